"""The sans-IO session, driven on a fake clock through the real broker (broker/router.py over
inproc sockets, one routing turn per message: h11's ConnectionPair way, with the real peer):
registration, requests, deadlines, liveness, re-registration after a broker restart, resending
what a forgetful broker refused, and departures; and fan-outs (one request for several
destinations, each settling on its own), their envelope included."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import zmq
from fedptr.broker.router import Broker, BrokerConfig
from hypothesis import given, settings
from hypothesis import strategies as st

from fedptr import envelope, limits, wire
from fedptr.errors import (
    DeadlineExceeded,
    InvalidArgumentError,
    LostWorkerError,
    ProtocolError,
    TooManyInFlightError,
    UnknownWorkerError,
)
from fedptr.session import Event, Incoming, Registered, Send, Session, SessionEnded, Settled
from fedptr.streams import split
from fedptr.zio import events, recv_frames, send_frames
from tests.conftest import examples

BEAT = 1.0


_endpoints = itertools.count()
_POLLIN = int(zmq.POLLIN)


def new_broker() -> Broker:
    """The real router on a fresh inproc endpoint; its heartbeat never falls due during a test
    (the sessions' clock is fake, the broker's is real)."""
    return Broker(BrokerConfig(bind=f"inproc://session-test-{next(_endpoints)}", heartbeat_s=3600.0))


@dataclass
class Net:
    """Sessions on a fake clock and the real broker (broker/router.py) between them. Each session's
    frames travel over an inproc DEALER socket; the broker runs one `turn` per message, in this
    thread, so the test decides when everything happens."""

    broker: Broker = field(default_factory=new_broker)
    now: float = 100.0
    events: dict[str, list[Event]] = field(default_factory=dict)
    sent: list[list[Any]] = field(default_factory=list)
    """Every message a session sent the broker, as sent."""
    sockets: dict[str, zmq.Socket[bytes]] = field(default_factory=dict)

    def socket(self, session: Session) -> zmq.Socket[bytes]:
        sock = self.sockets.get(session.name)
        if sock is None:
            sock = self.sockets[session.name] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.broker.endpoint)
        return sock

    def send(self, session: Session, message: list[Any]) -> None:
        self.sent.append(message)
        send_frames(self.socket(session), envelope.framed(message))
        while events(self.broker.sock) & _POLLIN:
            self.broker.turn(True)

    def take(self, session: Session) -> list[list[Any]]:
        """What the broker sent `session` so far (each a multipart: a message or a BATCH)."""
        out = []
        while True:
            try:
                out.append(recv_frames(self.socket(session), 1))
            except zmq.Again:
                return out

    def forget(self, name: str) -> None:
        """The broker forgets `name` as silent (it was paused, say), as its heartbeat would."""
        self.broker._forget(self.broker.table.by_name[name.encode()], envelope.GONE_SILENT)
        self.broker.turn(False)

    def restart_broker(self) -> None:
        """A new broker that knows no one; every session reaches it on a new connection."""
        self.close()
        self.broker = new_broker()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        self.broker.close()

    def run(self, *sessions: Session) -> None:
        """Deliver until nothing moves; the events each session produced land in `events`."""
        moved = True
        while moved:
            moved = False
            for s in sessions:
                for frames in self.take(s):
                    moved = True
                    self.handle(s, s.receive(frames, self.now))

    def handle(self, s: Session, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Send):
                self.send(s, e.message)
            else:
                self.events.setdefault(s.name, []).append(e)

    def tick(self, seconds: float, *sessions: Session) -> None:
        self.now += seconds
        for s in sessions:
            self.handle(s, s.tick(self.now))
        self.run(*sessions)

    def settled(self, s: Session) -> list[Settled]:
        return [e for e in self.events.get(s.name, []) if isinstance(e, Settled)]


def registered(net: Net, name: str, role: bytes) -> Session:
    s = Session(name, role, heartbeat_s=BEAT, liveness=3)
    rid, message = s.register(net.now, 5.0)
    net.send(s, message)
    net.run(s)
    assert net.settled(s) == [Settled(rid, wire.Ok(), dest="broker")]
    net.events.clear()
    return s


@pytest.fixture
def net() -> Iterator[Net]:
    net = Net()
    yield net
    net.close()


def pair(net: Net) -> tuple[Session, Session]:
    return registered(net, "bob", envelope.ROLE_WORKER), registered(net, "client-1", envelope.ROLE_CLIENT)


def test_request_reaches_the_worker_and_its_reply_settles_the_request(net: Net) -> None:
    bob, client = pair(net)
    rid, message = client.request("bob", wire.Search("digits"), 5.0, net.now)
    net.send(client, message)
    net.run(bob, client)
    [incoming] = net.events["bob"]
    assert isinstance(incoming, Incoming) and incoming.source == "client-1"
    assert incoming.request.message == wire.Search("digits") and incoming.request.budget_ms == 5000
    reply = bob.reply(incoming.source, incoming.rid, wire.SearchReply([7]), net.now)
    assert reply is not None
    net.send(bob, reply)
    net.run(bob, client)
    assert net.settled(client) == [Settled(rid, wire.SearchReply([7]), dest="bob")]
    assert client.in_flight == 0


def test_a_request_unanswered_by_its_deadline_fails_and_a_late_reply_is_ignored(net: Net) -> None:
    bob, client = pair(net)
    rid, message = client.request("bob", wire.Search("x"), 0.5, net.now)
    net.send(client, message)
    net.run(bob)
    assert client.next_deadline() == net.now + 0.5
    net.tick(0.6, client)
    [settled] = net.settled(client)
    assert settled.rid == rid and isinstance(settled.error, DeadlineExceeded) and settled.error.worker == "bob"
    [incoming] = net.events["bob"]
    assert isinstance(incoming, Incoming)
    late = bob.reply(incoming.source, incoming.rid, wire.SearchReply([]), net.now)
    assert late is not None
    net.send(bob, late)
    net.run(client)
    assert len(net.settled(client)) == 1  # nothing more


def test_in_flight_bound_is_local_backpressure(net: Net) -> None:
    client = Session("c", envelope.ROLE_CLIENT, max_in_flight=2)
    client.request("bob", wire.Clear(), 5, net.now)
    client.request("bob", wire.Clear(), 5, net.now)
    with pytest.raises(TooManyInFlightError, match="2 requests in flight"):
        client.request("bob", wire.Clear(), 5, net.now)


def test_idle_session_beats_and_a_silent_broker_is_taken_for_dead(net: Net) -> None:
    _bob, client = pair(net)
    rid, _message = client.request("bob", wire.Clear(), 60.0, net.now)  # never delivered
    net.now += BEAT
    beat = client.tick(net.now)
    assert [type(e) for e in beat] == [Send] and beat[0].message[0] == envelope.HEARTBEAT  # type: ignore[union-attr]
    for _ in range(3):  # three more silent intervals: past liveness
        net.now += BEAT
        events = client.tick(net.now)
    lost = [e for e in events if isinstance(e, Settled)]
    assert len(lost) == 1 and lost[0].rid == rid and isinstance(lost[0].error, LostWorkerError)
    assert not client.registered
    assert [e.message[0] for e in events if isinstance(e, Send)] == [envelope.REGISTER]


def test_a_stalled_loop_gives_no_liveness_verdict(net: Net) -> None:
    _, client = pair(net)
    net.now += 10 * BEAT  # our own loop was blocked: we could not have heard anything
    events = client.tick(net.now)
    assert client.registered
    assert not [e for e in events if isinstance(e, Settled)]


def test_registers_again_after_a_broker_restart(net: Net) -> None:
    _bob, client = pair(net)
    for _ in range(4):
        net.now += BEAT
        client.tick(net.now)
    assert not client.registered
    net.restart_broker()  # the restarted broker knows no one
    net.tick(BEAT, client)
    assert client.registered and client.reregistrations == 1
    assert any(isinstance(e, Registered) for e in net.events["client-1"])


def test_a_request_the_broker_refused_undelivered_is_sent_again_after_registering(net: Net) -> None:
    bob, client = pair(net)
    net.forget("client-1")  # the broker forgot the client (it was paused, say)
    rid, message = client.request("bob", wire.Search("x"), 5.0, net.now)
    net.send(client, message)
    net.run(bob, client)  # NOT_REGISTERED, then REGISTER, ACCEPTED, and the request again
    assert client.registered and client.reregistrations == 1
    [incoming] = net.events["bob"]
    assert isinstance(incoming, Incoming) and incoming.rid == rid


def test_lost_peer_fails_what_waits_on_it_and_ends_a_clients_session(net: Net) -> None:
    bob, client = pair(net)
    _rid, _message = client.request("bob", wire.Clear(), 5.0, net.now)
    lost = envelope.message(envelope.LOST, b"bob", envelope.NO_REPLY, [envelope.ROLE_WORKER, envelope.GONE_CLOSED])
    events = client.receive(envelope.framed(lost), net.now)
    assert len(events) == 1 and isinstance(events[0], Settled) and isinstance(events[0].error, LostWorkerError)
    gone = envelope.message(
        envelope.LOST, b"client-1", envelope.NO_REPLY, [envelope.ROLE_CLIENT, envelope.GONE_DISCONNECTED]
    )
    assert bob.receive(envelope.framed(gone), net.now) == [SessionEnded("client-1")]
    silent = envelope.message(
        envelope.LOST, b"client-1", envelope.NO_REPLY, [envelope.ROLE_CLIENT, envelope.GONE_SILENT]
    )
    assert bob.receive(envelope.framed(silent), net.now) == []  # it may come back: keep its objects


@pytest.mark.parametrize("then_delete", [False, True])
def test_a_lost_notice_fails_only_the_requests_relayed_to_the_peer_that_is_gone(net: Net, then_delete: bool) -> None:
    # a node killed and restarted at once: the broker forgets the old connection when the new one
    # registers, and a request the client sent to the name meanwhile went to the new process, which
    # answers it; the LOST notice, read by the client only after that, must not fail it too. A
    # no-reply request (a Delete) sent after the first must not change which one the notice names
    old_bob, client = pair(net)
    first, message = client.request("bob", wire.Clear(), 5.0, net.now)
    net.send(client, message)
    if then_delete:
        net.send(client, client.notify("bob", wire.Clear(), net.now))
    net.run(old_bob)  # the old process got it, and dies without an answer
    net.forget("bob")  # its LOST notice waits in the client's socket, unread
    net.sockets.pop("bob").close(linger=0)
    new_bob = registered(net, "bob", envelope.ROLE_WORKER)
    second, message = client.request("bob", wire.Clear(), 5.0, net.now)
    net.send(client, message)
    net.run(new_bob)
    [incoming] = net.events.pop("bob")
    assert isinstance(incoming, Incoming) and incoming.rid == second
    reply = new_bob.reply(incoming.source, incoming.rid, wire.Ok(), net.now)
    assert reply is not None
    net.send(new_bob, reply)
    net.run(client)
    outcome = {e.rid: e for e in net.settled(client)}
    assert isinstance(outcome[first].error, LostWorkerError)
    assert outcome[second] == Settled(second, wire.Ok(), dest="bob")
    assert client.in_flight == 0


def test_a_malformed_request_is_answered_with_a_protocol_failure(net: Net) -> None:
    bob, client = pair(net)
    rid, _ = client.request("bob", wire.Clear(), 5.0, net.now)
    net.send(client, envelope.message(envelope.REQUEST, b"bob", rid, [b"\xc1 not msgpack"]))
    net.run(bob, client)
    [settled] = net.settled(client)
    assert settled.error is not None and "protocol" in type(settled.error).__name__.lower()


def test_request_ids_never_repeat_across_incarnations(net: Net) -> None:
    a = Session("bob", envelope.ROLE_WORKER)
    b = Session("bob", envelope.ROLE_WORKER)  # the same peer, restarted
    ids_a = {a.request("x", wire.Clear(), 5, net.now)[0] for _ in range(100)}
    ids_b = {b.request("x", wire.Clear(), 5, net.now)[0] for _ in range(100)}
    assert a.incarnation != b.incarnation and not ids_a & ids_b
    assert envelope.NO_REPLY not in ids_a | ids_b


# --- fan-outs ------------------------------------------------------------------------------
WORKERS = ["bob", "alice", "carol"]


def fleet(net: Net) -> tuple[list[Session], Session]:
    workers = [registered(net, name, envelope.ROLE_WORKER) for name in WORKERS]
    return workers, registered(net, "client-1", envelope.ROLE_CLIENT)


def answer_all(net: Net, workers: list[Session]) -> list[Incoming]:
    """Each worker's requests so far, each answered with an Ok."""
    incoming = []
    for w in workers:
        for e in net.events.pop(w.name, []):
            assert isinstance(e, Incoming)
            incoming.append(e)
            reply = w.reply(e.source, e.rid, wire.Ok(), net.now)
            assert reply is not None
            net.send(w, reply)
    return incoming


