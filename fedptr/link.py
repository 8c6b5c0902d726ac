"""One peer's connection to the broker: the socket pump around a sans-IO `Session`.

Both the client and the node use it. The `Session` decides what every message means and what
to send; the link moves frames between it and a DEALER socket, turns its `Settled` events into
request futures, and calls `tick` on a timer (request deadlines and heartbeats). Messages pushed
within one event-loop turn leave as one BATCH multipart; large buffers stream as chunks, which
take the direct data path to their peer when it opens (`fedptr.direct`).

The link keeps no caller memory past the call that hands a message over (review9: a node's
get reply was a view of the stored tensor, and the node's next request wrote into it before
the bytes left). What leaves within the call needs nothing: a chunk written into a
shared-memory file or sealed for the direct path is copied by that. What is kept is copied when
it is not immutable (`zio.owned`): a message joining a BATCH, a multipart queued in the outbox;
and zmq is handed only immutable memory zero-copy (`zio.send_frames` copies the rest).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import zmq

from fedptr import envelope, limits, wire
from fedptr.direct import DirectPaths
from fedptr.errors import (
    BrokerUnreachable,
    ClientClosedError,
    DeadlineExceeded,
    FedptrError,
    ProtocolError,
    RegistrationRefused,
)
from fedptr.logs import rid_extra
from fedptr.progress import Transfers, transfers_for
from fedptr.security import CurveKeys
from fedptr.session import (
    Abandoned,
    Event,
    Incoming,
    NameList,
    NameTaken,
    Registered,
    Send,
    Session,
    SessionEnded,
    Settled,
)
from fedptr.streams import rechunk, split
from fedptr.zio import events, owned, recv_frames, send_frames

log = logging.getLogger("fedptr.link")

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_BATCHABLE = (envelope.REQUEST, envelope.REPLY, envelope.FANOUT)

RequestHandler = Callable[[str, bytes, wire.Decoded], None]
"""Called with (source name, request id, decoded request) for every request a peer receives.
It runs inside the socket's read callback, so it must not block; slow work goes to tasks."""

