"""Models on a ``--store`` node survive its restart (README "Guarantees and knobs"): a model the
client sent, trained op by op (``opt.step()``), switched between training and evaluation, ran
forward in training mode (BatchNorm's running statistics), or trained by DP-SGD comes back as the
client last left it, its pointers to the model's parameters still that model's parameters, and
exactly as private as it was (a restart never launders a taint). On the real broker and node in
this process (tests/harness.py); crash points of a model's writes are in
tests/test_model_crash_points.py."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
from fedptr.nodes.node import NodeConfig
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import dp, limits, modules, optim, wire
from fedptr.tensors import from_raw

from . import harness

ACTIONS = ("step", "step", "train", "eval", "forward", "restart")
"""What the walk draws from (a training step twice as often as the rest)."""

DEADLINE_S = 20.0
"""Seconds a deletion may take to show in a listing."""

WALK = 10
"""Random actions per walk, before its last ``restart, step, restart``."""


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1))


async def _fetched(p: fedptr.Pointer) -> nn.Module | torch.Tensor:
    """What a get of `p` brings back, leaving it on its worker (a pointer's get consumes it)."""
    reply = await p.client.call(p.location, wire.Get(p.id_at_location))
    if isinstance(reply, wire.ModuleReply):
        return modules.from_wire(reply.spec, reply.params)
    assert isinstance(reply, wire.TensorReply), reply
    return from_raw(reply.tensor)


def _same_state(local: nn.Module, remote: nn.Module) -> None:
    mine, theirs = local.state_dict(), remote.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        assert torch.allclose(value.float(), theirs[name].float(), atol=1e-5), name


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(3))
async def test_a_stored_model_restarts_as_the_client_last_left_it(seed: int) -> None:
    """A seeded walk of training steps (SGD with momentum: its buffers are stored tensors),
    train()/eval(), forwards and restarts on a remote model, mirrored by the same model here: after
    every restart the node's model equals the mirror, parameters, BatchNorm statistics and each
    submodule's mode, and a step after a restart still trains the model the pointers name."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    local = _net()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    actions = [rng.choice(ACTIONS) for _ in range(WALK)] + ["restart", "step", "restart"]
    async with harness.cluster(["alice"], stores=["alice"]) as c:
        alice = c.worker("alice")
        remote = await alice.send(local)
        assert isinstance(remote, fedptr.ModulePointer)
        xp, yp = await alice.send(x), await alice.send(y)
        opt = optim.SGD(remote.parameters(), lr=0.1, momentum=0.9)
        mirror = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
        for action in actions:
            if action == "step":
                await functional.mse_loss(remote(xp), yp).backward()
                await opt.step()
                await opt.zero_grad()
                mirror.zero_grad()
                functional.mse_loss(local(x), y).backward()
                mirror.step()
            elif action in ("train", "eval"):
                await remote.train(action == "train").zero_grad()  # (awaits the mode's change too)
                local.train(action == "train")
            elif action == "forward":
                await remote(xp)
                local(x)
            else:
                await c.restart_node("alice")
                held = c.node("alice").store.entries[remote.id_at_location].value
                assert [m.training for m in held.modules()] == [m.training for m in local.modules()], actions
                back = await _fetched(remote)
                assert isinstance(back, nn.Module)
                _same_state(local, back)


async def _refusal(p: fedptr.Pointer) -> tuple[str, str] | None:
    """How a get of `p` is refused (None: it is not)."""
    try:
        await _fetched(p)
    except fedptr.FedptrError as e:
        return type(e).__name__, str(e)
    return None


@pytest.mark.asyncio
async def test_a_restart_never_launders_a_models_taint() -> None:
    """Twins, one model trained a step on alice's private data, one on public data alike, and a
    third trained by DP-SGD (released): every get of each model and of each parameter is refused,
    or allowed, after a restart exactly as before it."""
    g = np.random.default_rng(0)
    xs, ys = g.normal(size=(64, 2)).astype(np.float32), g.normal(size=(64, 1)).astype(np.float32)
    async with harness.cluster(
        ["alice"],
        stores=["alice"],
        data={"alice": {"d": {"x": xs, "y": ys}}},
        configs={"alice": NodeConfig(epsilon=100.0)},
    ) as c:
        alice = c.worker("alice")
        private_x, private_y = await alice.search("d")
        public_x, public_y = await alice.send(torch.from_numpy(xs)), await alice.send(torch.from_numpy(ys))
        models = []
        for x, y in ((private_x, private_y), (public_x, public_y)):
            model = await alice.send(nn.Linear(2, 1))
            assert isinstance(model, fedptr.ModulePointer)
            opt = optim.SGD(model.parameters(), lr=0.1)
            await functional.mse_loss(model(x), y).backward()
            await opt.step()
            models += [model, *model.parameters()]
        released = await alice.send(nn.Linear(2, 1))
        assert isinstance(released, fedptr.ModulePointer)
        await dp.train(
            released, private_x, private_y, lr=0.1, sample_rate=0.5, steps=1, max_grad_norm=1.0, noise_multiplier=1.0,
            loss="mse_loss",
        )  # fmt: skip
        models.append(released)
        before = [await _refusal(p) for p in models]
        assert before[0] is not None and before[0][0] == "PermissionDenied", before
        assert before[3:] == [None] * 4, before  # the public twin's, and the released model's
        got = await _fetched(released)
        await c.restart_node("alice")
        assert [await _refusal(p) for p in models] == before
        again = await _fetched(released)
        assert isinstance(got, nn.Module) and isinstance(again, nn.Module)
        _same_state(got, again)


@pytest.mark.asyncio
async def test_tensors_of_a_model_kept_after_it_is_deleted_restart_as_last_changed() -> None:
    """The client keeps pointers to a model's parameters and buffers (its state_dict), changes the
    buffers through the model (a forward in training mode), deletes the model and steps the
    parameters on their own: a restart brings back each as last changed, not as the model last
    stored it nor as its own record last held it."""
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    x = torch.randn(8, 3)
    async with harness.cluster(["alice"], stores=["alice"]) as c:
        alice = c.worker("alice")
        remote = await alice.send(local)
        assert isinstance(remote, fedptr.ModulePointer)
        state = remote.state_dict()
        xp = await alice.send(x)
        await remote(xp)  # BatchNorm's running statistics change, through the model alone
        local(x)
        remote.owned = False
        c.client.release("alice", remote.id_at_location)
        async with asyncio.timeout(DEADLINE_S):
            while remote.id_at_location in await alice.objects():
                await asyncio.sleep(limits.POLL_INTERVAL_S)
        params = dict(local.named_parameters())
        for name in params:  # a step of their own, the model gone
            await state[name].sub_(1.0)
        with torch.no_grad():
            for p in params.values():
                p.sub_(1.0)
        await c.restart_node("alice")
        for name, mine in local.state_dict().items():
            value = await _fetched(state[name])
            assert isinstance(value, torch.Tensor)
            assert torch.allclose(value.float(), mine.float(), atol=1e-5), name
