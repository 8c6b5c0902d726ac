"""One peer's session with the broker, sans-IO in h11's way: state in, events out, no sockets.

A `Session` knows registration and re-registration, heartbeat liveness, request ids, deadlines
and what every incoming message means. It never touches a socket, a clock or an event loop:

* the calls that start something (`register`, `request`, `request_many`, `query`, `notify`,
  `reply`, `goodbye`) return the message to send, ``[command, name, rid, *body]`` (`fedptr.envelope`);
* `receive(frames, now)` turns one received multipart into events;
* `tick(now)` turns the passage of time into events: expired deadlines, a heartbeat to send,
  the broker taken for dead, a registration to repeat.

`fedptr.link.Link` is the socket pump that owns one session and carries out its events; tests
drive two sessions and a fake broker with no network at all (tests/test_session.py).

Request ids are ``[counter (uint32), incarnation (uint32)]``: the incarnation is random per
session, so a restarted peer never reuses an id its peers may still hold replies for.
"""

from __future__ import annotations

import collections
import heapq
import logging
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fedptr import envelope, limits, wire
from fedptr.errors import (
    DeadlineExceeded,
    FedptrError,
    InvalidArgumentError,
    LostWorkerError,
    OverloadedError,
    ProtocolError,
    RegistrationRefused,
    TooManyInFlightError,
    UnknownWorkerError,
)
from fedptr.failures import error_from_failure, failure_from_error
from fedptr.streams import Reassembly

log = logging.getLogger("fedptr.session")

_RID = struct.Struct("<II")


# --- events ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` (``[command, name, rid, *body]``) to the broker."""

    message: list[Any]


class Settled(NamedTuple):
    """Request `rid`, sent to `dest`, ended: with `result`, or with `error` (exactly one is set).
    A named tuple, like `Incoming`: a client gets one per reply, a hundred per BATCH of a chain's
    Oks, and a frozen dataclass took ~0.7 µs to build where this takes ~0.23."""

    rid: bytes
    result: wire.Message | None = None
    error: FedptrError | None = None
    dest: str = ""


class Incoming(NamedTuple):
    """Peer `source` asks something; answer with `Session.reply(source, rid, ...)`. A named
    tuple, like `envelope.Envelope`: a worker gets one per request, and a frozen dataclass
    takes about three times as long to build."""

    source: str
    rid: bytes
    request: wire.Decoded


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The client `name` ended its session (said goodbye, or its connection closed)."""

    name: str


@dataclass(frozen=True, slots=True)
class Registered:
    """The broker accepted this peer again after it had been forgotten or had restarted."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Request `rid` to `dest` will never be delivered: the broker refused it, and it is not sent
    again. Chunks of it that took a direct path wait at `dest` for a message that never comes:
    give them up there (`envelope.abort`)."""

    dest: str
    rid: bytes


Event = Send | Settled | Incoming | SessionEnded | Registered | Abandoned


class NameTaken(RegistrationRefused):
    """Raised when the broker refused a registration because a live peer holds the name."""


@dataclass(frozen=True, slots=True)
class NameList(wire.Message):
    """The broker's answer to LIST or STATS: one string per frame (never a body on the wire)."""

    names: list[str]


class _Pending(NamedTuple):
    """A request in flight. A named tuple built with `tuple.__new__` (`_track`): one per request,
    so no Python `__init__` call, and one object for the cyclic GC where a dataclass made two
    (the instance and its `__dict__`)."""

    dest: str
    deadline: float
    seconds: float
    message: list[Any] | None
    """A request as sent, kept so that one the broker refused undelivered can be sent again."""


_new_tuple = tuple.__new__


