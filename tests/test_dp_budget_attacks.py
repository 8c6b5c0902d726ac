"""The seventh red-team round (docs/REDTEAM.md): a malicious client against the privacy budget
and DP-SGD's assumptions. Each test is an attack that succeeded on main before its fix.

1. DP-SGD sampled each sample with a float32 uniform draw compared to the client's rate: a rate
   below float32's resolution (2^-24) was charged as given (1e-30) but realised as 2^-24, so
   the accountant priced a mechanism that never ran (charged 36, really about 19,000).
2. A noise multiplier the accountant cannot price (its arithmetic overflows or divides by zero)
   failed the release with Python's arithmetic errors; one of infinity, given to the budget, was
   charged and persisted, and the history then refused to load (the owner's node would not
   start again). The wire keeps infinities from clients; the budget now refuses them itself.
3. DP-SGD summed the clipped gradients and added the noise in the parameters' dtype: a model
   with bfloat16 parameters (a graph model carries its parameters' dtypes) had the sum of 1029
   clipped gradients rounded to bfloat16's spacing of 8, and noise of std 1 vanished in the
   next rounding: the step was a deterministic function of the data, and one sample moved it
   by 8 C.
4. A model with a complex parameter passed every check, was charged, then failed its first
   step (the per-sample norms refuse complex gradients): budget spent on nothing. Refused first.
5. Clipping trusted float64's arithmetic: with the scale C / norm subnormal (C = 1e-323, or a
   weight of 3e307 with C = 1e-16) it rounded by up to half itself, and a sample's clipped
   gradient came out 2 C. Such a sample now contributes zero, and C is at least 1e-100.
6. DP-SGD paired inputs of one dataset with targets of another: the same people in another
   order put one person in two samples (and removing a person shifted every later pair), while
   each step was charged for one. Inputs and targets now come from one search tag.

Attacks on processes share one module cluster (`owner`).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from fedptr.nodes import budget, mechanisms
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import dp, modules, wire

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
N = 1 << 20
EPSILON = 50.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def owner() -> AsyncIterator[fedptr.Cluster]:
    """alice owns "d" (2^20 one-feature samples), "e" and "f" (8 each), budget 50, in a --store."""
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/d.npz", x=np.ones((N, 1), np.float32), y=np.zeros((N, 1), np.float32))
        for tag in ("e", "f"):  # the same 8 people, say, in two tables
            np.savez(f"{tmp}/{tag}.npz", x=np.ones((8, 1), np.float32), y=np.zeros((8, 1), np.float32))
        async with fedptr.local_cluster(
            ["alice"],
            data={"alice": {tag: f"{tmp}/{tag}.npz" for tag in "def"}},
            node_args={"alice": ["--epsilon", str(EPSILON), "--store", f"{tmp}/alice"]},
            call_timeout=60,
        ) as c:
            yield c


async def _model(c: fedptr.Cluster, w0: float) -> fedptr.ModulePointer:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w0)
    pointer = await c.client.worker("alice").send(model)
    assert isinstance(pointer, fedptr.ModulePointer)
    return pointer


@MODULE_LOOP
async def test_1_dp_sgd_samples_at_the_rate_it_charges(owner: fedptr.Cluster) -> None:
    """q = 1e-30 and sigma = 0.05 for 512 steps are charged epsilon 36 (of 50) at the rate asked.
    Every sample pushes w down by C (mse of w * 1 against 0, w near 1000, clipped to 1), and lr =
    q n undoes the step's division, so w moves by the number of samples drawn plus noise of std
    sigma sqrt(512) = 1.1. At the rate charged, 512 steps of 2^20 samples draw none (expected
    5e-22); drawn by `rand() < q` in float32, a sample came in whenever rand gave exactly 0
    (probability 2^-24): 32 expected, and w moved by about 32, each sample's gradient nearly
    noiseless. Fixed: the node samples in float64 at a rate it can realise exactly, and charges
    that rate (here 2^-53: epsilon 112, past the budget, so refused and nothing runs)."""
    alice = owner.client.worker("alice")
    x, y = await alice.search("d")
    w0, q = 1000.0, 1e-30
    model = await _model(owner, w0)
    before = (await dp.budget(alice)).epsilon_spent
    try:
        await dp.train(
            model, x, y, lr=q * N, sample_rate=q, steps=512, max_grad_norm=1.0, noise_multiplier=0.05, loss="mse_loss"
        )
    except fedptr.BudgetExhaustedError:
        assert (await dp.budget(alice)).epsilon_spent == before  # refused, charged nothing
        return
    trained = await model.get()
    assert isinstance(trained, nn.Linear)
    moved = w0 - float(trained.weight.detach())
    assert abs(moved) < 6 * 0.05 * math.sqrt(512), f"LEAK: {moved:.1f} samples drawn at a rate charged as {q}"


def test_1_the_realised_rate_is_the_asked_one_rounded_up_to_float64_draws() -> None:
    for q in (1.0, 0.5, 0.25, 0.1, 1 / 3, 1e-6, 2.0**-53, 1e-30, 5e-324):
        realised = mechanisms.realised_rate(q)
        assert q <= realised <= max(q + 2.0**-53, 2.0**-53) and (realised * 2.0**53).is_integer(), q
    generator = torch.Generator().manual_seed(3)
    drawn = torch.rand(1 << 22, dtype=torch.float64, generator=generator)
    assert bool(((drawn * 2.0**53) == (drawn * 2.0**53).floor()).all())  # k / 2^53, as the rate assumes


async def _train(model: fedptr.ModulePointer, x: fedptr.Pointer, y: fedptr.Pointer) -> dp.Spent:
    return await dp.train(
        model, x, y, lr=0.1, sample_rate=0.5, steps=1, max_grad_norm=1.0, noise_multiplier=4.0, loss="mse_loss"
    )


@MODULE_LOOP
async def test_6_dp_sgd_takes_inputs_and_targets_of_one_dataset(owner: fedptr.Cluster) -> None:
    """On main any two of alice's arrays of one length trained together: x of "e", y of "f"."""
    alice = owner.client.worker("alice")
    (ex, ey), (_, fy) = await alice.search("e"), await alice.search("f")
    model = await _model(owner, 1.0)
    before = (await dp.budget(alice)).epsilon_spent
    args = {
        "lr": 0.1,
        "sample_rate": 0.5,
        "steps": 1,
        "max_grad_norm": 1.0,
        "noise_multiplier": 4.0,
        "loss": "mse_loss",
    }
    with pytest.raises(fedptr.PermissionDenied, match="one dataset"):
        await dp.train(model, ex, fy, **args)  # type: ignore[arg-type]
    assert (await dp.budget(alice)).epsilon_spent == before
    await dp.train(model, ex, ey, **args)  # type: ignore[arg-type]  # one dataset's: trained and charged
    assert (await dp.budget(alice)).epsilon_spent > before


