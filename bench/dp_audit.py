"""Empirical differential-privacy audit of M1, M2 and SecAgg+: ``python bench/dp_audit.py``.

In the manner of Jagielski et al. 2020 ("Auditing differentially private machine learning: how
private is private SGD?") and Nasr et al. 2021 ("Adversary instantiation"): run the real
mechanism (`fedptr.nodes.mechanisms`) many times on two neighbouring inputs, which differ in one
owner's contribution (M1) or one sample (M2) chosen by an adversary (a canary), compute a
statistic of each output, pick a threshold on half of the trials and count, on the other half,
how often the threshold test mistakes one world for the other. With Clopper-Pearson upper
bounds FPR_u and FNR_u on its two error rates (each at confidence 1 - (1 - c)/2, so that both
hold together with confidence c), any (epsilon, delta)-DP mechanism satisfies

    epsilon >= max(log((1 - delta - FNR_u) / FPR_u), log((1 - delta - FPR_u) / FNR_u))

so that value is a lower bound on the mechanism's real epsilon, at the accountant's delta. It
must not exceed what the accountant (Opacus's RDP accountant, through `nodes/budget.py`) charges
for the same parameters; a broken mechanism (clipping off, noise halved, a failing sample that
drops its batch), built here and only here, must push it above.

The neighbouring worlds, and why they are the right ones:

* **M1** (owner level): the target owner's contribution is the canary or zeros (its data absent:
  fedptr's client knows which owners contributed, so "absent" is a zero contribution, the
  zero-out form of add/remove adjacency, with sensitivity C like add/remove). Its partner, also
  chosen by the adversary, contributes zeros. The statistic is the released sum's coordinate
  along the canary direction, e_0. The trials are one `release_mean` on contributions of shape
  (trials, d): its noise is independent per element, so each row is one release.
* **M2** (sample level, DP-SGD): a linear model without bias and K canaries, canary k an input far
  from the data along e_k with a label far off (its gradient, clipped to C, points along e_k
  alone). The other world holds inert samples instead (zero input, zero label: zero gradient),
  so both worlds have n samples (the normalisation by q n is public either way). Sampling is
  Poisson per sample, clipping per sample and noise per coordinate, so weight k of one run
  depends only on canary k and its own noise: one `dp_sgd` run is K independent trials of the
  one-canary experiment (Steinke et al. 2023 insert many canaries in one run too; here the
  disjoint supports make the runs exactly independent). The statistic is weight k's change,
  scaled to units of C.
  Canaries that cannot be one of K independent trials (a sample that makes the batch fail, a
  non-finite input) are audited one per run, against m ordinary samples whose clipped gradients
  all push the same way: the statistic is the change of the model along that push. So is a far
  input to a hostile client's model that adds its batch's sum to every row (`BatchSum`, as a
  graph): DP-SGD computes each gradient on a batch of one, so it moves one clipped gradient; taken
  through the batch's forward instead (per-layer hooks' assumption), it moves every sample's.
* **SecAgg+** (owner level, `fedptr.nodes.secagg`, the owners' and the aggregator's real code):
  like M1, the target owner's value is the canary or zeros and the other owners contribute
  zeros, but every coordinate of a round is one trial (`secagg_statistics` says why that is
  sound, and why the clip is per trial), so a round of 2^20 coordinates is 2^20 releases. The
  statistic is the released sum's coordinate. Audited at `SA_DELTA`, which says why.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from fedptr.nodes import mechanisms, secagg
from fedptr.nodes.budget import Budget
from scipy import stats
from torch import nn
from torch.func import functional_call
from torch.nn import functional

from fedptr import modules, wire
from fedptr.errors import FedptrError
from fedptr.limits import DP_DELTA, MIN_OWNERS

CONFIDENCE = 0.95
"""The confidence of every lower bound (both error rates' Clopper-Pearson bounds hold together)."""

REFUSED = -math.inf
"""The statistic of a trial whose mechanism refused the input (the same refusal in every trial)."""


@dataclass(frozen=True)
class Bound:
    """An empirical lower bound on epsilon, with the held-out error rates it comes from."""

    epsilon: float
    """The lower bound (0 when the worlds were not told apart)."""
    fpr_upper: float
    fnr_upper: float
    trials: int
    """Trials per world, both halves."""


def accountant_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float = DP_DELTA) -> float:
    """What a data owner's budget charges for these parameters: nodes/budget.py, on a scratch store."""
    with tempfile.TemporaryDirectory() as store:
        return Budget("audit", math.inf, delta, Path(store)).charge(noise_multiplier, sample_rate, steps)