def test_a_fan_out_is_sent_once_and_each_destination_answers_its_own_request(net: Net) -> None:
    workers, client = fleet(net)
    net.sent.clear()
    rids, message = client.request_many(WORKERS, wire.Search("digits"), 5.0, net.now)
    assert len(set(rids)) == 3 and client.in_flight == 3
    net.send(client, message)
    assert [m[0] for m in net.sent] == [envelope.FANOUT]  # one upload
    net.run(*workers, client)
    incoming = answer_all(net, workers)
    assert [(e.source, e.rid, e.request.message) for e in incoming] == [
        ("client-1", rid, wire.Search("digits")) for rid in rids
    ]
    net.run(*workers, client)
    settled = sorted(net.settled(client), key=lambda e: rids.index(e.rid))
    assert settled == [Settled(r, wire.Ok(), dest=w) for r, w in zip(rids, WORKERS, strict=True)]
    assert client.in_flight == 0


def test_each_destination_of_a_fan_out_fails_on_its_own(net: Net) -> None:
    workers, client = fleet(net)
    bob = workers[0]
    rids, message = client.request_many([*WORKERS, "nobody"], wire.Clear(), 0.5, net.now)
    net.send(client, message)
    net.run(*workers, client)
    net.events.pop("carol")  # carol never answers
    net.events.pop("alice")
    lost = envelope.message(envelope.LOST, b"alice", envelope.NO_REPLY, [envelope.ROLE_WORKER, envelope.GONE_CLOSED])
    net.handle(client, client.receive(envelope.framed(lost), net.now))
    answer_all(net, [bob])
    net.run(*workers, client)
    net.tick(0.6, client)
    outcome = {e.rid: e for e in net.settled(client)}
    assert outcome[rids[0]] == Settled(rids[0], wire.Ok(), dest="bob")
    assert isinstance(outcome[rids[1]].error, LostWorkerError) and outcome[rids[1]].error.worker == "alice"
    assert isinstance(outcome[rids[2]].error, DeadlineExceeded) and outcome[rids[2]].error.worker == "carol"
    assert isinstance(outcome[rids[3]].error, UnknownWorkerError) and outcome[rids[3]].error.worker == "nobody"
    assert len(outcome) == 4 and client.in_flight == 0