@pytest.mark.parametrize("sigma", [1e300, 1e-300])
@MODULE_LOOP
async def test_2_a_noise_multiplier_the_accountant_cannot_price_is_refused_and_alice_restarts(
    owner: fedptr.Cluster, sigma: float
) -> None:
    """1e300 and 1e-300 made the accountant raise OverflowError and ZeroDivisionError on main:
    refused and charged nothing, but untyped (the client saw a RemoteError naming Python's
    arithmetic). An infinite sigma never reaches the node's budget from a client: the wire
    refuses non-finite floats when it decodes a DPTrain."""
    alice = owner.client.worker("alice")
    x, y = await alice.search("d")
    model = await _model(owner, 1.0)
    before = (await dp.budget(alice)).epsilon_spent
    with pytest.raises((fedptr.RemoteError, fedptr.BudgetExhaustedError)) as refused:
        await dp.train(
            model, x, y, lr=0.1, sample_rate=1e-6, steps=1, max_grad_norm=1.0, noise_multiplier=sigma, loss="mse_loss"
        )
    error = refused.value
    assert isinstance(error, fedptr.BudgetExhaustedError) or error.remote_type == "InvalidArgumentError", error
    assert (await dp.budget(alice)).epsilon_spent == before
    owner.signal("alice", 9)  # SIGKILL: the history on disk is all alice has
    await owner.start_node("alice")  # raised FedptrError ("not a privacy budget history") on main
    assert (await dp.budget(alice)).epsilon_spent == before


