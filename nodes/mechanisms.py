"""The differential-privacy mechanisms nodes run: the only ways a value derived from private
data leaves its owner's node (besides ``--release exact``). Their sensitivity is bounded by
clipping done here, on the node, whatever function of the data the client chose.

* **M1, DP aggregate (owner level).** An owner clips a value to its own L2 bound C (`clip`)
  and charges its budget for the aggregator's noise; the aggregator releases the mean of
  single-use contributions of at least k distinct owners of its roster, with Gaussian noise of
  standard deviation ``max(noise_multiplier * C)`` added to the sum (`release_mean`; both
  rounded to one fine grid first, so that the addition is exact: `noised`): under
  add/remove-one-owner adjacency each owner's release is a Gaussian mechanism with at least its
  own noise multiplier.
* **M2, DP-SGD (sample level).** `dp_sgd` trains a model on the node's own data: each step the
  node samples the batch itself (Poisson, rate q, rounded up to what a float64 draw realises
  exactly), computes each sample's gradient of a
  per-sample loss on that sample alone (``torch.func``: vmap of grad, the model run on a batch of
  one), clips each to C, adds N(0, (sigma C)^2) to their sum (in float64, whatever the model's
  dtype) and steps; a model's dropout draws from a state of torch's default generator of its
  own (`guard.own_draws`), never from the client's. Each step is a
  subsampled Gaussian mechanism with (sigma, q), charged before it runs. Parameters changed only
  by such steps are released by post-processing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional

from fedptr import limits, wire
from fedptr.errors import InvalidArgumentError, PermissionDenied

from .guard import meta_result, own_draws

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
    """`value` scaled down to L2 norm at most `bound`: a detached copy, in `value`'s dtype.

    Raises InvalidArgumentError for a value that is not floating point (a dtype is public: the
    refusal tells nothing of the data). The norm is taken in float64; a value with a non-finite
    entry counts as zeros (a NaN made the scale a no-op, an infinity a NaN), and the result's
    norm is checked, in its own dtype, before anyone charges for it. A refusal for a non-finite
    value would tell the client, uncharged, a bit of the data: zeros are a value of bounded
    norm like any other, so the release stays a Gaussian mechanism."""
    if not value.is_floating_point():
        raise InvalidArgumentError(f"a contribution is a floating-point tensor, not {value.dtype}")
    # a copy even when `value` is float64 already (`to` would return it, and an unscaled value
    # within the bound would leave as the live tensor: a write run while its charge awaits its
    # thread, after every check, changed what left)
    v = value.detach().to(torch.float64, copy=True)
    norm = float(v.norm())
    if not math.isfinite(norm):  # a NaN or infinity in it (or a float64 norm that overflows)
        v, norm = torch.zeros_like(v), 0.0
    if norm > bound:
        # rounding to the value's dtype moves each entry by at most eps/2 relative: aim that far below
        v = v * (bound / (norm * (1 + torch.finfo(value.dtype).eps)))
    clipped = v.to(value.dtype)
    if not float(clipped.to(torch.float64).norm()) <= bound:  # NaN fails too
        raise InvalidArgumentError("a contribution could not be clipped to its bound")
    return clipped


def private_generator() -> torch.Generator:
    """A generator for one release's noise and sampling, seeded from the OS (`secrets`).

    Clients draw from torch's default generator (``rand_like``, ``randn_like``, dropout), so
    whoever observes or steers it must learn nothing of a mechanism's noise: the mechanisms
    never touch it, and no two releases share a seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


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
    bound = sum(c.clip for c in contributions)
    check_range(std, bound, values[0].dtype)
    with torch.no_grad():
        total = torch.stack([v.detach().to(torch.float64) for v in values]).sum(0)
        noisy = noised(total, std, bound, private_generator())
        return (noisy / len(values)).to(values[0].dtype)


def noised(total: torch.Tensor, std: float, bound: float, generator: torch.Generator) -> torch.Tensor:
    """`total` (each entry at most `bound` in magnitude) plus Gaussian noise of standard deviation
    `std`, in float64, both rounded first to one grid, a power of two
    `limits.DP_NOISE_GRID_BITS` bits below the larger of `std` and `bound`: their sum is then
    exact. A rounded float sum tells its addends apart: 1 plus noise in (-3/4, -1/2) has the
    last bit of its mantissa even every time, the noise alone half the time, so a float64
    release told an owner's contribution from none with certainty (Mironov 2012, "On
    significance of the least significant bits for differential privacy"; docs/REDTEAM.md,
    twenty-first round). On the grid the noise is a Gaussian rounded to the grid's multiples
    and the sensitivity grows by at most a grid step per entry (sqrt(d) steps in L2 over d
    entries), 2^-40 of the larger of sigma C and the bound: not charged, far below the noise.
    The grid is what a release's last bits show: `std` and `bound` must be public."""
    grid = max(math.ldexp(1.0, math.frexp(max(std, bound))[1] - limits.DP_NOISE_GRID_BITS), _SMALLEST_NORMAL)
    noise = torch.randn(total.shape, dtype=torch.float64, generator=generator) * std
    return torch.round(total.to(torch.float64) / grid) * grid + torch.round(noise / grid) * grid


