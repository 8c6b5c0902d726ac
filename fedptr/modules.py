"""Models as data: an allow-listed `nn.Module` as an architecture spec plus raw parameters.

A spec is plain msgpack-able data, e.g. ``{"type": "Linear", "in_features": 64,
"out_features": 10, "bias": True}``; `build` makes a module only from the layer types in
LAYERS, with checked arguments, so nothing about a received model is ever executed as code.
Parameters travel in `module.parameters()` order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedptr import limits, wire
from fedptr.errors import ProtocolError
from fedptr.tensors import from_raw, to_raw

MAX_WIDTH = 1 << 16
"""Largest feature or channel count."""


def _int(spec: dict[str, Any], key: str, low: int = 0, high: int = MAX_WIDTH) -> int:
    v = spec.get(key)
    if type(v) is not int or not low <= v <= high:
        raise ValueError(f"{spec.get('type')}.{key} must be an int in [{low}, {high}], not {v!r}")
    return v


def _pair(spec: dict[str, Any], key: str, low: int) -> tuple[int, int]:
    v = spec.get(key)
    if type(v) is not list or len(v) != 2 or any(type(x) is not int or not low <= x <= 64 for x in v):
        raise ValueError(f"{spec.get('type')}.{key} must be two ints >= {low}, not {v!r}")
    return v[0], v[1]


def _bool(spec: dict[str, Any], key: str) -> bool:
    v = spec.get(key)
    if type(v) is not bool:
        raise ValueError(f"{spec.get('type')}.{key} must be a bool, not {v!r}")
    return v


def spec_of(module: nn.Module, depth: int = 0) -> dict[str, Any]:
    """The spec of `module`. Raises TypeError for any layer outside the allow-list."""
    if depth > limits.MAX_MODULE_DEPTH:
        raise TypeError(f"modules nest deeper than {limits.MAX_MODULE_DEPTH}")
    t = type(module)
    m: Any = module  # the exact type is checked below; subclasses are refused
    if t is nn.Sequential:
        return {"type": "Sequential", "children": [spec_of(c, depth + 1) for c in m]}
    if t is nn.Linear:
        return {
            "type": "Linear",
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        }
    if t is nn.Conv2d:
        if not isinstance(m.padding, tuple) or m.padding_mode != "zeros":
            raise TypeError("Conv2d: only numeric padding with padding_mode='zeros' can be sent")
        return {
            "type": "Conv2d",
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size),
            "stride": list(m.stride),
            "padding": list(m.padding),
            "dilation": list(m.dilation),
            "groups": m.groups,
            "bias": m.bias is not None,
        }
    if t is nn.ReLU:
        return {"type": "ReLU"}
    if t is nn.Flatten:
        return {"type": "Flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}
    if t is nn.Dropout:
        return {"type": "Dropout", "p": float(m.p)}
    raise TypeError(f"{t.__name__} is not an allowed module (allowed: {', '.join(sorted(LAYERS))})")


def build(spec: Any, depth: int = 0, count: list[int] | None = None) -> nn.Module:
    """A fresh module from `spec`. Raises ValueError for anything not in the allow-list or out of bounds."""
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > limits.MAX_MODULE_LAYERS or depth > limits.MAX_MODULE_DEPTH:
        raise ValueError(
            f"a model may have at most {limits.MAX_MODULE_LAYERS} layers nested {limits.MAX_MODULE_DEPTH} deep"
        )
    if type(spec) is not dict or spec.get("type") not in LAYERS:
        raise ValueError(f"not an allowed layer spec: {spec!r:.100}")
    kind = spec["type"]
    if kind == "Sequential":
        children = spec.get("children")
        if type(children) is not list:
            raise ValueError("Sequential.children must be a list")
        return nn.Sequential(*[build(c, depth + 1, count) for c in children])
    if kind == "Linear":
        return nn.Linear(_int(spec, "in_features", 1), _int(spec, "out_features", 1), bias=_bool(spec, "bias"))
    if kind == "Conv2d":
        return nn.Conv2d(
            _int(spec, "in_channels", 1),
            _int(spec, "out_channels", 1),
            _pair(spec, "kernel_size", 1),
            stride=_pair(spec, "stride", 1),
            padding=_pair(spec, "padding", 0),
            dilation=_pair(spec, "dilation", 1),
            groups=_int(spec, "groups", 1),
            bias=_bool(spec, "bias"),
        )
    if kind == "ReLU":
        return nn.ReLU()
    if kind == "Flatten":
        return nn.Flatten(_int(spec, "start_dim", -8, 8), _int(spec, "end_dim", -8, 8))
    p = spec.get("p")
    if type(p) is not float or not 0.0 <= p < 1.0:
        raise ValueError(f"Dropout.p must be a float in [0, 1), not {p!r}")
    return nn.Dropout(p)


LAYERS = frozenset({"Sequential", "Linear", "Conv2d", "ReLU", "Flatten", "Dropout"})
"""The layer types a model may be built from."""


def load_parameters(module: nn.Module, params: list[torch.Tensor]) -> None:
    """Copy `params` into `module`'s parameters, in order. Raises ValueError on a count, shape or dtype mismatch."""
    own = list(module.parameters())
    if len(own) != len(params):
        raise ValueError(f"the model has {len(own)} parameters, {len(params)} were sent")
    with torch.no_grad():
        for mine, theirs in zip(own, params, strict=True):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise ValueError(
                    f"parameter of {tuple(mine.shape)} {mine.dtype} got {tuple(theirs.shape)} {theirs.dtype}"
                )
            mine.copy_(theirs)


def to_wire(module: nn.Module) -> tuple[dict[str, Any], list[wire.Value]]:
    """`module` as its spec and raw parameters (TypeError outside the allow-list)."""
    return spec_of(module), [to_raw(p) for p in module.parameters()]


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