@dataclass
class Session:
    """The session of peer `name` (role `envelope.ROLE_WORKER` or `ROLE_CLIENT`)."""

    name: str
    role: bytes
    heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S
    liveness: int = limits.HEARTBEAT_LIVENESS
    max_in_flight: int = limits.MAX_IN_FLIGHT
    incarnation: int = field(default_factory=lambda: secrets.randbits(32) | 1)
    registered: bool = False
    reregistrations: int = 0
    """Times this peer registered again (after a broker restart, or after being forgotten)."""
    closed: bool = False
    _counter: int = 0
    _pending: dict[bytes, _Pending] = field(default_factory=dict)
    _deadlines: list[tuple[float, bytes]] = field(default_factory=list)
    _unsent: list[bytes] = field(default_factory=list)
    _registration: bytes = b""
    _last_heard: float = 0.0
    _last_sent: float = 0.0
    _next_beat: float = 0.0
    _last_beat_check: float = 0.0
    _reassembly: Reassembly = field(default_factory=Reassembly)
    direct_sources: set[bytes] = field(default_factory=set)
    """Peers whose chunks may come over a direct data path (the link's `DirectPaths.sources`):
    only their messages are held for chunks still to come; anyone else's stream is whole when
    its message arrives, or never will be (refused at once)."""
    _held: dict[bytes, collections.deque[envelope.Envelope]] = field(default_factory=dict)
    """Source -> its messages held, in order, behind one whose streamed chunks are still on
    their way over the direct path (they may trail the message, which came by the broker)."""

    # --- starting things ---------------------------------------------------------------
    def register(self, now: float, timeout: float) -> tuple[bytes, list[Any]]:
        """The first registration: its request id (settled by ACCEPTED or a refusal) and message."""
        rid = self._track("broker", timeout, now)
        self._registration = rid
        self._last_heard = self._last_beat_check = now
        self._next_beat = now + self.heartbeat_s
        return rid, self._sent(envelope.message(envelope.REGISTER, self.name.encode(), rid, [self.role]), now)

    def request(
        self, dest: str, msg: wire.Message, timeout: float, now: float, resend: bool = True
    ) -> tuple[bytes, list[Any]]:
        """A request to `dest` whose reply settles by `timeout` seconds from `now`. Without
        `resend` its message is not kept: one the broker refuses undelivered settles with
        LostWorkerError instead of leaving again (for a message of views of memory that may
        change meanwhile, which a resend would read then).

        Raises TooManyInFlightError when `max_in_flight` are already unanswered."""
        if len(self._pending) >= self.max_in_flight:
            raise TooManyInFlightError(f"{self.name}: {len(self._pending)} requests in flight; await some first")
        budget_ms = max(1, int(timeout * 1000))
        body = _op_body(msg, budget_ms) if type(msg) is wire.Op else None
        if body is None:
            body = wire.encode(msg, budget_ms=budget_ms)
        rid = self._track(dest, timeout, now, body)
        self._last_sent = now  # `_sent`, inline: every request's path
        pending = self._pending[rid]
        if not resend:
            self._pending[rid] = pending._replace(message=None)
        return rid, pending.message  # type: ignore[return-value]

    def request_many(
        self, dests: Sequence[str], msg: wire.Message, timeout: float, now: float
    ) -> tuple[list[bytes], list[Any]]:
        """One request to each of `dests` (a request id each, in order) and the one FANOUT that
        carries them: the body is encoded and sent once, the broker delivers it to each, and each
        request settles on its own as with `request` (its reply, deadline, LOST, a broker error).

        Raises InvalidArgumentError when `dests` is empty, repeats a name, holds a name no peer
        can register, or is longer than `limits.FANOUT_MAX_WIDTH`; TooManyInFlightError when
        they do not all fit under `max_in_flight`."""
        if not 0 < len(dests) <= limits.FANOUT_MAX_WIDTH or len(set(dests)) != len(dests):
            raise InvalidArgumentError(f"a fan-out goes to 1..{limits.FANOUT_MAX_WIDTH} distinct peers, not {dests}")
        bad = [d for d in dests if not envelope.valid_name(d.encode())]
        if bad:
            raise InvalidArgumentError(f"no peer can be named {bad[0]!r}")
        if len(self._pending) + len(dests) > self.max_in_flight:
            raise TooManyInFlightError(f"{self.name}: {len(self._pending)} requests in flight; await some first")
        body = wire.encode(msg, budget_ms=max(1, int(timeout * 1000)))
        targets = []
        for dest in dests:
            # a request the broker refuses undelivered (it forgot us) is sent again on its own
            rid = self._track(dest, timeout, now, body)
            targets.append((dest.encode(), rid))
        inner = envelope.message(envelope.REQUEST, b"", envelope.NO_REPLY, body)
        return [rid for _, rid in targets], self._sent(envelope.fanout(envelope.pack_targets(targets), inner), now)

    def query(self, command: bytes, timeout: float, now: float) -> tuple[bytes, list[Any]]:
        """A question to the broker itself (LIST or STATS), answered with a `NameList`."""
        rid = self._track("broker", timeout, now)
        return rid, self._sent(envelope.message(command, b"", rid), now)

    def notify(self, dest: str, msg: wire.Message, now: float) -> list[Any]:
        """A request that expects no reply (a Delete)."""
        return self._sent(envelope.message(envelope.REQUEST, dest.encode(), envelope.NO_REPLY, wire.encode(msg)), now)

    def reply(self, dest: str, rid: bytes, msg: wire.Message, now: float) -> list[Any] | None:
        """The reply to request `rid` from `dest`, or None when that request wants none."""
        if rid == envelope.NO_REPLY:
            return None
        try:
            body = wire.encode(msg)
        except ProtocolError as e:  # the caller must hear of it, not wait for its deadline
            body = wire.encode(failure_from_error(e, self.name))
        self._last_sent = now  # `_sent`, inline: a node replies to every request
        return [envelope.REPLY, dest.encode(), rid, *body]  # `envelope.message`'s layout, built here: per reply

    def goodbye(self) -> list[Any]:
        """The message that tells the broker this peer is leaving; the session is closed after it."""
        self.closed = True
        return envelope.message(envelope.DISCONNECT, b"", envelope.NO_REPLY)

    def fail_all(self, error: Callable[[str], FedptrError]) -> list[Event]:
        """Settle every pending request with `error(destination)` (the link is closing)."""
        return [
            Settled(rid, error=error(p.dest), dest=p.dest)
            for rid, p in list(self._pending.items())
            if self._forget(rid)
        ]

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet settled."""
        return len(self._pending)

    def next_request_id(self) -> bytes:
        """The id the next request will carry (ids are ``[counter, incarnation]``, uint32 each)."""
        return _RID.pack((self._counter + 1) & 0xFFFFFFFF, self.incarnation)

    def destination(self, rid: bytes) -> str | None:
        """The peer request `rid` went to, while it is pending."""
        p = self._pending.get(rid)
        return None if p is None else p.dest

    # --- time ---------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When `tick` next has something to do for a request deadline (None: nothing pending)."""
        while self._deadlines and self._deadlines[0][1] not in self._pending:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def tick(self, now: float) -> list[Event]:
        """Expire overdue requests; at heartbeat cadence, judge the broker's liveness, beat when
        idle, and repeat the registration while not registered."""
        events: list[Event] = []
        if self._held:
            self._reassembly.purge()  # a stalled stream fails the message held for it
            for source in list(self._held):
                self._release(source, now, events)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, rid = heapq.heappop(self._deadlines)
            p = self._pending.get(rid)
            if p is not None and p.deadline <= now:
                self._forget(rid)
                events.append(Settled(rid, error=DeadlineExceeded(p.dest, p.seconds, [p.dest]), dest=p.dest))
        if now >= self._next_beat and self._registration:
            events.extend(self._beat(now))
        return events

    def _beat(self, now: float) -> list[Event]:
        events: list[Event] = []
        # Our own loop was blocked for a while: silence we could not hear is no verdict.
        stalled = now - self._last_beat_check > 2 * self.heartbeat_s
        self._last_beat_check = now
        self._next_beat = now + self.heartbeat_s
        silent = now - self._last_heard
        if self.registered and not stalled and silent > self.heartbeat_s * self.liveness:
            log.warning("%s: no word from the broker for %.1f s; registering again", self.name, silent)
            self.registered = False
            for rid, p in list(self._pending.items()):
                if self._forget(rid):
                    events.append(Settled(rid, error=LostWorkerError(p.dest, ["broker"]), dest=p.dest))
        if not self.registered:
            events.append(Send(self._reregister(now)))
        elif now - self._last_sent >= self.heartbeat_s:
            events.append(Send(self._sent(envelope.message(envelope.HEARTBEAT, b"", envelope.NO_REPLY), now)))
        return events

    # --- receiving ----------------------------------------------------------------------
    def receive(self, frames: Sequence[Any], now: float) -> list[Event]:
        """The events one received multipart (a single message or a BATCH) stands for. Raises
        ProtocolError when it is no fedptr envelope; a bad message inside settles, is answered
        or is dropped on its own, and the batch's other messages stand."""
        self._last_heard = now
        events: list[Event] = []
        for env in envelope.parse(frames):
            try:
                # a request or reply with nothing held before it (nearly every message a node or a
                # client receives) goes straight to its handler: one call per message, not three,
                # for a batch of a hundred
                command = env.command
                if (command == envelope.REQUEST or command == envelope.REPLY or command == envelope.ACKS) and (
                    not self._held and env.name not in self.direct_sources
                ):
                    if command == envelope.REQUEST:
                        self._on_request(env.name, env.rid, env.body, now, events)
                    elif command == envelope.REPLY:
                        self._on_reply(env.name, env.rid, env.body, events)
                    else:
                        self._on_acks(env.name, env.rid, env.body, events)
                else:
                    self._receive_one(env, now, events)
            except ProtocolError as e:
                # not raised past the batch: an earlier message's events (a reply whose request
                # already left the pending table) would be dropped with it, its future never settled
                log.warning("%s dropped a malformed message from %r: %s", self.name, env.name, e)
        return events

    def receive_direct(self, source: bytes, frames: Sequence[Any], now: float) -> list[Event]:
        """The events of one chunk that peer `source` sent over the direct data path (the
        connection authenticated it as `source`; the name in the envelope is not read). Raises
        ProtocolError for anything but a single CHUNK. The broker's liveness is not touched."""
        envs = envelope.parse(frames)
        if len(envs) != 1 or envs[0].command != envelope.CHUNK:  # a peer's batch too: refused, not a ValueError
            raise ProtocolError("only chunks travel the direct path, one per message")
        env = envs[0]
        events: list[Event] = []
        self._chunk(source, env.rid, env.body, now, events)
        return events

    def _chunk(self, name: bytes, rid: bytes, body: list[Any], now: float, events: list[Event]) -> None:
        if len(body) != 2:
            raise ProtocolError("a chunk has an info frame and a data frame")
        try:
            self._reassembly.add(name, rid, bytes(body[0]), body[1])
        except ProtocolError as e:  # its own message is refused when it ends; the batch's others stand
            log.warning("%s refused a chunk from %r: %s", self.name, name.decode(errors="replace"), e)
        if self._held and name in self._held:
            self._release(name, now, events)

    def _release(self, source: bytes, now: float, events: list[Event]) -> None:
        """Handle `source`'s held messages, in order, up to one whose chunks are still coming."""
        held = self._held[source]
        while held:
            head = held[0]
            if self._reassembly.waiting(head.command, source, head.rid):
                return
            held.popleft()
            self._dispatch(head, now, events)
        del self._held[source]

    def _receive_one(self, env: envelope.Envelope, now: float, events: list[Event]) -> None:
        command, name = env.command, env.name
        if command == envelope.CHUNK:
            self._chunk(name, env.rid, env.body, now, events)
        elif command == envelope.REQUEST or command == envelope.REPLY or command == envelope.ACKS:
            held = self._held.get(name) if self._held else None
            if held is None and (
                name not in self.direct_sources or not self._reassembly.waiting(command, name, env.rid)
            ):
                self._dispatch(env, now, events)
                return
            if held is None:
                held = self._held[name] = collections.deque()
            held.append(env)
            if len(held) > limits.HELD_MAX_MESSAGES:  # a sender that never completes its stream
                head = held[0]
                self._reassembly.refuse(
                    (head.command, name, head.rid), f"{len(held)} messages waited behind its chunks"
                )
                self._release(name, now, events)
        else:
            self._control(env, now, events)

    def _dispatch(self, env: envelope.Envelope, now: float, events: list[Event]) -> None:
        if env.command == envelope.REPLY:
            self._on_reply(env.name, env.rid, env.body, events)
        elif env.command == envelope.ACKS:
            self._on_acks(env.name, env.rid, env.body, events)
        else:
            self._on_request(env.name, env.rid, env.body, now, events)

    def _control(self, env: envelope.Envelope, now: float, events: list[Event]) -> None:
        command, name, rid, body = env.command, env.name, env.rid, env.body
        if command == envelope.ACCEPTED:
            self._on_accepted(rid, now, events)
        elif command == envelope.LIST or command == envelope.STATS:
            self._settle(rid, events, result=NameList([bytes(f).decode() for f in body]))
        elif command == envelope.BROKER_ERROR:
            self._on_broker_error(name, rid, body, now, events)
        elif command == envelope.LOST:
            self._on_lost(name.decode(), body, events)
        elif command != envelope.HEARTBEAT:
            raise ProtocolError(f"unknown command {command!r}")

    def _on_reply(self, name: bytes, rid: bytes, body: list[Any], events: list[Event]) -> None:
        try:
            body = self._reassembly.complete(envelope.REPLY, name, rid, body)
            pending = self._pending.get(rid)
            if pending is None:
                return  # a late reply to a request that already settled
            if pending.dest.encode() != name:
                log.warning("%s dropped a reply from %r to a request sent to %r", self.name, name, pending.dest)
                return
            reply = wire.decode(body).message
        except ProtocolError as e:
            self._fail_reply(name, rid, events, e)
            return
        if isinstance(reply, wire.Failure):
            self._settle(rid, events, error=error_from_failure(reply))
        else:
            # `_settle`, inline, and the event built without the named tuple's Python `__new__`:
            # a client settles a hundred of these per BATCH of a chain's replies
            del self._pending[rid]
            events.append(_new_tuple(Settled, (rid, reply, None, pending.dest)))

    def _on_acks(self, name: bytes, rid: bytes, body: list[Any], events: list[Event]) -> None:
        """An ACKS: each reply it stands for settled as `_on_reply` settles one, its body decoded
        once. A malformed one settles its first request with the error, or, when its count was
        read, every request it answers (a body missing or in pieces too: those requests wait
        for nothing else)."""
        try:
            if not body:
                raise ProtocolError("an ACKS of no parts, not a count and a body")
            rids = envelope.acked(rid, bytes(body[0]))
        except ProtocolError as e:
            self._fail_reply(name, rid, events, e)
            return
        source = name.decode(errors="replace")
        try:
            if len(body) != 2:
                raise ProtocolError(f"an ACKS of {len(body)} parts, not a count and a body")
            reply = wire.decode(body[1:]).message
            if type(reply) is not wire.Ok:
                raise ProtocolError(f"an ACKS of {type(reply).__name__} replies, not of Ok")
        except ProtocolError as e:
            for r in rids:
                p = self._pending.get(r)
                if p is not None and p.dest == source:  # an error each: one raised twice would grow its traceback
                    self._settle(r, events, error=ProtocolError(str(e)))
            return
        pending = self._pending
        for r in rids:
            p = pending.get(r)
            if p is None:
                continue  # a late reply to a request that already settled
            if p.dest != source:
                log.warning("%s dropped a reply from %r to a request sent to %r", self.name, name, p.dest)
                continue
            del pending[r]
            events.append(_new_tuple(Settled, (r, reply, None, p.dest)))

    def _fail_reply(self, name: bytes, rid: bytes, events: list[Event], error: FedptrError) -> None:
        """Settle request `rid` with `error`, a malformed reply's from peer `name`, when it was sent
        to `name`: another peer's bad reply, naming it, must not fail it (a node that saw a
        client's ids can name the ones it sends to other workers), as its good one is dropped."""
        pending = self._pending.get(rid)
        if pending is not None and pending.dest.encode() == name:
            self._settle(rid, events, error=error)

    def _on_request(self, name: bytes, rid: bytes, body: list[Any], now: float, events: list[Event]) -> None:
        if self.role != envelope.ROLE_WORKER:
            raise ProtocolError("clients take no requests")
        source = name.decode()
        try:
            decoded = wire.decode_request(self._reassembly.complete(envelope.REQUEST, name, rid, body))
        except ProtocolError as e:
            log.warning("%s refused a malformed request from %r: %s", self.name, source, e, extra={"rid": rid.hex()})
            answer = self.reply(source, rid, failure_from_error(e, self.name), now)
            if answer is not None:
                events.append(Send(answer))
            return
        events.append(_new_tuple(Incoming, (source, rid, decoded)))  # (its `__new__` is a Python call: per request)

    def _on_accepted(self, rid: bytes, now: float, events: list[Event]) -> None:
        if rid != self._registration:
            return
        first = not self._registration_is_repeat
        self.registered = True
        if first:
            self._settle(rid, events, result=wire.Ok())
            return
        self.reregistrations += 1
        log.warning("%s registered again", self.name)
        events.append(Registered())
        unsent, self._unsent = self._unsent, []
        for r in unsent:
            p = self._pending.get(r)
            if p is not None and p.message is not None:
                events.append(Send(self._sent(p.message, now)))

    def _on_broker_error(self, name: bytes, rid: bytes, body: list[Any], now: float, events: list[Event]) -> None:
        reason = bytes(body[0]) if body else b""
        if reason == envelope.REASON_NOT_REGISTERED and rid != self._registration:
            # The broker forgot us (we were silent too long, or it restarted) and delivered
            # nothing: register again, and resend the request then. Safe: it never arrived.
            p = self._pending.get(rid)
            resend = p is not None and p.message is not None
            if resend:
                self._unsent.append(rid)
            if self.registered:
                self.registered = False
                events.append(Send(self._reregister(now)))
            if resend:
                return
        error = _broker_error(name, body)
        if rid == self._registration and self._registration_is_repeat:
            log.warning("%s: registering again was refused: %s", self.name, error)
            return
        p = self._pending.get(rid)
        self._settle(rid, events, error=error)
        if p is not None and p.dest != "broker" and rid != self._registration:
            events.append(Abandoned(p.dest, rid))

    def _on_lost(self, name: str, body: list[Any], events: list[Event]) -> None:
        last = bytes(body[2]) if len(body) >= 3 else None
        for rid, p in list(self._pending.items()):
            if p.dest == name and _relayed_to_the_lost(rid, last) and self._forget(rid):
                # its reply, if part of it came, can never end now (a late one is dropped
                # anyway): the stream's bytes go now, not after `limits.STREAM_TIMEOUT_S`, and
                # its later chunks (a worker forgotten for its silence may still stream) too
                self._reassembly.refuse((envelope.REPLY, name.encode(), rid), f"{name} was lost")
                events.append(Settled(rid, error=LostWorkerError(name), dest=name))
        is_client = len(body) >= 2 and bytes(body[0]) == envelope.ROLE_CLIENT
        if is_client and bytes(body[1]) in (envelope.GONE_DISCONNECTED, envelope.GONE_CLOSED):
            self._reassembly.forget(name.encode())  # its streams can never end now: their bytes go
            self._held.pop(name.encode(), None)
            events.append(SessionEnded(name))

    # --- internals ----------------------------------------------------------------------
    @property
    def _registration_is_repeat(self) -> bool:
        """Whether the current registration is a repeat (the first one is a tracked request)."""
        return self._registration not in self._pending

    def _reregister(self, now: float) -> list[Any]:
        self._registration = self._next_rid()
        return self._sent(envelope.message(envelope.REGISTER, self.name.encode(), self._registration, [self.role]), now)

    def _next_rid(self) -> bytes:
        self._counter = (self._counter + 1) & 0xFFFFFFFF
        return _RID.pack(self._counter, self.incarnation)

    def _track(self, dest: str, timeout: float, now: float, body: list[Any] | None = None) -> bytes:
        """A new request id to `dest`, pending until `timeout` s from `now`; with `body`, the
        request message to `dest` is built and kept with it (`_Pending.message`)."""
        if self.closed:
            raise LostWorkerError(dest, [dest])
        self._counter = counter = (self._counter + 1) & 0xFFFFFFFF  # `_next_rid`, inline: every request's path
        rid = _RID.pack(counter, self.incarnation)
        deadline = now + timeout
        # `envelope.message`'s layout, built here: a call less on every request's path
        message = None if body is None else [envelope.REQUEST, dest.encode(), rid, *body]
        self._pending[rid] = _new_tuple(_Pending, (dest, deadline, timeout, message))
        heapq.heappush(self._deadlines, (deadline, rid))
        if len(self._deadlines) > 2 * len(self._pending) + 64:  # drop settled entries in bulk
            self._deadlines = [(p.deadline, r) for r, p in self._pending.items()]
            heapq.heapify(self._deadlines)
        return rid

    def _sent(self, message: list[Any], now: float) -> list[Any]:
        self._last_sent = now
        return message

    def _forget(self, rid: bytes) -> bool:
        return self._pending.pop(rid, None) is not None

    def _settle(
        self, rid: bytes, events: list[Event], result: wire.Message | None = None, error: FedptrError | None = None
    ) -> None:
        p = self._pending.pop(rid, None)
        if p is not None:
            events.append(Settled(rid, result, error, p.dest))


