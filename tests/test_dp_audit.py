"""The empirical DP audit (bench/dp_audit.py) at CI size: for M1, M2 and SecAgg+ the
Clopper-Pearson lower bound on epsilon stays at or below what the accountant charges, and each
deliberately broken variant (clip off, noise halved, the clip and the dropped failing batch of
before issue 18's fixes, SecAgg+'s noise sized for all owners while only m survive) is flagged:
its lower bound exceeds the charge. A ring that wraps around breaks SecAgg+'s sums, not its
privacy (post-processing): its bound stays below the charge, and its sums are shown wrong.
Since the twenty-first red-team round the audit also reads a float64 release's last bit
(Mironov 2012: M1's `m1_bit_statistics`), and a float64 model's DP-SGD weights are read the same
way here.

Every case runs the real mechanisms (`fedptr.nodes.mechanisms`, and the owners' and
aggregator's protocol code of `fedptr.nodes.secagg`); only the breaks are patched in, by
bench/dp_audit.py, for the duration of their case. Seeded, so deterministic: the seed
replaces only the OS seed of the mechanisms' generators. `python bench/dp_audit.py` is the full
audit (ten times the trials, OS-seeded); docs/PRIVACY.md has its figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from fedptr.nodes import mechanisms

from bench import dp_audit
from fedptr import wire

SEED = 18
CASES = [case for case in dp_audit.cases(dp_audit.CI) if not case.replace_one]


def cases(honest: bool) -> list[object]:
    """The honest cases, or the broken ones. M2's (DP-SGD: hundreds of small trainings each,
    30-45 s apiece on a loaded 2-core machine) and SecAgg+'s (a 65,536-coordinate round each,
    4-20 s) are ``slow``; M1's stay in the fast loop."""
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.mechanism != "M1" else [])
        for c in CASES
        if (c.variant == dp_audit.HONEST or c.post_processing) == honest
    ]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The figures are deterministic whatever the machine's cores; one thread is also the fair
    share of a loaded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", cases(honest=True))
def test_the_lower_bound_stays_below_the_charged_epsilon(case: dp_audit.Case) -> None:
    result = dp_audit.run(case, SEED)
    assert result.bound.epsilon <= result.charged, (
        f"{case.name}: an empirical lower bound of {result.bound.epsilon:.2f} on epsilon, "
        f"but {result.charged:.2f} charged"
    )


@pytest.mark.parametrize("case", cases(honest=False))
def test_a_broken_mechanism_is_flagged(case: dp_audit.Case) -> None:
    result = dp_audit.run(case, SEED)
    assert result.flagged, f"{case.name}: lower bound {result.bound.epsilon:.2f}, {result.charged:.2f} charged"


def test_every_break_of_the_brief_is_audited() -> None:
    breaks = {(c.mechanism, c.variant) for c in CASES}
    for mechanism in ("M1", "M2"):
        assert {(mechanism, "clip off"), (mechanism, "noise halved")} <= breaks
    assert ("M2", "failing batch dropped (before the fix)") in breaks
    assert ("M2", "per-sample gradients through the batch's forward") in breaks
    assert {
        ("SecAgg+", "noise sized for all n owners"),
        ("SecAgg+", "noise halved"),
        ("SecAgg+", "clip off"),
        ("SecAgg+", "ring wrap-around"),
    } <= breaks
    survivors = {c.canary.split(", ")[1] for c in CASES if c.mechanism == "SecAgg+" and c.variant == dp_audit.HONEST}
    assert survivors == {"8 of 8 survive", f"{dp_audit.SA_MIN_SURVIVORS} of 8 survive"}


SA_DIM = 1 << 16


def secagg_sums(dropouts: dp_audit.Dropouts, value: float) -> torch.Tensor:
    """One audited SecAgg+ round of `SA_DIM` trials (nine owners asked, as in the audit)."""
    owners = [f"owner{i}" for i in range(dp_audit.SA_OWNERS + 1)]
    with dp_audit.seeded(SEED):
        return dp_audit.secagg_statistics(
            value,
            1,
            dim=SA_DIM,
            asked=owners,
            dropouts=dropouts,
            min_survivors=dp_audit.SA_MIN_SURVIVORS,
            clip=dp_audit.SA_CLIP,
            noise_multiplier=dp_audit.SA_SIGMA,
        )


