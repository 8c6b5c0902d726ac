"""A model's writes against crashes: what a ``--store`` node acknowledged of a model is what it
holds after a restart, in the manner of tests/test_acks_durability.py and with its nemesis
(tests/nemesis.py).

Two phases: the model's Put, and a training step (an in-place update of each parameter through its
pointer, as ``opt.step()`` makes). The node dies at each of its storage calls (and, a second time,
then loses in a power cut every rename its directory's fsync had not made durable), and just before
each record it sends, and its disk refuses each storage call in turn (disk full: the node fails
closed, as for a tensor's write); restarted on its store, it holds the model as it was before each
update or after it, never anything else, and every update the client saw acknowledged; the
parameters' pointers are that model's parameters again. The same check run on a node that
acknowledges a model's write before it is durable must fail, or it tests nothing."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest
import torch
from fedptr.nodes import node as node_module
from fedptr.nodes import writeahead
from torch import nn

import fedptr

from . import harness
from .nemesis import CrashingDisk, Death, Disks, awaited, crashed_at, install, raised

BEAT_S = 0.1
"""Heartbeat interval (s): peers hear of the killed node soon."""

QUIET_TIMEOUT_S = 20.0
"""Seconds a phase may take to be answered, or its node to die and come back."""

LR = 0.5
"""The step's size: each parameter ``p -= LR * g`` for a fixed `g` (distinct values before and after)."""


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


async def _phase(
    c: harness.InprocCluster, disks: Disks, death: Death, phase: str, cut: bool
) -> tuple[list[bool], list[dict[str, torch.Tensor] | None], dict[str, torch.Tensor] | None, bool]:
    """Run `phase` on bob (``"put"``: the model's send; ``"step"``: an update of each of its
    parameters, pipelined, each awaited on its own) with `death` on bob; then restart bob on its
    store. Returns which requests of the phase the client saw acknowledged, the states the model
    may rightly be in afterwards (before and after each update, in order; None: absent), the
    state bob holds (None: no model), and whether bob's parameter objects are that model's."""
    bob = c.node("bob")
    worker = c.worker("bob")
    torch.manual_seed(0)
    local = nn.Linear(3, 2)
    model: fedptr.ModulePointer | None = None
    params: list[fedptr.Pointer] = []
    grads = [torch.full_like(p, 0.25) for p in local.parameters()]
    if phase == "step":
        sent = await worker.send(local)
        assert isinstance(sent, fedptr.ModulePointer)
        model = sent
        params = model.parameters()
        steps = [await worker.send(LR * g) for g in grads]
        await asyncio.gather(*(awaited(p) for p in params))
    death.watch(bob)
    disks.give(bob, death.disk)
    if phase == "put":
        states: list[dict[str, torch.Tensor] | None] = [None, _state(local)]
        send = asyncio.ensure_future(worker.send(local))
        waits = [asyncio.ensure_future(raised(send))]
    else:
        states = [_state(local)]
        with torch.no_grad():
            for p, g in zip(local.parameters(), grads, strict=True):
                p.sub_(LR * g)
                states.append(_state(local))
        waits = [asyncio.ensure_future(raised(awaited(p.sub_(s)))) for p, s in zip(params, steps, strict=True)]
    restarted = await crashed_at(c, "bob", death, waits, cut, QUIET_TIMEOUT_S)
    acknowledged = [w.result() is None for w in waits]
    if phase == "put" and acknowledged[0]:
        model = send.result()
    models = [e for e in restarted.store.entries.values() if isinstance(e.value, nn.Module)]
    assert len(models) <= 1, models
    held = models[0].value if models else None
    aliases = True
    if held is not None and params:
        own = list(held.parameters())
        aliases = all(restarted.store.entries[p.id_at_location].value is q for p, q in zip(params, own, strict=True))
    for p in [*params, *([model] if model is not None else [])]:
        p.owned = False  # nothing to delete: the cluster ends here
    return acknowledged, states, None if held is None else _state(held), aliases


def _check(where: str, acknowledged: list[bool], states: list[Any], held: dict[str, torch.Tensor] | None) -> None:
    def same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
        if a is None or b is None:
            return a is b
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    matches = [i for i, s in enumerate(states) if same(s, held)]
    assert matches, f"{where}: the model bob holds is neither before nor after any acknowledged change"
    last = max((i for i, acked in enumerate(acknowledged, start=1) if acked), default=0)
    assert max(matches) >= last, f"{where}: change {last} was acknowledged, bob holds the state after {max(matches)}"


async def _every_point(monkeypatch: pytest.MonkeyPatch, phase: str) -> list[str]:
    """Every crash point of `phase`: where the check failed (empty: it held at each)."""
    deaths: dict[str, Death] = {}
    monkeypatch.setattr(node_module, "fail_stop", lambda node, why: deaths[node].kill())
    disks = Disks()
    install(monkeypatch, disks)
    failures = []
    async with harness.cluster(["bob"], stores=["bob"], heartbeat_s=BEAT_S) as c:
        deaths["bob"] = counting = Death()
        acknowledged, states, held, aliases = await _phase(c, disks, counting, phase, False)
        assert all(acknowledged) and aliases, (acknowledged, aliases)
        try:
            _check(f"{phase}, a kill once all was acknowledged", acknowledged, states, held)
        except AssertionError as e:
            failures.append(str(e))
        calls, messages = counting.disk.calls, counting.messages
    assert calls >= 3 and messages >= 1, f"{phase} made {calls} storage calls and {messages} records"
    points = [(Death(disk=CrashingDisk(at)), cut) for at in range(1, calls + 1) for cut in (False, True)]
    points += [(Death(disk=CrashingDisk(at, refuse=errno.ENOSPC)), False) for at in range(1, calls + 1)]
    points += [(Death(message=m), False) for m in range(1, messages + 1)]
    for death, cut in points:
        where = f"{phase}, storage call {death.disk.at}" if death.disk.at else f"{phase}, record {death.message}"
        where += ", refused (disk full)" if death.disk.refuse else ""
        where += ", then a power cut" if cut else ""
        async with harness.cluster(["bob"], stores=["bob"], heartbeat_s=BEAT_S) as c:
            deaths["bob"] = death
            acknowledged, states, held, aliases = await _phase(c, disks, death, phase, cut)
            try:
                _check(where, acknowledged, states, held)
                assert aliases, f"{where}: the parameters' objects are not the restored model's"
            except AssertionError as e:
                failures.append(str(e))
    return failures


@pytest.mark.asyncio
@pytest.mark.slow  # every storage call of each phase twice, and each record
@pytest.mark.parametrize("phase", ["put", "step"])
async def test_every_crash_point_of_a_models_put_and_training_step_keeps_what_was_acknowledged(
    monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    assert await _every_point(monkeypatch, phase) == []


@pytest.mark.asyncio
@pytest.mark.slow
async def test_the_crash_point_check_catches_a_model_acknowledged_before_its_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken node: a model's write is queued but its future settles at once (the ack before
    the write). Some crash point of the Put then loses an acknowledged model: the check says so."""
    queued = writeahead.WriteAhead.save_module

    def early(self: writeahead.WriteAhead, *args: Any) -> asyncio.Future[None]:
        queued(self, *args)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    monkeypatch.setattr(writeahead.WriteAhead, "save_module", early)
    failures = await _every_point(monkeypatch, "put")
    assert any("was acknowledged" in f for f in failures), failures
