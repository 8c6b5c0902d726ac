"""Properties for two causes of issue 18 that no pair of worlds differing in private data can see
(docs/PRIVACY.md, "The seven causes"): what a DP release depends on, and the budget's memory.

* **Randomness (cause 7).** A DP release's output depends only on the private data and the
  mechanism's own secret randomness. Two in-process clusters with the same data and the same OS
  seed source (`_Seeded`, patched in the nodes' modules: the only test-only change) differ only
  in the state of every generator a client reaches: torch's default generator, seeded apart,
  then drawn from by the client's own ``rand_like``, ``randn_like`` and dropout on bob's node.
  M1 (two owners' contributions, the mean), a secure mean and DP-SGD steps must then release
  the same bits in both worlds: a mechanism that drew from the default generator would not.
* **The budget (cause 6).** The epsilon an owner reports to the client never decreases, over any
  sequence of releases, restarts of its node, and removal, rollback or damage of its budget
  history; a history the node cannot prove (fewer charges than its audit log records, or
  unreadable) keeps it from starting. Not covered: an operator who deletes the audit log too
  (docs/PRIVACY.md names it).

`FEDPTR_STATE_EXAMPLES` sets the number of examples of each (CI's default: `EXAMPLES`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedptr.nodes import budget
from fedptr.nodes.node import NodeConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import dp

from . import harness
from .test_noninterference import SCRATCH, _error, _value
from .test_sensitivity import _Seeded

EXAMPLES = int(os.environ.get("FEDPTR_STATE_EXAMPLES", "15"))
OWNER = {"trust": ["agg"], "epsilon": 1e4, "dp_clip": 1.0, "dp_noise_multiplier": 1.0}
"""Each data owner's flags: a budget no example exhausts."""
LABELS = np.array([0, 1, 2, 1, 0, 2], dtype=np.int64)
DATA = {
    owner: {"d": {"x": np.random.default_rng(seed).normal(size=(6, 3)).astype(np.float32), "y": LABELS}}
    for seed, owner in enumerate(("bob", "alice"))
}

pytestmark = [pytest.mark.slow]  # each example starts clusters, and the accountant takes 0.1 s a charge


def _configs(tmp: str) -> dict[str, NodeConfig]:
    return {
        "bob": NodeConfig(**OWNER, store_dir=f"{tmp}/bob"),  # type: ignore[arg-type]
        "alice": NodeConfig(**OWNER, store_dir=f"{tmp}/alice"),  # type: ignore[arg-type]
        "agg": NodeConfig(aggregator=True, owners=["bob", "alice"], min_owners=2),
    }


# --- cause 7: the mechanisms' randomness is their own -----------------------------------------

DRAWS = {
    "rand_like": torch.rand_like,
    "randn_like": torch.randn_like,
    "dropout": lambda p: functional.dropout(p, 0.5),
}
"""What a client draws from the generator it reaches, on bob's node."""


async def _released(seed: int, draws: list[str]) -> list[Any]:
    """One world: torch's default generator seeded `seed`, the client's draws on bob's node, then
    every DP release's output, bit for bit."""
    out: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="fedptr-rng-", dir=SCRATCH) as tmp, _Seeded().patched(factory=False):
        async with harness.cluster(["bob", "alice", "agg"], configs=_configs(tmp), data=DATA, call_timeout=30.0) as c:
            bob, alice = c.worker("bob"), c.worker("alice")
            (bx, by), (ax, _) = await bob.search("d"), await alice.search("d")
            model = await bob.send(_model())
            torch.manual_seed(seed)  # what differs: the state of the generator clients reach
            for name in draws:
                await DRAWS[name](await bob.send(torch.zeros(64)))
            contributions = [(await dp.contribute(x.mean(0), "agg"))[0] for x in (bx, ax)]
            out.append(_value(await fedptr.aggregate.mean(contributions).get()))
            secure, _ = await dp.secure_mean([bx.mean(0), ax.mean(0)], "agg")
            out.append(_value(await secure.get()))
            await dp.train(model, bx, by, lr=0.5, sample_rate=0.5, steps=2, max_grad_norm=1.0, noise_multiplier=1.0)
            out.append(_value(await model.get()))
    return out


def _model() -> nn.Module:
    with torch.random.fork_rng():  # the same initial parameters in both worlds, whatever their seed
        torch.manual_seed(0)
        return nn.Linear(3, 3)


@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2, unique=True),
    draws=st.lists(st.sampled_from(sorted(DRAWS)), max_size=3),
)
def test_a_dp_release_depends_on_no_generator_a_client_reaches(seeds: list[int], draws: list[str]) -> None:
    a, b = (asyncio.run(_released(seed, draws)) for seed in seeds)
    for what, x, y in zip(("M1 mean", "secure mean", "DP-SGD model"), a, b, strict=True):
        assert x == y, f"the {what} depends on the default generator's state (seeds {seeds}, draws {draws})"


# --- cause 6: the spent epsilon never goes back ----------------------------------------------

_actions = st.lists(
    st.sampled_from(["release", "release", "train", "restart", "delete", "rollback", "damage"]), min_size=3, max_size=9
)
"""`release`: a contribution of bob's (M1); `train`: a DP-SGD step; `restart`: bob's node stops
and starts again on its store; `delete`, `rollback` (the history as it was at the first
release), `damage` (truncated): done to bob's budget history while the node is down, then it
starts again."""


async def _spent_over(actions: list[str]) -> list[tuple[str, Any]]:
    """Bob's spent epsilon as the client reads it after each action, or why the node is down."""
    seen: list[tuple[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedptr-budget-", dir=SCRATCH) as tmp:
        history = Path(tmp) / "bob" / budget.FILE_NAME
        first = Path(tmp) / "first-history"
        async with harness.cluster(["bob", "alice", "agg"], configs=_configs(tmp), data=DATA, call_timeout=30.0) as c:
            up = True
            for action in actions:
                if action in ("release", "train") and up:
                    bx, by = await c.worker("bob").search("d")
                    try:
                        if action == "release":
                            await dp.contribute(bx.mean(0), "agg")
                        else:
                            model = await c.worker("bob").send(nn.Linear(3, 3))
                            await dp.train(
                                model, bx, by, lr=0.1, sample_rate=1.0, steps=1, max_grad_norm=1.0, noise_multiplier=1.0
                            )
                    except fedptr.FedptrError as e:
                        seen.append((action, _error(e)))
                    if history.exists() and not first.exists():
                        shutil.copy(history, first)
                elif action not in ("release", "train"):
                    if up:
                        await c.stop_node("bob")
                    if action == "delete":
                        history.unlink(missing_ok=True)
                    elif action == "rollback" and first.exists():
                        shutil.copy(first, history)
                    elif action == "damage" and history.exists():
                        history.write_bytes(history.read_bytes()[:-3])
                    try:
                        await c.start_node("bob")
                        up = True
                    except (ValueError, OSError) as e:  # the node refuses to start: it fails closed
                        up = False
                        seen.append(("down", type(e).__name__))
                        continue
                if up:
                    seen.append(("spent", (await dp.budget(c.worker("bob"))).epsilon_spent))
    return seen


@pytest.mark.timeout(600)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(actions=_actions)
def test_the_spent_epsilon_never_goes_back(actions: list[str]) -> None:
    seen = asyncio.run(_spent_over(actions))
    spent = [value for kind, value in seen if kind == "spent"]
    for before, after in itertools.pairwise(spent):
        assert after >= before, f"bob's spent epsilon went from {before} to {after}: {actions} -> {seen}"