_UINT64_BE = struct.Struct(">Q")
_INT64_LE = struct.Struct("<q")
_BIG_ID = 1 << 32
"""Ids from here up are packed by msgpack as a uint64 (0xcf and 8 bytes, big-endian): a fixed
width, which a template can leave a hole for. Random 63-bit ids fall below it once in 2**31."""
_ID_END = 1 << 64

_OP_TEMPLATES: dict[tuple[str, int, int], tuple[bytes, ...] | None] = {}
"""The header of an `Op` on pointer operands only, cut where its ids go, by (op, number of
operands, budget in ms): `wire.encode`'s own output for sentinel ids (None: it could not be
cut, so that key is always encoded in full). At most `limits.OP_TEMPLATE_TABLE_SIZE` entries."""


def _op_body(msg: wire.Op, budget_ms: int) -> list[bytes | memoryview] | None:
    """The body `wire.encode(msg, budget_ms)` gives, byte for byte, built from a template with
    the ids patched in (~0.4 µs, where the packer's Python `default` per reference and the
    message's field list cost ~1 µs on every op a client issues); None when `msg` is not the
    common case: references only as arguments, one result, no keyword arguments, no sponsor."""
    if msg.kwargs or msg.more_ids or msg.sponsor or not _BIG_ID <= msg.result_id < _ID_END:
        return None
    args = msg.args
    for arg in args:
        if type(arg) is not wire.Ref:
            return None
    key = (msg.op, len(args), budget_ms)
    pieces = _OP_TEMPLATES[key] if key in _OP_TEMPLATES else _op_template(key)
    if pieces is None:
        return None
    parts = [pieces[0], _UINT64_BE.pack(msg.result_id)]
    for piece, arg in zip(pieces[1:], args, strict=False):
        parts.append(piece)
        parts.append(_INT64_LE.pack(arg.obj_id))  # type: ignore[union-attr]  # a Ref: checked above
    parts.append(pieces[-1])
    return [b"".join(parts)]


