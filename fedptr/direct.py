"""The direct data path: the chunks of large buffers between two peers, not through the broker.

With CURVE on, the broker decrypts every byte it relays and encrypts it again, on its one I/O
thread: a 64 MiB tensor cost four CURVE passes and two copies, and bandwidth fell to a quarter.
Here the chunks of a streamed buffer go straight from sender to receiver, encrypted once:

* A worker whose link has CURVE keys binds a ROUTER data socket (`DirectPaths.serve`) on the
  address it reaches the broker from, with a fresh CURVE key pair, in a zmq context of its own
  (its own I/O thread, and a ZAP handler that admits only the keys below).
* A peer with a large request for that worker, or a large reply coming from it, asks it through
  the broker for a ticket (`wire.DirectOffer` carrying a fresh public key of the peer's own). The
  broker authenticated both ends of that exchange and named the sender; the worker admits that
  key under that name only, and answers its data endpoint and public key (`wire.DirectTicket`).
* The peer connects a DEALER with those keys. The CURVE handshake authenticates the worker (only
  it holds the ticket's secret key); the worker's ZAP handler refuses every key it did not admit,
  so each chunk that arrives is attributed to the peer its key was admitted for, whatever the
  envelope says. The peer greets once the handshake succeeded; the greeting tells the worker the
  connection its reply chunks go back on.
* Then every chunk but each buffer's first takes that connection: the peer's requests' chunks to
  the worker, the worker's replies' chunks back. The messages themselves, and the first chunk of
  each buffer, still go through the broker, in order with everything else the sender sends, so
  ordering, deadlines, hand-overs and departures are the broker path's; the receiving session
  holds a message (and its sender's later ones) until its chunks are in (`Session`,
  `Reassembly.waiting`), under the same stream budgets.

Whatever fails sends chunks through the broker instead: a ticket refused or late, a handshake
that fails, a send the socket will not take (IMMEDIATE: nothing is queued on a connection that is
down). A path that failed or broke is tried again after `limits.DIRECT_RETRY_S`. Chunks already
handed to a connection that then breaks are lost: their message fails with a typed error (its
deadline, or the stream refused after `limits.STREAM_TIMEOUT_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from fedptr import envelope, limits, wire
from fedptr.zio import events, recv_frames, send_frames

log = logging.getLogger("fedptr.direct")

_POLLIN = int(zmq.POLLIN)
_GREETING = [envelope.PROTOCOL, envelope.HEARTBEAT, b"", envelope.NO_REPLY]
_LANE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

ChunkSink = Callable[[bytes, list[Any]], None]
"""Called with (peer name, frames ``[PROTOCOL, CHUNK, name, rid, info, data]``) for every chunk
that arrives over a direct path; the peer is the authenticated one."""


class NoDirectPath(Exception):
    """The worker offers no direct path, or it could not be opened (chunks use the broker)."""


@dataclass
class _Lane:
    """Our connection to one worker's data socket."""

    sock: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    opened: asyncio.Future[None]
    ready: bool = False