def tight_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float = DP_DELTA) -> float:
    """The epsilon of these parameters by Opacus's PRV accountant (numerical, nearly exact): how
    much of the gap between a lower bound and the charge is the RDP accountant's slack."""
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with np.errstate(all="ignore"):  # its log of 0 at q = 1 is harmless and masked
        return float(accountant.get_epsilon(delta))


def clopper_pearson_upper(errors: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided upper confidence bounds, at level 1 - alpha, on rates of `errors` in `n` trials."""
    upper = stats.beta.ppf(1 - alpha, errors + 1, np.maximum(n - errors, 1))
    return np.where(errors >= n, 1.0, upper)


def epsilon_bound(fp: np.ndarray, fn: np.ndarray, n0: int, n1: int, delta: float, confidence: float) -> np.ndarray:
    """The lower bounds on epsilon from threshold tests with `fp` false positives in `n0` trials
    of world 0 and `fn` false negatives in `n1` of world 1 (0 where they tell nothing)."""
    alpha = (1 - confidence) / 2  # a union bound over the two rates
    fpr, fnr = clopper_pearson_upper(fp, n0, alpha), clopper_pearson_upper(fn, n1, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log((1 - delta - fnr) / fpr)
        two = np.log((1 - delta - fpr) / fnr)
    return np.nan_to_num(np.maximum(np.maximum(one, two), 0.0), nan=0.0)


def _errors(s0: torch.Tensor, s1: torch.Tensor, thresholds: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """False positives (world 0 at or above a threshold) and negatives (world 1 below it)."""
    fp = len(s0) - torch.searchsorted(s0, thresholds, side="left")
    fn = torch.searchsorted(s1, thresholds, side="left")
    return fp.numpy(), fn.numpy()


def distinguish(s0: torch.Tensor, s1: torch.Tensor, delta: float, confidence: float = CONFIDENCE) -> Bound:
    """The lower bound on epsilon of the best threshold test on statistics `s0` (world 0) and
    `s1` (world 1): orientation and threshold chosen on the first half of each world's trials,
    errors counted on the second half. A NaN statistic counts as +inf (an outcome of its own)."""
    halves = []
    for s in (s0, s1):
        s = torch.nan_to_num(s.double().flatten(), nan=math.inf, posinf=math.inf, neginf=-math.inf)
        half = len(s) // 2
        halves.append((s[:half].sort().values, s[half:].sort().values))
    (train0, test0), (train1, test1) = halves
    best = (-1.0, 1.0, 0.0)  # (training bound, orientation, threshold)
    for sign in (1.0, -1.0):
        a0, a1 = (train0, train1) if sign > 0 else ((-train0).flip(0), (-train1).flip(0))
        pooled = torch.cat([a0, a1]).sort().values
        # thresholds at ranks spaced geometrically from both ends: the tails are where a bound is made
        ranks = np.unique(np.geomspace(1, len(pooled), 400).astype(np.int64) - 1)
        ranks = np.unique(np.concatenate([ranks, len(pooled) - 1 - ranks]))
        thresholds = pooled[torch.from_numpy(ranks)]
        fp, fn = _errors(a0, a1, thresholds)
        bounds = epsilon_bound(fp, fn, len(a0), len(a1), delta, confidence)
        i = int(bounds.argmax())
        if bounds[i] > best[0]:
            best = (float(bounds[i]), sign, float(thresholds[i]))
    _, sign, threshold = best
    e0, e1 = (test0, test1) if sign > 0 else ((-test0).flip(0), (-test1).flip(0))
    fp, fn = _errors(e0, e1, torch.tensor([threshold], dtype=torch.float64))
    alpha = (1 - confidence) / 2
    return Bound(
        epsilon=float(epsilon_bound(fp, fn, len(e0), len(e1), delta, confidence)[0]),
        fpr_upper=float(clopper_pearson_upper(fp, len(e0), alpha)[0]),
        fnr_upper=float(clopper_pearson_upper(fn, len(e1), alpha)[0]),
        trials=len(s0.flatten()),
    )


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """The mechanisms' generators seeded from `seed` (one new seed per release, in order), so
    that an audit is reproducible; `None` leaves them seeded from the OS, as deployed."""
    if seed is None:
        yield
        return
    seeds = torch.Generator().manual_seed(seed)

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=seeds)))

    with mock.patch.object(mechanisms, "private_generator", generator):
        yield


# --- M1 -------------------------------------------------------------------------------------

Clip = Callable[[torch.Tensor, float], torch.Tensor]

CHUNK = 1 << 18
"""M1 trials per `release_mean` call (bounds the memory of a vectorised run)."""


def m1_statistics(
    value: torch.Tensor,
    direction: torch.Tensor,
    trials: int,
    *,
    clip: float,
    noise_multiplier: float,
    clip_fn: Clip = mechanisms.clip,
) -> torch.Tensor:
    """`trials` releases of M1 where the target owner's value is `value` and its partner's is
    zeros (float32, given first: a release has the first contribution's dtype): each release's
    sum projected on the unit vector `direction`, in units of `clip`. A refused contribution (the
    same refusal every time) gives `REFUSED` for every trial."""
    try:
        contribution = clip_fn(value, clip)
    except FedptrError:
        return torch.full((trials,), REFUSED, dtype=torch.float64)
    owners = [mechanisms.Contribution(o, clip, noise_multiplier) for o in ("partner", "target")]
    roster = frozenset(c.owner for c in owners)
    on = direction != 0  # a NaN released off the canary's direction must not spoil the projection
    out = []
    for start in range(0, trials, CHUNK):
        rows = min(CHUNK, trials - start)
        target = contribution.expand(rows, *contribution.shape)
        released = mechanisms.release_mean([torch.zeros(target.shape), target], owners, roster, MIN_OWNERS)
        out.append(released[:, on].double() @ direction[on] * len(owners) / clip)
    return torch.cat(out)


def m1_bit_statistics(value: torch.Tensor, trials: int, *, clip: float, noise_multiplier: float) -> torch.Tensor:
    """`trials` releases of M1 in float64 (the target's and its partner's zeros both float64: a
    release has the first contribution's dtype), the target's value `value`, read as Mironov
    (2012) reads a floating-point release: the released coordinate e_0 in units of `clip`, or
    `REFUSED` (-inf) where that coordinate lies in (1/4, 1/2) and the last bit of its mantissa
    is odd. With the canary C e_0 present, the sum there is 1 plus noise in (-3/4, -1/2), whose
    float64 rounding leaves that bit even every time; absent, the noise alone is odd half the
    time: a threshold test with no false negatives at all."""
    owners = [mechanisms.Contribution(o, clip, noise_multiplier) for o in ("partner", "target")]
    roster = frozenset(c.owner for c in owners)
    contribution = mechanisms.clip(value.to(torch.float64), clip)
    out = []
    for start in range(0, trials, CHUNK):
        rows = min(CHUNK, trials - start)
        target = contribution.expand(rows, *contribution.shape)
        released = mechanisms.release_mean(
            [torch.zeros(target.shape, dtype=torch.float64), target], owners, roster, MIN_OWNERS
        )
        y = released[:, 0]
        units = y * len(owners) / clip
        odd = (y.view(torch.int64) & 1).bool() & (units > 0.25) & (units < 0.5)
        out.append(torch.where(odd, REFUSED, units))
    return torch.cat(out)


def canary_direction(absent: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The unit vector from `absent` to `present` (float64; non-finite coordinates count as 0)."""
    d = torch.nan_to_num(present.double() - absent.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return d / d.norm()


def m1_canaries(dim: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of (absent, present) values of the target owner's contribution."""
    far = torch.zeros(dim)
    far[0] = 1e6
    non_finite = far.clone()
    non_finite[1] = math.nan
    return {
        "max norm along e_0": (torch.zeros(dim), far),
        "non-finite (NaN beside it)": (torch.zeros(dim), non_finite),
        "int64 (refused)": (torch.zeros(dim, dtype=torch.int64), far.to(torch.int64)),
        "bool, all true (refused)": (torch.zeros(dim, dtype=torch.bool), torch.ones(dim, dtype=torch.bool)),
    }


def clip_off(value: torch.Tensor, bound: float) -> torch.Tensor:
    """Broken M1: no clipping."""
    return value.detach()


def clip_before_fix(value: torch.Tensor, bound: float) -> torch.Tensor:
    """Broken M1: the clip of before issue 18's fix (its code). ``min(1, C / nan)`` is 1, so a
    NaN anywhere left the value unclipped; a bool clipped back to its dtype is all true again."""
    v = value.detach().to(torch.float64)
    scale = min(1.0, bound / max(float(v.norm()), 1e-12))
    return (v * scale).to(value.dtype)


# --- M2 -------------------------------------------------------------------------------------


def m2_gradient_canaries(
    runs: int, canaries: int, config: wire.DPTrain, *, inert: int = 16, mirrored: bool = False
) -> torch.Tensor:
    """`runs` x `canaries` statistics of M2 with gradient canaries, world 0 (inert samples in
    their place, or with `mirrored` canaries whose gradient is the opposite, -C e_k: replace-one
    adjacency) then world 1 (stacked: shape (2, runs * canaries)); `config.loss` is ``mse_loss``."""
    k = canaries
    n = k + inert
    far = torch.cat([1e3 * torch.eye(k), torch.zeros(inert, k)])

    def labels(label: float) -> torch.Tensor:
        return torch.cat([torch.full((k, 1), label), torch.zeros(inert, 1)])

    absent = (far, labels(1e6)) if mirrored else (torch.zeros(n, k), torch.zeros(n, 1))
    worlds = []
    for x, y in (absent, (far, labels(-1e6))):
        rows = []
        for _ in range(runs):
            model = nn.Linear(k, 1, bias=False)
            nn.init.zeros_(model.weight)
            mechanisms.dp_sgd(model, x, y, config)
            # each canary's clipped gradient is +C e_k, so its weight moves by -lr C / (q n) per step it is in
            rows.append(
                -model.weight.detach()[0].double() * config.sample_rate * n / (config.lr * config.max_grad_norm)
            )
        worlds.append(torch.cat(rows))
    return torch.stack(worlds)


class BatchSum(nn.Module):
    """A hostile client's model: a linear map without bias of each row plus the sum of its
    batch's rows, so that one sample's input reaches every sample's output. It travels as a
    graph (`mixing_model`), as the node builds it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x + x.sum(0), self.weight)


def mixing_model() -> nn.Module:
    """`BatchSum` as a node builds it from the wire (a `fedptr.graphs.GraphModel`)."""
    return modules.from_wire(*modules.to_wire(BatchSum()))


def m2_batch_canary(
    runs: int,
    canary: tuple[torch.Tensor, torch.Tensor],
    config: wire.DPTrain,
    ordinary: int = 64,
    model: Callable[[], nn.Module] = lambda: nn.Linear(2, 2, bias=False),
) -> torch.Tensor:
    """`runs` statistics of M2 on `ordinary` samples, without then with `canary` (x, y) added
    (shape (2, runs)); two classes, two features, `config.loss` is ``cross_entropy``, a `model`
    whose one parameter, ``weight`` (2 x 2), starts at zeros. Each ordinary sample (10 e_0,
    class 0) has a gradient above the clip bound, and all push the model the same way: the
    statistic is how far the model moved along that push, in units of C."""
    xs = torch.zeros(ordinary, 2)
    xs[:, 0] = 10.0
    ys = torch.zeros(ordinary, dtype=torch.long)
    worlds = []
    for x, y in ((xs, ys), (torch.cat([xs, canary[0][None]]), torch.cat([ys, canary[1][None]]))):
        n = len(x)
        rows = []
        for _ in range(runs):
            trained = model()
            weight = dict(trained.named_parameters())["weight"]
            nn.init.zeros_(weight)
            mechanisms.dp_sgd(trained, x, y, config)
            w = weight.detach().double()
            push = (w[0, 0] - w[1, 0]) / math.sqrt(2)
            rows.append(push * config.sample_rate * n / (config.lr * config.max_grad_norm))
        worlds.append(torch.stack(rows))
    return torch.stack(worlds)


MIXING_CANARY = "far input to a model that sums its batch"
"""`m2_batch_canaries`' canary for `mixing_model`: its row reaches every row's input there."""


def m2_batch_canaries() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Samples that cannot be audited K at a time: each the (x, y) added in world 1."""
    return {
        "out-of-range label (fails the batch)": (torch.zeros(2), torch.tensor(2)),
        "non-finite input": (torch.tensor([math.nan, 0.0]), torch.tensor(0)),
        MIXING_CANARY: (torch.tensor([-1e4, 0.0]), torch.tensor(0)),
    }


@contextlib.contextmanager
def m2_clip_off() -> Iterator[None]:
    """Broken M2: per-sample gradients not clipped (the noise keeps its scale, sigma C)."""
    clipped_sum = mechanisms._clipped_sum

    def unclipped(
        loss: mechanisms.SampleLoss, params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, bound: float
    ) -> list[torch.Tensor]:
        return clipped_sum(loss, params, xb, yb, math.inf)

    with mock.patch.object(mechanisms, "_clipped_sum", unclipped):
        yield


@contextlib.contextmanager
def m2_drop_batch() -> Iterator[None]:
    """Broken M2, as before issue 18's fix: a batch that fails contributes nothing (every
    sample's fallback gradient is zero), so one failing sample removes the others' gradients."""

    def zero(
        loss: mechanisms.SampleLoss, params: dict[str, torch.Tensor], x1: torch.Tensor, y1: torch.Tensor
    ) -> list[torch.Tensor]:
        return [torch.zeros(p.numel(), dtype=p.dtype) for p in params.values()]

    with mock.patch.object(mechanisms, "_sample_gradient_or_zero", zero):
        yield


@contextlib.contextmanager
def m2_through_batch() -> Iterator[None]:
    """Broken M2: each sample's gradient taken through the forward of its whole batch (what
    per-layer per-sample gradients, Opacus's GradSampleModule, assume is the same), then clipped
    as the node does: with a model that mixes rows, one sample moves every sample's gradient."""
    clipped_sum = mechanisms._clipped_sum
    running: dict[str, Any] = {}  # the batch `through_batch` runs, and the row whose gradient it takes

    def sample_loss(model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> mechanisms.SampleLoss:
        def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, params, (running["batch"],))
            return loss_fn(out[running["row"] : running["row"] + 1], y[None], reduction="sum")

        return loss

    def through_batch(
        loss: mechanisms.SampleLoss, params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, bound: float
    ) -> list[torch.Tensor]:
        if len(xb) == 0:
            return clipped_sum(loss, params, xb, yb, bound)
        rows = []
        for i in range(len(xb)):
            running.update(batch=xb, row=i)
            rows.append(clipped_sum(loss, params, xb[i : i + 1], yb[i : i + 1], bound))
        return [torch.stack(r).sum(0) for r in zip(*rows, strict=True)]

    with (
        mock.patch.object(mechanisms, "_sample_loss", sample_loss),
        mock.patch.object(mechanisms, "_clipped_sum", through_batch),
    ):
        yield


# --- SecAgg+ ---------------------------------------------------------------------------------

SA_TARGET = "owner0"
"""The owner whose input is the canary; it never drops out."""


@dataclass(frozen=True)
class Dropouts:
    """Owners of a SecAgg+ round who drop out before each phase (the last ones by name first)."""

    advertise: int = 0
    share_keys: int = 0
    masked_input: int = 0

    def before(self, asked: Sequence[str]) -> tuple[set[str], set[str], set[str]]:
        """Who drops before advertising, before sharing keys, and before the masked input."""
        order = [o for o in reversed(asked) if o != SA_TARGET]
        a, s = self.advertise, self.advertise + self.share_keys
        return set(order[:a]), set(order[a:s]), set(order[s : s + self.masked_input])


def secagg_round(
    asked: Sequence[str],
    config_for: Callable[[tuple[str, ...]], secagg.Config],
    target: np.ndarray,
    dropouts: Dropouts,
    rng: np.random.Generator,
) -> np.ndarray:
    """One SecAgg+ round of the real protocol (nodes/secagg.py: the owners' and the aggregator's
    code), phase by phase as nodes/secure.py drives it, in one process: the round's config is
    fixed from the owners who advertised; `SA_TARGET` inputs `target`, every other owner zeros.
    Returns the unmasked sum of the survivors' noised inputs."""
    gone_advertise, gone_share, gone_masked = dropouts.before(asked)
    owners = {o: secagg.Owner(o) for o in asked}
    keys = {o: owner.advertise() for o, owner in owners.items() if o not in gone_advertise}
    config = config_for(tuple(sorted(keys)))
    aggregator = secagg.Aggregator(config)
    relayed = aggregator.relay_keys(keys)
    inbox = aggregator.route_shares({o: owners[o].share_keys(config, relayed) for o in relayed if o not in gone_share})
    zeros = np.zeros(config.dim)
    inputs = {
        o: owners[o].masked_input(target if o == SA_TARGET else zeros, inbox[o], rng)
        for o in inbox
        if o not in gone_masked
    }
    request = aggregator.collect(inputs)
    # every owner was told the same request, and says so
    total, _ = aggregator.finish({o: owners[o].unmask(request, request.survivors) for o in request.survivors})
    return total


def secagg_statistics(
    value: float,
    runs: int,
    *,
    dim: int,
    asked: Sequence[str],
    dropouts: Dropouts,
    min_survivors: int,
    clip: float,
    noise_multiplier: float,
    clip_fn: Clip = mechanisms.clip,
) -> torch.Tensor:
    """`runs` x `dim` trials of a SecAgg+ release where the target's value is `value`: each
    coordinate of a round is one trial, a 1-d release with sensitivity `clip`, in units of it.

    Why the coordinates are independent trials: each owner's noise and stochastic rounding are
    drawn independently per coordinate, and the masks cancel exactly (a mask that did not would
    make the sum uniform, which tells nothing). Why the clip is per trial: a trial is one
    coordinate, so its value is clipped alone, by the real `mechanisms.clip` on a 1-element
    tensor (the L2 clip over a whole vector is that same code, audited as M1), then broadcast to
    every coordinate. The round's `Config` then bounds the input vector's norm by what the clip
    left times sqrt(dim) (so the protocol's own check passes), and sizes each owner's noise for
    `clip` per coordinate, sigma C / sqrt(m), as the owners are charged."""
    clipped = float(clip_fn(torch.tensor([value], dtype=torch.float64), clip)[0])
    bound = max(clip, abs(clipped)) * math.sqrt(dim)
    target = np.full(dim, clipped)

    def config_for(owners: tuple[str, ...]) -> secagg.Config:
        # no colluders: the quorum is then a bare majority, so m survivors (5 of 8) may unmask,
        # the fewest any round allows and the noise's worst case (a collusion bound c raises m to
        # floor((n + c) / 2) + 1, which only adds noise)
        return secagg.Config(
            secrets.token_bytes(16), owners, dim, 0, min_survivors, bound, noise_multiplier * clip / bound, colluders=0
        )

    out = []
    for _ in range(runs):
        # the noise and rounding from `private_generator`, so that `seeded` makes a run reproducible
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=mechanisms.private_generator())))
        out.append(torch.from_numpy(secagg_round(asked, config_for, target, dropouts, rng)) / clip)
    return torch.cat(out)


@contextlib.contextmanager
def noise_for_all_owners() -> Iterator[None]:
    """Broken SecAgg+: each owner's noise share sized for all n owners of the round, sigma C /
    sqrt(n), though as few as m may survive (and then the sum carries sigma C sqrt(m / n))."""

    def noise_std(config: secagg.Config) -> float:
        return config.noise_multiplier * config.clip / math.sqrt(len(config.owners))

    with mock.patch.object(secagg.Config, "noise_std", property(noise_std)):
        yield


SA_WRAP_DEVIATIONS = 2.0
"""The wrap-around break's ring: half of it holds this many deviations of the sum's noise."""


@contextlib.contextmanager
def ring_wraps() -> Iterator[None]:
    """Broken SecAgg+: a value scale so large that the noised sum wraps around the ring (half of
    the ring holds `SA_WRAP_DEVIATIONS` deviations of the sum's noise, not 12 plus the values)."""

    def scale(config: secagg.Config) -> float:
        return ((1 << (config.ring_bits - 1)) - 1) / (
            SA_WRAP_DEVIATIONS * config.noise_std * math.sqrt(config.min_survivors)
        )

    with mock.patch.object(secagg.Config, "scale", property(scale)):
        yield


# --- the cases --------------------------------------------------------------------------------

HONEST = "honest"


@dataclass(frozen=True)
class Case:
    """One audit: a mechanism with a canary, honest or deliberately broken, and what it is charged."""

    mechanism: str
    canary: str
    variant: str
    """`HONEST`, or the name of the deliberate break."""
    charged_for: tuple[float, float, int]
    """(sigma, q, steps) as the accountant charges them, whatever the run used."""
    parameters: str
    measure: Callable[[], torch.Tensor]
    """The statistics of both worlds, shape (2, trials)."""
    replace_one: bool = False
    """The worlds differ by a replaced owner or sample (the canary against its mirror), not an
    added one: the accountant does not charge for that adjacency (docs/PRIVACY.md), so the case
    measures it rather than tests the charge, in `python bench/dp_audit.py` only."""
    post_processing: bool = False
    """A break of accuracy, not of privacy: the release is a function of an honest one, which
    DP's post-processing theorem says leaks no more, so its bound must stay below the charge."""
    delta: float = DP_DELTA
    """The delta the charge and the bound are taken at."""

    @property
    def name(self) -> str:
        return f"{self.mechanism}: {self.canary}, {self.variant}"


@dataclass(frozen=True)
class Result:
    """A case audited: what the budget charged, the lower bound, how long the trials took."""

    case: Case
    charged: float
    bound: Bound
    seconds: float

    @property
    def flagged(self) -> bool:
        """The lower bound exceeds the charged epsilon: the mechanism is not what it is charged for."""
        return self.bound.epsilon > self.charged


def run(case: Case, seed: int | None) -> Result:
    """Audit `case` (its generators seeded from `seed`, or from the OS when None)."""
    charged = accountant_epsilon(*case.charged_for, delta=case.delta)
    start = time.perf_counter()
    with seeded(seed):
        s0, s1 = case.measure()
    return Result(case, charged, distinguish(s0, s1, case.delta), time.perf_counter() - start)


@dataclass(frozen=True)
class Size:
    """How many trials an audit runs."""

    m1_trials: int
    """M1 releases per world."""
    m2_runs: int
    """DP-SGD runs per world with gradient canaries (each `m2_canaries` trials)."""
    m2_canaries: int
    m2_batch_runs: int
    """DP-SGD runs per world with a canary audited one per run."""
    sa_rounds: int
    """SecAgg+ rounds per world (each `SA_DIM` trials)."""


CI = Size(m1_trials=2_000_000, m2_runs=500, m2_canaries=400, m2_batch_runs=400, sa_rounds=2)
FULL = Size(m1_trials=10_000_000, m2_runs=5_000, m2_canaries=400, m2_batch_runs=3_000, sa_rounds=10)

M1_CLIP, M1_SIGMA, M1_DIM = 1.0, 2.0, 4
M2_CLIP, M2_SIGMA, M2_RATE, M2_STEPS = 1.0, 2.0, 0.5, 2
SA_CLIP, SA_SIGMA, SA_DIM, SA_OWNERS, SA_MIN_SURVIVORS = 1.0, 2.0, 1 << 20, 8, 5
SA_CANARY = 1e3
"""The target's value in every coordinate of world 1 (world 0: zeros), before the per-trial clip."""
SA_DELTA = 1e-3
"""The delta SecAgg+ is audited at. Its own break, noise sized for all n owners while only m
survive, moves epsilon by less than sqrt(2) (the threshold t > k/2 keeps more than half of each
neighbourhood: here m = 5 of n = 8), and at delta 1e-5 a threshold test's bound with 10^6-10^7
trials sits 0.3-0.6 below the tight epsilon: too far to see that. At 1e-3 it sits about 0.1
below. The accountant's (epsilon, delta) holds at every delta, so 1e-3 tests the same claim."""


M1_BITS = "max norm along e_0 in float64, its release's last bit"
"""The floating-point canary (`m1_bit_statistics`): a distinguisher of the release's bits, not
of its value."""


def cases(size: Size) -> list[Case]:
    """Every audit, honest and broken, at `size`."""
    out: list[Case] = []
    m1 = f"C={M1_CLIP:g} sigma={M1_SIGMA:g} d={M1_DIM}"
    canaries = m1_canaries(M1_DIM)
    far = canaries["max norm along e_0"][1]
    canaries["replace +C e_0 by -C e_0"] = (-far, far)

    def m1_case(canary: str, variant: str = HONEST, sigma: float = M1_SIGMA, clip_fn: Clip = mechanisms.clip) -> Case:
        pair = canaries[canary]

        def measure() -> torch.Tensor:
            u = canary_direction(*pair)
            return torch.stack(
                [
                    m1_statistics(v, u, size.m1_trials, clip=M1_CLIP, noise_multiplier=sigma, clip_fn=clip_fn)
                    for v in pair
                ]
            )

        return Case("M1", canary, variant, (M1_SIGMA, 1.0, 1), m1, measure, replace_one=canary.startswith("replace"))

    out += [m1_case(name) for name in canaries]

    def bits() -> torch.Tensor:
        return torch.stack(
            [
                m1_bit_statistics(v, size.m1_trials, clip=M1_CLIP, noise_multiplier=M1_SIGMA)
                for v in canaries["max norm along e_0"]
            ]
        )

    out.append(Case("M1", M1_BITS, HONEST, (M1_SIGMA, 1.0, 1), m1, bits))
    out += [
        m1_case("max norm along e_0", "clip off", clip_fn=clip_off),
        m1_case("max norm along e_0", "noise halved", sigma=M1_SIGMA / 2),
        m1_case("non-finite (NaN beside it)", "clip before the fix", clip_fn=clip_before_fix),
        m1_case("bool, all true (refused)", "clip before the fix", clip_fn=clip_before_fix),
    ]

    m2 = f"C={M2_CLIP:g} sigma={M2_SIGMA:g} q={M2_RATE:g} steps={M2_STEPS}"

    def config(loss: str, lr: float, sigma: float = M2_SIGMA) -> wire.DPTrain:
        """What `dp_sgd` runs with (the ids are the node's business: unused here)."""
        return wire.DPTrain(0, 0, 0, loss, lr, M2_RATE, M2_STEPS, M2_CLIP, sigma)

    def grad_case(
        variant: str = HONEST,
        sigma: float = M2_SIGMA,
        patch: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        mirrored: bool = False,
    ) -> Case:
        def measure() -> torch.Tensor:
            with patch():
                return m2_gradient_canaries(
                    size.m2_runs, size.m2_canaries, config("mse_loss", 1.0, sigma), mirrored=mirrored
                )

        canary = (
            "replace a gradient canary by its mirror" if mirrored else "gradient canaries (far input, label far off)"
        )
        return Case("M2", canary, variant, (M2_SIGMA, M2_RATE, M2_STEPS), m2, measure, replace_one=mirrored)

    out += [
        grad_case(),
        grad_case("clip off", patch=m2_clip_off),
        grad_case("noise halved", sigma=M2_SIGMA / 2),
        grad_case(mirrored=True),
    ]

    def batch_case(
        canary: str,
        variant: str = HONEST,
        patch: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> Case:
        mixing = canary == MIXING_CANARY

        def measure() -> torch.Tensor:
            with patch():
                return m2_batch_canary(
                    size.m2_batch_runs,
                    m2_batch_canaries()[canary],
                    config("cross_entropy", 0.01),
                    ordinary=8 if mixing else 64,  # a broken run's every sample runs the whole batch
                    model=mixing_model if mixing else lambda: nn.Linear(2, 2, bias=False),
                )

        return Case("M2", canary, variant, (M2_SIGMA, M2_RATE, M2_STEPS), m2, measure)

    out += [batch_case(name) for name in m2_batch_canaries()]
    out.append(
        batch_case("out-of-range label (fails the batch)", "failing batch dropped (before the fix)", m2_drop_batch)
    )
    out.append(batch_case(MIXING_CANARY, "per-sample gradients through the batch's forward", m2_through_batch))

    owners = [f"owner{i}" for i in range(SA_OWNERS + 1)]  # one more, to drop before advertising
    all_survive, most_drop = Dropouts(advertise=1), Dropouts(advertise=1, share_keys=1, masked_input=2)
    sa = (
        f"n={SA_OWNERS} m={SA_MIN_SURVIVORS} C={SA_CLIP:g} sigma={SA_SIGMA:g} d=2^{SA_DIM.bit_length() - 1} "
        f"delta={SA_DELTA:g}"
    )

    def sa_case(
        dropouts: Dropouts,
        variant: str = HONEST,
        sigma: float = SA_SIGMA,
        clip_fn: Clip = mechanisms.clip,
        patch: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
        post_processing: bool = False,
    ) -> Case:
        survivors = SA_OWNERS - dropouts.share_keys - dropouts.masked_input
        canary = f"{SA_CANARY:g} C per coordinate, {survivors} of {SA_OWNERS} survive"

        def measure() -> torch.Tensor:
            with patch():
                return torch.stack(
                    [
                        secagg_statistics(
                            value,
                            size.sa_rounds,
                            dim=SA_DIM,
                            asked=owners,
                            dropouts=dropouts,
                            min_survivors=SA_MIN_SURVIVORS,
                            clip=SA_CLIP,
                            noise_multiplier=sigma,
                            clip_fn=clip_fn,
                        )
                        for value in (0.0, SA_CANARY)
                    ]
                )

        return Case(
            "SecAgg+",
            canary,
            variant,
            (SA_SIGMA, 1.0, 1),
            sa,
            measure,
            post_processing=post_processing,
            delta=SA_DELTA,
        )

    out += [
        sa_case(all_survive),
        sa_case(most_drop),
        sa_case(most_drop, "noise sized for all n owners", patch=noise_for_all_owners),
        sa_case(most_drop, "noise halved", sigma=SA_SIGMA / 2),
        sa_case(most_drop, "clip off", clip_fn=clip_off),
        sa_case(most_drop, "ring wrap-around", patch=ring_wraps, post_processing=True),
    ]
    return out


def table(results: list[Result]) -> str:
    """A Markdown table of `results`, with each charge's tight epsilon (`tight_epsilon`)."""
    tight = {(p, d): tight_epsilon(*p, delta=d) for p, d in {(r.case.charged_for, r.case.delta) for r in results}}
    lines = [
        "| mechanism | canary | adjacency | variant | parameters | trials per world | charged epsilon (RDP) | "
        "tight epsilon (PRV) | lower bound | bound / charged | verdict |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.case
        adjacency = "replace-one" if c.replace_one else "add/remove"
        if c.replace_one:
            verdict = "above the charge (not charged for)" if r.flagged else "below the charge"
        elif c.variant == HONEST or c.post_processing:
            verdict = "EXCEEDS the charge" if r.flagged else "below the charge"
            verdict += " (post-processing)" if c.post_processing else ""
        else:
            verdict = "flagged" if r.flagged else "NOT flagged"
        lines.append(
            f"| {c.mechanism} | {c.canary} | {adjacency} | {c.variant} | {c.parameters} | {r.bound.trials:,} | "
            f"{r.charged:.2f} | {tight[c.charged_for, c.delta]:.2f} | {r.bound.epsilon:.2f} | "
            f"{r.bound.epsilon / r.charged:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the sizes of tests/test_dp_audit.py, not the full audit")
    parser.add_argument("--seed", type=int, help="seed the mechanisms' generators (default: from the OS, as deployed)")
    parser.add_argument("--mechanism", choices=["M1", "M2", "SecAgg+"], help="audit this mechanism only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = CI if args.ci else FULL
    print(
        f"delta {DP_DELTA:g} (SecAgg+: {SA_DELTA:g}), confidence {CONFIDENCE:g} "
        "(Clopper-Pearson, both error rates together)"
    )
    results = []
    for case in cases(size):
        if args.mechanism not in (None, case.mechanism):
            continue
        results.append(run(case, args.seed))
        r = results[-1]
        print(f"  {case.name}: {r.bound.epsilon:.2f} of {r.charged:.2f} charged ({r.seconds:.1f} s)", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