def check_range(std: float, bound: float, dtype: torch.dtype) -> None:
    """Raise InvalidArgumentError unless a release's arithmetic stays finite in `dtype` (and in
    float64, where `noised` computes): its sum, at most `bound` in magnitude, plus its noise to
    `limits.DP_NOISE_SPAN` deviations of `std`, twice over (the sum's partial sums and the
    rounding to `noised`'s grid take a little more). Past that range a sum overflowed to
    infinity, which is not the sum the noise was sized for: the noise rounded to an infinity
    too (`math.frexp(inf)` set a grid of 2^-40), and their sum was NaN or kept the sum's sign,
    a function of the data (twenty-second red-team round). Decided from public figures (the
    clips, the noise multipliers, the sample count, the dtype) before any noise is drawn, so the
    refusal tells nothing; a mechanism calls it before its charge (DP-SGD) or its release (M1)."""
    reach = bound + limits.DP_NOISE_SPAN * std
    if not 2 * reach <= min(torch.finfo(dtype).max, _LARGEST):  # NaN and infinity fail too
        raise InvalidArgumentError(
            f"a release's sum (at most {bound:g}) and noise (std {std:g}) could leave {dtype}'s finite range"
        )


_LARGEST = torch.finfo(torch.float64).max
"""`noised` computes in float64, whatever the release's dtype."""

_SMALLEST_NORMAL = torch.finfo(torch.float64).tiny
"""A grid finer than this would be subnormal, where a division by it is no longer exact."""


def check_run(config: wire.DPTrain, n: int) -> None:
    """Raise InvalidArgumentError for a DP-SGD run that is not well defined on `n` samples."""
    if config.loss not in LOSSES:
        raise InvalidArgumentError(f"DP-SGD takes a per-sample loss: {', '.join(LOSSES)}; not {config.loss!r}")
    if not (config.lr > 0 and 0 < config.sample_rate <= 1 and config.steps >= 1 and config.max_grad_norm > 0):
        raise InvalidArgumentError("DP-SGD needs lr > 0, 0 < sample_rate <= 1, steps >= 1, max_grad_norm > 0")
    if config.max_grad_norm < limits.DP_MIN_GRAD_NORM:
        raise InvalidArgumentError(f"DP-SGD needs max_grad_norm >= {limits.DP_MIN_GRAD_NORM:g}")
    if config.noise_multiplier <= 0 or n == 0:
        raise InvalidArgumentError("DP-SGD needs noise_multiplier > 0 and some data")
    # every step's clipped sum is within n C (the grid's bound in `dp_sgd`), its noise sigma C
    check_range(config.noise_multiplier * config.max_grad_norm, n * config.max_grad_norm, torch.float64)