@dataclass
class DirectPaths:
    """One link's direct data paths: its data socket if it is a worker (`serve`), and its
    connections to workers' data sockets (`open`)."""

    on_chunk: ChunkSink
    bytes_sent: int = 0
    """Bytes of the chunks sent over direct paths (for tests and figures)."""
    bytes_received: int = 0
    endpoint: str = ""
    """Where this worker's data socket listens ("" when it has none)."""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _ctx: zmq.Context[zmq.Socket[bytes]] | None = None
    _server: zmq.Socket[bytes] | None = None
    _auth: ThreadAuthenticator | None = None
    _public: bytes = b""
    _admitted: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)
    """z85 public key -> the peer the broker vouched for when it offered that key."""
    _routes: dict[bytes, bytes] = field(default_factory=dict)
    """Peer -> the routing id of its (greeted) connection to our data socket."""
    _lanes: dict[bytes, _Lane] = field(default_factory=dict)
    _retry_at: dict[bytes, float] = field(default_factory=dict)
    sources: set[bytes] = field(default_factory=set)
    """Peers whose chunks may come over a path: those admitted, and the workers we connect to
    (the session holds their messages until the chunks are in: `Session.direct_sources`)."""
    _scheduled: set[zmq.Socket[bytes]] = field(default_factory=set)

    def _context(self) -> zmq.Context[zmq.Socket[bytes]]:
        if self._ctx is None:
            self._ctx = zmq.Context(io_threads=1)
        return self._ctx

    # --- the worker's side ---------------------------------------------------------------
    def serve(self, broker_address: str) -> None:
        """Bind the data socket on the address this host reaches `broker_address` from (a tcp
        broker only: over ipc:// or inproc:// everything goes through the broker)."""
        host = local_host(broker_address)
        if host is None:
            return
        ctx = self._context()
        sock = ctx.socket(zmq.ROUTER)
        _tune(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._auth = ThreadAuthenticator(ctx, log=log)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        public, secret = zmq.curve_keypair()
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.bind(f"tcp://{host}:*")
        self._server, self._public = sock, public
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop.add_reader(sock.FD, self._drain_server)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP (on the authenticator's thread): admit only keys offered through the broker."""
        return key in self._admitted

    def admit(self, peer: bytes, key: bytes) -> wire.DirectTicket:
        """`peer` (named by the broker) will connect with `key`: admit it, in place of any key
        that peer was admitted with before, and answer where to connect."""
        if self._server is None or len(key) != 40:
            return wire.DirectTicket("", b"")
        self.forget(peer)
        self._admitted[key] = peer
        self.sources.add(peer)
        while len(self._admitted) > limits.DIRECT_MAX_KEYS:
            self.sources.discard(self._admitted.popitem(last=False)[1])
        return wire.DirectTicket(self.endpoint, self._public)

    def forget(self, peer: bytes) -> None:
        """`peer` left: its key is refused from now on, and nothing more is sent to it directly."""
        for key in [k for k, p in self._admitted.items() if p == peer]:
            del self._admitted[key]
        self._routes.pop(peer, None)
        self.sources.discard(peer)

    def _drain_server(self) -> None:
        sock = self._server
        if sock is None:
            return
        self._scheduled.discard(sock)
        for _ in range(limits.DRAIN_BATCH):
            try:
                frames = recv_frames(sock, 0)
            except zmq.Again:
                break
            if len(frames) < 1 + envelope.ENVELOPE_FRAMES:
                continue
            peer = self._admitted.get(frames[1].get("User-Id").encode())
            if peer is None:  # admitted once, forgotten since (it left, or a newer key replaced it)
                continue
            head = [f.bytes for f in frames[1 : 1 + envelope.ENVELOPE_FRAMES]]
            if head[1] == envelope.HEARTBEAT:
                self._routes[peer] = frames[0].bytes
                continue
            self._received(peer, head + frames[1 + envelope.ENVELOPE_FRAMES :])
        self._recheck(sock, self._drain_server)

    # --- the connecting side -------------------------------------------------------------
    def wants(self, worker: bytes) -> bool:
        """Whether a path to `worker` is worth opening now (none open, none opening, and the
        last failure, if any, long enough ago)."""
        return worker not in self._lanes and self._retry_at.get(worker, 0.0) <= self._loop.time()

    def open(self, worker: bytes, ask: Callable[[bytes], Awaitable[wire.Message]]) -> Coroutine[Any, Any, None]:
        """Start opening a path to `worker` (from now on `wants` says no) and return what to
        await to finish. `ask` is called at once with our public key: it sends the offer
        through the broker (ahead of the chunks that follow) and returns the awaitable answer.
        The coroutine never raises: a failure is logged and leaves chunks on the broker's path."""
        public, secret = zmq.curve_keypair()
        self._lanes[worker] = lane = self._connect(worker, public, secret)
        self.sources.add(worker)
        return self._open(worker, lane, ask(public))

    async def _open(self, worker: bytes, lane: _Lane, answer: Awaitable[wire.Message]) -> None:
        try:
            async with asyncio.timeout(limits.DIRECT_CONNECT_TIMEOUT_S):
                ticket = await answer
                if not isinstance(ticket, wire.DirectTicket) or not ticket.endpoint:
                    raise NoDirectPath("it offers none")
                lane.sock.curve_serverkey = ticket.key
                lane.sock.connect(ticket.endpoint)
                self._watch_lane(worker)  # zmq's FD signals edges: read what came before we waited
                await lane.opened
        except asyncio.CancelledError:
            self._close_lane(worker)
            raise
        except Exception as e:  # any failure: the broker's path carries on
            why = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            log.info("no direct path to %r (%s); chunks go through the broker", worker.decode(errors="replace"), why)
            self._fail(worker)

    def _connect(self, worker: bytes, public: bytes, secret: bytes) -> _Lane:
        sock = self._context().socket(zmq.DEALER)
        _tune(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        lane = _Lane(sock, sock.get_monitor_socket(_LANE_EVENTS), self._loop.create_future())
        self._loop.add_reader(sock.FD, self._drain_lane, worker)
        self._loop.add_reader(lane.monitor.FD, self._watch_lane, worker)
        return lane

    def _watch_lane(self, worker: bytes) -> None:
        lane = self._lanes.get(worker)
        while lane is not None:
            try:
                event = recv_monitor_message(lane.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not lane.ready:
                send_frames(lane.sock, _GREETING)
                lane.ready = True
                if not lane.opened.done():
                    lane.opened.set_result(None)
            elif event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.info("direct path to %r: %s", worker.decode(errors="replace"), _event_name(event))
                if not lane.opened.done():
                    lane.opened.set_exception(NoDirectPath(_event_name(event)))
                else:
                    self._fail(worker)
                return

    def _drain_lane(self, worker: bytes) -> None:
        lane = self._lanes.get(worker)
        if lane is None:
            return
        self._scheduled.discard(lane.sock)
        for _ in range(limits.DRAIN_BATCH):
            try:
                frames = recv_frames(lane.sock, envelope.ENVELOPE_FRAMES)
            except zmq.Again:
                break
            self._received(worker, frames)
        if worker in self._lanes:
            self._recheck(lane.sock, lambda: self._drain_lane(worker))

    def _fail(self, worker: bytes) -> None:
        self._close_lane(worker)
        self._retry_at[worker] = self._loop.time() + limits.DIRECT_RETRY_S

    def _close_lane(self, worker: bytes) -> None:
        lane = self._lanes.pop(worker, None)
        if lane is None:
            return
        self._loop.remove_reader(lane.sock.FD)
        self._loop.remove_reader(lane.monitor.FD)
        lane.sock.disable_monitor()
        lane.monitor.close(linger=0)
        lane.sock.close(linger=0)
        if not lane.opened.done():
            lane.opened.cancel()

    # --- both ----------------------------------------------------------------------------
    def send(self, peer: bytes, command: bytes, frames: list[Any]) -> bool:
        """Send a chunk of a `command` (REQUEST or REPLY) for `peer` directly; False when no
        path takes it (the caller sends it through the broker). Requests' chunks take our
        connection to the worker `peer`; replies' chunks its (greeted) connection to us."""
        try:
            if command == envelope.REQUEST:
                lane = self._lanes.get(peer)
                if lane is None or not lane.ready:
                    return False
                send_frames(lane.sock, frames)
                self._recheck(lane.sock, lambda: self._drain_lane(peer))
            else:
                route = self._routes.get(peer)
                if route is None or self._server is None:
                    return False
                send_frames(self._server, [route, *frames])
                self._recheck(self._server, self._drain_server)
        except zmq.ZMQError as e:
            log.info("direct path to %r refused a chunk (%s); through the broker", peer.decode(errors="replace"), e)
            if command == envelope.REQUEST:
                self._fail(peer)
            else:
                self._routes.pop(peer, None)
            return False
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        return True

    def _received(self, peer: bytes, frames: list[Any]) -> None:
        self.bytes_received += sum(len(f) for f in frames)
        self.on_chunk(peer, frames)

    def _recheck(self, sock: zmq.Socket[bytes], drain: Callable[[], None]) -> None:
        """zmq's FD is edge-triggered and any call may consume an edge: read what waits."""
        if sock not in self._scheduled and events(sock) & _POLLIN:
            self._scheduled.add(sock)
            self._loop.call_soon(drain)

    def close(self) -> None:
        for worker in list(self._lanes):
            self._close_lane(worker)
        if self._server is not None:
            self._loop.remove_reader(self._server.FD)
            self._server.close(linger=0)
            self._server = None
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)


def _tune(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SNDHWM, limits.SOCKET_HWM)
    sock.setsockopt(zmq.RCVHWM, limits.SOCKET_HWM)


def local_host(broker_address: str) -> str | None:
    """The IPv4 address of this host's interface toward a ``tcp://`` broker (loopback for a
    loopback broker); None for any other transport or a host that does not resolve."""
    if not broker_address.startswith("tcp://"):
        return None
    host = broker_address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # no packet is sent: this only picks the route
            return str(probe.getsockname()[0])
    except OSError:
        return None


def _event_name(event: int) -> str:
    try:
        return str(zmq.Event(event).name).lower().replace("_", " ")
    except ValueError:
        return f"event {event}"
