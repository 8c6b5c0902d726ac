"""Merged acknowledgements (`envelope.ACKS`): a node's run of `Ok` replies to consecutive requests
travels as one record, and settles, is relayed and is counted exactly as the replies it stands for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedptr
from fedptr import envelope, limits, wire
from fedptr import link as linkmod
from fedptr.errors import FedptrError, ProtocolError
from fedptr.session import Session, Settled

from .conftest import eventually

CLIENT = "client-1"
WORKER = "bob"
OKS = [wire.Ok([4], "float32"), wire.Ok([4], "float32"), wire.Ok([2, 3], "int64"), wire.Ok()]
"""Replies a node may give: most alike (the merge's case), some not."""


def _replies(frames: list[Any]) -> Iterator[envelope.Envelope]:
    return (e for e in envelope.parse(frames) if e.command in (envelope.REPLY, envelope.ACKS))


@pytest.mark.inproc
async def test_a_chains_oks_reach_the_client_as_one_record(client: fedptr.Client, bob: fedptr.Worker) -> None:
    """100 dependent ops: op 1 is answered alone, the other 99 (sent as one BATCH with the get)
    in one ACKS; each pointer settles, the value is right, and the broker counts no reply owed."""
    x = await bob.send(torch.ones(4))
    records: list[tuple[bytes, int]] = []
    receive = client.link.session.receive

    def got(frames: Any, now: float) -> list[Any]:
        for e in _replies(frames):
            records.append((e.command, envelope.replies_in([e.command, e.name, e.rid, *e.body])))
        return receive(frames, now)

    client.link.session.receive = got  # type: ignore[method-assign]
    y = x
    ys = []
    for _ in range(100):
        y = y + x
        ys.append(y)
    assert torch.equal(await y.get(), torch.full((4,), 101.0))
    for p in ys:
        await p  # each settled, none failed
    acks = [n for command, n in records if command == envelope.ACKS]
    assert sum(n for _, n in records) == 101  # 100 Oks and the get's reply
    assert acks and max(acks) >= 99, f"the chain's replies came as {records}"

    async def owed_nothing() -> bool:
        stats = await client.link.broker_stats(5.0)
        return stats.get(f"{envelope.STATS_PEER_PREFIX}{WORKER}.pending", 0) == 0

    assert await eventually(owed_nothing, 5.0)


_reply = st.one_of(
    st.sampled_from(OKS),
    st.builds(
        lambda why: wire.Failure(wire.FailureCode.REMOTE.value, "RuntimeError", why, WORKER, [WORKER]),
        st.sampled_from(["a", "b"]),
    ),
)
_step = st.tuples(st.booleans(), st.sampled_from([WORKER, "alice"]), _reply)
"""(answered?, to whom the request went, its reply): a request skipped is one whose reply comes
later or never (an id missing from the run)."""


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_step, max_size=3 * limits.ACKS_MAX_REPLIES), split=st.integers(0, 400))
def test_merged_replies_settle_as_the_replies_they_stand_for(steps: list[Any], split: int) -> None:
    """A node's link answers any mix of requests (some not answered, some to requests sent
    elsewhere, Oks alike and not, failures) in one turn: the client settles exactly the requests
    answered, each with its own reply, in order; the broker's fast and general paths count as
    many replies as were given, and relay the same records."""
    asyncio.run(_merged_replies(steps, split))


async def _merged_replies(steps: list[Any], split: int) -> None:
    session = Session(CLIENT, envelope.ROLE_CLIENT)
    sent: list[list[Any]] = []
    node = linkmod.Link("inproc://none", WORKER, envelope.ROLE_WORKER)
    send, events = linkmod.send_frames, linkmod.events
    linkmod.send_frames = lambda sock, frames: sent.append(list(frames))  # type: ignore[assignment]
    linkmod.events = lambda sock: 0  # type: ignore[assignment]
    try:
        node._sock = object()  # type: ignore[assignment]
        expected: list[tuple[bytes, wire.Message]] = []
        with node.batched():
            for i, (answered, dest, reply) in enumerate(steps):
                rid, _ = session.request(dest, wire.Get(1), 10.0, 0.0)
                if answered and dest == WORKER:
                    node.reply(CLIENT, rid, reply)
                    expected.append((rid, reply))
                if i == split:  # a batch left mid-run: the next reply starts a record of its own
                    node._flush_batch()
    finally:
        linkmod.send_frames, linkmod.events = send, events
    settled: list[Settled] = []
    replies = 0
    for frames in sent:
        relayed = envelope.relay(frames, WORKER.encode())
        assert relayed is not None
        [out] = relayed
        general = [envelope.message(m.command, WORKER.encode(), m.rid, m.body) for m in envelope.parse(frames)]
        assert [list(m) for m in envelope.parse(out.frames)] == [
            list(m) for m in envelope.parse(envelope.pack_batch(general))
        ]
        assert out.replies == sum(envelope.replies_in(m) for m in general)
        replies += out.replies
        settled += [e for e in session.receive(out.frames, 1.0) if isinstance(e, Settled)]
    assert replies == len(expected)
    assert [e.rid for e in settled] == [rid for rid, _ in expected]
    for event, (_, reply) in zip(settled, expected, strict=True):
        if isinstance(reply, wire.Failure):
            assert isinstance(event.error, FedptrError) and event.result is None
        else:
            assert event.error is None and event.result == reply
    assert sum(len(list(_replies(f))) for f in sent) <= len(expected)