def _op_template(key: tuple[str, int, int]) -> tuple[bytes, ...] | None:
    """The pieces of `key`'s header between its ids (see `_OP_TEMPLATES`), remembered while
    the table has room. Cut at each id's bytes in `wire.encode`'s output for sentinel ids,
    each found exactly once, or not at all (None)."""
    op, arity, budget_ms = key
    ids = [_BIG_ID + 0x5EED_0000 + i for i in range(arity + 1)]  # each one's bytes unlike any other's
    try:
        [header] = wire.encode(wire.Op(ids[0], op, [wire.Ref(i) for i in ids[1:]], {}), budget_ms)
    except (ProtocolError, ValueError):
        return None  # not encodable (a name too long, say): the full encode says why, each time
    cut: list[bytes] = []
    rest = bytes(header)
    holes = [b"\xcf" + _UINT64_BE.pack(ids[0])] + [b"\xd7\x02" + _INT64_LE.pack(i) for i in ids[1:]]
    for hole in holes:
        if rest.count(hole) != 1:
            break
        before, rest = rest.split(hole)
        cut.append(before + hole[:-8])  # the piece ends with the id's type bytes
    pieces = (*cut, rest) if len(cut) == len(holes) else None
    if len(_OP_TEMPLATES) < limits.OP_TEMPLATE_TABLE_SIZE:
        _OP_TEMPLATES[key] = pieces
    return pieces


