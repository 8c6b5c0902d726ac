"""Merged acknowledgements against crashes: an `Ok` that travels inside an ACKS record promises what
an `Ok` alone promises, that its op's state change was durable when the record left.

A `--store` node answers each op of a pipelined chain once the op's result is on disk; answers
that come in one loop turn leave as one ACKS (`Link.reply`). Every crash point of such a run is
enumerated, in the manner of tests/test_crash_points.py and with its nemesis (tests/nemesis.py):
the node dies at each of its storage calls (and, a second time, then loses in a power cut every
rename its directory's fsync had not made durable), and just before each record it sends. Then
a broker restart that loses a record, and a client forgotten by the broker that sends its run
again. Restarted on
its store, it must hold every result the client saw acknowledged, each whole, and no result it
holds may be other than the op's (nothing half-applied)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from fedptr.nodes import node as node_module

import fedptr
from fedptr import envelope, limits, wire
from fedptr.session import Settled

from . import harness
from .nemesis import CrashingDisk, Death, Disks, awaited, crashed_at, install, raised

BEAT_S = 0.1
"""Heartbeat interval (s): peers hear of the killed node soon."""

QUIET_TIMEOUT_S = 20.0
"""Seconds a run may take to be answered, or its node to die and come back."""

OPS = 6
"""The chain's length: ops whose `Ok` bodies are alike, so that they merge."""


class _Answers:
    """The ops `client` requests from now on (their ids, in order) and those its session settles
    with a result: each op's own answer (awaiting an in-place op's pointer waits for the value's
    last op, and a chain's pointer for what it depends on)."""

    def __init__(self, client: fedptr.Client) -> None:
        self.ops: list[bytes] = []
        self.answered: set[bytes] = set()
        self._session = session = client.link.session
        request, receive = session.request, session.receive

        def requested(dest: str, msg: wire.Message, *args: Any) -> tuple[bytes, list[Any]]:
            rid, message = request(dest, msg, *args)
            if type(msg) is wire.Op:
                self.ops.append(rid)
            return rid, message

        def received(frames: Any, now: float) -> list[Any]:
            events = receive(frames, now)
            self.answered.update(e.rid for e in events if isinstance(e, Settled) and e.error is None)
            return events

        session.request, session.receive = requested, received  # type: ignore[method-assign]

    def acknowledged(self) -> list[bool]:
        """Whether each op was answered with a result; the session is put back."""
        del self._session.request, self._session.receive
        assert len(self.ops) == OPS, self.ops
        return [rid in self.answered for rid in self.ops]


async def _run(
    c: harness.InprocCluster, disks: Disks, death: Death, cut: bool = False
) -> tuple[list[bool], list[Any], int]:
    """x + 1 + 1 ... on bob (`OPS` ops, un-awaited, each then awaited on its own), with `death` on
    bob: which ops the client saw acknowledged, what bob holds of each result once restarted
    (None: nothing), and the ACKS records bob sent."""
    bob = c.node("bob")
    x = await c.worker("bob").send(torch.zeros(4))
    death.watch(bob)
    disks.give(bob, death.disk)
    acks = 0
    watched = bob.link._sent

    def sent(frames: list[Any]) -> int:
        nonlocal acks
        if not death.dead:
            acks += sum(m.command == envelope.ACKS for m in envelope.parse(frames))
        return watched(frames)

    bob.link._sent = sent  # type: ignore[method-assign]
    answers = _Answers(c.client)
    chain = [x]
    for _ in range(OPS):
        chain.append(chain[-1] + 1.0)
    waits = [asyncio.ensure_future(raised(awaited(p))) for p in chain[1:]]
    await crashed_at(c, "bob", death, waits, cut, QUIET_TIMEOUT_S)
    async with asyncio.timeout(QUIET_TIMEOUT_S):
        acknowledged = answers.acknowledged()
        while True:
            try:
                held = await c.worker("bob").objects()
                break
            except fedptr.LostWorkerError:  # the old connection's notice, just after the new one registered
                await asyncio.sleep(limits.POLL_INTERVAL_S)
    found = [held[p.id_at_location].preview if p.id_at_location in held else None for p in chain[1:]]
    for p in chain:
        p.owned = False  # nothing to delete: the cluster ends here
    return acknowledged, found, acks


def _check(where: str, acknowledged: list[bool], found: list[Any]) -> None:
    for i, (acked, value) in enumerate(zip(acknowledged, found, strict=True), start=1):
        assert value in (None, [float(i)] * 4), f"{where}: op {i}'s result is {value}"
        assert value is not None or not acked, f"{where}: op {i} was acknowledged and is lost ({found})"


