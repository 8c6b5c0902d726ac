"""fedptr: remote tensor pointers for federated, privacy-preserving machine learning in asyncio.

``import fedptr`` is cheap: the client, which imports torch, loads on first use of its names
(and submodules such as ``fedptr.optim`` on first use as attributes), so the broker can use
`fedptr.wire` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedptr.errors import (
    BroadcastError,
    BudgetExhaustedError,
    ClientClosedError,
    ConsumedPointerError,
    DataDependentError,
    DeadlineExceeded,
    DropoutError,
    FedptrError,
    InDoubtError,
    InvalidArgumentError,
    LocationMismatchError,
    LostWorkerError,
    NotAwaitedError,
    ObjectNotFoundError,
    OpNotAllowedError,
    OverloadedError,
    PermissionDenied,
    ProtocolError,
    QuotaExceededError,
    RegistrationRefused,
    RemoteError,
    StoreFullError,
    TooManyInFlightError,
    UnknownWorkerError,
    UnsupportedTypeError,
    UsageError,
    WorkerRefused,
)

if TYPE_CHECKING:
    from fedptr import aggregate as aggregate
    from fedptr import data as data
    from fedptr import dp as dp
    from fedptr import logs as logs
    from fedptr import meta as meta
    from fedptr import modules as modules
    from fedptr import opinfo as opinfo
    from fedptr import ops as ops
    from fedptr import optim as optim
    from fedptr import tensors as tensors
    from fedptr.broadcasting import broadcast
    from fedptr.client import Client, ObjectInfo, Worker, connect
    from fedptr.cluster import Cluster, LocalCluster, local_cluster
    from fedptr.plans import Plan, plan
    from fedptr.pointer import ModulePointer, Pending, Pointer

_LAZY = {
    "broadcast": "fedptr.broadcasting",
    "Client": "fedptr.client",
    "ObjectInfo": "fedptr.client",
    "Worker": "fedptr.client",
    "connect": "fedptr.client",
    "Cluster": "fedptr.cluster",
    "local_cluster": "fedptr.cluster",
    "LocalCluster": "fedptr.cluster",
    "Pointer": "fedptr.pointer",
    "ModulePointer": "fedptr.pointer",
    "Pending": "fedptr.pointer",
    "Plan": "fedptr.plans",
    "plan": "fedptr.plans",
}
_SUBMODULES = frozenset(
    {
        "aggregate",
        "awaiting",
        "broadcasting",
        "client",
        "cluster",
        "data",
        "direct",
        "dp",
        "envelope",
        "errors",
        "failures",
        "graphs",
        "heap",
        "limits",
        "link",
        "logs",
        "meta",
        "metrics",
        "modules",
        "opinfo",
        "ops",
        "optim",
        "plans",
        "pointer",
        "pointer_methods",
        "processes",
        "progress",
        "security",
        "session",
        "shm",
        "status",
        "streams",
        "tensors",
        "torchops",
        "wire",
        "zio",
    }
)
"""Every submodule, reachable as an attribute after ``import fedptr`` (``fedptr.optim.SGD``,
``fedptr.dp.train``), imported on first use; tests/test_docs.py checks that none is missing."""

__all__ = [
    "BroadcastError",
    "BudgetExhaustedError",
    "Client",
    "ClientClosedError",
    "Cluster",
    "ConsumedPointerError",
    "DataDependentError",
    "DeadlineExceeded",
    "DropoutError",
    "FedptrError",
    "InDoubtError",
    "InvalidArgumentError",
    "LocalCluster",
    "LocationMismatchError",
    "LostWorkerError",
    "ModulePointer",
    "NotAwaitedError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "OpNotAllowedError",
    "OverloadedError",
    "Pending",
    "PermissionDenied",
    "Plan",
    "Pointer",
    "ProtocolError",
    "QuotaExceededError",
    "RegistrationRefused",
    "RemoteError",
    "StoreFullError",
    "TooManyInFlightError",
    "UnknownWorkerError",
    "UnsupportedTypeError",
    "UsageError",
    "Worker",
    "WorkerRefused",
    "broadcast",
    "connect",
    "local_cluster",
    "plan",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fedptr.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedptr' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
