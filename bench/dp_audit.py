"""Empirical differential-privacy audit of fedptr's two mechanisms: ``python bench/dp_audit.py``.

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
  all push the same way: the statistic is the change of the model along that push.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from fedptr.nodes import mechanisms
from fedptr.nodes.budget import Budget
from scipy import stats
from torch import nn

from fedptr import wire
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


def m2_batch_canary(
    runs: int, canary: tuple[torch.Tensor, torch.Tensor], config: wire.DPTrain, ordinary: int = 64
) -> torch.Tensor:
    """`runs` statistics of M2 on `ordinary` samples, without then with `canary` (x, y) added
    (shape (2, runs)); two classes, two features, `config.loss` is ``cross_entropy``. Each
    ordinary sample (10 e_0, class 0) has a gradient above the clip bound, and all push the
    model the same way: the statistic is how far the model moved along that push, in units of C."""
    xs = torch.zeros(ordinary, 2)
    xs[:, 0] = 10.0
    ys = torch.zeros(ordinary, dtype=torch.long)
    worlds = []
    for x, y in ((xs, ys), (torch.cat([xs, canary[0][None]]), torch.cat([ys, canary[1][None]]))):
        n = len(x)
        rows = []
        for _ in range(runs):
            model = nn.Linear(2, 2, bias=False)
            nn.init.zeros_(model.weight)
            mechanisms.dp_sgd(model, x, y, config)
            w = model.weight.detach().double()
            push = (w[0, 0] - w[1, 0]) / math.sqrt(2)
            rows.append(push * config.sample_rate * n / (config.lr * config.max_grad_norm))
        worlds.append(torch.stack(rows))
    return torch.stack(worlds)


def m2_batch_canaries() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Samples that cannot be audited K at a time: each the (x, y) added in world 1."""
    return {
        "out-of-range label (fails the batch)": (torch.zeros(2), torch.tensor(2)),
        "non-finite input": (torch.tensor([math.nan, 0.0]), torch.tensor(0)),
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


def run(case: Case, seed: int | None, delta: float = DP_DELTA) -> Result:
    """Audit `case` (its generators seeded from `seed`, or from the OS when None)."""
    charged = accountant_epsilon(*case.charged_for, delta=delta)
    start = time.perf_counter()
    with seeded(seed):
        s0, s1 = case.measure()
    return Result(case, charged, distinguish(s0, s1, delta), time.perf_counter() - start)


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


CI = Size(m1_trials=2_000_000, m2_runs=500, m2_canaries=400, m2_batch_runs=400)
FULL = Size(m1_trials=10_000_000, m2_runs=5_000, m2_canaries=400, m2_batch_runs=3_000)

M1_CLIP, M1_SIGMA, M1_DIM = 1.0, 2.0, 4
M2_CLIP, M2_SIGMA, M2_RATE, M2_STEPS = 1.0, 2.0, 0.5, 2


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
        def measure() -> torch.Tensor:
            with patch():
                return m2_batch_canary(size.m2_batch_runs, m2_batch_canaries()[canary], config("cross_entropy", 0.01))

        return Case("M2", canary, variant, (M2_SIGMA, M2_RATE, M2_STEPS), m2, measure)

    out += [batch_case(name) for name in m2_batch_canaries()]
    out.append(
        batch_case("out-of-range label (fails the batch)", "failing batch dropped (before the fix)", m2_drop_batch)
    )
    return out


def table(results: list[Result]) -> str:
    """A Markdown table of `results`, with each charge's tight epsilon (`tight_epsilon`)."""
    tight = {p: tight_epsilon(*p) for p in {r.case.charged_for for r in results}}
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
        elif c.variant == HONEST:
            verdict = "EXCEEDS the charge" if r.flagged else "below the charge"
        else:
            verdict = "flagged" if r.flagged else "NOT flagged"
        lines.append(
            f"| {c.mechanism} | {c.canary} | {adjacency} | {c.variant} | {c.parameters} | {r.bound.trials:,} | "
            f"{r.charged:.2f} | {tight[c.charged_for]:.2f} | {r.bound.epsilon:.2f} | "
            f"{r.bound.epsilon / r.charged:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the sizes of tests/test_dp_audit.py, not the full audit")
    parser.add_argument("--seed", type=int, help="seed the mechanisms' generators (default: from the OS, as deployed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = CI if args.ci else FULL
    print(f"delta {DP_DELTA:g}, confidence {CONFIDENCE:g} (Clopper-Pearson, both error rates together)")
    results = []
    for case in cases(size):
        results.append(run(case, args.seed))
        r = results[-1]
        print(f"  {case.name}: {r.bound.epsilon:.2f} of {r.charged:.2f} charged ({r.seconds:.1f} s)", flush=True)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