def test_an_acks_claiming_too_many_replies_is_refused() -> None:
    session = Session(CLIENT, envelope.ROLE_CLIENT)
    rid, _ = session.request(WORKER, wire.Get(1), 10.0, 0.0)
    body = [envelope.ACKS_COUNT.pack(limits.ACKS_MAX_REPLIES + 1), *wire.encode(wire.Ok())]
    frames = envelope.framed(envelope.message(envelope.ACKS, WORKER.encode(), rid, body))
    [event] = session.receive(frames, 1.0)
    assert isinstance(event, Settled) and isinstance(event.error, ProtocolError)
    assert envelope.relay(frames, b"x") is None  # the broker's fast path leaves it to the general one


def test_an_acks_of_anything_but_ok_fails_each_request_it_names() -> None:
    session = Session(CLIENT, envelope.ROLE_CLIENT)
    rids = [session.request(WORKER, wire.Get(1), 10.0, 0.0)[0] for _ in range(2)]
    failure = wire.Failure(wire.FailureCode.REMOTE.value, "RuntimeError", "no", WORKER, [WORKER])
    body = [envelope.ACKS_COUNT.pack(2), *wire.encode(failure)]
    frames = envelope.framed(envelope.message(envelope.ACKS, WORKER.encode(), rids[0], body))
    events = session.receive(frames, 1.0)
    assert [e.rid for e in events if isinstance(e, Settled)] == rids
    errors = [e.error for e in events if isinstance(e, Settled)]
    assert all(isinstance(e, ProtocolError) for e in errors) and errors[0] is not errors[1]
    assert session.in_flight == 0


_MALFORMED = st.one_of(
    st.builds(lambda n: [envelope.ACKS_COUNT.pack(n), *wire.encode(wire.Ok())], st.sampled_from([0, 2**32 - 1])),
    st.builds(lambda b: [b, *wire.encode(wire.Ok())], st.binary(max_size=7).filter(lambda b: len(b) != 4)),
    st.just([]),
)
"""ACKS bodies a session refuses before it reads the ids they name: no count, a bad count (a count
with no body names them: `test_an_acks_with_a_count_and_no_body_fails_every_request_it_names_at_once`)."""


@settings(max_examples=60, deadline=None)
@given(body=_MALFORMED, victim=st.booleans())
def test_a_malformed_acks_fails_only_requests_sent_to_its_sender(body: list[Any], victim: bool) -> None:
    """A peer's malformed ACKS naming a request the client sent to another worker leaves that
    request pending (as a well-formed reply from the wrong peer is dropped); naming one sent to
    that peer, it fails it. (Failed on main: 'carol' failed bob's request with a bad count.)"""
    session, rid = _to_bob_and_carol(victim)
    frames = envelope.framed(envelope.message(envelope.ACKS, b"carol", rid, body))
    _failed_only_if_sent_to_carol(session, session.receive(frames, 1.0), rid, victim)


@pytest.mark.parametrize("victim", [True, False])
def test_a_reply_whose_stream_is_incomplete_fails_only_a_request_sent_to_its_sender(victim: bool) -> None:
    """The same for a REPLY whose streamed buffer never came whole: 'carol' streams half a buffer
    under the id of a request sent to bob, then replies to it. (Failed on main: bob's request
    failed with 'a streamed buffer is incomplete'.)"""
    session, rid = _to_bob_and_carol(victim)
    info = envelope.CHUNK_INFO.pack(envelope.REPLY, 1, 0, 2)
    session.receive(envelope.framed(envelope.message(envelope.CHUNK, b"carol", rid, [info, b"x"])), 1.0)
    reply = envelope.framed(envelope.message(envelope.REPLY, b"carol", rid, [*wire.encode(wire.Ok()), b""]))
    _failed_only_if_sent_to_carol(session, session.receive(reply, 1.0), rid, victim)


def _to_bob_and_carol(victim: bool) -> tuple[Session, bytes]:
    """A client's session with a request to bob and one to carol; the id of bob's when `victim`
    (carol names a request that is not hers), else of carol's."""
    session = Session(CLIENT, envelope.ROLE_CLIENT)
    to_bob, _ = session.request(WORKER, wire.Get(1), 10.0, 0.0)
    to_carol, _ = session.request("carol", wire.Get(1), 10.0, 0.0)
    return session, to_bob if victim else to_carol


