"""The real broker's fast path (`Broker._relay`) keeps its tables as the general path did: a
client's BATCH to two workers reaches each as one multipart named for the client, the latest
request id per worker is noted for LOST notices, and STATS counts what each has pending."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from fedptr.broker.router import Broker, BrokerConfig
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedptr import envelope
from fedptr.zio import events, recv_frames

from .test_session import _endpoints, new_broker

_POLLIN = int(zmq.POLLIN)


class Peers:
    """DEALER sockets registered with one real broker, which routes when `flush` is called."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.socks: dict[bytes, zmq.Socket[bytes]] = {}

    def join(self, name: bytes, role: bytes, rcvhwm: int = 1000) -> None:
        sock = self.socks[name] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.connect(self.broker.endpoint)
        self.send(name, envelope.build(envelope.REGISTER, name, envelope.NO_REPLY, role))
        [accepted] = self.take(name)
        assert envelope.command_of(accepted) == envelope.ACCEPTED

    def send(self, name: bytes, frames: list[Any]) -> None:
        self.socks[name].send_multipart(frames)
        assert self.broker.sock.poll(5000), "the broker never saw the message"
        while events(self.broker.sock) & _POLLIN:
            self.broker.turn(True)

    def take(self, name: bytes) -> list[list[Any]]:
        """What the broker sent `name` so far, heartbeats aside."""
        out = []
        while self.socks[name].poll(0):
            frames = recv_frames(self.socks[name], 1)
            if envelope.command_of(frames) != envelope.HEARTBEAT:
                out.append(frames)
        return out

    def stats(self) -> dict[str, str]:
        self.send(b"c", envelope.build(envelope.STATS, b"", envelope.NO_REPLY))
        [frames] = self.take(b"c")
        [e] = envelope.parse(frames)
        return dict(bytes(f).decode().split("=", 1) for f in e.body)


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers(new_broker())
    yield p
    for s in p.socks.values():
        s.close(linger=0)
    p.broker.close()


def rid(n: int) -> bytes:
    return n.to_bytes(4, "little") + b"\1\0\0\0"


def test_a_batch_to_two_workers_is_relayed_noted_and_counted(peers: Peers) -> None:
    for name, role in ((b"w1", envelope.ROLE_WORKER), (b"w2", envelope.ROLE_WORKER), (b"c", envelope.ROLE_CLIENT)):
        peers.join(name, role)
    sent = [
        envelope.message(envelope.REQUEST, b"w1", rid(1), [b"a"]),
        envelope.message(envelope.REQUEST, b"w2", envelope.NO_REPLY, [b"b"]),
        envelope.message(envelope.REQUEST, b"w1", rid(2), [b"c", b"x" * 5000]),
        envelope.message(envelope.REQUEST, b"w1", rid(3), [b"d"]),
    ]
    peers.send(b"c", envelope.pack_batch(sent))
    [to_w1] = peers.take(b"w1")
    [to_w2] = peers.take(b"w2")
    assert envelope.command_of(to_w1) == envelope.BATCH and len(to_w1) == 2  # the big part stays a frame
    got = [[e.command, e.name, e.rid, *map(bytes, e.body)] for e in envelope.parse(to_w1)]
    assert got == [[m[0], b"c", *m[2:]] for m in (sent[0], sent[2], sent[3])]
    [e2] = envelope.parse(to_w2)
    assert (e2.command, e2.name, e2.rid, e2.body) == (envelope.REQUEST, b"c", envelope.NO_REPLY, [b"b"])
    stats = peers.stats()
    assert (stats["peer.w1.pending"], stats["peer.w2.pending"]) == ("3", "0")
    assert (stats["peer.w1.delivered"], stats["peer.w2.delivered"], stats["routed"]) == ("3", "1", "4")

    replies = [envelope.message(envelope.REPLY, b"c", rid(n), [b"ok"]) for n in (1, 2)]
    peers.send(b"w1", envelope.pack_batch(replies))
    [back] = peers.take(b"c")
    assert [(e.command, e.name, e.rid) for e in envelope.parse(back)] == [
        (envelope.REPLY, b"w1", rid(n)) for n in (1, 2)
    ]
    assert peers.stats()["peer.w1.pending"] == "1"

    # w1 leaves: the client hears which of its requests may have reached it (the latest, 3)
    peers.send(b"w1", envelope.build(envelope.DISCONNECT, b"", envelope.NO_REPLY))
    [lost] = peers.take(b"c")
    [notice] = envelope.parse(lost)
    assert (notice.command, notice.name, [bytes(f) for f in notice.body]) == (
        envelope.LOST,
        b"w1",
        [envelope.ROLE_WORKER, envelope.GONE_DISCONNECTED, rid(3)],
    )