def test_a_fan_out_the_broker_refused_undelivered_is_sent_again_to_each(net: Net) -> None:
    workers, client = fleet(net)
    net.forget("client-1")
    rids, message = client.request_many(WORKERS, wire.Clear(), 5.0, net.now)
    net.send(client, message)
    net.run(*workers, client)  # NOT_REGISTERED for each, REGISTER, ACCEPTED, each request again
    assert client.registered and client.reregistrations == 1
    assert [e.rid for e in answer_all(net, workers)] == rids


def test_a_streamed_fan_out_reaches_each_destination_whole(net: Net) -> None:
    """As `Link` streams a fan-out: the message it carries is split, each part fanned out alike."""
    workers, client = fleet(net)
    data = bytes(range(256)) * 4
    tensor = wire.RawTensor("uint8", [len(data)], memoryview(data))
    _rids, message = client.request_many(WORKERS, wire.Put(7, tensor, False), 5.0, net.now)
    targets, inner = envelope.fanned(message)
    parts = split(inner, threshold=100, chunk=300)
    assert [p[0] for p in parts] == [envelope.CHUNK] * 4 + [envelope.REQUEST]
    for part in parts:
        net.send(client, envelope.fanout(targets, part))
    net.run(*workers, client)
    for w in workers:
        [put] = [e.request.message for e in net.events[w.name] if isinstance(e, Incoming)]
        assert isinstance(put, wire.Put) and bytes(put.tensor.data) == data


