"""The torch function behind each op of the registry (`fedptr.opinfo`), resolved once.

The client's ``__torch_function__`` and meta inference, graph models and the node's kernels all
call torch through this table, so what an op name runs is decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional

from fedptr.opinfo import REGISTRY, Call, OpInfo

_HOMES: dict[Call, Any] = {Call.METHOD: torch.Tensor, Call.TORCH: torch, Call.FUNCTIONAL: functional}


def _resolve(info: OpInfo) -> Callable[..., Any]:
    fn: Callable[..., Any] = getattr(_HOMES[info.call], info.target)
    return fn


TORCH: dict[str, Callable[..., Any]] = {
    name: _resolve(info) for name, info in REGISTRY.items() if info.call is not Call.SPECIAL
}
"""Op name → the torch function, method or functional it runs (specials have kernels of their own)."""


def dispatched() -> dict[Any, str]:
    """torch callable → op name, for ``__torch_function__``: each dispatchable op's own function,
    and for a tensor method its ``torch.<name>`` twin where torch has one (``torch.add``)."""
    names: dict[Any, str] = {}
    for name, info in REGISTRY.items():
        if not info.dispatch or info.call is Call.SPECIAL:
            continue
        names[TORCH[name]] = name
        twin = getattr(torch, info.target, None) if info.call is Call.METHOD else None
        if twin is not None:
            names.setdefault(twin, name)
    return names
