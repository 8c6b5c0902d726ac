"""One peer's connection to the broker: a DEALER socket, a reader task and a writer task.

Both the client and the node use it. Requests are correlated with replies by request id; each
has a deadline timer, so every request future settles (reply, typed error or DeadlineExceeded).
Outgoing messages queue in order and the writer task sends whatever has accumulated in one go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from fedptr import limits, wire
from fedptr.errors import (
    DeadlineExceeded,
    FedptrError,
    LostWorkerError,
    OverloadedError,
    ProtocolError,
    RegistrationRefused,
    UnknownWorkerError,
)
from fedptr.failures import error_from_failure
from fedptr.security import CurveKeys
from fedptr.streams import Reassembly, split
from fedptr.zio import events, recv_frames, send_frames

log = logging.getLogger("fedptr.link")

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_REREGISTER = b"\xff" * 8
"""Request id of the registrations a link repeats on its own."""
_DRAIN_BATCH = 256
"""Messages handled per read callback before other callbacks get a turn."""

RequestHandler = Callable[[str, bytes, wire.Decoded], None]
"""Called with (source name, request id, decoded request) for every request a peer receives.
It runs inside the socket's read callback, so it must not block; slow work goes to tasks."""


@dataclass
class _Pending:
    future: asyncio.Future[wire.Message]
    dest: str
    timer: asyncio.TimerHandle
    message: list[Any] | None = None
    """The request as sent, kept so that one the broker refused undelivered can be sent again."""


