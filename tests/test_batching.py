"""Batching: messages issued within one event-loop turn travel together and each settles on its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedptr
import fedptr.link
from fedptr import envelope, limits, wire

from . import harness
from .conftest import eventually

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)


async def test_ops_issued_together_share_multiparts(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.arange(3))
    link = client.link
    messages, multiparts = link.messages_sent, link.multiparts_sent
    ys = [x + i for i in range(200)]  # one loop turn
    results = await asyncio.gather(*[y.get() for y in ys])  # the gets start together too
    assert all(torch.equal(r, torch.arange(3) + i) for i, r in enumerate(results))  # type: ignore[arg-type]
    sent = link.messages_sent - messages
    packed = link.multiparts_sent - multiparts
    # 200 ops + 200 gets, then the gets' second phase: their entries' deletes, a few batched Deletes
    assert 400 < sent <= 410
    assert packed < sent / 4, f"{sent} messages went out in {packed} multiparts"


async def test_lone_message_is_sent_at_once(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(1))
    before = client.link.multiparts_sent
    y = x + 1  # no await: it must already be on the socket, not waiting for the loop
    assert client.link.multiparts_sent == before + 1
    await y


async def test_a_long_turn_leaves_in_batches_as_they_fill(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(1))
    link = client.link
    before = link.multiparts_sent
    ys = [x + i for i in range(2 * limits.BATCH_MAX_MESSAGES + 1)]  # one loop turn
    # the first alone, then each batch as soon as it is full: none waits for the turn's end
    assert link.multiparts_sent == before + 3
    results = await asyncio.gather(*[y.get() for y in ys])
    assert all(torch.equal(r, torch.ones(1) + i) for i, r in enumerate(results))  # type: ignore[arg-type]


async def test_deletes_queued_before_a_lone_request_leave_in_its_multipart(
    client: fedptr.Client, bob: fedptr.Worker
) -> None:
    x = await bob.send(torch.ones(1))
    y = await (x + 1)
    dropped = y.id_at_location
    link = client.link
    multiparts, messages = link.multiparts_sent, link.messages_sent
    del y  # its delete is queued for the next loop turn
    z = x + 2  # the turn's first request leaves at once, and the delete with it, ahead of it
    assert (link.multiparts_sent, link.messages_sent) == (multiparts + 1, messages + 2)
    await z
    assert link.multiparts_sent == multiparts + 1  # no multipart of its own for the delete
    assert dropped not in await bob.objects()


async def test_errors_inside_a_batch_stay_with_their_request(client: fedptr.Client, bob: fedptr.Worker) -> None:
    alice = client.worker("alice")
    results = await asyncio.gather(
        bob.send(torch.ones(1)),
        client.worker("ghost").send(torch.ones(1)),
        alice.send(torch.ones(2)),
        return_exceptions=True,
    )
    assert isinstance(results[0], fedptr.Pointer) and results[0].location == "bob"
    assert isinstance(results[1], fedptr.UnknownWorkerError) and results[1].worker == "ghost"
    assert isinstance(results[2], fedptr.Pointer) and results[2].location == "alice"


async def test_failure_mid_pipeline_fails_every_later_step(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(2, 2))
    steps = [x + 1]
    steps.append(steps[-1].reshape(5))  # fails: 4 elements
    for _ in range(10):
        steps.append(steps[-1] * 2)
    await steps[0]
    for step in steps[1:]:
        with pytest.raises(fedptr.RemoteError) as info:
            await step
        assert info.value.remote_type == "RuntimeError" and "invalid for input of size 4" in info.value.remote_message


async def test_in_flight_bound_gives_backpressure(cluster: fedptr.Cluster) -> None:
    async with cluster.connect(max_in_flight=8) as small:
        bob = small.worker("bob")
        x = await bob.send(torch.ones(2))
        ys = [x + i for i in range(8)]
        with pytest.raises(fedptr.TooManyInFlightError, match="8 requests in flight"):
            x + 99
        # awaited calls wait for room instead of failing
        stats = await asyncio.gather(*[small.call("bob", wire.NodeStats()) for _ in range(20)])
        assert all(isinstance(s, wire.NodeStatsReply) for s in stats)
        assert [float((await y.get())[0]) for y in ys] == [1.0 + i for i in range(8)]  # type: ignore[index]
        await bob.clear()


# --- the property: whatever the interleaving, every message arrives once, in per-peer order ----
# Random programs of pipelined ops, gets, dropped pointers (deletes), awaits, loop turns, `batched`
# blocks and `hold_turn`, run through the real Link, Session, broker and nodes in process. What
# each link pushes (requests, deletes, replies) is recorded per destination, and what each
# session receives per source: the two lists must be equal (nothing lost, duplicated or
# reordered, nothing left unsent), and every get must read the value the program computed.
WORKERS = ("bob", "alice")
PROPERTY_TIMEOUT_S = 30.0
"""Deadline of one program, its quiescence included (s)."""

_steps = st.one_of(
    st.tuples(st.just("op"), st.integers(0, 7), st.integers(-3, 3)),
    st.tuples(st.just("get"), st.integers(0, 7)),
    st.tuples(st.just("await"), st.integers(0, 7)),
    st.tuples(st.just("await get"), st.integers(0, 7)),
    st.tuples(st.just("drop"), st.integers(0, 7)),
    st.tuples(
        st.just("turn"),
    ),
    st.tuples(st.just("batched"), st.integers(0, 7), st.integers(1, 4)),
    st.tuples(
        st.just("hold"),
    ),
    st.tuples(st.just("send"), st.sampled_from(WORKERS), st.integers(-3, 3)),
)


def _record(link: fedptr.link.Link, sent: list[tuple[bytes, ...]], received: list[tuple[bytes, ...]]) -> None:
    """Wrap `link` so that what it pushes and what its session receives (requests and replies:
    (peer, command, rid, header)) is appended to `sent` and `received`, in order."""
    push, reply, reply_each, receive = link._push, link.reply, link.reply_each, link.session.receive
    replying = each = False

    def pushed(message: list[Any]) -> None:
        if message[0] in (envelope.REQUEST, envelope.REPLY) and not replying:
            sent.append((bytes(message[1]), message[0], bytes(message[2]), bytes(message[3])))
        push(message)

    def replied(dest: str, rid: bytes, msg: wire.Message) -> None:
        # recorded here, not as pushed: an op's Ok may join the record before it (an ACKS)
        nonlocal replying
        if rid != envelope.NO_REPLY and not each:
            sent.append((dest.encode(), envelope.REPLY, rid, bytes(wire.encode(msg)[0])))
        replying = True
        try:
            reply(dest, rid, msg)
        finally:
            replying = False

    def replied_each(dest: str, rids: Sequence[bytes], msg: wire.Ok) -> None:
        # a node's run of Oks: recorded per id here (it calls `reply` only for some of them)
        nonlocal each
        sent.extend(
            (dest.encode(), envelope.REPLY, rid, bytes(wire.encode(msg)[0])) for rid in rids if rid != envelope.NO_REPLY
        )
        each = True
        try:
            reply_each(dest, rids, msg)
        finally:
            each = False

    def got(frames: Any, now: float) -> list[Any]:
        for env in envelope.parse(frames):
            if env.command in (envelope.REQUEST, envelope.REPLY):
                received.append((env.name, env.command, env.rid, bytes(env.body[0])))
            elif env.command == envelope.ACKS:  # the replies it stands for, in order
                body = bytes(env.body[1])
                received.extend(
                    (env.name, envelope.REPLY, r, body) for r in envelope.acked(env.rid, bytes(env.body[0]))
                )
        return receive(frames, now)

    link._push = pushed  # type: ignore[method-assign]
    link.reply = replied  # type: ignore[method-assign]
    link.reply_each = replied_each  # type: ignore[method-assign]
    link.session.receive = got  # type: ignore[method-assign]


async def _run_program(program: list[tuple[Any, ...]]) -> None:
    async with harness.cluster(list(WORKERS), call_timeout=PROPERTY_TIMEOUT_S / 2) as c:
        client = c.client
        logs = {name: ([], []) for name in (client.link.name, *WORKERS)}  # name -> (sent, received)
        _record(client.link, *logs[client.link.name])
        for name in WORKERS:
            _record(c.node(name).link, *logs[name])
        live: list[tuple[fedptr.Pointer, torch.Tensor]] = []
        pending: list[tuple[Awaitable[Any], torch.Tensor | None]] = []

        def pick(i: int) -> tuple[fedptr.Pointer, torch.Tensor] | None:
            return live[i % len(live)] if live else None

        def op(i: int, k: int) -> None:
            picked = pick(i)
            if picked is not None:
                live.append((picked[0] + k, picked[1] + k))

        async with asyncio.timeout(PROPERTY_TIMEOUT_S):
            for step in program:
                kind = step[0]
                if kind == "send":
                    value = torch.full((3,), float(step[2]))
                    live.append((await c.worker(step[1]).send(value), value))
                elif kind == "op":
                    op(step[1], step[2])
                elif kind == "batched":
                    with client.link.batched():
                        for k in range(step[2]):
                            op(step[1] + k, k)
                elif kind == "hold":
                    client.link.hold_turn()
                elif kind == "turn":
                    await asyncio.sleep(0)
                elif (picked := pick(step[1])) is None:
                    continue
                elif kind == "get":  # a get hands the object on: the pointer is spent
                    live.remove(picked)
                    pending.append((asyncio.ensure_future(picked[0].get()), picked[1]))
                elif kind == "await get":
                    live.remove(picked)
                    assert torch.equal(await picked[0].get(), picked[1])
                elif kind == "await":
                    await picked[0]
                else:  # drop: its delete is queued
                    live.remove(picked)
                    del picked
            for fut, want in pending:
                assert torch.equal(await fut, want)
            for ptr, want in live:
                assert torch.equal(await ptr.get(), want)
            live.clear()  # every delete is queued now

            def flows() -> list[tuple[str, str, list[tuple[bytes, ...]], list[tuple[bytes, ...]]]]:
                return [
                    (
                        src,
                        dst,
                        [m[1:] for m in logs[src][0] if m[0] == dst.encode()],
                        [m[1:] for m in logs[dst][1] if m[0] == src.encode()],
                    )
                    for src in logs
                    for dst in logs
                    if src != dst
                ]

            async def quiet() -> bool:  # the deletes travel unanswered: wait until the stores are empty
                emptied = all([await c.worker(name).objects() == {} for name in WORKERS])
                return emptied and all(sent == got for _, _, sent, got in flows())

            await eventually(quiet, PROPERTY_TIMEOUT_S / 2)
        for src, dst, sent, got in flows():
            assert got == sent, f"{src} -> {dst}: sent {len(sent)}, received {len(got)} (or in another order)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(_steps, min_size=1, max_size=60).map(lambda p: [("send", "bob", 1), *p]))
def test_every_message_arrives_once_in_per_peer_order(program: list[tuple[Any, ...]]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_run_program(program))
    finally:
        loop.close()


async def test_a_request_due_sooner_than_those_in_flight_settles_at_its_own_deadline() -> None:
    # The link arms its deadline timer only for a request due sooner than the timer: one due
    # later than a request already in flight must not move it, one due sooner must. Heartbeats
    # far apart: the link's heartbeat also expires overdue requests, and would hide a timer left late.
    async with harness.cluster([], heartbeat_s=30.0) as c:
        silent = fedptr.link.Link(c.address, "silent", envelope.ROLE_WORKER, handler=lambda *args: None)
        async with silent:
            link = c.client.link
            late = link.request_nowait("silent", wire.Get(1), 60.0)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(fedptr.DeadlineExceeded):
                await asyncio.wait_for(link.request_nowait("silent", wire.Get(2), 0.2), 20.0)
            assert loop.time() - started < 10.0, "the sooner deadline waited for the later one's timer"
            assert not late.done()
            late.cancel()


async def test_a_callback_raising_on_one_reply_leaves_the_rest_of_its_batch_settled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The link calls its hooks for each reply of a BATCH in turn: one raising (a bug in an
    audit hook, say) must not skip the others, whose awaits would end only at their deadline.
    The error is logged, naming the link and the reply."""
    seen = 0

    def audit(reply: wire.Message) -> None:
        nonlocal seen
        seen += 1
        if seen == 50:  # mid-flood: the replies of a chain arrive batched, and this one is no batch's last
            raise RuntimeError("the audit hook broke")

    async with harness.cluster(["bob"], call_timeout=60.0) as c:
        x = await c.worker("bob").send(torch.zeros(1))
        c.client.link.on_reply = audit
        ys = [x + i for i in range(200)]  # one loop turn: the node answers in BATCHes
        async with asyncio.timeout(10.0):  # far under the deadline those left out would end at
            for y in ys:
                await y
        c.client.link.on_reply = None
        assert seen == 200
        assert [float(v) for v in await asyncio.gather(*[y.get() for y in ys[:3]])] == [0.0, 1.0, 2.0]
    [record] = [r for r in caplog.records if r.name == "fedptr.link" and r.exc_info is not None]
    assert "the audit hook broke" in str(record.exc_info[1])  # type: ignore[index]
    assert c.client.name in record.getMessage() and "Settled" in record.getMessage()