def test_a_fan_out_takes_distinct_possible_names_within_its_width(net: Net) -> None:
    client = Session("c", envelope.ROLE_CLIENT, max_in_flight=4)
    too_many = [f"w{i}" for i in range(limits.FANOUT_MAX_WIDTH + 1)]
    for dests in ([], ["bob", "bob"], ["bob", "no such name!"], too_many):
        with pytest.raises(InvalidArgumentError):
            client.request_many(dests, wire.Clear(), 5, net.now)
    assert client.in_flight == 0
    client.request_many(["a", "b"], wire.Clear(), 5, net.now)
    with pytest.raises(TooManyInFlightError):
        client.request_many(["a", "b", "c"], wire.Clear(), 5, net.now)
    assert client.in_flight == 2


def fan(targets: bytes, *body: bytes) -> envelope.Envelope:
    [env] = envelope.parse(envelope.build(envelope.FANOUT, targets, envelope.NO_REPLY, *body))
    return env


def test_unfan_gives_each_target_the_same_body() -> None:
    rid_a, rid_b = b"\1" * 8, b"\2" * 8
    env = fan(envelope.pack_targets([(b"bob", rid_a), (b"alice", rid_b)]), envelope.REQUEST, b"header", b"buf")
    [a, b] = envelope.unfan(env)
    assert (a.command, a.name, a.rid, a.body) == (envelope.REQUEST, b"bob", rid_a, [b"header", b"buf"])
    assert (b.command, b.name, b.rid) == (envelope.REQUEST, b"alice", rid_b)
    assert a.body[1] is b.body[1]  # the same frame, never copied


