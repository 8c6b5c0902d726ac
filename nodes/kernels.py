"""The node's table of runnable operations, built once from the allow-list in `fedptr.ops`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from fedptr.errors import OpNotAllowedError
from fedptr.ops import IN_PLACE, TENSOR_METHODS, TORCH_FUNCTIONS


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()  # type: ignore[no-untyped-call]
    return torch.empty(0)


def _grad(t: torch.Tensor) -> torch.Tensor:
    if t.grad is None:
        raise ValueError("this tensor has no gradient (call backward on a loss that uses it first)")
    return t.grad


def _zero_grad(t: torch.Tensor | nn.Module) -> torch.Tensor:
    if isinstance(t, nn.Module):
        t.zero_grad(set_to_none=True)
        return torch.empty(0)
    t.grad = None
    return t


def _forward(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise TypeError("forward needs a model as its first argument")
    out: torch.Tensor = model(*inputs)
    return out


def _parameter(model: nn.Module, index: int) -> torch.Tensor:
    params = list(model.parameters())
    if type(index) is not int or not 0 <= index < len(params):
        raise IndexError(f"the model has {len(params)} parameters; no index {index!r}")
    return params[index]


def _in_place(name: str) -> Callable[..., Any]:
    method = getattr(torch.Tensor, name)

    def update(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return method(t, *args, **kwargs)

    return update


OPERATIONS: dict[str, Callable[..., Any]] = {name: getattr(torch.Tensor, name) for name in TENSOR_METHODS}
OPERATIONS.update({name: getattr(torch, name) for name in TORCH_FUNCTIONS})
OPERATIONS.update({name: _in_place(name) for name in IN_PLACE})
OPERATIONS.update(
    {
        "backward": _backward,
        "grad": _grad,
        "zero_grad": _zero_grad,
        "requires_grad_": torch.Tensor.requires_grad_,
        "forward": _forward,
        "parameter": _parameter,
        "cross_entropy": functional.cross_entropy,
        "mse_loss": functional.mse_loss,
    }
)


def run(op: str, args: list[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """Run allow-listed `op`. Raises OpNotAllowedError for a name off the list, TypeError when the
    result is not a tensor, and whatever torch raises for bad arguments."""
    fn = OPERATIONS.get(op)
    if fn is None:
        raise OpNotAllowedError("", f"operation {op!r} is not allowed")
    if args and isinstance(args[0], nn.Module) and op not in ("forward", "parameter", "zero_grad"):
        raise TypeError(f"{op} takes tensors, not a model")
    result = fn(*args, **kwargs)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"operation {op!r} returned {type(result).__name__}, not a tensor")
    return result
