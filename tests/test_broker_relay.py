"""The real broker's fast path (`Broker._relay`) keeps its tables as the general path did: a
client's BATCH to two workers reaches each as one multipart named for the client, the latest
request id per worker is noted for LOST notices, and STATS counts what each has pending."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from fedptr.broker.router import Broker

from fedptr import envelope
from fedptr.zio import events, recv_frames

from .test_session import new_broker

_POLLIN = int(zmq.POLLIN)


class Peers:
    """DEALER sockets registered with one real broker, which routes when `flush` is called."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.socks: dict[bytes, zmq.Socket[bytes]] = {}

    def join(self, name: bytes, role: bytes) -> None:
        sock = self.socks[name] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
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
