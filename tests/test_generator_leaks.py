"""Torch's default generator as a channel out of private computation (red-team round 15).

Clients draw from torch's default generator (``rand_like``, ``randn_like``, dropout) and fetch
what they draw on public tensors. A computation on private data that draws from it (a model with
dropout) advanced it by as many draws as the run made, and how many it made depended on the
data: a forward that failed at its real run before its dropout (an `Embedding` of an index out
of range: the guard's zeros) drew nothing; a DP-SGD step whose batched computation failed (a
label out of range) ran each sample again, drawing again. A later ``rand_like(public).get()``
then differed between two worlds that differ only in bob's labels: no DP mechanism in the way
for the forward, and an exact bit beside the noised model for DP-SGD.

Twin worlds on the in-process harness (the real broker, nodes and client), each seeded alike;
the worlds differ only in bob's private labels (in range of 3 classes in world a, not in b).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedptr.nodes import guard
from fedptr.nodes.budget import Budget
from fedptr.nodes.node import NodeConfig
from torch import nn

from fedptr import dp
from fedptr.pointer import remote_call

from . import harness

DEADLINE_S = 10.0
"""How long a test waits for each step it orders of a run on a thread."""

LABELS = {"a": [0, 1, 2, 0], "b": [0, 1, 3, 0]}
"""Bob's private labels: in range of 3 classes in world a; one out of it in world b."""


async def _world(labels: list[int], attack: str) -> list[Any]:
    """What the client observes: the attack's outcome, then a public ``rand_like`` fetched."""
    torch.manual_seed(0)  # the client's models and torch's default generator: alike in both worlds
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 12
    data = {"bob": {"secret": {"x": x, "y": np.array(labels, dtype=np.int64)}}}
    seen: list[Any] = []
    configs = {"bob": NodeConfig(dp_clip=1.0, dp_noise_multiplier=1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        async with harness.cluster(["bob"], configs=configs, data=data) as c:
            node = c.node("bob")
            node.budget = node.release.budget = Budget("bob", 1e4, 1e-5, Path(tmp))
            bob = c.worker("bob")
            bx, by = await bob.search("secret")
            public = await bob.send(torch.zeros(64))
            if attack == "forward":  # the embedding fails on an index out of range: no dropout drawn
                model = await bob.send(nn.Sequential(nn.Embedding(3, 8), nn.Dropout(0.5)))
                out = await remote_call("sum", (model(by),))
                seen.append(("forward", tuple(out.shape)))
            else:  # the batch fails on a label out of range: each sample is run (and drawn) again
                model = await bob.send(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)))
                kw = {"lr": 0.1, "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0, "noise_multiplier": 1e3}
                spent = await dp.train(model, bx, by, **kw)
                seen.append(("trained", spent.epsilon_spent))
            drawn = await remote_call("rand_like", (public,))
            seen.append(("rand_like", (await drawn.get()).tolist()))
    return seen


@pytest.mark.parametrize("attack", ["forward", "dp_train"])
def test_what_a_client_draws_after_a_private_computation_does_not_depend_on_the_data(attack: str) -> None:
    a = asyncio.run(_world(LABELS["a"], attack))
    b = asyncio.run(_world(LABELS["b"], attack))
    assert a == b, "torch's default generator advanced differently: the draws tell the data apart"


class _Run(threading.Thread):
    """A private run on an offload thread, inside `guard.own_draws`: it enters, draws `draws`
    numbers (how many depends on the private data) when told, and leaves when told."""

    def __init__(self, draws: int) -> None:
        super().__init__(daemon=True)
        self.draws = draws
        self.entered, self.drawn, self.left = threading.Event(), threading.Event(), threading.Event()
        self.draw, self.leave = threading.Event(), threading.Event()

    def run(self) -> None:
        with guard.own_draws():
            self.entered.set()
            assert self.draw.wait(DEADLINE_S)
            torch.rand(self.draws)
            self.drawn.set()
            assert self.leave.wait(DEADLINE_S)
        self.left.set()


def _step(run: _Run, event: str) -> None:
    """Let `run` go on to `event` (draw, leave) and wait until it got there."""
    getattr(run, event).set()
    assert {"draw": run.drawn, "leave": run.left}[event].wait(DEADLINE_S), f"the run did not {event}"


def _overlapping_runs(draws: int) -> list[float]:
    """Three private runs whose windows overlap (two offload threads and the loop's inline
    forward): the first opens, the second opens inside it, the first closes, the second draws
    `draws`, a third opens, the second closes, the third closes. Then the client's next draws."""
    torch.manual_seed(0)  # the client's generator: alike in both worlds
    first, second, third = _Run(0), _Run(draws), _Run(0)
    first.start()
    assert first.entered.wait(DEADLINE_S)
    second.start()
    assert second.entered.wait(DEADLINE_S)
    _step(first, "draw")
    _step(first, "leave")
    _step(second, "draw")
    third.start()
    assert third.entered.wait(DEADLINE_S)
    _step(second, "leave")
    _step(third, "draw")
    _step(third, "leave")
    for run in (first, second, third):
        run.join(DEADLINE_S)
    return torch.rand(4).tolist()


@pytest.mark.parametrize("draws", [0, 5])
def test_overlapping_private_runs_leave_the_clients_generator_where_it_was(draws: int) -> None:
    """Twin worlds differing in how many numbers a private run draws (its data decides): with
    one saved state per window, the first window's close put the client's state back while the
    second still drew, and the third saved that advanced state and restored it last."""
    torch.manual_seed(0)
    expected = torch.rand(4).tolist()
    assert _overlapping_runs(draws) == expected, "the client's generator moved by a private run's draws"