@pytest.mark.parametrize(
    ("dropouts", "survivors"),
    [(dp_audit.Dropouts(advertise=1), 8), (dp_audit.Dropouts(advertise=1, share_keys=1, masked_input=2), 5)],
)
def test_an_audited_secagg_round_sums_the_clipped_canary_with_its_survivors_noise(
    dropouts: dp_audit.Dropouts, survivors: int
) -> None:
    """The audit's rounds are what it says: the target's canary, clipped to C per trial, in the
    sum, and the noise of the survivors' shares, sigma C sqrt(survivors / m)."""
    sums = secagg_sums(dropouts, dp_audit.SA_CANARY)
    std = dp_audit.SA_SIGMA * math.sqrt(survivors / dp_audit.SA_MIN_SURVIVORS)
    assert float(sums.mean()) == pytest.approx(1.0, abs=5 * std / math.sqrt(SA_DIM))
    assert float(sums.std()) == pytest.approx(std, rel=0.02)


def test_the_wrap_around_break_breaks_the_sums() -> None:
    """The ring's break is real (the audit's verdict on it is not a patch that did nothing): the
    sums wrap into half a ring of 2 deviations (4 C), so the canary's sums, 1 +- 2 in units of C,
    come out wrong on average: about 0.5 (13 deviations of the mean from 1)."""
    dropouts = dp_audit.Dropouts(advertise=1, share_keys=1, masked_input=2)
    with dp_audit.ring_wraps():
        sums = secagg_sums(dropouts, dp_audit.SA_CANARY)
    half_ring = dp_audit.SA_WRAP_DEVIATIONS * dp_audit.SA_SIGMA
    assert float(sums.abs().max()) <= half_ring * 1.001
    assert float(sums.mean()) < 0.8


def test_the_charge_is_the_budgets() -> None:
    """One Gaussian release with sigma 1 at delta 1e-5 costs what Opacus's RDP accountant says
    (4.73; that Gaussian mechanism's exact epsilon, Balle and Wang 2018, is 4.38): nothing
    rescales the comparison."""
    assert dp_audit.accountant_epsilon(1.0, 1.0, 1, 1e-5) == pytest.approx(4.73, abs=0.01)


def test_clopper_pearson_with_no_errors_is_exact() -> None:
    """With no errors in n trials the one-sided bound is 1 - alpha^(1/n)."""
    n, alpha = 1000, 0.025
    upper = dp_audit.clopper_pearson_upper(np.array([0]), n, alpha)[0]
    assert upper == pytest.approx(1 - alpha ** (1 / n), rel=1e-9)
    assert dp_audit.clopper_pearson_upper(np.array([n]), n, alpha)[0] == 1.0