RunHandler = Callable[[list[Incoming]], None]
"""Called with a run of consecutive `Op` requests of one peer, in arrival order, in place of
`RequestHandler` once per op (a node's `Node.handle_ops`): it must answer each as that would."""


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
        progress: bool | Transfers | None = None,
    ) -> None:
        self.address = address
        self.handler = handler
        self.run_handler: RunHandler | None = None
        """Set by a node: its consecutive `Op` requests of one peer arrive as one run."""
        self.connect_timeout = connect_timeout
        self.curve = curve
        self.session = Session(name, role, heartbeat_s=heartbeat_s, liveness=liveness, max_in_flight=max_in_flight)
        self.bytes_received = 0
        """Bytes of every frame this link has received (for tests that check what reached it)."""
        self.messages_sent = 0
        """Requests and replies handed to the socket (a batch counts each message)."""
        self.multiparts_sent = 0
        """zmq multipart messages sent (a batch counts once)."""
        self.messages_received = 0
        """Messages received (a batch counts each message; a chunk counts as one)."""
        self.bytes_sent = 0
        """Bytes of every frame handed to the socket."""
        self.progress: Transfers | None = progress if isinstance(progress, Transfers) else transfers_for(progress)
        """Progress bars of streamed transfers (None: silent). On only when asked (`progress=True`
        or ``FEDPTR_PROGRESS=1``) and stderr is a terminal."""
        self.on_reply: Callable[[wire.Message], None] | None = None
        """Called with every reply this link decodes (for audits: what reached this client)."""
        self.on_settled: Callable[[str, asyncio.Future[wire.Message]], None] | None = None
        """Called with the destination and the future of every request just settled (a reply,
        an error or a deadline): the client's bookkeeping per worker, without a done callback,
        its context and its loop turn per request."""
        self.on_session_ended: Callable[[str], None] | None = None
        """Called with a client's name when the broker says its session ended (it said goodbye
        or its connection closed): a worker reclaims what that client owned."""
        self._sock: zmq.Socket[bytes] | None = None
        self.direct: DirectPaths | None = None
        """Direct data paths for streamed chunks, CURVE on or off (their keys are their own:
        `fedptr.direct` says why a path is no weaker than the broker's without CURVE)."""
        self._futures: dict[bytes, asyncio.Future[wire.Message]] = {}
        self._outbox: collections.deque[list[Any]] = collections.deque()
        self._batch: list[list[Any]] | None = None
        self._acks = 0
        """Replies merged into an earlier record of the open batch (`reply`): messages it holds
        beyond its records, counted towards `limits.BATCH_MAX_MESSAGES`."""
        # the timer that closes the batch a lone message opened, at the end of its turn (a timer,
        # not `call_soon`: `end_turn` cancels it, and a cancelled timer costs the loop no pass)
        self._closing: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._room = asyncio.Event()
        self._paused = False
        self._drain_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._loop = asyncio.get_running_loop()
        # the loop's clock, read directly where it is `time.monotonic` (asyncio's own loops): a
        # worker reads it for every reply, and `loop.time` is a Python call; another loop's own
        self._now: Callable[[], float] = (
            time.monotonic if type(self._loop).time is asyncio.BaseEventLoop.time else self._loop.time
        )

    @property
    def name(self) -> str:
        """The name this link registered under."""
        return self.session.name

    @property
    def reregistrations(self) -> int:
        """Times this link registered again (after a broker restart, or after being forgotten)."""
        return self.session.reregistrations

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet settled."""
        return self.session.in_flight

    @property
    def outbox_depth(self) -> int:
        """Multiparts waiting to be sent because the socket's queue was full."""
        return len(self._outbox)

    # --- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> Link:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, limits.SOCKET_HWM)
        sock.setsockopt(zmq.RCVHWM, limits.SOCKET_HWM)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.address)
        self._sock = sock
        self._loop.add_reader(sock.FD, self._drain)
        if self.address.startswith("tcp://"):  # a data socket listens on tcp only (`DirectPaths.serve`)
            self.direct = DirectPaths(self._direct_chunk)
            self.session.direct_sources = self.direct.sources
            if self.session.role == envelope.ROLE_WORKER:
                self.direct.serve(self.address)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._tasks = [self._group.create_task(self._writer())]
        try:
            await self._register()
        except BaseException:
            await self.aclose()
            raise
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
        self._outbox.append(envelope.framed(self.session.goodbye()))
        with contextlib.suppress(zmq.ZMQError):
            while self._outbox:
                send_frames(self._sock, self._outbox.popleft())
        self._loop.remove_reader(self._sock.FD)
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        try:
            await self._group.__aexit__(None, None, None)
        finally:
            self._handle(self.session.fail_all(lambda dest: ClientClosedError(self.name, dest)))
            self._sock.close(linger=0)
            if self.direct is not None:
                self.direct.close()
            if self.progress is not None:
                self.progress.close()

    async def _register(self) -> None:
        """Register; a taken name is tried again until the connect timeout, since the broker
        frees the name of a dead peer within a heartbeat liveness (a restarted node)."""
        deadline = self._loop.time() + self.connect_timeout
        refused = False
        while True:
            now = self._loop.time()
            timeout = max(0.001, deadline - now)
            rid, message = self.session.register(now, timeout)
            fut = self._expect(rid, now + timeout)
            self._push_frames(envelope.framed(message))
            try:
                await fut
                return
            except DeadlineExceeded as e:
                raise BrokerUnreachable(self.address, self.connect_timeout) from e
            except NameTaken:
                if not refused:
                    log.warning(
                        "%s: the name is taken by a live peer; trying again for %.1f s (the broker frees "
                        "the name of a dead peer within its heartbeat liveness)",
                        self.name,
                        max(0.0, deadline - self._loop.time()),
                    )
                refused = True
                if self._loop.time() + self.session.heartbeat_s > deadline:
                    raise RegistrationRefused(f"name {self.name!r} is taken") from None
                await asyncio.sleep(self.session.heartbeat_s)

    # --- requests ----------------------------------------------------------------------
    def request_nowait(
        self, dest: str, msg: wire.Message, timeout: float, resend: bool = True
    ) -> asyncio.Future[wire.Message]:
        """Queue a request to `dest` and return the future of its reply, which settles by `timeout` s.
        Without `resend`, one the broker refuses undelivered is not sent again (`Session.request`).

        Raises TooManyInFlightError when `max_in_flight` requests are already unanswered, and
        ClientClosedError once the link is closed."""
        if self._closed:  # `_check_open`, inline: every op's path
            raise ClientClosedError(self.name, dest)
        now = self._loop.time()
        rid, message = self.session.request(dest, msg, timeout, now, resend)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: request %s to %r", self.name, type(msg).__name__, dest, extra=rid_extra(rid))
        fut = self._expect(rid, now + timeout)
        self._push(message)
        return fut

    def request_many_nowait(
        self, dests: Sequence[str], msg: wire.Message, timeout: float
    ) -> list[asyncio.Future[wire.Message]]:
        """Queue one request to each of `dests`, uploaded once (the broker fans it out), and
        return the future of each one's reply, in order; each settles by `timeout` s on its own.

        Raises InvalidArgumentError for an empty list, a repeated or impossible name, or more
        than `limits.FANOUT_MAX_WIDTH` names; TooManyInFlightError when they do not all fit
        under `max_in_flight`; ClientClosedError once the link is closed."""
        self._check_open(", ".join(dests))
        now = self._loop.time()
        rids, message = self.session.request_many(dests, msg, timeout, now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: request %s to %s", self.name, type(msg).__name__, dests, extra=rid_extra(rids[0]))
        futures = [self._expect(rid, now + timeout) for rid in rids]
        self._push(message)
        return futures

    async def request(self, dest: str, msg: wire.Message, timeout: float) -> wire.Message:
        """Send a request to `dest` and return its reply; raises the typed error of a failure.
        With `max_in_flight` requests unanswered it first waits for room, within `timeout`."""
        limit = self.session.max_in_flight
        if self.session.in_flight >= limit:
            started = self._loop.time()
            try:
                async with asyncio.timeout(timeout):
                    while self.session.in_flight >= limit:
                        self._room.clear()
                        await self._room.wait()
            except TimeoutError:
                raise DeadlineExceeded(dest, timeout, [dest]) from None
            timeout -= self._loop.time() - started
        return await self.request_nowait(dest, msg, timeout)

    def notify(self, dest: str, msg: wire.Message) -> None:
        """Queue a request that expects no reply (a Delete)."""
        self._push(self.session.notify(dest, msg, self._loop.time()))

    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None:
        """Queue the reply to request `rid` from `dest`. An op's `Ok` that follows the reply to
        the request before it, with the same body, joins that record in the open batch
        (`envelope.ACKS`): a chain's hundred replies travel, are relayed and are read as one."""
        message = self.session.reply(dest, rid, msg, self._now())
        if message is None:
            return
        batch = self._batch
        if batch and type(msg) is wire.Ok:
            merged = envelope.merged(batch[-1], message)
            if merged is not None:  # it leaves when it would have on its own: counted among the batch's messages
                batch[-1] = merged
                self.messages_sent += 1
                self._acks += 1
                if len(batch) + self._acks >= limits.BATCH_MAX_MESSAGES:  # full: out now, as in `_push`
                    self._batch = []
                    self._acks = 0
                    self._push_frames(envelope.pack_batch(batch))
                return
        self._push(message)

    def reply_each(self, dest: str, rids: Sequence[bytes], msg: wire.Ok) -> None:
        """`reply(dest, rid, msg)` for each of `rids`, in order: the same records in the same
        multiparts. Where the ids follow one another the ACKS's count grows at once, without a
        REPLY built, encoded and merged per id (a node's run of ops answered with one `Ok`)."""
        count_of, pack = envelope.ACKS_COUNT.unpack, envelope.ACKS_COUNT.pack
        rid_of = envelope.RID_PARTS.unpack
        i, n = 0, len(rids)
        while i < n:
            self.reply(dest, rids[i], msg)
            i += 1
            batch = self._batch
            if not batch or i == n:
                continue
            tail = batch[-1]  # this reply's record (a full batch left: `batch` is empty then)
            if tail[0] == envelope.ACKS:
                (held,) = count_of(tail[3])
            elif len(tail) == envelope.ENVELOPE_FRAMES:
                held = 1
            else:  # a reply that no later one merges into (`envelope.merged`)
                continue
            counter, incarnation = rid_of(tail[2])
            room = min(limits.ACKS_MAX_REPLIES - held, limits.BATCH_MAX_MESSAGES - len(batch) - self._acks, n - i)
            k = 0
            while (
                k < room
                and rid_of(rids[i + k]) == ((counter + held + k) & 0xFFFFFFFF, incarnation)
                and rids[i + k] != envelope.NO_REPLY  # (the counter wrapped to it): wants no reply
            ):
                k += 1
            if not k:
                continue
            batch[-1] = [envelope.ACKS, tail[1], tail[2], pack(held + k), tail[-1]]
            i += k
            self.messages_sent += k
            self._acks += k
            if len(batch) + self._acks >= limits.BATCH_MAX_MESSAGES:  # full: out now, as in `reply`
                self._batch = []
                self._acks = 0
                self._push_frames(envelope.pack_batch(batch))

    async def list_workers(self, timeout: float) -> list[str]:
        """Names of the workers registered with the broker."""
        return await self._query(envelope.LIST, timeout)

    async def broker_stats(self, timeout: float) -> dict[str, int]:
        """The broker's counters: table sizes, messages routed and dropped."""
        items = await self._query(envelope.STATS, timeout)
        return {k: int(v) for k, v in (item.split("=", 1) for item in items)}

    async def _query(self, command: bytes, timeout: float) -> list[str]:
        self._check_open("broker")
        now = self._loop.time()
        rid, message = self.session.query(command, timeout, now)
        fut = self._expect(rid, now + timeout)
        self._push_frames(envelope.framed(message))
        reply = await fut
        assert isinstance(reply, NameList)
        return reply.names

    # --- session events ----------------------------------------------------------------
    def pending(self) -> list[asyncio.Future[wire.Message]]:
        """The futures of the requests not settled yet."""
        return list(self._futures.values())

    def _check_open(self, dest: str) -> None:
        if self._closed:
            raise ClientClosedError(self.name, dest)

    def _expect(self, rid: bytes, deadline: float) -> asyncio.Future[wire.Message]:
        """The future of request `rid`, which the session settles by `deadline` (loop time)."""
        fut: asyncio.Future[wire.Message] = self._loop.create_future()
        self._futures[rid] = fut
        # The timer is due at or before every other pending request's deadline (`_arm` keeps it
        # so): only a request due sooner than it can need it moved. With one timeout for all
        # requests that is never, and `_arm` (two calls, a heap walk) is skipped on every op.
        if deadline < self._timer_at:
            self._arm()
        return fut

    def _arm(self) -> None:
        """Make sure a timer fires by the session's next request deadline."""
        at = self.session.next_deadline()
        if at is not None and at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._handle(self.session.tick(self._loop.time()))
        self._arm()

    def _handle(self, events: list[Event]) -> None:
        settled = False
        runs = self.run_handler
        run: list[Incoming] = []
        for event in events:
            # A node's consecutive ops of one peer are gathered and handled as one run, before
            # any other event: in arrival order, as one by one
            if runs is not None and type(event) is Incoming and type(event.request.message) is wire.Op:
                if run and run[0].source != event.source:
                    self._run(run)
                    run = []
                run.append(event)
                continue
            if run:
                self._run(run)
                run = []
            # Each event on its own: a callback that raises (a bug in a hook or a handler) is
            # logged, and the events after it (a BATCH's other replies, whose awaits would
            # otherwise end at their deadlines) still go. The try costs nothing until it catches.
            try:
                if isinstance(event, Settled):
                    settled = True
                    fut = self._futures.pop(event.rid, None)
                    if fut is None or fut.done():
                        continue
                    # the future first, then the hooks: one that raises leaves it settled
                    if event.error is not None:
                        fut.set_exception(event.error)
                    else:
                        assert event.result is not None
                        fut.set_result(event.result)
                    if self.on_settled is not None:
                        self.on_settled(event.dest, fut)
                    if self.on_reply is not None and event.result is not None:
                        self.on_reply(event.result)
                elif isinstance(event, Incoming):  # before `Send`: a worker gets one per request
                    message = event.request.message
                    if type(message) is wire.DirectOffer:  # the link's business, never the node's
                        ticket = wire.DirectTicket("", b"")
                        if self.direct is not None:
                            ticket = self.direct.admit(event.source.encode(), message.key)
                        self.reply(event.source, event.rid, ticket)
                    elif self.handler is not None:
                        self.handler(event.source, event.rid, event.request)
                elif isinstance(event, Send):
                    self._push(event.message)
                elif isinstance(event, SessionEnded):
                    if self.direct is not None:
                        self.direct.forget(event.name.encode())
                    if self.on_session_ended is not None:
                        self.on_session_ended(event.name)
                elif isinstance(event, Registered):
                    self._arm()
                elif isinstance(event, Abandoned):
                    # only a direct path carries a request's chunks apart from its message
                    dest = event.dest.encode()
                    if self.direct is not None and self.direct.ready(dest, envelope.REQUEST):
                        self._sent_direct(self.direct, dest, envelope.REQUEST, envelope.abort(dest, event.rid))
            except Exception:
                log.exception("%s failed to handle %s; the events after it go on", self.name, _about(event))
        if run:
            self._run(run)
        # room for the requests waiting in `request`, once per batch of events, not per reply
        # (waking them takes a loop turn either way)
        if settled and self.session.in_flight < self.session.max_in_flight:
            self._room.set()

    def _run(self, run: list[Incoming]) -> None:
        assert self.run_handler is not None  # (a run is gathered only when there is one)
        try:
            self.run_handler(run)
        except Exception:  # the handler answers each op itself; a bug in it must not stop the link
            log.exception("%s failed to handle a run of %d requests", self.name, len(run))

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
        """Send `message` (``[command, name, rid, *body]``). A lone message goes out at once (or,
        pushed while the link drains its socket, as `_drain` says); the requests and replies that
        follow within the same event-loop turn go out together as one BATCH. A message with a
        large buffer streams it as chunks first, each its own multipart."""
        if message[0] not in _BATCHABLE:
            self._flush_batch()  # in order: a delete must not overtake the requests queued before it
            self._push_frames(envelope.framed(message))
            return
        self.messages_sent += 1
        if (
            len(message) > envelope.ENVELOPE_FRAMES
            and any(
                memoryview(f).nbytes > limits.DIRECT_STREAM_THRESHOLD_BYTES for f in message[envelope.ENVELOPE_FRAMES :]
            )
            and self._stream(message)
        ):
            return
        batch = self._batch
        if batch is not None:
            # it leaves later (at the turn's or the drain's end): its buffers, if any, must be
            # owned by then; the envelope and the header before them are bytes (the session's)
            batch.append(message if len(message) <= envelope.ENVELOPE_FRAMES else owned(message))
            if len(batch) + self._acks >= limits.BATCH_MAX_MESSAGES:  # full: out now, the turn goes on with a new one
                self._batch = []
                self._acks = 0
                self._push_frames(envelope.pack_batch(batch))
            return
        self._push_frames(envelope.framed(message))
        self._batch = []
        self._closing = self._loop.call_at(self._loop.time(), self._close_turn)

    def end_turn(self) -> None:
        """The caller is about to wait (an awaited request): close the batch a lone message
        opened in this turn, if nothing joined it, so the loop need not turn once more to close
        it. What is pushed later in the turn leaves as it would at the start of one."""
        if self._closing is not None and not self._batch:
            self._closing.cancel()
            self._closing = self._batch = None

    def _close_turn(self) -> None:
        self._closing = None
        self._flush_batch()

    def _stream(self, message: list[Any]) -> bool:
        """Send `message` as chunks then itself, if it has a frame large enough: over
        `limits.STREAM_THRESHOLD_BYTES`, or, with CURVE, over `limits.DIRECT_STREAM_THRESHOLD_BYTES`
        when a direct path to its peer is open (only a small first chunk then takes the broker, whose
        CURVE costs 4 passes per byte). False when it has none (it is sent as any other)."""
        # a fan-out streams the message it carries, each chunk fanned out to the same targets
        targets, inner = envelope.fanned(message) if message[0] == envelope.FANOUT else (None, message)
        direct = self.direct if targets is None else None
        if direct is not None and inner[0] == envelope.REQUEST:
            self._want_direct(inner[1])
        fast = direct is not None and direct.ready(inner[1], inner[0])
        # without CURVE the broker relays a buffer it carries whole faster than the path streams it
        early = fast and self.curve is not None
        threshold = limits.DIRECT_STREAM_THRESHOLD_BYTES if early else limits.STREAM_THRESHOLD_BYTES
        if not any(memoryview(f).nbytes > threshold for f in inner[envelope.ENVELOPE_FRAMES :]):
            return False
        self._flush_batch()
        # same host: the rest of each buffer in large chunks, each written once into a shared-memory file
        whole = direct is not None and direct.shares_memory(inner[1], inner[0])
        chunk = limits.DIRECT_SHM_FILE_BYTES if whole else limits.STREAM_CHUNK_BYTES
        for part in split(inner, threshold, chunk, first=limits.DIRECT_FIRST_CHUNK_BYTES if fast else 0):
            if self.progress is not None and part[0] == envelope.CHUNK:
                self.progress.chunk(inner[1], part, outgoing=True)
            # a buffer's first chunk goes through the broker, in order before its message:
            # the receiver then knows to hold the message until the rest is in
            if direct is not None and part[0] == envelope.CHUNK and _offset(part) > 0:
                big = memoryview(part[4]).nbytes > limits.STREAM_CHUNK_BYTES
                if big and self._sent_direct(direct, inner[1], inner[0], part):
                    continue
                for piece in rechunk(part) if big else [part]:  # the shared memory refused it whole
                    if not self._sent_direct(direct, inner[1], inner[0], piece):
                        self._push_frames(envelope.framed(piece))
                continue
            self._push_frames(envelope.framed(part if targets is None else envelope.fanout(targets, part)))
        return True

    def _sent_direct(self, direct: DirectPaths, peer: bytes, command: bytes, part: list[Any]) -> bool:
        """Whether chunk `part` went over the direct path to `peer` (False: it did not)."""
        frames = envelope.framed(part)
        if not direct.send(peer, command, frames):
            return False
        self.multiparts_sent += 1
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        return True

    def _want_direct(self, worker: bytes) -> None:
        """Open a direct data path to `worker` in the background, if one is worth opening."""
        direct = self.direct
        if direct is None or self._closed or self._group is None or not direct.wants(worker):
            return
        dest = worker.decode()

        def ask(key: bytes) -> Awaitable[wire.Message]:
            try:
                return self.request_nowait(dest, wire.DirectOffer(key), limits.DIRECT_CONNECT_TIMEOUT_S)
            except FedptrError as e:  # too many in flight, say: no path this time
                failed: asyncio.Future[wire.Message] = self._loop.create_future()
                failed.set_exception(e)
                return failed

        task = self._group.create_task(direct.open(worker, ask))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def _direct_chunk(self, peer: bytes, frames: list[Any]) -> None:
        """A chunk that came over a direct path, from the peer that path authenticated."""
        self.bytes_received += sum(len(f) for f in frames)
        self.messages_received += 1
        try:
            if self.progress is not None:
                self.progress.chunk(peer, envelope.unframed(frames), outgoing=False)
            self._handle(self.session.receive_direct(peer, frames, self._loop.time()))
        except ProtocolError as e:
            log.warning("%s dropped a malformed direct message from %r: %s", self.name, peer, e)

    @property
    def batching(self) -> bool:
        """Whether messages pushed now join a BATCH still open (a message went out alone this
        loop turn already, or a `batched` block is running)."""
        return self._batch is not None

    def hold_turn(self) -> None:
        """Keep what is pushed from now on to the end of this loop turn, to leave together as one
        BATCH: for a request whose follow-ups are usually pushed in the same turn (a plan run,
        then the get of its output), which would otherwise leave alone at once."""
        if self._batch is None:
            self._batch = []
            self._loop.call_soon(self._flush_batch)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Send the requests and replies pushed in the block as one BATCH, at its end (they
        would otherwise leave as the lone first message and a BATCH of the rest)."""
        if self._batch is not None:
            yield
            return
        self._batch = []
        try:
            yield
        finally:
            self._flush_batch()

    def _flush_batch(self) -> None:
        if self._sent_batch() & _POLLIN:
            self._schedule_drain()

    def _sent_batch(self) -> int:
        """Send what the open batch holds and close it; the socket's zmq.EVENTS after the send
        (0 when there was nothing to send: then they were not read)."""
        if self._closing is not None:  # closed before its turn ended: its timer has nothing to do
            self._closing.cancel()
            self._closing = None
        batch, self._batch = self._batch, None
        if not batch:
            return 0
        self._acks = 0
        return self._sent(envelope.framed(batch[0]) if len(batch) == 1 else envelope.pack_batch(batch))

    def _push_frames(self, frames: list[Any]) -> None:
        """Send a whole multipart now, or queue it behind what is already waiting, in order."""
        if self._sent(frames) & _POLLIN:
            self._schedule_drain()

    def _sent(self, frames: list[Any]) -> int:
        """`_push_frames` without scheduling a drain: the socket's zmq.EVENTS after the send, read
        because the send may have consumed a read edge of the FD (it re-arms it)."""
        self.multiparts_sent += 1
        self.bytes_sent += sum(f.nbytes if type(f) is memoryview else len(f) for f in frames)
        assert self._sock is not None
        if self._outbox:
            self._outbox.append(owned(frames))
        else:
            try:
                send_frames(self._sock, frames)
            except zmq.Again:
                self._outbox.append(owned(frames))
                self._writable.set()
        return events(self._sock)

    def _drain(self) -> None:
        """Handle what the socket holds, a bounded number at a time so timers still run in a flood.
        What the handlers push (a node's replies, say) leaves in this turn: the first message's
        answers at once (an awaited op's reply waits for nothing), the rest as one multipart at
        the drain's end; no loop turn of its own is left to close the batch."""
        self._drain_scheduled = False
        sock = self._sock
        if self._closed or sock is None:
            return
        if self._batch is None:
            self._batch = []
        elif self._closing is None:  # a batch a `batched` block or `hold_turn` opened closes itself
            self._drain_from(sock, False)
            return
        try:
            self._drain_from(sock, True)
        finally:
            self._flush_batch()

    def _drain_from(self, sock: zmq.Socket[Any], own_batch: bool) -> None:
        ready = 0
        for i in range(limits.DRAIN_BATCH):
            if self._paused:
                return
            try:
                frames = recv_frames(sock, 1, limits.RECV_COPY_BYTES)
            except zmq.Again:
                ready = events(sock)
                break
            self.bytes_received += sum(len(f) for f in frames)
            self.messages_received += envelope.count(frames)
            try:
                if envelope.command_of(frames) == envelope.CHUNK:
                    chunk = envelope.unframed(frames)  # [CHUNK, name, rid, info, data]
                    if self.progress is not None:  # the broker names the source; the info may be malformed
                        self.progress.chunk(bytes(chunk[1]), chunk, outgoing=False)
                    if self.direct is not None and len(chunk) > 3 and bytes(chunk[3])[:1] == envelope.REPLY:
                        self._want_direct(chunk[1])  # a large reply from that worker: later ones go direct
                self._handle(self.session.receive(frames, self._loop.time()))
            except ProtocolError as e:
                log.warning("%s dropped a malformed message: %s", self.name, e)
            except Exception:  # a bug in a handler must not stop this link from reading
                log.exception("%s failed to handle a message", self.name)
            # asked after each message, as it must be after the last (it re-arms the FD): a
            # recv on an empty socket would raise zmq.Again, which costs 2 us more. The first
            # message's answer (an awaited op's reply) leaves now, the rest at the drain's end:
            # its send reads them anyway, and a reply that waits for nothing should not
            if i == 0 and own_batch and self._batch:
                ready = self._sent_batch()
                self._batch = []
            else:
                ready = events(sock)
            if not ready & _POLLIN:
                break
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
                await asyncio.sleep(limits.WRITE_RETRY_S)  # the FD wakes us for reads only
                self._writable.set()

    async def _heartbeat(self) -> None:
        """Tick the session every heartbeat interval, after reading what waits (beats may sit
        unread if this loop was busy, and they must count before liveness is judged)."""
        while True:
            await asyncio.sleep(self.session.heartbeat_s)
            self._drain()
            self._handle(self.session.tick(self._loop.time()))


def _about(event: Event) -> str:
    """`event` in a log line: its kind and whom it concerns (not its message, which may be large)."""
    if isinstance(event, Settled):
        outcome = type(event.error if event.error is not None else event.result).__name__
        return f"Settled (request {event.rid.hex()} to {event.dest!r}, {outcome})"
    if isinstance(event, Incoming):
        return f"Incoming ({type(event.request.message).__name__} {event.rid.hex()} from {event.source!r})"
    if isinstance(event, SessionEnded):
        return f"SessionEnded ({event.name!r})"
    return type(event).__name__


def _offset(chunk: list[Any]) -> int:
    """Where a CHUNK message (``[CHUNK, name, rid, info, data]``) starts in its buffer."""
    return int(envelope.CHUNK_INFO.unpack(chunk[3])[2])
