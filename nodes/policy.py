"""The privacy policy a node enforces: where private data may go and what may leave.

Every tensor carries its *origins*: the data owners whose private data it derives from, each
with the workers that owner trusts. Private data gets its owner as origin when the node loads
it; an operation's result inherits the union of its inputs' origins, an in-place update adds
them to its target, and `backward` adds the loss's origins to every gradient it fills.

* get: refused for anything with origins (PermissionDenied names the owner), except released
  aggregates;
* move: an object with origins goes only to its owners or to workers every owner trusts;
* release: an aggregator node (``--aggregator``) computes the mean or weighted mean of
  same-shaped inputs, one per data owner, from at least `k` owners; the result has no origins
  and is marked released. Optional Gaussian noise after clipping each input (DP) is added there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedptr import limits
from fedptr.errors import PermissionDenied

Origins = dict[str, frozenset[str]]
"""Data owner -> the workers it trusts."""

_ORIGINS = "_fedptr_origins"
_RELEASED = "_fedptr_released"


@dataclass
class PolicyConfig:
    """What a node's flags set."""

    name: str
    trust: frozenset[str] = frozenset()
    """Workers this node, as a data owner, lets its private data (and what derives from it) go to."""
    aggregator: bool = False
    """Whether this node may release aggregates."""
    min_owners: int = limits.MIN_OWNERS
    """k: an aggregate needs inputs from at least this many distinct owners."""
    max_weight_ratio: float = limits.MAX_WEIGHT_RATIO
    """Largest ratio between two weights of a weighted mean (so no weight can single one input out)."""
    dp_noise_multiplier: float = 0.0
    """sigma: Gaussian noise with std sigma * clip / n is added to a released mean (0: none)."""
    dp_clip: float = 0.0
    """C: each input is scaled down to L2 norm C before averaging (0: no clipping)."""


def origins_of(value: Any) -> Origins:
    """The origins of a tensor, or the union over a module's parameters."""
    if isinstance(value, nn.Module):
        return merge(origins_of(p) for p in value.parameters())
    out: Origins = getattr(value, _ORIGINS, {})
    return out


def merge(all_origins: Iterable[Origins]) -> Origins:
    out: Origins = {}
    for origins in all_origins:
        for owner, trusted in origins.items():
            out[owner] = out.get(owner, trusted) & trusted
    return out


def taint(value: Any, origins: Origins) -> None:
    """Add `origins` to a tensor (or every parameter of a module)."""
    if not origins:
        return
    if isinstance(value, nn.Module):
        for p in value.parameters():
            taint(p, origins)
        return
    if isinstance(value, torch.Tensor):
        setattr(value, _ORIGINS, merge([origins_of(value), origins]))
        if getattr(value, _RELEASED, False):
            setattr(value, _RELEASED, False)


def to_wire(origins: Origins) -> dict[str, Any]:
    return {owner: sorted(trusted) for owner, trusted in origins.items()}


def from_wire(data: Mapping[str, Any]) -> Origins:
    """Origins sent by another node; malformed entries raise ValueError."""
    out: Origins = {}
    for owner, trusted in data.items():
        if type(trusted) is not list or not all(type(t) is str for t in trusted):
            raise ValueError("origins must map owners to lists of worker names")
        out[owner] = frozenset(trusted)
    return out


def release_kind(value: Any) -> str:
    """How a value may leave: ``"aggregate"``, ``"public"``, or raise PermissionDenied."""
    origins = origins_of(value)
    if origins:
        owner = sorted(origins)[0]
        raise PermissionDenied(
            owner, f"this object derives from {owner!r}'s private data; only aggregates are released"
        )
    return "aggregate" if getattr(value, _RELEASED, False) else "public"


def check_move(value: Any, dest: str) -> None:
    """Refuse moving `value` to `dest` unless each owner is `dest` or trusts it."""
    for owner, trusted in sorted(origins_of(value).items()):
        if dest != owner and dest not in trusted:
            raise PermissionDenied(owner, f"{owner!r} does not trust {dest!r} with its data")


def aggregate(config: PolicyConfig, inputs: list[torch.Tensor], weights: list[float] | None) -> torch.Tensor:
    """The released mean (or weighted mean) of `inputs`, one per data owner, from >= k owners."""
    if not config.aggregator:
        raise PermissionDenied(config.name, f"{config.name!r} is not an aggregator; nothing is released here")
    if not inputs:
        raise PermissionDenied(config.name, "an aggregate needs inputs")
    owners: list[str] = []
    for t in inputs:
        origins = origins_of(t)
        if len(origins) != 1:
            who = ", ".join(sorted(origins)) or "no one"
            raise PermissionDenied(
                sorted(origins)[0] if origins else config.name,
                f"each input must derive from exactly one data owner's data, not from {who}",
            )
        owners.extend(origins)
    if len(set(owners)) != len(owners):
        dup = next(o for o in owners if owners.count(o) > 1)
        raise PermissionDenied(dup, f"the inputs must be one per data owner; {dup!r} gave {owners.count(dup)}")
    if len(owners) < config.min_owners:
        raise PermissionDenied(
            owners[0], f"an aggregate needs at least {config.min_owners} data owners, not {len(owners)}"
        )
    shape = inputs[0].shape
    if any(t.shape != shape for t in inputs):
        raise ValueError("aggregated inputs must all have the same shape")
    n = len(inputs)
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n or any(not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0) for w in weights):
        raise ValueError("weights must be one positive number per input")
    if max(weights) / min(weights) > config.max_weight_ratio:
        raise PermissionDenied(owners[0], f"weights may differ by at most {config.max_weight_ratio}x")
    with torch.no_grad():
        stacked = torch.stack([t.detach().to(torch.float64) for t in inputs])
        if config.dp_clip > 0:
            norms = stacked.reshape(n, -1).norm(dim=1).clamp(min=1e-12)
            scale = (config.dp_clip / norms).clamp(max=1.0)
            stacked = stacked * scale.reshape(n, *([1] * (stacked.dim() - 1)))
        w = torch.tensor(weights, dtype=torch.float64)
        w = w / w.sum()
        mean = (stacked * w.reshape(n, *([1] * (stacked.dim() - 1)))).sum(0)
        if config.dp_noise_multiplier > 0:
            sensitivity = (config.dp_clip if config.dp_clip > 0 else 1.0) * float(w.max())
            mean = mean + torch.randn_like(mean) * config.dp_noise_multiplier * sensitivity
        result = mean.to(inputs[0].dtype)
    setattr(result, _RELEASED, True)
    return result