def test_perfectly_separated_worlds_give_the_bound_their_count_allows() -> None:
    """Worlds that never overlap give log((1 - delta - u) / u), u the bound with no errors in the
    held-out half: the most that many trials can show, whatever the mechanism."""
    n = 2000
    bound = dp_audit.distinguish(torch.zeros(n), torch.ones(n), delta=1e-5)
    u = 1 - 0.025 ** (1 / (n // 2))
    assert bound.epsilon == pytest.approx(math.log((1 - 1e-5 - u) / u), rel=1e-9)


def test_identical_worlds_give_no_bound() -> None:
    """The same distribution in both worlds: the threshold chosen on one half tells nothing on the
    other (a bound above 0.1 here would be the selection overfitting)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 200_000, generator=g, dtype=torch.float64)
    assert dp_audit.distinguish(s[0], s[1], delta=1e-5).epsilon < 0.1


def test_a_lower_world_is_found_too() -> None:
    """World 1 below world 0 (a failing sample that removed the others' gradients) is told apart
    as well as above it."""
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(20_000, generator=g, dtype=torch.float64)
    s1 = torch.randn(20_000, generator=g, dtype=torch.float64)
    assert dp_audit.distinguish(s0, s1 - 3, 1e-5).epsilon == pytest.approx(
        dp_audit.distinguish(s0, s1 + 3, 1e-5).epsilon, abs=0.3
    )
    assert dp_audit.distinguish(s0, s1 - 3, 1e-5).epsilon > 2.0


def _odd_in_band(label: float) -> int:
    """One float64 DP-SGD step of 8,000 gradient canaries (20 runs of 400, `dp_audit.m2_gradient_canaries`'
    form, q = 1, lr = 1, 512 samples: the update is the noised sum over 512, exactly): how many
    weights, in units of C, lie in (1/4, 1/2) with the last bit of their mantissa odd. `label`
    0 gives zero gradients (the canaries absent); -1e6, each canary's clipped gradient C e_k."""
    k, n = 400, 512
    x = torch.cat([1e3 * torch.eye(k, dtype=torch.float64), torch.zeros(n - k, k, dtype=torch.float64)])
    y = torch.cat([torch.full((k, 1), label, dtype=torch.float64), torch.zeros(n - k, 1, dtype=torch.float64)])
    config = wire.DPTrain(0, 0, 0, "mse_loss", 1.0, 1.0, 1, 1.0, 2.0)
    odd = 0
    with dp_audit.seeded(SEED):
        for _ in range(20):
            model = torch.nn.Linear(k, 1, bias=False).double()
            torch.nn.init.zeros_(model.weight)
            mechanisms.dp_sgd(model, x if label else torch.zeros_like(x), y, config)
            units = -model.weight.detach()[0] * n
            odd += int(((units.view(torch.int64) & 1).bool() & (units > 0.25) & (units < 0.5)).sum())
    return odd


def test_a_float64_models_dp_sgd_weights_do_not_show_the_sums_last_bits() -> None:
    """Mironov's reading of a release's bits (`dp_audit.m1_bit_statistics`) against DP-SGD: a
    float64 model's weight is the noised gradient sum's rounding, which, with a canary's
    gradient C in it, left the last bit even for every weight in (C/4, C/2), and odd for about
    one in two there without it (twenty-first red-team round: 0 against 190 before the fix).
    Both worlds must show the same count."""
    assert _odd_in_band(-1e6) == _odd_in_band(0.0)


def test_a_float64_models_dp_sgd_weights_do_not_tell_the_realised_batch_size() -> None:
    """Poisson sampling hides how many samples a step drew (the update divides by the expected
    batch, q n, for that reason; the accountant's add/remove analysis counts on it): the grid
    `noised` rounds to must not follow the realised batch. One float64 DP-SGD step, q n = 1
    and lr = 1 on zero data, so the weight is minus the noise exactly: on a grid fixed by
    len(batch) C (review13: as merged) a weight was an odd multiple of 2^-39 C about half the time
    when the step drew at most one sample, and never when it drew two or more. Each run's batch
    is read again from its generator's state (the batch is its first draw)."""
    n, q = 8, 1 / 8
    config = wire.DPTrain(0, 0, 0, "mse_loss", 1.0, q, 1, 1.0, 1.0)
    x, y = torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    odd: dict[bool, list[bool]] = {True: [], False: []}
    with dp_audit.seeded(SEED):
        seeded_generator = mechanisms.private_generator
        states: list[torch.Tensor] = []

        def generator() -> torch.Generator:
            g = seeded_generator()
            states.append(g.get_state())
            return g

        with mock.patch.object(mechanisms, "private_generator", generator):
            for _ in range(600):
                model = torch.nn.Linear(1, 1, bias=False).double()
                torch.nn.init.zeros_(model.weight)
                mechanisms.dp_sgd(model, x, y, config)
                replay = torch.Generator()
                replay.set_state(states[-1])
                drawn = int((torch.rand(n, dtype=torch.float64, generator=replay) < mechanisms.realised_rate(q)).sum())
                units = float(model.weight.detach()[0, 0]) * 2.0**39
                assert units == int(units)  # on a grid of 2^-39 or coarser, whatever the batch
                odd[drawn <= 1].append(int(units) % 2 == 1)
    few, more = (sum(v) / len(v) for v in (odd[True], odd[False]))
    assert len(odd[True]) > 100 and len(odd[False]) > 100
    assert abs(few - more) < 0.1, f"odd multiples of 2^-39: {few:.2f} of small batches, {more:.2f} of larger ones"