def test_a_batch_naming_an_unknown_worker_delivers_the_rest_and_refuses_that_one(peers: Peers) -> None:
    for name, role in ((b"w1", envelope.ROLE_WORKER), (b"c", envelope.ROLE_CLIENT)):
        peers.join(name, role)
    sent = [envelope.message(envelope.REQUEST, name, rid(n), [b"a"]) for n, name in ((1, b"w1"), (2, b"nobody"))]
    peers.send(b"c", envelope.pack_batch(sent))
    [to_w1] = peers.take(b"w1")
    assert [(e.name, e.rid) for e in envelope.parse(to_w1)] == [(b"c", rid(1))]
    [refused] = peers.take(b"c")
    [err] = envelope.parse(refused)
    assert (err.command, err.name, err.rid, bytes(err.body[0])) == (
        envelope.BROKER_ERROR,
        b"nobody",
        rid(2),
        envelope.REASON_UNKNOWN_NAME,
    )


def _lost_last(peers: Peers, name: bytes) -> bytes:
    """The request id the LOST notice `name` got names as its latest relayed to the peer gone."""
    [lost] = peers.take(name)
    [notice] = envelope.parse(lost)
    assert notice.command == envelope.LOST
    return bytes(notice.body[2])


@pytest.mark.parametrize("batched", [True, False])
def test_a_delete_after_a_request_is_not_named_as_the_latest_request_in_lost(peers: Peers, batched: bool) -> None:
    """A no-reply request (a Delete notice, NO_REPLY) expects nothing and can be failed by no
    LOST notice; were it kept as the latest id (it is of "another incarnation", so after every
    id), the notice would name it, and the session would fail every call to that name, even one
    relayed to the process that took the name again (what 60e6974 fixed)."""
    for name, role in ((b"w1", envelope.ROLE_WORKER), (b"c", envelope.ROLE_CLIENT)):
        peers.join(name, role)
    sent = [
        envelope.message(envelope.REQUEST, b"w1", rid(1), [b"op"]),
        envelope.message(envelope.REQUEST, b"w1", envelope.NO_REPLY, [b"delete"]),
    ]
    if batched:
        peers.send(b"c", envelope.pack_batch(sent))
    else:
        for m in sent:
            peers.send(b"c", envelope.framed(m))
    assert len(peers.take(b"w1")) == (1 if batched else 2)
    peers.send(b"w1", envelope.build(envelope.DISCONNECT, b"", envelope.NO_REPLY))
    assert _lost_last(peers, b"c") == rid(1)


def test_a_peer_that_sent_only_deletes_hears_lost_naming_no_request(peers: Peers) -> None:
    for name, role in ((b"w1", envelope.ROLE_WORKER), (b"c", envelope.ROLE_CLIENT)):
        peers.join(name, role)
    peers.send(b"c", envelope.build(envelope.REQUEST, b"w1", envelope.NO_REPLY, b"delete"))
    peers.send(b"w1", envelope.build(envelope.DISCONNECT, b"", envelope.NO_REPLY))
    assert _lost_last(peers, b"c") == b""


def test_a_peer_answering_itself_in_one_batch_has_nothing_pending(peers: Peers) -> None:
    """A peer may send to its own name: a batch of a request and its reply leaves nothing
    pending (the general path before the fast path counted message by message); counted
    replies first, each such batch left one more pending, without bound."""
    peers.join(b"c", envelope.ROLE_WORKER)
    for n in range(1, 4):
        batch = [
            envelope.message(envelope.REQUEST, b"c", rid(n), [b"q"]),
            envelope.message(envelope.REPLY, b"c", rid(n), [b"p"]),
        ]
        peers.send(b"c", envelope.pack_batch(batch))
        assert len(peers.take(b"c")) == 1
    assert peers.stats()["peer.c.pending"] == "0"


_rids = st.sampled_from([rid(1), rid(2), rid(7), envelope.NO_REPLY, b"\xff\xff\xff\xff\1\0\0\0", b"\0\0\0\0\2\0\0\0"])
_bodies = st.sampled_from([[b"a"], [b"b", b"x" * 3000], [b""]])
_clean = st.tuples(
    st.sampled_from([envelope.REQUEST] * 3 + [envelope.REPLY, envelope.CHUNK]),
    st.sampled_from([b"w1", b"w1", b"w2", b"c"]),
    _rids,
    _bodies,
)
"""What the fast path relays: requests, replies and chunks to registered names (its own too)."""
_odd = st.one_of(
    st.tuples(st.sampled_from([envelope.REQUEST, envelope.REPLY]), st.just(b"nobody"), _rids, _bodies),
    st.tuples(st.just(envelope.HEARTBEAT), st.just(b"w1"), _rids, st.just([])),
    st.tuples(st.just(envelope.FANOUT), st.sampled_from([b"w1", b"nobody"]), _rids, st.just([b"f"])),
)
"""What sends a batch to the general path: an unknown name, a heartbeat, a fan-out."""
_batches = st.lists(
    st.one_of(st.lists(_clean, min_size=1, max_size=8), st.lists(st.one_of(_clean, _odd), min_size=1, max_size=8)),
    min_size=1,
    max_size=3,
)


