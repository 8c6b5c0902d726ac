"""fedptr: remote tensor pointers for federated, privacy-preserving machine learning in asyncio.

``import fedptr`` is cheap: the client, which imports torch, loads on first use of its names, so
the broker can use `fedptr.wire` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedptr.errors import (
    ClientClosedError,
    ConsumedPointerError,
    DeadlineExceeded,
    FedptrError,
    InDoubtError,
    InvalidArgumentError,
    LocationMismatchError,
    LostWorkerError,
    ObjectNotFoundError,
    OpNotAllowedError,
    OverloadedError,
    PermissionDenied,
    ProtocolError,
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
    from fedptr.client import Client, ObjectInfo, Worker, connect
    from fedptr.cluster import Cluster, local_cluster
    from fedptr.pointer import ModulePointer, Pointer

_LAZY = {
    "Client": "fedptr.client",
    "ObjectInfo": "fedptr.client",
    "Worker": "fedptr.client",
    "connect": "fedptr.client",
    "Cluster": "fedptr.cluster",
    "local_cluster": "fedptr.cluster",
    "Pointer": "fedptr.pointer",
    "ModulePointer": "fedptr.pointer",
}

__all__ = [
    "Client",
    "ClientClosedError",
    "Cluster",
    "ConsumedPointerError",
    "DeadlineExceeded",
    "FedptrError",
    "InDoubtError",
    "InvalidArgumentError",
    "LocationMismatchError",
    "LostWorkerError",
    "ModulePointer",
    "ObjectInfo",
    "ObjectNotFoundError",
    "OpNotAllowedError",
    "OverloadedError",
    "PermissionDenied",
    "Pointer",
    "ProtocolError",
    "RegistrationRefused",
    "RemoteError",
    "StoreFullError",
    "TooManyInFlightError",
    "UnknownWorkerError",
    "UnsupportedTypeError",
    "UsageError",
    "Worker",
    "WorkerRefused",
    "connect",
    "local_cluster",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedptr' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
