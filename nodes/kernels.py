"""The node's table of runnable operations, built once from the op registry (`fedptr.opinfo`):
torch's own function for each op (`fedptr.torchops`), and the kernels of the special ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedptr.errors import OpNotAllowedError
from fedptr.opinfo import REGISTRY, Call, Model
from fedptr.ops import DEVICE_PREFIX, DTYPE_PREFIX, ELLIPSIS_KEY, SLICE_KEY, WRITING_KEYWORDS
from fedptr.tensors import DTYPE_BY_NAME
from fedptr.torchops import TORCH

MODULE_OPS = frozenset(n for n, i in REGISTRY.items() if i.model is not Model.NO)
"""The operations that take a model as their first argument."""
MODEL_ONLY = frozenset(n for n, i in REGISTRY.items() if i.model is Model.YES)
"""Module operations that need a model (``zero_grad`` also takes a tensor)."""


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()  # type: ignore[no-untyped-call]
    return torch.empty(0)


def _grad(t: torch.Tensor) -> torch.Tensor:
    # a copy, made here: the result checks that copy an alias (guard.unshared, the lean loop's)
    # read a leaf's gradient only (torch fills no other), but set_grad gives a non-leaf one, and
    # the live gradient handed out let a write through it reach t.grad behind t's taint
    grad = t._grad  # a non-leaf's without torch's warning
    if grad is None:
        raise ValueError("this tensor has no gradient (call backward on a loss that uses it first)")
    return grad.detach().clone()


def _zero_grad(t: torch.Tensor | nn.Module) -> torch.Tensor:
    if isinstance(t, nn.Module):
        t.zero_grad(set_to_none=True)
        return torch.empty(0)
    t.grad = None
    return t


def _forward(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    out = model(*inputs)
    if isinstance(out, tuple):  # recurrent layers: (output, hidden state); the output is the result
        out = out[0]
    result: torch.Tensor = out
    return result


def _parameter(model: nn.Module, index: int) -> torch.Tensor:
    params = list(model.parameters())
    if type(index) is not int or not 0 <= index < len(params):
        raise IndexError(f"the model has {len(params)} parameters; no index {index!r}")
    return params[index]


def _train(model: nn.Module, mode: bool = True) -> torch.Tensor:
    if type(mode) is not bool:
        raise TypeError("train takes a bool")
    model.train(mode)
    return torch.empty(0)


def _state(model: nn.Module, name: str) -> torch.Tensor:
    state = model.state_dict(keep_vars=True)
    if type(name) is not str or name not in state:
        raise KeyError(f"the model has no parameter or buffer {name!r}")
    value: torch.Tensor = state[name]
    return value


def _set_grad(t: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    # a copy: a gradient sharing `grad`'s memory would let a backward write into that tensor,
    # whose taint the policy does not know to grow
    t.grad = None if grad is None else grad.detach().clone()
    return t


def _set_data(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    # a copy (writes through `t` must not reach `data`), and a new version: a graph that saved
    # `t` before must fail rather than differentiate through values it was not built from
    t.data = data.detach().clone()
    torch.autograd.graph.increment_version(t)
    return t


def _not_writing(fn: Callable[..., Any], writing: tuple[str, ...]) -> Callable[..., Any]:
    """`fn` (a functional op with `writing` parameters: `fedptr.ops.WRITING_KEYWORDS`) refusing
    any of them given, by keyword or by position: a write would change an operand behind the
    policy's back."""
    signature = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs).arguments
        for name in writing:
            value = bound.get(name)
            if value is not None and value is not False:
                raise TypeError(f"{fn.__name__} may not write into an argument ({name}=)")
        return fn(*args, **kwargs)

    return call


def _slice_bound(v: Any) -> int | None:
    if v is None or type(v) is int:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v)
    raise TypeError(f"slice bounds must be ints or None, not {type(v).__name__}")


def _index_part(part: Any) -> Any:
    if type(part) is dict and set(part) == {SLICE_KEY} and type(part[SLICE_KEY]) is list and len(part[SLICE_KEY]) == 3:
        return slice(*[_slice_bound(b) for b in part[SLICE_KEY]])
    if type(part) is dict and part == {ELLIPSIS_KEY: True}:
        return Ellipsis
    if part is None or type(part) in (int, bool) or isinstance(part, torch.Tensor):
        return part
    if type(part) is list and all(type(i) is int for i in part):
        return torch.tensor(part, dtype=torch.int64)
    raise TypeError(f"not an index: {part!r:.60}")


def _getitem(t: torch.Tensor, *index: Any) -> torch.Tensor:
    result: torch.Tensor = t[tuple(_index_part(i) for i in index)]
    return result


def _setitem(t: torch.Tensor, value: Any, *index: Any) -> torch.Tensor:
    with torch.no_grad():
        t[tuple(_index_part(i) for i in index)] = value
    return t