def _failed_only_if_sent_to_carol(session: Session, events: list[Any], rid: bytes, victim: bool) -> None:
    settled = [e for e in events if isinstance(e, Settled)]
    if victim:
        assert settled == [] and session.in_flight == 2
    else:
        [event] = settled
        assert event.rid == rid and isinstance(event.error, ProtocolError)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 5),
    dests=st.lists(st.sampled_from([WORKER, "carol"]), min_size=1, max_size=6),
    extra=st.booleans(),
)
def test_an_acks_with_a_count_and_no_body_fails_every_request_it_names_at_once(
    count: int, dests: list[str], extra: bool
) -> None:
    """An ACKS whose count was read but whose body is missing (or comes in more than one part)
    names its requests all the same: each of them sent to its sender fails at once, typed, rather
    than the first failing and the others waiting for their deadlines (review12's "Left"); one
    sent to another worker stays pending. (Failed on main: only the first failed.)"""
    session = Session(CLIENT, envelope.ROLE_CLIENT)
    rids = [session.request(dest, wire.Get(1), 10.0, 0.0)[0] for dest in dests]
    body: list[Any] = [envelope.ACKS_COUNT.pack(count)]
    if extra:
        body += [*wire.encode(wire.Ok()), b"extra"]
    frames = envelope.framed(envelope.message(envelope.ACKS, WORKER.encode(), rids[0], body))
    settled = [e for e in session.receive(frames, 1.0) if isinstance(e, Settled)]
    named = [rid for rid, dest in zip(rids[:count], dests, strict=False) if dest == WORKER]
    assert [e.rid for e in settled] == named
    assert all(isinstance(e.error, ProtocolError) and e.result is None for e in settled)
    assert len({id(e.error) for e in settled}) == len(settled)  # an error each
    assert session.in_flight == len(rids) - len(named)


def _worker_link() -> linkmod.Link:
    """A node's link while it drains its socket (the caller swaps `send_frames` and `events`)."""
    link = linkmod.Link("inproc://none", WORKER, envelope.ROLE_WORKER)
    link._sock = object()  # type: ignore[assignment]
    link._batch = []  # as while it drains its socket: replies join the open batch
    return link


@settings(max_examples=200, deadline=None)
@given(
    before=st.lists(
        st.tuples(st.sampled_from([CLIENT, "client-2"]), st.integers(0, 12), st.sampled_from(OKS)), max_size=6
    ),
    counters=st.lists(st.sampled_from([1, 1, 1, 1, 2, 0, -1]), min_size=1, max_size=60),
    incarnation=st.lists(st.integers(0, 9), min_size=1, max_size=60),
    ok=st.sampled_from(OKS[1:]),
    acks_max=st.sampled_from([1, 2, 5, limits.ACKS_MAX_REPLIES]),
    batch_max=st.sampled_from([2, 7, limits.BATCH_MAX_MESSAGES]),
    start=st.sampled_from([0, 5, 0xFFFFFFFE]),
)
async def test_reply_each_sends_what_a_reply_per_id_sends(
    before: list[tuple[str, int, wire.Ok]],
    counters: list[int],
    incarnation: list[int],
    ok: wire.Ok,
    acks_max: int,
    batch_max: int,
    start: int,
) -> None:
    """Drawn ids (mostly each the one after the last; gaps, repeats, another incarnation, the
    counter wrapping), after drawn replies already in the batch, with drawn record and batch
    limits: `reply_each` leaves the same multiparts, the same open batch and the same counts as
    `reply` called for each id."""
    rids, counter = [], start
    for i, step in enumerate(counters):
        counter = (counter + step) & 0xFFFFFFFF
        rids.append(envelope.RID_PARTS.pack(counter, 1 if incarnation[i % len(incarnation)] == 0 else 0))
    worlds = []
    for each in (True, False):
        sent: list[list[bytes]] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(limits, "ACKS_MAX_REPLIES", acks_max)
            patch.setattr(limits, "BATCH_MAX_MESSAGES", batch_max)
            keep = sent.append
            patch.setattr(linkmod, "send_frames", lambda sock, frames, keep=keep: keep([bytes(f) for f in frames]))
            patch.setattr(linkmod, "events", lambda sock: 0)
            worlds.append(_replied(sent, before, rids, ok, start, each))
    assert worlds[0] == worlds[1]


def _replied(
    sent: list[list[bytes]],
    before: list[tuple[str, int, wire.Ok]],
    rids: list[bytes],
    ok: wire.Ok,
    start: int,
    each: bool,
) -> tuple[Any, ...]:
    """What a node's link sent and holds after the replies `before`, then `rids` answered with
    `ok` by `reply_each` (`each`) or by `reply` per id."""
    link = _worker_link()
    for dest, n, reply in before:
        link.reply(dest, envelope.RID_PARTS.pack((start + n) & 0xFFFFFFFF, 0), reply)
    if each:
        link.reply_each(CLIENT, rids, ok)
    else:
        for rid in rids:
            link.reply(CLIENT, rid, ok)
    batch = [[bytes(f) for f in record] for record in link._batch or []]
    return (sent, batch, link._acks, link.messages_sent, link.multiparts_sent)