def _message(command: bytes, name: bytes, request_id: bytes, body: list[bytes]) -> list[Any]:
    if command != envelope.FANOUT:
        return envelope.message(command, name, request_id, body)
    inner = envelope.message(envelope.REQUEST, b"", envelope.NO_REPLY, body)
    return envelope.fanout(envelope.pack_targets([(name, request_id), (b"w2", rid(9))]), inner)


def _world(general: bool, batches: list[list[tuple[bytes, bytes, bytes, list[bytes]]]]) -> list[Any]:
    """Everything the peers of one real broker saw (messages, STATS, LOST) for `batches` sent
    by c, then w1's departure; through the general path alone when `general`."""
    p = Peers(new_broker())
    try:
        p.broker.stats.debug = general  # debug logging makes the broker take the general path
        for name, role in ((b"w1", envelope.ROLE_WORKER), (b"w2", envelope.ROLE_WORKER), (b"c", envelope.ROLE_WORKER)):
            p.join(name, role)
        seen: list[Any] = []
        for batch in batches:
            built = [_message(*m) for m in batch]
            p.send(b"c", envelope.pack_batch(built) if len(built) > 1 else envelope.framed(built[0]))
            for name in (b"w1", b"w2", b"c"):
                seen += [
                    (name, [(e.command, e.name, e.rid, *map(bytes, e.body)) for e in envelope.parse(f)])
                    for f in p.take(name)
                ]
        stats = {k: v for k, v in p.stats().items() if not k.endswith("heard_ms")}
        p.send(b"w1", envelope.build(envelope.DISCONNECT, b"", envelope.NO_REPLY))
        lost = [[(e.command, e.name, *map(bytes, e.body)) for e in envelope.parse(f)] for f in p.take(b"c")]
        return [seen, stats, lost, p.broker.table.sizes()]
    finally:
        for s in p.socks.values():
            s.close(linger=0)
        p.broker.close()


@settings(max_examples=200, deadline=None)
@given(_batches)
@example([[(envelope.REQUEST, b"w1", rid(1), [b"a"]), (envelope.REQUEST, b"w1", rid(2), [b"a"])]])
@example([[(envelope.REQUEST, b"c", rid(1), [b"a"]), (envelope.REPLY, b"c", rid(1), [b"a"])]])
def test_the_fast_path_keeps_every_table_and_counter_as_the_general_path(
    batches: list[list[tuple[bytes, bytes, bytes, list[bytes]]]],
) -> None:
    """Mixed batches (requests, replies, chunks, fan-outs, heartbeats, unknown names, the
    sender's own name; ids repeated, wrapped, of another incarnation, NO_REPLY) through one
    real broker on its fast path and one on its general path: every peer sees the same
    messages and errors, STATS the same counters, and the LOST notice the same latest id."""
    assert _world(False, batches) == _world(True, batches)


@pytest.mark.parametrize("general", [False, True])
def test_a_worker_that_does_not_read_gets_what_fits_and_each_request_refused_is_told(general: bool) -> None:
    """A slow consumer: batches of two requests to a worker that reads nothing, past the broker's
    queue to it. Each request is delivered or refused (OVERLOADED, its own id) exactly once, and
    STATS counts as pending only those delivered, as refused each multipart refused."""
    p = Peers(Broker(BrokerConfig(bind=f"inproc://relay-hwm-{next(_endpoints)}", heartbeat_s=3600.0, hwm=2)))
    try:
        p.broker.stats.debug = general
        p.join(b"w1", envelope.ROLE_WORKER, rcvhwm=2)
        p.join(b"c", envelope.ROLE_CLIENT)
        sent = [rid(n) for n in range(1, 41)]
        for a, b in zip(sent[::2], sent[1::2], strict=True):
            batch = [envelope.message(envelope.REQUEST, b"w1", r, [b"q"]) for r in (a, b)]
            p.send(b"c", envelope.pack_batch(batch))
        errors = [e for f in p.take(b"c") for e in envelope.parse(f)]
        assert {(e.command, bytes(e.body[0])) for e in errors} == {(envelope.BROKER_ERROR, envelope.REASON_OVERLOADED)}
        stats = p.stats()
        delivered = [e.rid for f in p.take(b"w1") for e in envelope.parse(f)]
        refused = [e.rid for e in errors]
        assert sorted(delivered + refused) == sent and delivered and refused
        assert stats["peer.w1.pending"] == str(len(delivered))
        assert stats["peer.w1.refused"] == str(len(refused) // 2)
    finally:
        for sock in p.socks.values():
            sock.close(linger=0)
        p.broker.close()
