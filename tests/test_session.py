"""The sans-IO session, driven through a fake broker with no sockets and a fake clock (h11's
ConnectionPair way): registration, requests, deadlines, liveness, re-registration after a
broker restart, resending what a forgetful broker refused, and departures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fedptr import envelope, wire
from fedptr.errors import DeadlineExceeded, LostWorkerError, TooManyInFlightError
from fedptr.session import Event, Incoming, Registered, Send, Session, SessionEnded, Settled

BEAT = 1.0


@dataclass
class FakeBroker:
    """Routes between sessions by name, as broker/router.py does, minus sockets."""

    peers: dict[str, Session] = field(default_factory=dict)
    inbox: dict[str, list[list[Any]]] = field(default_factory=dict)

    def accept(self, sender: Session, message: list[Any]) -> None:
        """Handle one message `sender` sent (``[command, name, rid, *body]``)."""
        command, name, rid, body = message[0], message[1], message[2], message[3:]
        if command == envelope.REGISTER:
            self.peers[name.decode()] = sender
            self._to(sender, envelope.message(envelope.ACCEPTED, name, rid))
        elif sender.name not in self.peers:
            self._to(sender, envelope.message(envelope.BROKER_ERROR, name, rid, [envelope.REASON_NOT_REGISTERED]))
        elif command in (envelope.REQUEST, envelope.REPLY):
            dest = self.peers[name.decode()]
            self._to(dest, envelope.message(command, sender.name.encode(), rid, body))

    def _to(self, session: Session, message: list[Any]) -> None:
        self.inbox.setdefault(session.name, []).append(message)

    def take(self, session: Session) -> list[list[Any]]:
        return self.inbox.pop(session.name, [])


@dataclass
class Net:
    """Two sessions, a worker and a client, and the broker between them."""

    broker: FakeBroker = field(default_factory=FakeBroker)
    now: float = 100.0
    events: dict[str, list[Event]] = field(default_factory=dict)

    def send(self, session: Session, message: list[Any]) -> None:
        self.broker.accept(session, message)

    def run(self, *sessions: Session) -> None:
        """Deliver until nothing moves; the events each session produced land in `events`."""
        moved = True
        while moved:
            moved = False
            for s in sessions:
                for message in self.broker.take(s):
                    moved = True
                    self.handle(s, s.receive(envelope.framed(message), self.now))

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
    assert net.settled(s) == [Settled(rid, wire.Ok())]
    net.events.clear()
    return s


@pytest.fixture
def net() -> Net:
    return Net()


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
    assert net.settled(client) == [Settled(rid, wire.SearchReply([7]))]
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
    net.broker = FakeBroker()  # the restarted broker knows no one
    net.tick(BEAT, client)
    assert client.registered and client.reregistrations == 1
    assert any(isinstance(e, Registered) for e in net.events["client-1"])


def test_a_request_the_broker_refused_undelivered_is_sent_again_after_registering(net: Net) -> None:
    bob, client = pair(net)
    del net.broker.peers["client-1"]  # the broker forgot the client (it was paused, say)
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