def decode(value: Any) -> Any:
    """`value` with tagged strings (`fedptr.ops.DTYPE_PREFIX`, `DEVICE_PREFIX`) turned into a
    ``torch.dtype`` or ``torch.device``; ValueError for a dtype off the wire's list or a device
    other than the CPU."""
    if type(value) is str:
        if value.startswith(DTYPE_PREFIX):
            dtype = DTYPE_BY_NAME.get(value[len(DTYPE_PREFIX) :])
            if dtype is None:
                raise ValueError(f"unknown dtype {value!r:.60}")
            return dtype
        if value.startswith(DEVICE_PREFIX):
            if value != DEVICE_PREFIX + "cpu":
                raise ValueError(f"only the cpu device exists on a worker, not {value!r:.60}")
            return torch.device("cpu")
        return value
    if type(value) is list:
        for v in value:
            if type(v) in _NESTED:
                return [decode(v) for v in value]
        return value  # the common case: tensors and numbers, nothing to decode
    if type(value) is dict:
        return {k: decode(v) for k, v in value.items()} if value else value
    return value


_NESTED = (str, list, dict)


def _in_place(method: Callable[..., Any]) -> Callable[..., Any]:
    def update(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return method(t, *args, **kwargs)

    return update


def _writing(fn: Callable[..., Any]) -> tuple[str, ...]:
    """`fn`'s parameters that make it write an argument (`WRITING_KEYWORDS`)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: torch's C ops take `out` by keyword only
        return ()
    return tuple(sorted(WRITING_KEYWORDS & parameters.keys()))


SPECIAL: dict[str, Callable[..., Any]] = {
    "backward": _backward,
    "grad": _grad,
    "zero_grad": _zero_grad,
    "requires_grad_": torch.Tensor.requires_grad_,
    "set_grad": _set_grad,
    "set_data": _set_data,
    "getitem": _getitem,
    "setitem": _setitem,
    "forward": _forward,
    "parameter": _parameter,
    "train": _train,
    "state": _state,
}
"""The kernels of the registry's `Call.SPECIAL` ops (``aggregate_mean`` is the aggregator's
release, nodes/mechanisms.py); tests/test_opinfo.py checks they match."""


def _kernel(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    info = REGISTRY[name]
    if info.mutating:
        return _in_place(fn)  # updates run under no_grad, as an optimizer's step does
    writing = _writing(fn) if info.call is Call.FUNCTIONAL else ()
    return _not_writing(fn, writing) if writing else fn


OPERATIONS: dict[str, Callable[..., Any]] = {name: _kernel(name, fn) for name, fn in TORCH.items()} | SPECIAL
"""Every op a node runs, by name."""


Result = torch.Tensor | tuple[torch.Tensor, ...]
"""What an op gives: one tensor, or a tuple of them for an op with several results."""


def run(op: str, args: list[Any], kwargs: dict[str, Any]) -> Result:
    """Run allow-listed `op`. Raises OpNotAllowedError for a name off the list, TypeError when the
    result is not a tensor (or, for an op with several results, a tuple of them), and whatever
    torch raises for bad arguments."""
    fn = OPERATIONS.get(op)
    if fn is None:
        raise OpNotAllowedError("", f"operation {op!r} is not allowed")
    if args and isinstance(args[0], nn.Module):
        if op not in MODULE_OPS:
            raise TypeError(f"{op} takes tensors, not a model")
    elif op in MODEL_ONLY:
        raise TypeError(f"{op} needs a model as its first argument")
    if kwargs:
        result = fn(*decode(args), **decode(kwargs))
    else:
        for v in args:  # `decode`'s own scan, here: a flat list (most ops) needs no call to it
            if type(v) in _NESTED:
                args = decode(args)
                break
        result = fn(*args)
    return result if type(result) is torch.Tensor else checked(op, result)  # the common case: no call


def checked(op: str, result: Any) -> Result:
    """What `op`'s kernel returned, as a `Result`; TypeError when it is not a tensor (or, for an
    op with several results, a tuple of them)."""
    if isinstance(result, torch.Tensor):
        return result
    if REGISTRY[op].outputs != 1 and isinstance(result, tuple) and all(isinstance(r, torch.Tensor) for r in result):
        return tuple(result)  # torch's named tuples (values, indices) as plain ones
    raise TypeError(f"operation {op!r} returned {type(result).__name__}, not a tensor")


def results(value: Result, count: int) -> tuple[torch.Tensor, ...]:
    """`value` as the `count` results a request asked for; TypeError when torch gave another number."""
    outputs = value if isinstance(value, tuple) else (value,)
    if len(outputs) != count:
        raise TypeError(f"the operation gives {len(outputs)} results, not the {count} asked for")
    return outputs
