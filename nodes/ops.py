"""The node's table of runnable operations, built once from the allow-list in `fedptr.ops`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedptr.ops import TENSOR_METHODS, TORCH_FUNCTIONS

OPERATIONS: dict[str, Callable[..., Any]] = {name: getattr(torch.Tensor, name) for name in TENSOR_METHODS}
OPERATIONS.update({name: getattr(torch, name) for name in TORCH_FUNCTIONS})


def run(op: str, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """Run allow-listed `op`. Raises PermissionError for a name off the list, TypeError when the
    result is not a tensor, and whatever torch raises for bad arguments."""
    fn = OPERATIONS.get(op)
    if fn is None:
        raise PermissionError(f"operation {op!r} is not allowed")
    result = fn(*args, **kwargs)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"operation {op!r} returned {type(result).__name__}, not a tensor")
    return result