@pytest.mark.parametrize(
    ("targets", "body"),
    [
        (envelope.pack_targets([(b"bob", b"\1" * 8)]), []),  # nothing carried
        (envelope.pack_targets([(b"bob", b"\1" * 8)]), [envelope.REPLY, b"h"]),  # replies are not fanned out
        (envelope.pack_targets([(b"bob", b"\1" * 8)]), [envelope.REQUEST * 2, b"h"]),
        (b"", [envelope.REQUEST, b"h"]),  # no destination
        (envelope.pack_targets([(b"bob", b"\1" * 8)])[:-1], [envelope.REQUEST, b"h"]),  # truncated id
        (b"\xff" + b"bob" + b"\1" * 8, [envelope.REQUEST, b"h"]),  # length past the end
        (envelope.pack_targets([(b"b b", b"\1" * 8)]), [envelope.REQUEST, b"h"]),  # impossible name
        (envelope.pack_targets([(b"bob", b"\1" * 8), (b"bob", b"\2" * 8)]), [envelope.REQUEST, b"h"]),
        (envelope.pack_targets([(f"w{i}".encode(), b"\1" * 8) for i in range(65)]), [envelope.REQUEST, b"h"]),
    ],
)
def test_unfan_refuses_malformed_fan_outs(targets: bytes, body: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        envelope.unfan(fan(targets, *body), max_width=64)


def test_a_small_message_is_one_frame_and_a_batch_one_frame_plus_its_big_buffers() -> None:
    """Each frame is a message of its own to libzmq (and to CURVE): a small reply crosses as 1
    frame (version 2: 2), an op and the delete batched with it as 1 (version 2: 5); a buffer over
    `limits.INLINE_FRAME_BYTES` stays a frame of its own, the same object, never copied."""
    rid = envelope.request_id_bytes(7)
    op = envelope.message(envelope.REQUEST, b"bob", rid, [b"header", b"\0" * 16])
    delete = envelope.message(envelope.REQUEST, b"bob", envelope.NO_REPLY, [b"header"])
    reply = envelope.message(envelope.REPLY, b"client-1", rid, [b"header"])
    assert len(envelope.framed(reply)) == 1
    batch = envelope.pack_batch([delete, op])
    assert len(batch) == 1
    got = [envelope.message(e.command, e.name, e.rid, e.body) for e in envelope.parse(batch)]
    assert got == [delete, op]
    assert envelope.command_of(batch) == envelope.BATCH and envelope.count(batch) == 2
    big = memoryview(bytearray(limits.INLINE_FRAME_BYTES + 1))
    chain = [envelope.message(envelope.REQUEST, b"bob", envelope.request_id_bytes(i), [b"op"]) for i in range(100)]
    frames = envelope.pack_batch([*chain, envelope.message(envelope.REQUEST, b"bob", rid, [b"put", big, b"tail"])])
    assert len(frames) == 3 and frames[1] is big and frames[2] == b"tail"  # after a big one, frames of their own
    [one] = envelope.parse(envelope.framed(op))
    assert (one.command, one.name, one.rid, one.body) == (envelope.REQUEST, b"bob", rid, [b"header", b"\0" * 16])


def test_a_chunk_keeps_its_info_and_data_as_frames() -> None:
    """The direct path seals and reads a chunk's info and data frames in place (fedptr/direct.py)."""
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 3)
    frames = envelope.framed(envelope.message(envelope.CHUNK, b"bob", b"\1" * 8, [info, b"abc"]))
    assert frames[1:] == [info, b"abc"]