def _broker_error(name_bytes: bytes, body: list[Any]) -> FedptrError:
    name = name_bytes.decode(errors="replace")
    reason = bytes(body[0]) if body else b""
    text = bytes(body[1]).decode(errors="replace") if len(body) > 1 else ""
    if reason == envelope.REASON_LOST:
        return LostWorkerError(name)
    if reason == envelope.REASON_NOT_REGISTERED:
        return LostWorkerError(name or "broker", ["broker"])
    if reason == envelope.REASON_OVERLOADED:
        return OverloadedError(name, "the broker's queue to it is full")
    if reason == envelope.REASON_UNKNOWN_NAME:
        return UnknownWorkerError(name)
    if reason == envelope.REASON_NAME_TAKEN:
        return NameTaken(f"broker refused {name!r}: {text}")
    if reason in (envelope.REASON_BAD_NAME, envelope.REASON_FULL, envelope.REASON_FORBIDDEN):
        return RegistrationRefused(f"broker refused {name!r}: {text}")
    return ProtocolError(f"broker error for {name!r}: {reason!r} {text}")


def _relayed_to_the_lost(rid: bytes, last: bytes | None) -> bool:
    """Whether request `rid` may have gone to a peer now lost, when the broker's LOST notice says
    `last` was the latest of this session's requests it relayed there (b"": none). A later one
    went, or will go, to whoever registers that name next, or gets the broker's error: it must
    not fail here (a node killed and restarted at once would fail calls its new process
    answers). Without `last` (an older broker), or with an id not of this session's form, it
    may have gone."""
    if last is None or len(last) != _RID.size or last[4:] != rid[4:]:
        return last != b""
    return not envelope.request_after(rid, last)
