"""The differential-privacy mechanisms nodes run: the only ways a value derived from private
data leaves its owner's node (besides ``--release exact``). Their sensitivity is bounded by
clipping done here, on the node, whatever function of the data the client chose.

* **M1, DP aggregate (owner level).** An owner clips a value to its own L2 bound C (`clip`)
  and charges its budget for the aggregator's noise; the aggregator releases the mean of
  single-use contributions of at least k distinct owners of its roster, with Gaussian noise of
  standard deviation ``max(noise_multiplier * C)`` added to the sum (`release_mean`): under
  add/remove-one-owner adjacency each owner's release is a Gaussian mechanism with at least its
  own noise multiplier.
* **M2, DP-SGD (sample level).** `dp_sgd` trains a model on the node's own data: each step the
  node samples the batch itself (Poisson, rate q), computes per-sample gradients of a per-sample
  loss with Opacus's GradSampleModule, clips each to C, adds N(0, (sigma C)^2) to their sum and
  steps. Each step is a subsampled Gaussian mechanism with (sigma, q), charged before it runs.
  Parameters changed only by such steps are released by post-processing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional

from fedptr import wire
from fedptr.errors import InvalidArgumentError, PermissionDenied

from .guard import meta_result

# torch warns on every DP-SGD step that Opacus's full backward hooks fire on module outputs
# "since no inputs require gradients": true and intended (nobody wants the gradient of the private
# data, and asking for it would cost a backward through the input); per-sample gradients of the
# parameters are unaffected. Only this message is silenced, and only in the node's process.
warnings.filterwarnings(
    "ignore",
    message="Full backward hook is firing when gradients are computed with respect to module outputs",
    category=UserWarning,
)

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": functional.cross_entropy,
    "mse_loss": functional.mse_loss,
}
"""Per-sample losses DP-SGD may use: each is a sum over samples of one term per sample."""


@dataclass(frozen=True)
class Contribution:
    """What makes a stored value a DP contribution: the owner that clipped it, to `clip`, and
    the noise multiplier it charged its budget for."""

    owner: str
    clip: float
    noise_multiplier: float


def clip(value: torch.Tensor, bound: float) -> torch.Tensor:
    """`value` scaled down to L2 norm at most `bound` (a copy, detached)."""
    v = value.detach().to(torch.float64)
    scale = min(1.0, bound / max(float(v.norm()), 1e-12))
    return (v * scale).to(value.dtype)


def release_mean(
    values: list[torch.Tensor], contributions: list[Contribution], roster: frozenset[str], min_owners: int
) -> torch.Tensor:
    """The noised mean of contributions, one per owner of `roster`, from at least `min_owners`.
    Raises PermissionDenied when they do not meet that, InvalidArgumentError for mixed shapes."""
    owners = [c.owner for c in contributions]
    for owner in owners:
        if owner not in roster:
            raise PermissionDenied(owner, f"{owner!r} is not on this aggregator's roster of data owners")
    if len(set(owners)) != len(owners):
        dup = next(o for o in owners if owners.count(o) > 1)
        raise PermissionDenied(dup, f"an aggregate takes one contribution per owner; {dup!r} gave {owners.count(dup)}")
    if len(owners) < min_owners:
        raise PermissionDenied(
            owners[0] if owners else "", f"a release needs contributions of at least {min_owners} owners"
        )
    if any(v.shape != values[0].shape for v in values):
        raise InvalidArgumentError("contributions must all have the same shape")
    std = max(c.noise_multiplier * c.clip for c in contributions)
    with torch.no_grad():
        total = torch.stack([v.detach().to(torch.float64) for v in values]).sum(0)
        noisy = total + torch.randn_like(total) * std
        return (noisy / len(values)).to(values[0].dtype)


def check_run(config: wire.DPTrain, n: int) -> None:
    """Raise InvalidArgumentError for a DP-SGD run that is not well defined on `n` samples."""
    if config.loss not in LOSSES:
        raise InvalidArgumentError(f"DP-SGD takes a per-sample loss: {', '.join(LOSSES)}; not {config.loss!r}")
    if not (config.lr > 0 and 0 < config.sample_rate <= 1 and config.steps >= 1 and config.max_grad_norm > 0):
        raise InvalidArgumentError("DP-SGD needs lr > 0, 0 < sample_rate <= 1, steps >= 1, max_grad_norm > 0")
    if config.noise_multiplier <= 0 or n == 0:
        raise InvalidArgumentError("DP-SGD needs noise_multiplier > 0 and some data")


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: wire.DPTrain) -> None:
    """Refuse, from shapes alone (meta tensors), a model and loss that cannot run on the data:
    a failure in the real run could otherwise depend on values."""
    out = meta_result("forward", [model, x[:2]], {})
    assert out is not None
    LOSSES[config.loss](out, torch.empty(y[:2].shape, dtype=y.dtype, device="meta"), reduction="sum")


def dp_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: wire.DPTrain) -> None:
    """Train `model` in place for `config.steps` DP-SGD steps on (`x`, `y`).

    A step whose computation fails (a value the meta check could not foresee) contributes no
    gradient, only noise, so the reply never depends on the data."""
    n = len(x)
    loss_fn = LOSSES[config.loss]
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        for _ in range(config.steps):
            batch = torch.nonzero(torch.rand(n) < config.sample_rate).flatten()
            summed = _clipped_sum(gsm, params, x[batch], y[batch], loss_fn, config.max_grad_norm)
            with torch.no_grad():
                for p, g in zip(params, summed, strict=True):
                    noise = torch.randn_like(g) * (config.noise_multiplier * config.max_grad_norm)
                    p.sub_(config.lr * (g + noise) / (config.sample_rate * n))
    finally:
        gsm._close()
        for p in params:
            p.grad = None


def _clipped_sum(
    gsm: GradSampleModule,
    params: list[nn.Parameter],
    xb: torch.Tensor,
    yb: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    bound: float,
) -> list[torch.Tensor]:
    zeros = [torch.zeros_like(p) for p in params]
    if len(xb) == 0:
        return zeros
    for p in params:
        p.grad = None
        p.grad_sample = None  # type: ignore[attr-defined]
    try:
        loss_fn(gsm(xb), yb, reduction="sum").backward()  # type: ignore[no-untyped-call]
        samples = [p.grad_sample.reshape(len(xb), -1) for p in params]  # type: ignore[attr-defined]
    except Exception:
        return zeros
    norms = torch.stack([s.norm(dim=1) for s in samples]).norm(dim=0)
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)
    return [(factor @ s).reshape(p.shape) for s, p in zip(samples, params, strict=True)]
