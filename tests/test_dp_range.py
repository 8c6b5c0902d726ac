"""The twenty-second red-team round (docs/REDTEAM.md): a DP release whose arithmetic leaves the
finite range. A mechanism's sum of clipped values and its noise are a Gaussian mechanism only
while every number in them is finite: a sum that overflowed to infinity is no longer the sum
the noise was sized for, and infinity plus the opposite infinity is NaN. With clips summing
past float64's range the noise grid fell to 2^-40 (`math.frexp(inf)` has exponent 0), the noise
rounded to an infinity of its sign, and the sum to an infinity exactly when it was huge: the
release was NaN or an infinity of the sum's sign, a function of the data, at the price of one
release. Such releases are now refused from public figures (the clips, the noise multipliers,
the sample count, the dtype) before anything is charged (DP-SGD) or released (M1).

Each attack runs in twin worlds (in-process clusters, tests/harness.py) that differ only in the
owner's private data, with the mechanisms' generators seeded alike (`dp_audit.seeded`): both
worlds draw the same noise, so what a release shows beyond its noised sum (NaN, an infinity's
sign against the noise's) must be the same in both.
"""

from __future__ import annotations

import math

import pytest
import torch
from fedptr.nodes import mechanisms
from fedptr.nodes.node import NodeConfig
from torch import nn
from torch.nn import functional

import fedptr
from bench import dp_audit
from fedptr import aggregate, dp, limits, wire

from . import harness

RUNS = 6
"""Releases a world makes: the noise's sign is negative in about half of them, and there the
worlds differed."""
SEED = 22


def _kind(v: float) -> str:
    """What a released number shows beyond its noised value: NaN, an infinity's sign, or finite."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return "finite"


class _Weight(nn.Module):
    """``w x`` for one feature, w a single float64 parameter of 1e300 (it travels as a graph,
    dtype and all): a sample's gradient of mse against 0 is 2 w x^2, 2e300 for x = 1, and a
    one-element gradient's norm does not overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1, 1), 1e300, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.w)


async def _dp_sgd_world(x: float) -> list[object]:
    """bob holds two samples of value `x`; the client trains `_Weight` one step on both (q = 1)
    with C = 1e308: n C overflows, and on main so did the clipped sum when x = 1."""
    xs = torch.full((2, 1), x, dtype=torch.float64)
    seen: list[object] = []
    data = {"bob": {"d": {"x": xs, "y": xs * 0}}}
    with dp_audit.seeded(SEED):
        async with harness.cluster(["bob"], configs={"bob": NodeConfig(epsilon=1e6)}, stores=["bob"], data=data) as c:
            bob = c.worker("bob")
            x_at, y_at = await bob.search("d")
            for _ in range(RUNS):
                pointer = await bob.send(_Weight())
                assert isinstance(pointer, fedptr.ModulePointer)
                before = (await dp.budget(bob)).epsilon_spent
                try:
                    await dp.train(
                        pointer,
                        x_at,
                        y_at,
                        lr=1.0,
                        sample_rate=1.0,
                        steps=1,
                        max_grad_norm=1e308,
                        noise_multiplier=1.0,
                        loss="mse_loss",
                    )
                except fedptr.FedptrError as e:
                    seen.append(("refused", type(e).__name__, str(e), (await dp.budget(bob)).epsilon_spent == before))
                    continue
                trained = await pointer.get()
                seen.append(("released", _kind(float(trained.w.detach()[0, 0]))))
    return seen


@pytest.mark.asyncio
async def test_dp_sgd_with_a_clip_past_the_range_tells_nothing_of_the_data() -> None:
    """On main the weight came out NaN or -inf when x = 1 (an infinite sum plus an infinite
    noise), -inf or +inf when x = 0 (the noise's sign alone). Now refused, charging nothing."""
    present, absent = await _dp_sgd_world(1.0), await _dp_sgd_world(0.0)
    assert present == absent
    assert all(s[0] == "refused" and s[-1] for s in present), present


async def _m1_world(x: float) -> list[object]:
    """bob and alice clip to 1e308 (their `--dp-clip`); the client contributes bob's x times
    1e308 and alice's 1 times 1e308, one element each (whose norm does not overflow): their
    sum overflowed when bob's x is 1, and is 0 when it is -1."""
    owner = NodeConfig(trust=["agg"], epsilon=1e6, dp_clip=1e308)
    configs = {"bob": owner, "alice": owner, "agg": NodeConfig(aggregator=True, owners=["bob", "alice"])}
    data = {
        "bob": {"d": {"x": torch.full((1,), x, dtype=torch.float64)}},
        "alice": {"d": {"x": torch.ones(1, dtype=torch.float64)}},
    }
    seen: list[object] = []
    with dp_audit.seeded(SEED):
        async with harness.cluster(["bob", "alice", "agg"], configs=configs, stores=["bob", "alice"], data=data) as c:
            agg = c.worker("agg")
            (bx,), (ax,) = await c.worker("bob").search("d"), await c.worker("alice").search("d")
            for _ in range(RUNS):
                parts = [(await dp.contribute(p * 1e308, agg))[0] for p in (bx, ax)]
                try:
                    mean = await aggregate.mean(parts).get()
                except fedptr.FedptrError as e:
                    seen.append(("refused", type(e).__name__, str(e)))
                    continue
                seen.append(("released", _kind(float(mean[0]))))
    return seen


@pytest.mark.asyncio
async def test_an_m1_release_whose_clips_sum_past_the_range_tells_nothing_of_the_data() -> None:
    """On main the mean came out NaN or +inf when bob's x is 1, +inf or -inf when it is -1. The
    owners were charged at their contributions; the release is refused (the contributions, of
    no use, stay spent)."""
    present, absent = await _m1_world(1.0), await _m1_world(-1.0)
    assert present == absent
    assert all(s[0] == "refused" for s in present), present


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_release_mean_refuses_a_release_that_could_leave_its_dtypes_range(dtype: torch.dtype) -> None:
    """From public figures alone, before any noise: the clips' sum and the noise, to
    `limits.DP_NOISE_SPAN` deviations, must fit the release's dtype twice over."""
    top = torch.finfo(dtype).max
    values = [torch.zeros(3, dtype=dtype)] * 2
    fits = [mechanisms.Contribution(o, top / 64, 1.0) for o in "ab"]
    past = [mechanisms.Contribution(o, top, 1.0) for o in "ab"]
    assert bool(torch.isfinite(mechanisms.release_mean(values, fits, frozenset("ab"), 2)).all())
    with pytest.raises(fedptr.InvalidArgumentError, match="range"):
        mechanisms.release_mean(values, past, frozenset("ab"), 2)


def test_dp_sgd_refuses_a_run_whose_sums_could_leave_the_range() -> None:
    """`check_run` runs before the charge: n C and sigma C must fit float64 twice over."""
    run = wire.DPTrain(0, 0, 0, "mse_loss", 1.0, 1.0, 1, 1e306, 1.0)
    mechanisms.check_run(run, 2)
    with pytest.raises(fedptr.InvalidArgumentError, match="range"):
        mechanisms.check_run(run, 1000)
    with pytest.raises(fedptr.InvalidArgumentError, match="range"):
        mechanisms.check_run(wire.DPTrain(0, 0, 0, "mse_loss", 1.0, 1.0, 1, 1.0, 1e308), 2)
    assert limits.DP_NOISE_SPAN > 8.6  # torch's float64 normal draws stay within 8.6 deviations