def check_per_sample(model: nn.Module) -> None:
    """Raise InvalidArgumentError for a model whose DP-SGD training would release more than
    its noised, clipped per-sample gradients: buffers (BatchNorm's running statistics) are
    written by every forward from the raw batch and never noised, and batch normalisation mixes
    the samples of a batch, so no per-sample gradient is one sample's alone (Opacus refuses it
    too). LayerNorm normalises each sample by itself. A trainable parameter must be real
    floating point (a complex one has no clip here: its run failed after the charge)."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise InvalidArgumentError(
            f"DP-SGD trains models without buffers: a forward writes {buffers[0]!r} from the raw data, unprotected"
        )
    for name, p in model.named_parameters():
        if p.requires_grad and not p.is_floating_point():
            # complex gradients have no real L2 clip here: the run would fail after its charge
            raise InvalidArgumentError(f"DP-SGD trains real floating-point parameters, not {name!r} of {p.dtype}")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise InvalidArgumentError("DP-SGD cannot train batch normalisation (it mixes samples); use LayerNorm")


def check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: wire.DPTrain) -> None:
    """Refuse, from shapes alone (meta tensors), a model and loss that cannot run on the data:
    a failure in the real run could otherwise depend on values."""
    out = meta_result("forward", [model, x[:2]], {})
    assert isinstance(out, torch.Tensor)  # a forward gives one tensor
    LOSSES[config.loss](out, torch.empty(y[:2].shape, dtype=y.dtype, device="meta"), reduction="sum")


def dp_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: wire.DPTrain) -> None:
    """Train `model` in place for `config.steps` DP-SGD steps on (`x`, `y`).

    A sample whose computation fails (a value the meta check could not foresee) contributes no
    gradient, the others do (`_clipped_sum`), so the reply never depends on the data."""
    n = len(x)
    loss = _sample_loss(model, LOSSES[config.loss])
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    generator = private_generator()
    rate = realised_rate(config.sample_rate)
    # A model's dropout draws from torch's default generator, which the client draws from and
    # sees: how much a step drew depended on the data (a batch failing on a label out of range
    # is computed again, sample by sample) and on the batch sizes. Its own state, put back after.
    with own_draws():
        for _ in range(config.steps):
            batch = torch.nonzero(torch.rand(n, dtype=torch.float64, generator=generator) < rate).flatten()
            detached = {name: p.detach() for name, p in named.items()}
            summed = _clipped_sum(loss, detached, x[batch], y[batch], config.max_grad_norm)
            with torch.no_grad():
                std = config.noise_multiplier * config.max_grad_norm
                for p, g in zip(named.values(), summed, strict=True):
                    # a float64 update: `p` (of any dtype) is rounded once, after the noise, which is
                    # post-processing; noise drawn and added in a bfloat16 model's dtype vanished in
                    # the rounding of a large sum. Added on `noised`'s grid: a float64 model's
                    # weights would show the sum's last bits. The grid's bound is n C, public (the
                    # update divides by q n): len(batch) C set a grid that the weights' last bits
                    # showed, and so the realised batch size, which Poisson sampling hides
                    noisy = noised(g, std, n * config.max_grad_norm, generator)
                    p.sub_(config.lr * noisy / (config.sample_rate * n))


def realised_rate(sample_rate: float) -> float:
    """The Poisson rate `dp_sgd` samples at, and so the rate its steps are charged at, for a
    requested `sample_rate` in (0, 1]: rounded up to a multiple of 2^-53.

    A float64 uniform draw from torch is k / 2^53 for k uniform in [0, 2^53), so ``u < r`` holds
    with probability exactly r for such an r, and with probability ceil(q 2^53) / 2^53 for any
    other q. (Drawn in float32, the resolution was 2^-24: a client asking q = 1e-30, charged
    epsilon 36 for 512 steps at sigma 0.05, had each sample drawn with probability 2^-24,
    whose epsilon is about 19,000.)"""
    return math.ceil(sample_rate * _UNIFORM_STEPS) / _UNIFORM_STEPS


_UNIFORM_STEPS = 2.0**53
"""How many values a float64 `torch.rand` draw takes, evenly spaced in [0, 1)."""


SampleLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
"""The loss of one sample (no batch dimension) as a function of the parameters."""


def _sample_loss(model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> SampleLoss:
    """The loss of `model` on one sample, run as a batch of one: whatever the model does across
    its batch (a sum over dimension 0, ``Softmax(dim=0)``, ``Flatten(0)``, a graph's
    ``x - x.mean(0)``) sees that sample alone, so no sample's gradient depends on another's.
    (Per-layer per-sample gradients, Opacus's GradSampleModule, assume the layers never mix
    samples: a model that did moved every sample's clipped gradient with one sample.)"""

    def loss(params: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (x1.unsqueeze(0),))
        return loss_fn(out, y1.unsqueeze(0), reduction="sum")

    return loss


def _clipped_sum(
    loss: SampleLoss, params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, bound: float
) -> list[torch.Tensor]:
    """The sum of the batch's per-sample gradients of `loss` at `params`, each clipped to
    `bound`, in float64 (norms, scales and the sum), in the order of `params`. Summed in the
    parameters' dtype, the sum was rounded to it: in bfloat16 one sample moved a sum near 1024 by
    8 (its spacing there), whatever the clip.

    One sample moves the sum by at most `bound`, whatever its values: a sample whose gradient is
    not finite contributes zero, and when the batch fails as a whole (an out-of-range label or
    embedding index in some sample) each sample is computed alone and only those that fail
    contribute zero. Dropping the whole batch instead let one sample move the step by the
    batch's sum."""
    if len(xb) == 0:
        return [torch.zeros_like(p, dtype=torch.float64) for p in params.values()]
    try:
        grads = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(params, xb, yb)
        samples = [g.reshape(len(xb), -1) for g in grads.values()]
    except Exception:
        rows = [_sample_gradient_or_zero(loss, params, xb[i], yb[i]) for i in range(len(xb))]
        samples = [torch.stack([r[k] for r in rows]) for k in range(len(params))]
    norms = torch.stack([torch.linalg.vector_norm(s, dim=1, dtype=torch.float64) for s in samples]).norm(dim=0)
    factor = (bound / (norms + 1e-6)).clamp(max=1.0)
    # Kept: a finite gradient (no NaN or infinity anywhere in it) whose scale is not subnormal.
    # A subnormal scale rounds by up to half its own size (a weight of 3e307 and C = 1e-16 gave
    # 1.9 C): a gradient that far past C contributes zero, like a non-finite one.
    kept = torch.isfinite(norms) & (factor >= torch.finfo(torch.float64).tiny)
    factor = torch.where(kept, factor, 0.0)
    if not bool(kept.all()):
        samples = [torch.where(kept[:, None], s, 0.0) for s in samples]  # 0 * NaN would be NaN
    return [(factor @ s.to(torch.float64)).reshape(p.shape) for s, p in zip(samples, params.values(), strict=True)]


def _sample_gradient_or_zero(
    loss: SampleLoss, params: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor
) -> list[torch.Tensor]:
    """One sample's gradient, flattened per parameter, or zeros when its computation fails."""
    try:
        return [g.reshape(-1) for g in grad(loss)(params, x1, y1).values()]
    except Exception:
        return [torch.zeros(p.numel(), dtype=p.dtype) for p in params.values()]
