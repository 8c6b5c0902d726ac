"""What a remote result will look like, worked out on the client without a round trip.

A pointer carries a *meta* tensor: a tensor on torch's ``meta`` device, which has a shape, a
dtype and ``requires_grad`` but no data. When an operation is issued, `infer` runs it on the
meta tensors of its operands (and a meta copy of a model), which costs microseconds and gives
the result's shape and dtype exactly as torch computes them. When torch cannot say without the
data (``x[mask]``, ``nonzero``) `infer` gives None, and the pointer learns its shape from the
worker's reply instead.

Importing this module (so the client) runs one meta op, which makes torch load its meta
kernels: about two seconds and 70 MB once per process, paid before any connection exists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch
from torch import nn

from fedptr import modules
from fedptr.tensors import DTYPE_BY_NAME
from fedptr.torchops import TORCH

META = torch.device("meta")
CACHE_SIZE = 4096
"""How many inferred results `infer` remembers. Running an op on meta tensors costs up to a few
hundred microseconds; a training loop repeats the same ops on the same shapes, which then cost a
dictionary lookup."""


def of_tensor(t: torch.Tensor) -> torch.Tensor:
    """The meta tensor of `t`: its shape, dtype and ``requires_grad``, no data."""
    return torch.empty(t.shape, dtype=t.dtype, device=META, requires_grad=t.requires_grad)


def described(shape: list[int] | tuple[int, ...], dtype: str, requires_grad: bool = False) -> torch.Tensor | None:
    """The meta tensor a worker describes as `shape` and wire `dtype` (None for an unknown dtype)."""
    torch_dtype = DTYPE_BY_NAME.get(dtype)
    if torch_dtype is None:
        return None
    grad = requires_grad and (torch_dtype.is_floating_point or torch_dtype.is_complex)
    return torch.empty(tuple(shape), dtype=torch_dtype, device=META, requires_grad=grad)


def model(spec: Mapping[str, Any], training: bool = True) -> nn.Module:
    """A model built from `spec` on the meta device (no memory for its parameters)."""
    with META:
        built = modules.build(dict(spec))
    built.train(training)
    return built


def _empty(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty(0, device=META)


def _grad(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, requires_grad=False)


def _forward(m: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    out = m(*inputs)
    result: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return result


def _parameter(m: nn.Module, index: int) -> torch.Tensor:
    return list(m.parameters())[index]


def _state(m: nn.Module, name: str) -> torch.Tensor:
    value: torch.Tensor = m.state_dict(keep_vars=True)[name]
    return value


def _getitem(t: torch.Tensor, *index: Any) -> torch.Tensor:
    return t[index]


def _to(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``Tensor.to`` without its device arguments (the worker only has the CPU)."""
    kwargs.pop("device", None)
    rest = [a for a in args if not isinstance(a, (str, torch.device))]
    return t.to(*rest, **kwargs)


def _aggregate(inputs: list[torch.Tensor], *weights: Any) -> torch.Tensor:
    return torch.empty_like(inputs[0], requires_grad=False)


_SPECIAL: dict[str, Callable[..., torch.Tensor]] = {
    "backward": _empty,
    "train": _empty,
    "grad": _grad,
    "forward": _forward,
    "parameter": _parameter,
    "state": _state,
    "getitem": _getitem,
    "to": _to,
    "aggregate_mean": _aggregate,
}
"""The shape rules of the registry's `Shape.RULE` ops (what torch's meta device cannot run as
is); tests/test_opinfo.py checks they match."""


def _function(op: str) -> Callable[..., Any] | None:
    return _SPECIAL.get(op) or TORCH.get(op)


_ATOMS = frozenset({bool, int, float, str, type(None)})


class _Uncacheable(Exception):
    """An argument has no structural key (its result is inferred every time)."""


def _key(value: Any, pinned: list[object]) -> Hashable:
    """What the result of an op depends on in `value`: shapes, dtypes, requires_grad, scalars.
    A model is keyed by identity and pinned, so its id is not reused while the entry lives."""
    kind = type(value)  # cheap checks first: this runs for every operand of every op
    if kind is torch.Tensor or isinstance(value, torch.Tensor):
        return ("T", value.shape, value.dtype, value.requires_grad)  # a torch.Size hashes as its tuple
    if kind in _ATOMS:
        return (kind.__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple([_key(v, pinned) for v in value]))
    if kind is dict or isinstance(value, Mapping):
        return ("D", tuple(sorted((str(k), _key(v, pinned)) for k, v in value.items())))
    if isinstance(value, nn.Module):
        pinned.append(value)
        return ("M", id(value))
    if value is Ellipsis or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return (type(value).__name__, value)
    if isinstance(value, slice):
        return ("S", _key(value.start, pinned), _key(value.stop, pinned), _key(value.step, pinned))
    raise _Uncacheable


_CACHE: OrderedDict[Hashable, tuple[Inferred, list[object]]] = OrderedDict()


Inferred = torch.Tensor | tuple[torch.Tensor, ...] | None
"""What `infer` gives: a result's meta tensor, a tuple of them for an op with several results
(``max(dim=)``, ``split``), or None."""


def _detached(result: Any) -> torch.Tensor | None:
    if not isinstance(result, torch.Tensor) or result.device != META:
        return None
    return result.detach().requires_grad_(result.requires_grad)


def _stand_ins(value: Any) -> Any:
    """`value` with each meta tensor (nested in lists, tuples and dicts) replaced by a fresh one
    of the same shape, dtype and ``requires_grad``: the operands a pointer holds are shared (a
    result's meta is every pointer's that the same op made on the same shapes, and the key of
    fedptr.pointer's table), and a call that writes an argument (F.normalize's fifth, ``out``,
    resizes it) would change them all."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device=META, requires_grad=value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)([_stand_ins(v) for v in value])
    if isinstance(value, Mapping):
        return {k: _stand_ins(v) for k, v in value.items()}
    return value


def _run(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Inferred:
    fn = _function(op)
    if fn is None:
        return None
    try:
        # on stand-ins, made only when nothing was cached for these shapes: a few µs per operand
        result = fn(*_stand_ins(args), **_stand_ins(kwargs))
    except Exception:
        return None
    if isinstance(result, tuple):  # torch's named tuples (values, indices) too
        metas = [_detached(r) for r in result]
        return None if None in metas else tuple(m for m in metas if m is not None)
    return _detached(result)


def infer(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Inferred:
    """The meta tensor of `op`'s result on meta `args`/`kwargs` (a tuple of them for an op with
    several results), or None when torch cannot tell without the data (or the op fails; the
    worker then reports the real error). Results are remembered by the operands' shapes, dtypes
    and values (`CACHE_SIZE`)."""
    pinned: list[object] = []
    try:
        key: Hashable = (op, _key(args, pinned), _key(kwargs, pinned))
    except _Uncacheable:
        return _run(op, args, kwargs)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit[0]
    result = _run(op, args, kwargs)
    _CACHE[key] = (result, pinned)
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _load_meta_kernels() -> None:
    """Run one op on the meta device. torch loads its Python meta kernels (and sympy) on the
    first one, which takes a second or two: done when this module is imported, before a client
    connects, so it never stalls a running event loop past its heartbeats."""
    probe = torch.empty(1, device=META)
    torch.add(probe, probe)


_load_meta_kernels()