@pytest.mark.asyncio
@pytest.mark.slow  # 52 crash points (25 storage calls twice, 2 records): 11 s
async def test_every_crash_point_of_a_run_answered_by_merged_acks_keeps_each_acknowledged_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run of ops answered in ACKS records, the node killed at each of its storage calls (with
    and without a power cut after) and before each record it sends: each op acknowledged is there
    after the restart, whole, and nothing else is other than its op made it."""
    deaths: dict[str, Death] = {}
    monkeypatch.setattr(node_module, "fail_stop", lambda node, why: deaths[node].kill())
    disks = Disks()
    install(monkeypatch, disks)
    async with harness.cluster(["bob"], stores=["bob"], heartbeat_s=BEAT_S) as c:
        deaths["bob"] = counting = Death()
        acknowledged, found, acks = await _run(c, disks, counting)
        assert all(acknowledged) and found == [[float(i)] * 4 for i in range(1, OPS + 1)], found
        calls, messages = counting.disk.calls, counting.messages
    assert acks >= 1, "no ACKS left: the run tested nothing merged"
    points = [(Death(disk=CrashingDisk(at)), cut) for at in range(1, calls + 1) for cut in (False, True)]
    points += [(Death(message=m), False) for m in range(1, messages + 1)]
    for death, cut in points:
        where = f"storage call {death.disk.at}" if death.disk.at else f"record {death.message}"
        async with harness.cluster(["bob"], stores=["bob"], heartbeat_s=BEAT_S) as c:
            deaths["bob"] = death
            acknowledged, found, _ = await _run(c, disks, death, cut)
            _check(where + (", then a power cut" if cut else ""), acknowledged, found)


CALL_TIMEOUT_S = 3.0
"""The client's deadline per call: a request whose answer the restarted broker lost fails by it."""


async def _in_place_run(c: harness.InprocCluster, client: fedptr.Client, lose: int) -> tuple[list[bool], Any]:
    """`OPS` pipelined ``x.add_(1)`` on bob, each awaited on its own; the broker restarted just
    before bob's record number `lose` (0: never), that record lost with it. Which ops the client
    saw acknowledged, and x as bob's store holds it once bob is restarted."""
    bob = c.node("bob")
    x = await client.worker("bob").send(torch.zeros(4))
    records = delivered = 0
    send = bob.link._sent

    def sent(frames: list[Any]) -> int:
        nonlocal records, delivered
        if envelope.command_of(frames) in (envelope.REPLY, envelope.ACKS, envelope.BATCH):
            records += 1
            if records == lose:
                return 0  # in the broker's queue when it went down
            if not lose or records < lose:
                delivered += sum(
                    envelope.replies_in([m.command, m.name, m.rid, *m.body]) for m in envelope.parse(frames)
                )
        return send(frames)

    bob.link._sent = sent  # type: ignore[method-assign]
    answers = _Answers(client)
    waits = [asyncio.ensure_future(raised(awaited(x.add_(1.0)))) for _ in range(OPS)]
    async with asyncio.timeout(QUIET_TIMEOUT_S):
        # the records before the lost one reach the client before the broker goes down
        while lose and (records < lose or len(answers.answered) < delivered):
            await asyncio.sleep(limits.POLL_INTERVAL_S)
        if lose:
            await c.restart_broker()
        await asyncio.wait(waits)
    acknowledged = answers.acknowledged()
    del bob.link._sent
    await c.restart_node("bob")
    async with asyncio.timeout(QUIET_TIMEOUT_S):
        while True:
            try:
                held = await client.worker("bob").objects()
                break
            except fedptr.LostWorkerError:
                await asyncio.sleep(limits.POLL_INTERVAL_S)
    x.owned = False
    return acknowledged, held[x.id_at_location].preview


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "case", ["broker restart, first record lost", "broker restart, second record lost", "client forgotten"]
)
async def test_a_run_answered_by_merged_acks_across_a_broker_restart_or_a_resend_is_applied_once(case: str) -> None:
    """In-place ops on a stored value, answered in ACKS records: the broker restarted with a record
    in its queue (its requests fail by their deadline, applied or not), or the client forgotten by
    the broker before the run (its requests refused undelivered, then sent again). Every op the
    client saw acknowledged is in the value bob's store holds after a restart, the value is whole
    (each op applied to all of it) and no op is applied twice."""
    async with (
        harness.cluster(["bob"], stores=["bob"], heartbeat_s=BEAT_S, transport="ipc") as c,
        c.connect(timeout=CALL_TIMEOUT_S, heartbeat_s=30.0 if case == "client forgotten" else BEAT_S) as client,
    ):
        lose = 0
        if case == "client forgotten":
            await client.worker("bob").objects()  # registered, then silent past its liveness
            broker = c.broker
            assert broker is not None
            async with asyncio.timeout(QUIET_TIMEOUT_S):
                while client.link.session.name.encode() in broker.table.by_name:
                    await asyncio.sleep(limits.POLL_INTERVAL_S)
        else:
            lose = 1 if case.startswith("broker restart, first") else 2
        acknowledged, value = await _in_place_run(c, client, lose)
        applied = value[0]
        assert value == [applied] * 4, f"{case}: x is {value}, not whole"
        assert applied <= OPS, f"{case}: {OPS} ops made x {applied}: one applied twice"
        last = max((i for i, acked in enumerate(acknowledged, start=1) if acked), default=0)
        assert applied >= last, f"{case}: op {last} acknowledged, x is {applied} after the restart"
        if case == "client forgotten":
            assert all(acknowledged) and applied == OPS and client.link.reregistrations >= 1, (acknowledged, value)