class Link:
    """A registered connection to the broker under `name` with role worker or client.

    Use as an async context manager. `handler` receives incoming requests (nodes only)."""

    def __init__(
        self,
        address: str,
        name: str,
        role: bytes,
        handler: RequestHandler | None = None,
        *,
        connect_timeout: float = limits.CONNECT_TIMEOUT_S,
        heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S,
        liveness: int = limits.HEARTBEAT_LIVENESS,
        curve: CurveKeys | None = None,
        max_in_flight: int = limits.MAX_IN_FLIGHT,
    ) -> None:
        self.address = address
        self.name = name
        self.role = role
        self.handler = handler
        self.connect_timeout = connect_timeout
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.curve = curve
        self.max_in_flight = max_in_flight
        self.reregistrations = 0
        """Times this link registered again (after a broker restart, or after being forgotten)."""
        self.bytes_received = 0
        """Bytes of every frame this link has received (for tests that check what reached it)."""
        self.messages_sent = 0
        """Requests and replies handed to the socket (a batch counts each message)."""
        self.multiparts_sent = 0
        """zmq multipart messages sent (a batch counts once)."""
        self.on_reply: Callable[[wire.Message], None] | None = None
        """Called with every reply this link decodes (for audits: what reached this client)."""
        self.on_session_ended: Callable[[str], None] | None = None
        """Called with a client's name when the broker says its session ended (it said goodbye
        or its connection closed): a worker reclaims what that client owned."""
        self._sock: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[bytes, _Pending] = {}
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._batch: list[list[Any]] | None = None
        self._reassembly = Reassembly()
        self._registered = False
        self._unsent: list[bytes] = []
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._writable = asyncio.Event()
        self._room = asyncio.Event()
        self._paused = False
        self._drain_scheduled = False
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._loop = asyncio.get_running_loop()

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Link:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)
        self._sock = sock
        self._loop.add_reader(sock.FD, self._drain)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._tasks = [self._group.create_task(self._writer())]
        self._last_heard = self._last_sent = self._loop.time()
        try:
            await self._register()
        except BaseException:
            await self.aclose()
            raise
        self._registered = True
        self._tasks.append(self._group.create_task(self._heartbeat()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Say goodbye to the broker, fail every pending request, and stop both tasks."""
        if self._closed:
            return
        self._closed = True
        assert self._sock is not None and self._group is not None
        # Whatever is queued (deletes of dropped pointers, say) still goes out, then goodbye.
        self._flush_batch()
        self._outbox.append([wire.PROTOCOL, wire.DISCONNECT, b"", b"\0" * 8])
        with contextlib.suppress(zmq.ZMQError):
            while self._outbox:
                send_frames(self._sock, self._outbox.popleft())
        self._loop.remove_reader(self._sock.FD)
        for task in self._tasks:
            task.cancel()
        try:
            await self._group.__aexit__(None, None, None)
        finally:
            for rid in list(self._pending):
                self._settle(rid, error=LostWorkerError(self._pending[rid].dest))
            self._sock.close(linger=0)

    async def _register(self) -> None:
        """Register; a taken name is tried again until the connect timeout, since the broker
        frees the name of a dead peer within a heartbeat liveness (a restarted node)."""
        deadline = self._loop.time() + self.connect_timeout
        while True:
            rid = self._next_rid()
            fut = self._track(rid, self.name, max(0.001, deadline - self._loop.time()))
            self._push_frames([wire.PROTOCOL, wire.REGISTER, self.name.encode(), rid, self.role])
            try:
                await fut
                return
            except DeadlineExceeded as e:
                raise DeadlineExceeded("broker", self.connect_timeout, ["broker at " + self.address]) from e
            except _NameTaken:
                if self._loop.time() + self.heartbeat_s > deadline:
                    raise RegistrationRefused(f"name {self.name!r} is taken") from None
                await asyncio.sleep(self.heartbeat_s)

    # --- requests ----------------------------------------------------------------------
    def request_nowait(self, dest: str, msg: wire.Message, timeout: float) -> asyncio.Future[wire.Message]:
        """Queue a request to `dest` and return the future of its reply, which settles by `timeout` s.

        Raises OverloadedError when `max_in_flight` requests are already unanswered."""
        if len(self._pending) >= self.max_in_flight:
            raise OverloadedError(self.name, f"{len(self._pending)} requests in flight; await some first")
        body = wire.encode(msg, budget_ms=max(1, int(timeout * 1000)))
        rid = self._next_rid()
        fut = self._track(rid, dest, timeout)
        message = [wire.REQUEST, dest.encode(), rid, *body]
        self._pending[rid].message = message
        self._push(message)
        return fut

    async def request(self, dest: str, msg: wire.Message, timeout: float) -> wire.Message:
        """Send a request to `dest` and return its reply; raises the typed error of a failure.
        With `max_in_flight` requests unanswered it first waits for room, within `timeout`."""
        if len(self._pending) >= self.max_in_flight:
            started = self._loop.time()
            try:
                async with asyncio.timeout(timeout):
                    while len(self._pending) >= self.max_in_flight:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                raise DeadlineExceeded(dest, timeout, [dest]) from None
            timeout -= self._loop.time() - started
        return await self.request_nowait(dest, msg, timeout)

    def notify(self, dest: str, msg: wire.Message) -> None:
        """Queue a request that expects no reply (a Delete)."""
        self._push([wire.REQUEST, dest.encode(), b"\0" * 8, *wire.encode(msg)])

    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None:
        """Queue the reply to request `rid` from `dest`."""
        if rid == b"\0" * 8:
            return
        self._push([wire.REPLY, dest.encode(), rid, *wire.encode(msg)])

    async def list_workers(self, timeout: float) -> list[str]:
        """Names of the workers registered with the broker."""
        rid = self._next_rid()
        fut = self._track(rid, "broker", timeout)
        self._push_frames([wire.PROTOCOL, wire.LIST, b"", rid])
        reply = await fut
        assert isinstance(reply, _NameList)
        return reply.names

    async def broker_stats(self, timeout: float) -> dict[str, int]:
        """The broker's counters: table sizes, messages routed and dropped."""
        rid = self._next_rid()
        fut = self._track(rid, "broker", timeout)
        self._push_frames([wire.PROTOCOL, wire.STATS, b"", rid])
        reply = await fut
        assert isinstance(reply, _NameList)
        return {k: int(v) for k, v in (item.split("=", 1) for item in reply.names)}

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet settled."""
        return len(self._pending)

    # --- internals ---------------------------------------------------------------------
    def _next_rid(self) -> bytes:
        return wire.request_id_bytes(next(self._ids))

    def _track(self, rid: bytes, dest: str, timeout: float) -> asyncio.Future[wire.Message]:
        if self._closed:
            raise LostWorkerError(dest, [dest])
        fut: asyncio.Future[wire.Message] = self._loop.create_future()
        timer = self._loop.call_later(timeout, self._expire, rid, timeout)
        self._pending[rid] = _Pending(fut, dest, timer)
        return fut

    def _expire(self, rid: bytes, timeout: float) -> None:
        p = self._pending.get(rid)
        if p is not None:
            self._settle(rid, error=DeadlineExceeded(p.dest, timeout, [p.dest]))

    def _settle(self, rid: bytes, result: wire.Message | None = None, error: FedptrError | None = None) -> None:
        p = self._pending.pop(rid, None)
        if p is None:
            return
        if len(self._pending) < self.max_in_flight:
            self._room.set()
        p.timer.cancel()
        if p.future.done():
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            assert result is not None
            p.future.set_result(result)

    # --- socket I/O --------------------------------------------------------------------
    # The socket is a plain zmq socket used only with NOBLOCK and driven by the event loop
    # through zmq's FD. That FD is edge-triggered and any socket call may consume an edge, so
    # after every send or receive we re-check zmq.EVENTS ourselves (`_drain`).
    def pause_reading(self) -> None:
        """Stop taking messages off the socket (backpressure: zmq queues them, then the sender's)."""
        self._paused = True

    def resume_reading(self) -> None:
        """Take messages off the socket again."""
        if self._paused:
            self._paused = False
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _push(self, message: list[Any]) -> None:
        """Send `message` (``[command, name, rid, *body]``). A lone message goes out at once; the
        ones that follow within the same event-loop turn go out together as one BATCH. A message
        with a large buffer streams it as chunks first, each its own multipart."""
        self.messages_sent += 1
        if len(message) > 4 and any(memoryview(f).nbytes > limits.STREAM_THRESHOLD_BYTES for f in message[4:]):
            self._flush_batch()
            for part in split(message):
                self._push_frames([wire.PROTOCOL, *part])
            return
        if self._batch is not None:
            self._batch.append(message)
            return
        self._push_frames([wire.PROTOCOL, *message])
        self._batch = []
        self._loop.call_soon(self._flush_batch)

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self._push_frames([wire.PROTOCOL, *batch[0]] if len(batch) == 1 else wire.pack_batch(batch))

    def _push_frames(self, frames: list[Any]) -> None:
        """Send a whole multipart now, or queue it behind what is already waiting, in order."""
        self.multiparts_sent += 1
        self._last_sent = self._loop.time()
        if self._outbox:
            self._outbox.append(frames)
            return
        assert self._sock is not None
        try:
            send_frames(self._sock, frames)
        except zmq.Again:
            self._outbox.append(frames)
            self._writable.set()
        # the send may have consumed a read edge of the FD
        if events(self._sock) & _POLLIN:
            self._schedule_drain()

    def _drain(self) -> None:
        """Handle what the socket holds, a bounded number at a time so timers still run in a flood."""
        self._drain_scheduled = False
        sock = self._sock
        if self._closed or sock is None:
            return
        for _ in range(_DRAIN_BATCH):
            if self._paused:
                return
            try:
                frames = recv_frames(sock, wire.ENVELOPE_FRAMES)
            except zmq.Again:
                break
            self.bytes_received += sum(len(f) for f in frames)
            self._last_heard = self._loop.time()
            try:
                if len(frames) < wire.ENVELOPE_FRAMES or frames[0] != wire.PROTOCOL:
                    raise ProtocolError("not a fedptr envelope")
                if frames[1] == wire.BATCH:
                    for m in wire.unpack_batch(frames[2], frames[3:]):
                        self._dispatch(bytes(m[0]), bytes(m[1]), bytes(m[2]), m[3:])
                else:
                    self._dispatch(frames[1], frames[2], frames[3], frames[4:])
            except ProtocolError as e:
                log.warning("%s dropped a malformed message: %s", self.name, e)
            except Exception:  # a bug in a handler must not stop this link from reading
                log.exception("%s failed to handle a message", self.name)
        ready = events(sock)
        if ready & _POLLIN:
            self._schedule_drain()
        if ready & _POLLOUT and self._outbox:
            self._writable.set()

    async def _writer(self) -> None:
        """Sends what `_push` could not send at once (the broker's queue for us was full)."""
        sock = self._sock
        assert sock is not None
        outbox = self._outbox
        while True:
            await self._writable.wait()
            self._writable.clear()
            while outbox:
                try:
                    send_frames(sock, outbox[0])
                except zmq.Again:
                    break
                outbox.popleft()
            self._drain()
            if outbox:
                await asyncio.sleep(0.001)  # the FD wakes us for reads only; poll for room to write
                self._writable.set()

    async def _heartbeat(self) -> None:
        """Beat when idle; take the broker for dead after `liveness` silent intervals, fail what
        waits on it, and keep registering again until a broker (the same or a new one) accepts."""
        while True:
            slept_from = self._loop.time()
            await asyncio.sleep(self.heartbeat_s)
            self._drain()  # beats may sit unread if this loop was busy; read them before judging
            now = self._loop.time()
            stalled = now - slept_from > 2 * self.heartbeat_s  # our own loop was blocked: no verdict
            if now - self._last_heard > self.heartbeat_s * self.liveness and self._registered and not stalled:
                log.warning(
                    "%s: no word from the broker for %.1f s; registering again", self.name, now - self._last_heard
                )
                self._registered = False
                for rid in list(self._pending):
                    self._settle(rid, error=LostWorkerError(self._pending[rid].dest, ["broker"]))
            if not self._registered:
                self._push_frames([wire.PROTOCOL, wire.REGISTER, self.name.encode(), _REREGISTER, self.role])
            elif now - self._last_sent >= self.heartbeat_s:
                self._push_frames([wire.PROTOCOL, wire.HEARTBEAT, b"", wire.NO_REPLY])

    def _lost(self, name: str) -> None:
        """Fail every request waiting on `name`, which the broker says is gone."""
        for rid in [r for r, p in self._pending.items() if p.dest == name]:
            self._settle(rid, error=LostWorkerError(name))

    def _dispatch(self, command: bytes, name: bytes, rid: bytes, body: list[Any]) -> None:
        """Act on one message from the broker: `name` is its source (or the name it concerns)."""
        if command == wire.CHUNK:
            if len(body) != 2:
                raise ProtocolError("a chunk has an info frame and a data frame")
            self._reassembly.add(name, rid, bytes(body[0]), body[1])
            return
        if command == wire.REPLY:
            p = self._pending.get(rid)
            try:
                body = self._reassembly.complete(command, name, rid, body)
                if p is None:
                    return  # late reply to a request that already timed out
                reply = wire.decode(body).message
                if self.on_reply is not None:
                    self.on_reply(reply)
            except ProtocolError as e:
                self._settle(rid, error=e)
                return
            if isinstance(reply, wire.Failure):
                self._settle(rid, error=error_from_failure(reply))
            else:
                self._settle(rid, result=reply)
        elif command == wire.REQUEST:
            if self.handler is None:
                raise ProtocolError("clients take no requests")
            source = name.decode()
            try:
                decoded = wire.decode(self._reassembly.complete(command, name, rid, body))
            except ProtocolError as e:
                log.warning("%s refused a malformed request from %r: %s", self.name, source, e)
                self.reply(source, rid, wire.Failure("protocol", "", str(e)[:500], self.name, [self.name]))
                return
            self.handler(source, rid, decoded)
        elif command == wire.ACCEPTED:
            if rid == _REREGISTER:
                self._registered = True
                self.reregistrations += 1
                log.warning("%s registered again", self.name)
                unsent, self._unsent = self._unsent, []
                for r in unsent:
                    pending = self._pending.get(r)
                    if pending is not None and pending.message is not None:
                        self._push(pending.message)
            self._settle(rid, result=wire.Ok())
        elif command == wire.LIST or command == wire.STATS:
            self._settle(rid, result=_NameList([bytes(f).decode() for f in body]))
        elif command == wire.BROKER_ERROR:
            if body and bytes(body[0]) == wire.REASON_NOT_REGISTERED:
                # The broker forgot us (we were silent too long, or it restarted) and delivered
                # nothing: register again and resend the request then. Safe, as it never arrived.
                pending = self._pending.get(rid)
                if pending is not None and pending.message is not None:
                    self._unsent.append(rid)
                if self._registered:
                    self._registered = False
                    self._push_frames([wire.PROTOCOL, wire.REGISTER, self.name.encode(), _REREGISTER, self.role])
                if pending is not None and pending.message is not None:
                    return
            if rid == _REREGISTER:
                log.warning("%s: registering again was refused: %s", self.name, _broker_error(name, body))
            self._settle(rid, error=_broker_error(name, body))
        elif command == wire.LOST:
            self._lost(name.decode())
            ended = len(body) >= 2 and bytes(body[0]) == wire.ROLE_CLIENT
            if ended and bytes(body[1]) in (wire.GONE_DISCONNECTED, wire.GONE_CLOSED) and self.on_session_ended:
                self.on_session_ended(name.decode())
        elif command == wire.HEARTBEAT:
            return
        else:
            raise ProtocolError(f"unknown command {command!r}")


class _NameTaken(RegistrationRefused):
    """The broker refused a registration because the name is registered to a live peer."""


@dataclass(frozen=True)
class _NameList(wire.Message):
    """The broker's answer to LIST (never on the wire as a body)."""

    names: list[str]


def _broker_error(name_bytes: bytes, body: list[Any]) -> FedptrError:
    name = name_bytes.decode(errors="replace")
    reason = bytes(body[0]) if body else b""
    text = bytes(body[1]).decode(errors="replace") if len(body) > 1 else ""
    if reason == wire.REASON_LOST:
        return LostWorkerError(name)
    if reason == wire.REASON_NOT_REGISTERED:
        return LostWorkerError(name or "broker", ["broker"])
    if reason == wire.REASON_OVERLOADED:
        return OverloadedError(name, "the broker's queue to it is full")
    if reason in (wire.REASON_UNKNOWN_NAME,):
        return UnknownWorkerError(name)
    if reason == wire.REASON_NAME_TAKEN:
        return _NameTaken(f"broker refused {name!r}: {text}")
    if reason in (wire.REASON_BAD_NAME, wire.REASON_FULL, wire.REASON_FORBIDDEN):
        return RegistrationRefused(f"broker refused {name!r}: {text}")
    return ProtocolError(f"broker error for {name!r}: {reason!r} {text}")