_messages = st.lists(
    st.tuples(
        st.sampled_from(sorted(envelope.COMMANDS - {envelope.BATCH})),
        st.binary(max_size=80),
        st.binary(min_size=8, max_size=8),
        st.lists(
            st.one_of(st.binary(max_size=40), st.integers(0, 3 * limits.INLINE_FRAME_BYTES).map(bytes)), max_size=5
        ),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=examples(300), deadline=None)
@given(_messages)
def test_any_messages_framed_and_parsed_come_back(messages: list[tuple[bytes, bytes, bytes, list[bytes]]]) -> None:
    """Frames, then parse, give back every message: alone, and all in one BATCH."""
    ms = [envelope.message(c, n, r, b) for c, n, r, b in messages]
    for m in ms:
        [e] = envelope.parse(envelope.framed(m))
        assert envelope.message(e.command, e.name, e.rid, [bytes(f) for f in e.body]) == m
    batch = envelope.pack_batch(ms)
    assert envelope.count(batch) == len(ms)
    assert [envelope.message(e.command, e.name, e.rid, [bytes(f) for f in e.body]) for e in envelope.parse(batch)] == ms


_BATCH_HEAD = envelope.PROTOCOL + envelope.BATCH


_garbage = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.binary(max_size=64).map(lambda b: envelope.PROTOCOL + b),
        st.binary(max_size=64).map(lambda b: _BATCH_HEAD + b),
        _messages.map(lambda ms: envelope.pack_batch([envelope.message(c, n, r, b) for c, n, r, b in ms])[0]),
    ),
    min_size=0,
    max_size=4,
)


@settings(max_examples=examples(1500), deadline=None)
@given(
    _garbage,
    st.integers(0, 200),
    st.binary(max_size=4),
)
def test_any_bytes_parse_to_valid_envelopes_or_a_protocol_error(frames: list[bytes], cut: int, noise: bytes) -> None:
    """Fuzz: whatever the bytes (a well-formed batch cut short or with bytes added included),
    `parse` raises ProtocolError or gives envelopes of a known form, never another exception."""
    if frames:
        frames[0] = frames[0][: len(frames[0]) - cut] + noise if cut % 2 else frames[0] + noise
    try:
        envs = envelope.parse(frames)
    except ProtocolError:
        return
    assert envs
    for e in envs:
        assert len(e.command) == 1 and e.command != envelope.BATCH and len(e.rid) == envelope.REQUEST_ID_BYTES


@pytest.fixture(scope="module")
def lone_broker() -> Iterator[Broker]:
    broker = new_broker()
    yield broker
    broker.close()


@settings(max_examples=examples(500), deadline=None)
@given(frames=_garbage)
def test_the_broker_handles_any_bytes_without_an_exception(lone_broker: Broker, frames: list[bytes]) -> None:
    """Fuzz the real router's `handle` (an unregistered sender's multipart): whatever the bytes, it
    drops them or answers, and never raises (its loop would log a bug and drop the message)."""
    lone_broker.handle([b"\0fuzzer", *frames])


def record(command: bytes, name: bytes = b"bob", extra: int = 0, tail: bytes = b"") -> bytes:
    """One FPTR3 record, by hand (`fedptr/envelope.py`'s layout), for malformed batches."""
    return command + b"\0" * 8 + len(name).to_bytes(2, "little") + extra.to_bytes(2, "little") + name + tail


def prefixed(rec: bytes, length: int | None = None) -> bytes:
    return (len(rec) if length is None else length).to_bytes(4, "little") + rec


