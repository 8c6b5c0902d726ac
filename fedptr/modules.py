"""Models as data: an allow-listed `nn.Module` as an architecture spec plus raw parameters.

A spec is plain msgpack-able data, e.g. ``{"type": "Linear", "in_features": 64,
"out_features": 10, "bias": True}``; `build` makes a module only from the layer types in
LAYERS, with checked arguments, so nothing about a received model is ever executed as code.
Parameters and buffers (BatchNorm's running statistics) travel in `module.state_dict()` order.

A custom architecture is a `nn.Sequential` of the layers in LAYERS (nested as needed), or the
same as a spec written by hand: ``build({"type": "Sequential", "children": [...]})``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedptr import graphs, limits, wire
from fedptr.errors import ProtocolError, UnsupportedTypeError
from fedptr.tensors import from_raw, to_raw

MAX_WIDTH = 1 << 16
"""Largest feature or channel count."""
MAX_VOCABULARY = 1 << 20
"""Largest Embedding table."""


@dataclass(frozen=True)
class Arg:
    """One constructor argument of a layer: its spec key (the constructor's keyword), how a
    spec value is checked (`check` returns the value to pass, or raises ValueError saying what
    it must be), and how `spec_of` reads it off a module (default: the attribute of that name,
    tuples as lists)."""

    key: str
    check: Callable[[Any], Any]
    read: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Layer:
    """An allowed layer type: its class, its arguments, and `refuse`, which names a setting
    of a module that cannot travel (None when it can)."""

    cls: type[nn.Module]
    args: tuple[Arg, ...] = ()
    refuse: Callable[[Any], str | None] = lambda m: None


def integer(low: int = 0, high: int = MAX_WIDTH, optional: bool = False) -> Callable[[Any], int | None]:
    """A checker: an int in [low, high] (or None if `optional`)."""

    def check(v: Any) -> int | None:
        if optional and v is None:
            return None
        if type(v) is not int or not low <= v <= high:
            raise ValueError(f"must be an int in [{low}, {high}]{' or None' if optional else ''}, not {v!r:.40}")
        return v

    return check


def integers(n: int, low: int = 0, high: int = 64) -> Callable[[Any], tuple[int, ...]]:
    """A checker: a list of `n` ints in [low, high] (1 to 8 of them when `n` is 0)."""

    def check(v: Any) -> tuple[int, ...]:
        ok_len = type(v) is list and (len(v) == n if n else 1 <= len(v) <= 8)
        if not ok_len or any(type(x) is not int or not low <= x <= high for x in v):
            raise ValueError(f"must be {n or '1 to 8'} ints in [{low}, {high}], not {v!r:.40}")
        return tuple(v)

    return check


def real(low: float, high: float, optional: bool = False) -> Callable[[Any], float | None]:
    """A checker: a float in [low, high) (or None if `optional`)."""

    def check(v: Any) -> float | None:
        if optional and v is None:
            return None
        if type(v) is not float or not low <= v < high:
            raise ValueError(f"must be a float in [{low}, {high}){' or None' if optional else ''}, not {v!r:.40}")
        return v

    return check


def boolean(v: Any) -> bool:
    """A checker: a bool."""
    if type(v) is not bool:
        raise ValueError(f"must be a bool, not {v!r:.40}")
    return v


def choice(*allowed: str) -> Callable[[Any], str]:
    """A checker: one of the strings `allowed`."""

    def check(v: Any) -> str:
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {v!r:.40}")
        return str(v)

    return check


def _has_bias(m: Any) -> bool:
    return m.bias if isinstance(m.bias, bool) else m.bias is not None


def _ints_of(key: str, n: int) -> Callable[[Any], Any]:
    def read(m: Any) -> Any:
        v = getattr(m, key)
        return [v] * n if type(v) is int else v

    return read


def _pair(key: str, low: int) -> Arg:
    return Arg(key, integers(2, low), _ints_of(key, 2))


def _conv_refuse(m: Any) -> str | None:
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return "only numeric padding with padding_mode='zeros' can be sent"
    return None


def _conv(cls: type[nn.Module], n: int) -> Layer:
    return Layer(
        cls,
        (
            Arg("in_channels", integer(1)),
            Arg("out_channels", integer(1)),
            Arg("kernel_size", integers(n, 1)),
            Arg("stride", integers(n, 1)),
            Arg("padding", integers(n, 0)),
            Arg("dilation", integers(n, 1)),
            Arg("groups", integer(1)),
            Arg("bias", boolean, _has_bias),
        ),
        _conv_refuse,
    )


def _batch_norm(cls: type[nn.Module]) -> Layer:
    return Layer(
        cls,
        (
            Arg("num_features", integer(1)),
            Arg("eps", real(0.0, 1.0)),
            Arg("momentum", real(0.0, 1.0, optional=True)),
            Arg("affine", boolean),
            Arg("track_running_stats", boolean),
        ),
    )


def _recurrent(cls: type[nn.Module]) -> Layer:
    return Layer(
        cls,
        (
            Arg("input_size", integer(1)),
            Arg("hidden_size", integer(1)),
            Arg("num_layers", integer(1, 64)),
            Arg("bias", boolean, _has_bias),
            Arg("batch_first", boolean),
            Arg("dropout", real(0.0, 1.0)),
            Arg("bidirectional", boolean),
        ),
        lambda m: "LSTM projections (proj_size) cannot be sent" if getattr(m, "proj_size", 0) else None,
    )


def _pool(cls: type[nn.Module], *extra: Arg) -> Layer:
    return Layer(
        cls,
        (_pair("kernel_size", 1), _pair("stride", 1), _pair("padding", 0), Arg("ceil_mode", boolean), *extra),
        lambda m: "divisor_override cannot be sent" if getattr(m, "divisor_override", None) else None,
    )


def _no_max_norm(m: Any) -> str | None:
    return "max_norm cannot be sent" if m.max_norm is not None or m.sparse else None


LAYERS: dict[str, Layer] = {
    "Sequential": Layer(nn.Sequential),
    "Linear": Layer(
        nn.Linear, (Arg("in_features", integer(1)), Arg("out_features", integer(1)), Arg("bias", boolean, _has_bias))
    ),
    "Conv1d": _conv(nn.Conv1d, 1),
    "Conv2d": _conv(nn.Conv2d, 2),
    "ReLU": Layer(nn.ReLU),
    "Sigmoid": Layer(nn.Sigmoid),
    "Tanh": Layer(nn.Tanh),
    "Identity": Layer(nn.Identity),
    "GELU": Layer(nn.GELU, (Arg("approximate", choice("none", "tanh")),)),
    "Softmax": Layer(nn.Softmax, (Arg("dim", integer(-8, 8, optional=True)),)),
    "LogSoftmax": Layer(nn.LogSoftmax, (Arg("dim", integer(-8, 8, optional=True)),)),
    "Flatten": Layer(nn.Flatten, (Arg("start_dim", integer(-8, 8)), Arg("end_dim", integer(-8, 8)))),
    "Dropout": Layer(nn.Dropout, (Arg("p", real(0.0, 1.0), lambda m: float(m.p)),)),
    "BatchNorm1d": _batch_norm(nn.BatchNorm1d),
    "BatchNorm2d": _batch_norm(nn.BatchNorm2d),
    "LayerNorm": Layer(
        nn.LayerNorm,
        (
            Arg("normalized_shape", integers(0, 1, MAX_WIDTH)),
            Arg("eps", real(0.0, 1.0)),
            Arg("elementwise_affine", boolean),
            Arg("bias", boolean, _has_bias),
        ),
    ),
    "MaxPool2d": _pool(nn.MaxPool2d, _pair("dilation", 1)),
    "AvgPool2d": _pool(nn.AvgPool2d, Arg("count_include_pad", boolean)),
    "Embedding": Layer(
        nn.Embedding,
        (
            Arg("num_embeddings", integer(1, MAX_VOCABULARY)),
            Arg("embedding_dim", integer(1)),
            Arg("padding_idx", integer(0, MAX_VOCABULARY, optional=True)),
        ),
        _no_max_norm,
    ),
    "LSTM": _recurrent(nn.LSTM),
    "GRU": _recurrent(nn.GRU),
}
"""The layer types a model may be built from, by spec ``type``. A spec names a type and gives
every argument of its `Layer`; nothing else in it is read."""


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def spec_of(module: nn.Module, depth: int = 0) -> dict[str, Any]:
    """The spec of `module`. Raises UnsupportedTypeError (a TypeError) for any layer outside the allow-list (subclasses
    included) or a setting that cannot travel."""
    if depth > limits.MAX_MODULE_DEPTH:
        raise UnsupportedTypeError(f"modules nest deeper than {limits.MAX_MODULE_DEPTH}")
    name = type(module).__name__
    layer = LAYERS.get(name)
    if layer is None or layer.cls is not type(module):
        raise UnsupportedTypeError(f"{name} is not an allowed module (allowed: {', '.join(sorted(LAYERS))})")
    if layer.cls is nn.Sequential:
        return {"type": name, "children": [spec_of(c, depth + 1) for c in module.children()]}
    refusal = layer.refuse(module)
    if refusal:
        raise UnsupportedTypeError(f"{name}: {refusal}")
    spec: dict[str, Any] = {"type": name}
    for arg in layer.args:
        value = _plain(arg.read(module) if arg.read else getattr(module, arg.key))
        try:
            arg.check(value)
        except ValueError as e:
            raise UnsupportedTypeError(f"{name}.{arg.key} cannot be sent: it {e}") from None
        spec[arg.key] = value
    return spec


def build(spec: Any, depth: int = 0, count: list[int] | None = None) -> nn.Module:
    """A fresh module from `spec`. Raises ValueError for anything not in the allow-list or out of bounds."""
    if depth == 0 and type(spec) is dict and spec.get("type") == graphs.GRAPH:
        return graphs.build(spec, [0])
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > limits.MAX_MODULE_LAYERS or depth > limits.MAX_MODULE_DEPTH:
        raise ValueError(
            f"a model may have at most {limits.MAX_MODULE_LAYERS} layers nested {limits.MAX_MODULE_DEPTH} deep"
        )
    if type(spec) is not dict or spec.get("type") not in LAYERS:
        raise ValueError(f"not an allowed layer spec: {spec!r:.100}")
    kind = spec["type"]
    layer = LAYERS[kind]
    if layer.cls is nn.Sequential:
        children = spec.get("children")
        if type(children) is not list:
            raise ValueError("Sequential.children must be a list")
        return nn.Sequential(*[build(c, depth + 1, count) for c in children])
    kwargs = {}
    for arg in layer.args:
        try:
            kwargs[arg.key] = arg.check(spec.get(arg.key))
        except ValueError as e:
            raise ValueError(f"{kind}.{arg.key} {e}") from None
    return layer.cls(**kwargs)


def load_parameters(module: nn.Module, params: list[torch.Tensor]) -> None:
    """Copy `params` into `module`'s parameters and buffers, in state_dict order. Raises
    ValueError on a count, shape or dtype mismatch."""
    own = list(module.state_dict(keep_vars=True).values())
    if len(own) != len(params):
        raise ValueError(f"the model has {len(own)} parameters and buffers, {len(params)} were sent")
    with torch.no_grad():
        for mine, theirs in zip(own, params, strict=True):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise ValueError(
                    f"parameter of {tuple(mine.shape)} {mine.dtype} got {tuple(theirs.shape)} {theirs.dtype}"
                )
            mine.copy_(theirs)


def to_wire(module: nn.Module, copy: bool = False) -> tuple[dict[str, Any], list[wire.Value]]:
    """`module` as its spec and raw parameters and buffers (views, `to_raw`; with `copy`, immutable
    copies of their bytes): a layer spec when it is built from LAYERS alone, else its graph
    (fedptr/graphs.py). Raises UnsupportedTypeError (a TypeError) naming what cannot travel."""
    try:
        spec = spec_of(module)
    except UnsupportedTypeError:
        spec = graphs.capture(module)
    return spec, [to_raw(p, copy) for p in module.state_dict().values()]


def from_wire(spec: dict[str, Any], params: list[wire.Value]) -> nn.Module:
    """The model a spec and raw parameters describe; ValueError or ProtocolError when they do not fit."""
    model = build(spec)
    tensors = []
    for p in params:
        if not isinstance(p, wire.RawTensor):
            raise ProtocolError("model parameters must be tensors")
        tensors.append(from_raw(p))
    load_parameters(model, tensors)
    return model