@pytest.mark.parametrize("sigma", [math.inf, math.nan, 1e300, 1e-300, -1.0])
def test_2_budget_charges_only_what_the_accountant_prices_and_keeps_its_history_loadable(sigma: float) -> None:
    """The budget is the last check before a release: on main, sigma = inf was charged (Opacus
    prices it at 0.10) and written, and the history then failed to load (a non-finite entry),
    so the owner's node would not start again; the others raised ValueError or Python's
    arithmetic errors. Now each is an InvalidArgumentError and nothing is written."""
    with tempfile.TemporaryDirectory() as tmp:
        owned = budget.Budget("alice", 10.0, 1e-5, Path(tmp))
        with pytest.raises((fedptr.BudgetExhaustedError, fedptr.InvalidArgumentError)):
            owned.charge(sigma, 0.01, 1)
        assert owned.spent == 0.0
        owned.charge(2.0, 1.0, 1)
        assert budget.Budget("alice", 10.0, 1e-5, Path(tmp)).spent == owned.spent  # loads


class _Bfloat16Net(nn.Module):
    """A model whose one parameter is bfloat16: it travels as a graph, dtype and all."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1, 1), 1024.0, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x.bfloat16(), self.w).float()


def _released_weights(pushes: int, n: int, trials: int) -> list[float]:
    """The weight after one DP-SGD step (q = 1, C = 1, sigma = 1, lr = q n: the step subtracts
    the noised sum itself) of `trials` runs, each on a model rebuilt from the wire, as the node
    gets it; `pushes` samples move w by C each (mse of w * 1 against 0), the rest are inert (x = 0)."""
    spec, params = modules.to_wire(_Bfloat16Net())
    x, y = torch.zeros(n, 1), torch.zeros(n, 1)
    x[:pushes] = 1.0
    config = wire.DPTrain(0, 0, 0, "mse_loss", float(n), 1.0, 1, 1.0, 1.0)
    weights = []
    for _ in range(trials):
        model = modules.from_wire(spec, params)
        mechanisms.check_per_sample(model)
        mechanisms.check_model(model, x, y, config)
        mechanisms.dp_sgd(model, x, y, config)
        weights.append(float(next(model.parameters()).detach()))
    return weights


def test_3_a_low_precision_model_keeps_its_noise_and_one_sample_moves_it_by_c() -> None:
    """Two worlds differing in one sample (1028 pushes or 1029). On main every run released
    w = 0 in the first world and -8 in the second: no noise survived bfloat16's rounding of the
    sum (spacing 8 above 1024), so 20 runs told the worlds apart every time. Now the sum and the
    noise are float64 and the parameter is rounded once, after the noise."""
    worlds = [_released_weights(pushes, 1029, 20) for pushes in (1028, 1029)]
    for weights in worlds:
        assert statistics.pstdev(weights) > 0.5, f"LEAK: the noise (std 1) vanished: {sorted(set(weights))}"
    moved = statistics.mean(worlds[0]) - statistics.mean(worlds[1])
    assert abs(moved) < 1.0 + 4 * math.sqrt(2 / 20), f"LEAK: one sample moved the release by {moved:.2f} C"


class _ComplexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, 4, dtype=torch.complex64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.complex64) @ self.w).float()


def test_4_dp_sgd_refuses_a_parameter_that_is_not_real_before_the_charge() -> None:
    model = modules.from_wire(*modules.to_wire(_ComplexNet()))
    with pytest.raises(fedptr.InvalidArgumentError, match="complex64"):
        mechanisms.check_per_sample(model)  # on main it passed, and the run failed after the charge


@pytest.mark.parametrize(("weight", "bound"), [(1.0, 1e-323), (3e307, 1e-16)])
def test_5_a_subnormal_clip_scale_cannot_let_a_sample_past_c(weight: float, bound: float) -> None:
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(weight)
    params = {name: p.detach() for name, p in model.named_parameters()}
    loss = mechanisms._sample_loss(model, mechanisms.LOSSES["mse_loss"])
    for x in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.37, 1.5):
        summed = mechanisms._clipped_sum(loss, params, torch.tensor([[x]]).double(), torch.zeros(1, 1).double(), bound)
        moved = float(summed[0].norm())
        assert moved <= bound, f"LEAK: x = {x} moved the sum by {moved / bound:.2f} C"


def test_5_dp_sgd_refuses_a_clip_bound_below_the_floor() -> None:
    config = wire.DPTrain(0, 0, 0, "mse_loss", 0.1, 0.5, 1, 1e-323, 1.0)
    with pytest.raises(fedptr.InvalidArgumentError, match="max_grad_norm"):
        mechanisms.check_run(config, 8)