MALFORMED_BATCHES = [
    [_BATCH_HEAD],  # no message
    [_BATCH_HEAD + b"\5\0"],  # a truncated length prefix
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST)) + b"\1\0\0"],  # a truncated second prefix
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST), 200)],  # a length past the end
    [_BATCH_HEAD + prefixed(b"")],  # a zero-length record
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST)[:10])],  # a record too short for its fields
    [_BATCH_HEAD + prefixed(record(envelope.BATCH, b"", 0, prefixed(record(envelope.REQUEST))))],  # nested
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST, extra=0xFFFF)), b"x"],  # a huge count of frames
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST, name=b"b" * 40)[:20])],  # a name past its record's end
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST, tail=b"\x09\0\0\0ab"))],  # an inlined part past the end
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST, tail=b"\1\0"))],  # an inlined part's truncated prefix
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST)), b"an extra frame no record counts"],
    [_BATCH_HEAD + prefixed(record(envelope.REQUEST)) * (limits.BATCH_MAX_RECEIVED + 1)],  # too many messages
]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [envelope.PROTOCOL],  # no command
        [envelope.PROTOCOL + envelope.REQUEST + b"\0" * 7],  # a request id short of 8 bytes
        [b"FPTR1", envelope.REQUEST, b"bob", b"\0" * 8, b"h"],  # version 1's four frames
        [b"FPTR2" + envelope.REQUEST + b"\0" * 8 + b"bob", b"h"],  # version 2's head and body
        [b"FPTR9" + envelope.REQUEST + b"\0" * 8 + b"bob", b"h"],
        [envelope.PROTOCOL + record(envelope.REQUEST, extra=1)],  # an extra frame counted, none sent
        [envelope.PROTOCOL + record(envelope.REQUEST), b"an extra frame not counted"],
        *MALFORMED_BATCHES,
    ],
)
def test_malformed_envelopes_are_refused(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        envelope.parse(frames)


def test_a_malformed_batch_loses_no_other_peers_message(net: Net) -> None:
    """The broker drops each malformed one-frame batch whole and goes on routing: another
    peer's request sent after them all still reaches its worker."""
    bob, client = pair(net)
    rogue = registered(net, "rogue", envelope.ROLE_CLIENT)
    for frames in MALFORMED_BATCHES:
        send_frames(net.socket(rogue), frames)
        while events(net.broker.sock) & _POLLIN:
            net.broker.turn(True)
    assert net.broker.dropped == len(MALFORMED_BATCHES)
    rid, message = client.request("bob", wire.Search("digits"), 5.0, net.now)
    net.send(client, message)
    net.run(bob, client, rogue)
    [incoming] = net.events["bob"]
    assert isinstance(incoming, Incoming) and incoming.source == "client-1" and incoming.rid == rid
    assert net.events.get("rogue", []) == []


def inlined(*parts: bytes) -> bytes:
    """The inlined body parts of a hand-made record, each after its u32 length."""
    return b"".join(len(p).to_bytes(4, "little") + p for p in parts)


_INFO = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 100)
_TINY = [b""] * 5000
EXPLODING = {
    # an oversized inlined part first: the broker's re-made head keeps none of what follows it
    "request": record(envelope.REQUEST, tail=inlined(b"h" * (limits.INLINE_FRAME_BYTES + 1), *_TINY)),
    # a chunk inlines nothing: the broker re-makes every inlined part a frame of its own
    "chunk": record(envelope.CHUNK, tail=inlined(_INFO, *_TINY)),
    # a fan-out inlines its parts; the chunk it carries is re-made with each as a frame
    "fanned chunk": record(
        envelope.FANOUT, envelope.pack_targets([(b"bob", b"\3" * 8)]), tail=inlined(envelope.CHUNK, _INFO, *_TINY)
    ),
}


@pytest.mark.parametrize("attack", sorted(EXPLODING))
def test_the_broker_sends_no_more_frames_than_a_peer_sent(net: Net, attack: str) -> None:
    """A peer's one frame (a head of 5,000 tiny inlined parts after an oversized one, or inlined
    into a chunk, or into a chunk a fan-out carries) must not become 5,000 frames the broker
    sends, per destination: libzmq (and CURVE) costs per frame, so that was ~1,000 times the
    broker's and the worker's work and queued memory per byte the peer sent. Such a record breaks
    the envelope's own rules (inlined parts are small; a chunk inlines nothing and is two
    frames): the broker drops it as malformed."""
    bob, _ = pair(net)
    rogue = registered(net, "rogue", envelope.ROLE_CLIENT)
    send_frames(net.socket(rogue), [envelope.PROTOCOL + EXPLODING[attack]])
    while events(net.broker.sock) & _POLLIN:
        net.broker.turn(True)
    assert [len(frames) for frames in net.take(bob)] == []
    assert net.broker.dropped == 1


def test_a_record_the_broker_cannot_frame_again_is_dropped_not_raised(net: Net) -> None:
    """An oversized inlined part then 65,536 empty ones (264 KB): framed again, they are 65,537
    extra frames, past the record's u16 count. `handle` raised ProtocolError from inside
    routing (the loop logged a traceback per message, unthrottled); it must drop the record as
    malformed, like any other."""
    bob, _ = pair(net)
    rogue = registered(net, "rogue", envelope.ROLE_CLIENT)
    head = envelope.PROTOCOL + record(envelope.REQUEST, tail=inlined(b"h" * 2000, *[b""] * 0x10000))
    net.broker.handle([net.broker.table.by_name[b"rogue"], head])
    assert net.broker.dropped == 1
    assert net.take(bob) == [] and net.take(rogue) == []


def test_a_bad_message_in_a_batch_loses_none_of_the_batchs_other_replies(net: Net) -> None:
    """A worker answers the client's request and, in the same BATCH, sends it something it
    refuses (a request: clients take none). The reply still settles its request: when the
    refusal raised out of `receive`, the reply's request was already taken off the pending table
    but its Settled event was dropped with the rest of the batch, so the caller's future waited
    forever (no deadline left to fail it)."""
    bob, client = pair(net)
    rid, message = client.request("bob", wire.Search("digits"), 5.0, net.now)
    net.send(client, message)
    [request] = net.take(bob)
    [incoming] = bob.receive(request, net.now)
    assert isinstance(incoming, Incoming) and incoming.rid == rid
    reply = envelope.message(envelope.REPLY, b"client-1", rid, wire.encode(wire.Ok()))
    stray = envelope.message(envelope.REQUEST, b"client-1", b"\7" * 8, wire.encode(wire.Search("x")))
    send_frames(net.socket(bob), envelope.pack_batch([reply, stray]))
    while events(net.broker.sock) & _POLLIN:
        net.broker.turn(True)
    [batch] = net.take(client)
    assert client.receive(batch, net.now) == [Settled(rid, wire.Ok(), dest="bob")]
    assert client.in_flight == 0


def test_a_batch_over_the_direct_path_is_a_protocol_error() -> None:
    """A direct path's peer (admitted, but not trusted to be well-formed) seals a BATCH of two
    chunks. `receive_direct` raised ValueError (an unpacking of one message), which the link's
    direct handler, catching ProtocolError only, let out of the direct socket's drain: the rest
    of that socket, every other peer's chunks, was left unread, with a traceback per message."""
    node = Session("bob", envelope.ROLE_WORKER, heartbeat_s=BEAT, liveness=3)
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 4)
    chunk = envelope.message(envelope.CHUNK, b"bob", b"\1" * 8, [info, b"data"])
    with pytest.raises(ProtocolError):
        node.receive_direct(b"client-1", envelope.pack_batch([chunk, chunk]), 100.0)


@settings(max_examples=200, deadline=None)
@given(
    result_id=st.integers(0, 2**63 - 1),
    refs=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
    op=st.sampled_from(["add", "mul", "matmul", "x" * 40]),
    timeout=st.floats(0.001, 3600.0),
    extra=st.sampled_from([None, "kwargs", "scalar", "more_ids"]),
)
def test_a_request_body_is_what_wire_encode_gives(
    result_id: int, refs: list[int], op: str, timeout: float, extra: str | None
) -> None:
    # An Op on references only is encoded from a template with its ids patched in: byte for
    # byte what the full encode gives, for every id (those msgpack packs shorter included) and
    # every other Op, which takes the full encode.
    args: list[wire.Value] = [wire.Ref(r) for r in refs]
    kwargs: dict[str, wire.Value] = {"alpha": 2} if extra == "kwargs" else {}
    if extra == "scalar":
        args.append(1.5)
    msg = wire.Op(result_id, op, args, kwargs, more_ids=[7] if extra == "more_ids" else [])
    session = Session("c", envelope.ROLE_CLIENT)
    _, message = session.request("bob", msg, timeout, 0.0)
    expected = wire.encode(msg, budget_ms=max(1, int(timeout * 1000)))
    body = message[3:]  # [command, name, rid, *body]
    assert [bytes(f) for f in body] == [bytes(f) for f in expected]
    assert wire.decode(body).message == msg
