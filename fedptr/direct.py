"""The direct data path: the chunks of large buffers between two peers, not through the broker.

With CURVE on, the broker decrypts every byte it relays and encrypts it again, on its one I/O
thread: a 64 MiB tensor cost four CURVE passes and two copies, and bandwidth fell to a quarter.
Here the chunks of a streamed buffer go straight from sender to receiver, encrypted once, with
AES-256-GCM (OpenSSL, AES-NI: 3-5 GB/s per core here) rather than CURVE's XSalsa20-Poly1305
(libzmq's, about 0.6 GB/s end to end: 64 MiB took 90-160 ms over loopback, more than
torch.rpc's whole unencrypted transfer). Without CURVE the broker still copies every chunk
through a third process (64 MiB at 0.64-0.69x torch.rpc), and the path skips it the same way:

* A worker on a ``tcp://`` broker binds a ROUTER data socket (`DirectPaths.serve`) on the
  address it reaches the broker from, in a zmq context of its own (its own I/O thread), CURVE
  on or off (see "Without CURVE" below).
* A peer with a large request for that worker, or a large reply coming from it, asks it through
  the broker for a ticket (`wire.DirectOffer` carrying a fresh public key of the peer's own). The
  broker named the sender of that exchange (and, with CURVE, authenticated both ends); the
  worker admits that key under that name only, and answers its data endpoint and the public key of an X25519 key
  pair (a CURVE key pair: the same curve) made for this admission alone (`wire.DirectTicket`).
* Both ends derive the path's keys from an X25519 agreement between those two key pairs (HKDF-
  SHA256 over both public keys): one AES-256-GCM key each way. Only the two holders of the
  secret keys can make or read a message of the path; the broker, which saw the public keys
  only, cannot. Every message on the data socket is ``[peer key, nonce, sealed]``: the sealed
  part holds the whole envelope and the chunk (names, request id and offsets are not readable on
  the wire either). The worker drops a message whose key it did not admit, or that does not
  open under that key, or whose nonce (a counter) is not above the last it accepted from that
  key (a replay), so each chunk that arrives is attributed to the peer its key was admitted
  for, whatever the envelope says. The peer's first message is a sealed greeting; the worker
  answers it sealed, which proves to the peer that the worker holds the ticket's secret key,
  and tells the worker the connection its reply chunks go back on. The path is used from then.
* Then every chunk but each buffer's first takes that connection: the peer's requests' chunks to
  the worker, the worker's replies' chunks back. The messages themselves, and the first chunk of
  each buffer, still go through the broker, in order with everything else the sender sends, so
  ordering, deadlines, hand-overs and departures are the broker path's; the receiving session
  holds a message (and its sender's later ones) until its chunks are in (`Session`,
  `Reassembly.waiting`), under the same stream budgets.

On one host, a path whose greeting proved a shared ``/dev/shm`` (the greeting names a probe
file the worker reads: `fedptr.shm`) carries the rest of each buffer as files there (of
`limits.DIRECT_SHM_FILE_BYTES` at most): only their descriptors are sealed (`_SHM_CHUNK`), and
the receiver reads each file into its buffer, one per turn of its loop. A message of that kind
not of a chunk's shape is dropped, and the files not taken yet are bounded
(`limits.DIRECT_SHM_MAX_PENDING_BYTES`: more goes sealed).

Anyone can connect to the data socket, but its handshake (ZMTP PLAIN, answered by the worker's
ZAP handler) completes only for an admitted key presenting its path's token, derived from the
agreement like the keys: a stranger is disconnected before a message of it is read. The token
travels in clear, so one who reads it off the wire gets a connection whose messages do not
open: the worker receives and drops them, each at most one chunk's size (`MAXMSGSIZE`), at most
`limits.DIRECT_RCVHWM` of them queued per connection. Whatever fails sends chunks through the broker
instead: a ticket refused or late, a greeting unanswered, a send the socket will not take
(IMMEDIATE: nothing is queued on a connection that is down). A path that failed or broke is
tried again after `limits.DIRECT_RETRY_S`. Chunks already handed to a connection that then breaks
are lost: their message fails with a typed error (its deadline, or the stream refused after
`limits.STREAM_TIMEOUT_S`).

Without CURVE (a broker without ``--curve-secret``, ``local_cluster(curve=False)``) the path
opens too, and carries the same bytes (shared memory on one host) with the same rules; its
security is its own X25519 agreement's, not the broker's CURVE, and it is no weaker than the
broker path it replaces, where every message is in clear and names are not authenticated (the
broker only stamps each message with the name its connection registered):

* Read: the offer and the ticket cross the broker in clear, but they hold public keys only. The
  path's AES keys, its token and its shared-memory file names derive from the agreement, which
  takes one of the two secret keys: someone reading the network reads every message of the
  broker path, and none of the direct path's (the token is in clear on the data connection's
  handshake, as with CURVE on: it opens a connection, not a message, and names files of the
  worker's own uid, 0600).
* Inject: the worker opens only what is sealed under an admitted key's path keys, and attributes
  it to the name the broker stamped on that key's offer. A third party gets a path only by
  offering a key of its own under its own registered name, so its chunks are its own, as its
  messages are on the broker path. A key read off the wire and offered under another name gets
  no ticket (`admit`): if that offer came first, the owner's gets none and its chunks take the
  broker, a denial of the shortcut only.
* Take over: a name whose session ended has its key forgotten (`forget`), so whoever registers
  that name next must offer its own; an active attacker between a peer and the broker could
  swap the offer's or the ticket's key and sit in the middle of the path, but such an attacker
  already reads and rewrites every message of the broker path without CURVE.
* Redirect: the ticket names where the peer connects; only a ``tcp://`` IPv4 address and port
  (what `serve` binds) is taken, so whoever holds a name cannot point a client's lane at a unix
  socket or a host the client would resolve.

Names stay unauthenticated without CURVE: run that way only on a host and network you trust.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from fedptr import envelope, limits, shm, wire
from fedptr.zio import events, recv_frames, send_frames

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger("fedptr.direct")

_POLLIN = int(zmq.POLLIN)
_GREETING = envelope.build(envelope.HEARTBEAT, b"", envelope.NO_REPLY)
_LANE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH  # the worker's ZAP handler no longer admits our key
)
_SHM_CHUNK = envelope.SHM_CHUNK
"""A CHUNK whose data frame is a shared-memory descriptor (its frames are never inlined)."""
_CHUNK_FRAMES = 3
"""A chunk's frames: its head, its info, its data (or a shared-memory descriptor)."""
_SHARED = b"shared"
"""The worker's answer to a greeting whose probe file it read: this path has shared memory."""
_KDF_INFO = b"fedptr direct path v1"
_NONCE = struct.Struct("!4xQ")  # 96 bits: a message counter, never reused under one key
_COUNT = struct.Struct("!B")
_LENGTH = struct.Struct("!I")

ChunkSink = Callable[[bytes, list[Any]], None]
"""Called with (peer name, the frames of a CHUNK as `envelope.framed` makes them) for every chunk
that arrives over a direct path; the peer is the authenticated one."""


class NoDirectPath(Exception):
    """The worker offers no direct path, or it could not be opened (chunks use the broker)."""


@dataclass
class _Channel:
    """One path's keys, both ends alike: AES-256-GCM one way for what we seal, the other way for
    what we open, each message numbered (the nonce) so that no nonce repeats under a key and a
    replayed message is dropped."""

    key_id: bytes
    """The connecting peer's public key (z85), sent in clear: the worker finds the path by it."""
    sealing: AESGCM
    opening: AESGCM
    token: bytes = field(default=b"", repr=False)
    """What the connecting end presents (PLAIN password) for its connection to be accepted at all:
    derived from the agreement like the keys, so only the two ends have it (a sniffer sees it)."""
    outgoing: bytes = b""
    incoming: bytes = b""
    """The directions this end writes and reads shared-memory files in (their names' tags differ)."""
    sent: int = 0
    opened: int = 0
    """The highest counter accepted: one TCP connection keeps order, so anything else is a replay."""
    shared: bool = False
    """Both ends proved they share `limits.DIRECT_SHM_DIR` (the greeting's probe): large chunks
    go as files there."""
    files: collections.deque[bytes] = field(default_factory=collections.deque)
    """The names of the shared-memory files written for this path, oldest first (`DirectPaths._spare`)."""
    files_sent: int = 0
    files_taken: int = 0
    """The counters of the shared-memory files written, and of the last one taken (a replay's is not above it)."""

    def seal(self, frames: list[Any]) -> list[Any]:
        """``[key id, nonce, sealed]``: the frames (small ones, then one buffer last) encrypted
        and authenticated as one message."""
        self.sent += 1
        nonce = _NONCE.pack(self.sent)
        head = frames[:-1]
        plain = b"".join(
            [_COUNT.pack(len(head)), *[_LENGTH.pack(len(f)) + f for f in head], memoryview(frames[-1]).cast("B")]
        )
        return [self.key_id, nonce, self.sealing.encrypt(nonce, plain, None)]

    def open(self, nonce: bytes, sealed: Any) -> list[Any] | None:
        """The frames `seal` was given (the last a view into one buffer), or None for a message
        that was not sealed under this path's key, or that came before (a replay)."""
        from cryptography.exceptions import InvalidTag

        if len(nonce) != _NONCE.size:
            return None
        counter = _NONCE.unpack(nonce)[0]
        if counter <= self.opened:
            return None
        try:
            plain = memoryview(self.opening.decrypt(nonce, memoryview(sealed), None))
        except InvalidTag:
            return None
        self.opened = counter
        # sealed by the other end of this path, so well formed; a short buffer still fails here
        frames: list[Any] = []
        at = _COUNT.size
        for _ in range(_COUNT.unpack_from(plain)[0]):
            (n,) = _LENGTH.unpack_from(plain, at)
            frames.append(bytes(plain[at + _LENGTH.size : at + _LENGTH.size + n]))
            at += _LENGTH.size + n
        frames.append(plain[at:])
        return frames


def _channel(peer_key: bytes, own_secret: bytes, their_public: bytes, connecting: bool) -> _Channel:
    """The keys of the path between the connecting peer's key `peer_key` and a worker's: an
    X25519 agreement, then HKDF-SHA256 bound to both public keys. Raises ValueError for a key
    that is not a z85 X25519 public key. (`cryptography` is loaded on the first path: an idle
    node never loads it.)"""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(their_public) != 40 or len(own_secret) != 40:
        raise ValueError("not a z85 key")
    try:
        mine = X25519PrivateKey.from_private_bytes(z85.decode(own_secret))
        shared = mine.exchange(X25519PublicKey.from_public_bytes(z85.decode(their_public)))
    except KeyError as e:  # z85.decode's answer to a character outside its alphabet
        raise ValueError("not a z85 key") from e
    worker_key = their_public if connecting else z85.encode(mine.public_key().public_bytes_raw())
    hkdf = HKDF(algorithm=hashes.SHA256(), length=96, salt=None, info=_KDF_INFO + peer_key + worker_key)
    keys = hkdf.derive(shared)
    to_worker, to_peer, token = AESGCM(keys[:32]), AESGCM(keys[32:64]), keys[64:]
    if connecting:
        return _Channel(peer_key, to_worker, to_peer, token, outgoing=b"to worker", incoming=b"to peer")
    return _Channel(peer_key, to_peer, to_worker, token, outgoing=b"to peer", incoming=b"to worker")


@dataclass
class _File:
    """One of our shared-memory files (`shm.Directory.write`), by its name in `DirectPaths._files`."""

    spent: bytes
    """The name its receiver hands it back under once read (`shm.Directory.spent_name`)."""
    inode: int
    nbytes: int
    check: asyncio.TimerHandle
    """When it is next looked at (`DirectPaths._check_file`)."""
    written: float
    """The loop's time it was written at."""
    handed_back: bool = False
    """Seen handed back (by `DirectPaths._check_file`): unlinked at the next check."""


@dataclass
class _Lane:
    """Our connection to one worker's data socket."""

    sock: zmq.Socket[bytes]
    monitor: zmq.Socket[bytes]
    opened: asyncio.Future[None]
    public: bytes
    secret: bytes = field(repr=False)
    channel: _Channel | None = None
    """Set once the worker's ticket came (its public key completes the agreement)."""
    greeted: bool = False
    ready: bool = False
    """The worker answered our greeting under the path's keys: chunks may take the lane."""
    probe: bytes = b""
    """Our probe file's name, while the worker may still read it (`shm.Directory.probe`)."""
    offer: bytes = field(default=b"", repr=False)
    """What the greeting says of the probe (its name and secret): b"" when there is none."""


@dataclass
class DirectPaths:
    """One link's direct data paths: its data socket if it is a worker (`serve`), and its
    connections to workers' data sockets (`open`)."""

    on_chunk: ChunkSink
    bytes_sent: int = 0
    """Bytes of the chunks sent over direct paths, before encryption (for tests and figures)."""
    bytes_received: int = 0
    files_rewritten: int = 0
    """Shared-memory files written again in place after their receiver handed them back."""
    endpoint: str = ""
    """Where this worker's data socket listens ("" when it has none)."""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _ctx: zmq.Context[zmq.Socket[bytes]] | None = None
    _server: zmq.Socket[bytes] | None = None
    _zap: zmq.Socket[bytes] | None = None
    """Answers the data socket's handshakes (ZAP): only an admitted key with its path's token."""
    _admitted: OrderedDict[bytes, tuple[bytes, _Channel]] = field(default_factory=OrderedDict)
    """z85 public key -> the peer the broker vouched for when it offered that key, and the path's keys."""
    _routes: dict[bytes, tuple[bytes, _Channel]] = field(default_factory=dict)
    """Peer -> the routing id of its (greeted) connection to our data socket, and its keys."""
    _lanes: dict[bytes, _Lane] = field(default_factory=dict)
    _retry_at: dict[bytes, float] = field(default_factory=dict)
    sources: set[bytes] = field(default_factory=set)
    """Peers whose chunks may come over a path: those admitted, and the workers we connect to
    (the session holds their messages until the chunks are in: `Session.direct_sources`)."""
    _scheduled: set[zmq.Socket[bytes]] = field(default_factory=set)
    _shm: shm.Directory = field(default_factory=shm.Directory)
    _files: dict[bytes, _File] = field(default_factory=dict)
    """Our shared-memory files by name: not taken yet, or handed back and kept for a while to be written again."""
    _file_bytes: int = 0
    """The bytes of `_files` (within `limits.DIRECT_SHM_MAX_PENDING_BYTES`)."""
    _sweep: asyncio.TimerHandle | None = None
    """The sweep due after peers that shared memory left (`forget`), one for all of them."""

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
        self._shm.sweep()
        # bound before the data socket: from its first connection, every handshake asks it
        zap = self._context().socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind("inproc://zeromq.zap.01")
        self._zap = zap
        self._loop.add_reader(zap.FD, self._drain_zap)
        sock = self._context().socket(zmq.ROUTER)
        _tune(sock)
        sock.setsockopt(zmq.PLAIN_SERVER, 1)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"fedptr-direct")
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # per connection, and anyone may connect: what the I/O thread reads while the loop is busy
        sock.setsockopt(zmq.RCVHWM, limits.DIRECT_RCVHWM)
        sock.bind(f"tcp://{host}:*")
        self._server = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loop.add_reader(sock.FD, self._drain_server)

    def admit(self, peer: bytes, key: bytes) -> wire.DirectTicket:
        """`peer` (named by the broker) will connect with `key`: admit it, in place of any key
        that peer was admitted with before, and answer where to connect."""
        held = self._admitted.get(key)
        if self._server is None or (held is not None and held[0] != peer):
            # every message on the data socket names its key in clear: a peer that offered one it
            # read there would replace its owner's path keys, and that owner's chunks be dropped
            return wire.DirectTicket("", b"")
        # a key pair per admission: no two admissions share keys, so nothing sealed for one
        # (the same peer key offered again, say) opens under another
        public, secret = zmq.curve_keypair()
        try:
            channel = _channel(key, secret, key, connecting=False)
        except ValueError:
            return wire.DirectTicket("", b"")
        self.forget(peer)
        if len(self._admitted) >= limits.DIRECT_MAX_KEYS:
            # one client key may register any number of names, each offering a key: forgetting
            # the oldest admission whoever held it dropped a path in use (its lane, not told,
            # kept sending chunks into the void). Only one without a greeted connection goes.
            idle = next((k for k, (p, _) in self._admitted.items() if p not in self._routes), None)
            if idle is None:
                return wire.DirectTicket("", b"")  # every path is in use: this peer's take the broker
            self.sources.discard(self._admitted.pop(idle)[0])
        self._admitted[key] = (peer, channel)
        self.sources.add(peer)
        return wire.DirectTicket(self.endpoint, public)

    def forget(self, peer: bytes) -> None:
        """`peer` left: its key is refused from now on, and nothing more is sent to it directly.
        A peer that shared memory with us may have died (kill -9) leaving files of its own in
        the directory: those it wrote and we handed back, and one written but never announced.
        Nobody else knows of them: they are swept `limits.DIRECT_SHM_SWEEP_S` later, once for
        every peer that left meanwhile (a sweep reads the whole directory on the loop), once its
        process is gone (before, they stayed until some path next opened on this host)."""
        shared = False
        for key in [k for k, (p, _) in self._admitted.items() if p == peer]:
            channel = self._admitted.pop(key)[1]
            shared |= channel.shared
            self._drop_files(channel)
        self._routes.pop(peer, None)
        self.sources.discard(peer)
        if shared:
            self._sweep_soon()

    def _sweep_soon(self) -> None:
        """Sweep the shared-memory directory `limits.DIRECT_SHM_SWEEP_S` from now, once for every
        peer that shared memory with us and left meanwhile (a client, `forget`; a worker whose
        path closed, `_close_lane`): it may have died leaving files of its own there."""
        if self._sweep is None:
            self._sweep = self._loop.call_later(limits.DIRECT_SHM_SWEEP_S, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        self._shm.sweep()

    def _drain_zap(self) -> None:
        """Answer the data socket's handshakes: a connection whose PLAIN credentials are not an
        admitted key and that path's token is refused before any message of it is read (a
        stranger holds a descriptor for one handshake, not a queue of chunks)."""
        zap = self._zap
        if zap is None:
            return
        self._scheduled.discard(zap)
        for _ in range(limits.DRAIN_BATCH):
            try:
                request = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            # version, request id, domain, address, routing id, mechanism, username, password
            admitted = self._admitted.get(request[6]) if len(request) == 8 and request[5] == b"PLAIN" else None
            ok = admitted is not None and hmac.compare_digest(admitted[1].token, request[7])
            status = [b"200", b"OK"] if ok else [b"400", b"not admitted"]
            zap.send_multipart([b"1.0", request[1] if len(request) > 1 else b"", *status, b"", b""])
        self._recheck(zap, self._drain_zap)

    def _drain_server(self) -> None:
        sock = self._server
        if sock is None:
            return
        self._scheduled.discard(sock)
        for _ in range(limits.DRAIN_BATCH):
            try:
                frames = recv_frames(sock, 3)
            except zmq.Again:
                break
            if len(frames) != 4:
                continue
            admitted = self._admitted.get(frames[1])
            if admitted is None:  # never admitted, or forgotten since (it left, or a newer key replaced it)
                continue
            peer, channel = admitted
            inner = channel.open(frames[2], frames[3])
            if inner is None or not envelope.command_of(inner):
                continue
            if envelope.command_of(inner) == envelope.HEARTBEAT:  # the greeting: this connection is the peer's
                # a probe file named in it that we can read: the peer shares our shared memory
                channel.shared = len(inner) > len(_GREETING) and self._shm.check_probe(bytes(inner[-1]))
                try:
                    send_frames(
                        sock, [frames[0], *channel.seal([*_GREETING, _SHARED] if channel.shared else _GREETING)]
                    )
                except zmq.ZMQError as e:
                    # the connection closed after its greeting (its client left): no route to
                    # answer, and the rest of the socket must still be read
                    if e.errno != errno.EHOSTUNREACH:
                        raise
                    continue
                self._routes[peer] = (frames[0], channel)
                continue
            if self._received(peer, channel, inner):
                break  # a file read is this turn's work: what is due runs before the next
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
        self._lanes[worker] = lane = self._connect(worker)
        self.sources.add(worker)
        return self._open(worker, lane, ask(lane.public))

    async def _open(self, worker: bytes, lane: _Lane, answer: Awaitable[wire.Message]) -> None:
        try:
            async with asyncio.timeout(limits.DIRECT_CONNECT_TIMEOUT_S):
                ticket = await answer
                if not isinstance(ticket, wire.DirectTicket) or not ticket.endpoint:
                    raise NoDirectPath("it offers none")
                if not _data_endpoint(ticket.endpoint):
                    # the worker names where we connect: not a unix socket, an inproc name (a
                    # node's ZAP socket is bound in our context) or a host we would resolve
                    raise NoDirectPath("its endpoint is not a tcp:// address")
                try:
                    lane.channel = _channel(lane.public, lane.secret, ticket.key, connecting=True)
                except ValueError:
                    raise NoDirectPath("its key is malformed") from None
                lane.sock.setsockopt(zmq.PLAIN_USERNAME, lane.public)
                lane.sock.setsockopt(zmq.PLAIN_PASSWORD, lane.channel.token)
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

    def _connect(self, worker: bytes) -> _Lane:
        sock = self._context().socket(zmq.DEALER)
        _tune(sock)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        public, secret = zmq.curve_keypair()
        lane = _Lane(sock, sock.get_monitor_socket(_LANE_EVENTS), self._loop.create_future(), public, secret)
        if self._shm.usable():
            self._shm.sweep()
            probe = self._shm.probe()
            if probe is not None:
                lane.probe, lane.offer = probe
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
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and lane.channel is not None:
                if not lane.greeted:  # the lane is ready once the worker answers it (`_drain_lane`)
                    send_frames(lane.sock, lane.channel.seal([*_GREETING, lane.offer] if lane.offer else _GREETING))
                    lane.greeted = True
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
                frames = recv_frames(lane.sock, 3)
            except zmq.Again:
                break
            channel = lane.channel
            if len(frames) != 3 or channel is None or frames[0] != channel.key_id:
                continue
            inner = channel.open(frames[1], frames[2])
            if inner is None or not envelope.command_of(inner):
                continue
            if envelope.command_of(inner) != envelope.HEARTBEAT:
                if self._received(worker, channel, inner):
                    break  # a file read is this turn's work: what is due runs before the next
            elif not lane.ready:  # the worker's answer to our greeting: it holds the ticket's key
                lane.ready = True
                channel.shared = len(inner) > len(_GREETING) and bytes(inner[-1]) == _SHARED
                self._drop_probe(lane)
                if not lane.opened.done():
                    lane.opened.set_result(None)
        if worker in self._lanes:
            self._recheck(lane.sock, lambda: self._drain_lane(worker))

    def _fail(self, worker: bytes) -> None:
        self._close_lane(worker)
        self._retry_at[worker] = self._loop.time() + limits.DIRECT_RETRY_S

    def _close_lane(self, worker: bytes) -> None:
        lane = self._lanes.pop(worker, None)
        if lane is None:
            return
        self._drop_probe(lane)
        if lane.channel is not None:
            self._drop_files(lane.channel)
            if lane.channel.shared:
                # the worker may have died (kill -9): its reply files waiting for us, and those we
                # read and handed back to it, are named for it and no one else unlinks them
                self._sweep_soon()
        self._loop.remove_reader(lane.sock.FD)
        self._loop.remove_reader(lane.monitor.FD)
        lane.sock.disable_monitor()
        lane.monitor.close(linger=0)
        lane.sock.close(linger=0)
        if not lane.opened.done():
            lane.opened.cancel()

    def _drop_probe(self, lane: _Lane) -> None:
        if lane.probe:
            self._shm.unlink(lane.probe)
            lane.probe = b""

    # --- both ----------------------------------------------------------------------------
    def _channel_for(self, peer: bytes, command: bytes) -> _Channel | None:
        if command == envelope.REQUEST:
            lane = self._lanes.get(peer)
            return lane.channel if lane is not None and lane.ready else None
        routed = self._routes.get(peer) if command == envelope.REPLY else None
        return routed[1] if routed is not None else None

    def shares_memory(self, peer: bytes, command: bytes) -> bool:
        """Whether chunks of a `command` for `peer` go as shared-memory files (any size then)."""
        channel = self._channel_for(peer, command)
        return channel is not None and channel.shared

    def ready(self, peer: bytes, command: bytes) -> bool:
        """Whether chunks of a `command` (REQUEST or REPLY) for `peer` have a path now."""
        if command == envelope.REQUEST:
            lane = self._lanes.get(peer)
            return lane is not None and lane.ready
        return command == envelope.REPLY and peer in self._routes

    def send(self, peer: bytes, command: bytes, frames: list[Any]) -> bool:
        """Send a chunk (``[head, info, data]``, `envelope.framed`) of a `command` (REQUEST or
        REPLY) for `peer` directly; False when no path takes it (the caller sends it through
        the broker, or, when it is larger than `limits.STREAM_CHUNK_BYTES`, which only shared
        memory takes, in chunks of that size). Requests' chunks take our connection to the
        worker `peer`; replies' chunks its (greeted) connection to us."""
        channel = self._channel_for(peer, command)
        if channel is None or (command == envelope.REPLY and self._server is None):
            return False
        sealed, file = self._seal(channel, frames)
        if sealed is None:
            return False
        try:
            if command == envelope.REQUEST:
                lane = self._lanes[peer]
                send_frames(lane.sock, sealed)
                self._recheck(lane.sock, lambda: self._drain_lane(peer))
            else:
                assert self._server is not None
                send_frames(self._server, [self._routes[peer][0], *sealed])
                self._recheck(self._server, self._drain_server)
        except zmq.ZMQError as e:
            log.info("direct path to %r refused a chunk (%s); through the broker", peer.decode(errors="replace"), e)
            if file:  # nobody will take it: the caller sends the bytes another way
                self._expire(file)
            if command == envelope.REQUEST:
                self._fail(peer)
            else:
                self._drop_files(self._routes.pop(peer)[1])
            return False
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        return True

    def _seal(self, channel: _Channel, frames: list[Any]) -> tuple[list[Any] | None, bytes]:
        """The sealed message carrying chunk `frames`, and the name of the shared-memory file
        its bytes were written into when the path has shared memory (its descriptor sealed in
        their place; b"" for none). None for a chunk too large to seal whole that no file took."""
        data = memoryview(frames[-1])
        if channel.shared and data.nbytes >= limits.DIRECT_SHM_MIN_BYTES and self._file_room(data.nbytes):
            channel.files_sent += 1
            counter = channel.files_sent
            spare = self._spare(channel)
            name_tag = shm.tag(channel.token, channel.outgoing, counter)
            if spare is None:
                written = self._shm.write(name_tag, counter, data)
            else:
                written = self._shm.write(name_tag, counter, data, spare.spent, spare.inode)
                self._shm.unlink(spare.spent)  # still there only when it was not rewritten
                self.files_rewritten += written is not None and shm.Directory.inode(written[1]) == spare.inode
            if written is not None:
                name, descriptor = written
                spent = self._shm.spent_name(name, channel.token, channel.outgoing, counter)
                check = self._loop.call_later(limits.DIRECT_SHM_SPARE_S, self._check_file, name)
                inode = shm.Directory.inode(descriptor)
                self._files[name] = _File(spent, inode, data.nbytes, check, self._loop.time())
                self._file_bytes += data.nbytes
                channel.files.append(name)
                return channel.seal([*envelope.with_command(frames[:-1], _SHM_CHUNK), descriptor]), name
        if data.nbytes > limits.STREAM_CHUNK_BYTES:
            return None, b""
        return channel.seal(frames), b""

    def _spare(self, channel: _Channel) -> _File | None:
        """The oldest file written for `channel` if its receiver handed it back (read it: files
        are taken in order), forgotten here to be written again for the same path only: its
        receiver, which may have kept a descriptor of it, gets only what it was going to get.
        Handed back is its spent name there and its own gone (the receiver's rename does both at
        once): a file the receiver put under the spent name without taking ours would have had
        ours forgotten here, never unlinked."""
        while channel.files:
            name = channel.files[0]
            file = self._files.get(name)
            if file is None:  # expired, or given up
                channel.files.popleft()
                continue
            if not self._shm.exists(file.spent) or self._shm.exists(name):
                return None
            self._forget(channel.files.popleft())
            return file
        return None

    def _check_file(self, name: bytes) -> None:
        """A file of ours, every `limits.DIRECT_SHM_SPARE_S` after it was written: handed back
        at the check before and not written again since, or gone (refused), it goes; one nobody
        took goes after `limits.STREAM_TIMEOUT_S` (a receiver that died or never got the descriptor)."""
        file = self._files.get(name)
        if file is None:
            return
        taken = not self._shm.exists(name)
        if file.handed_back or (taken and not self._shm.exists(file.spent)):
            self._expire(name)
        elif taken or self._loop.time() < file.written + limits.STREAM_TIMEOUT_S:
            file.handed_back = taken  # kept one more period, for the path's next chunk
            file.check = self._loop.call_later(limits.DIRECT_SHM_SPARE_S, self._check_file, name)
        else:
            self._expire(name)

    def _file_room(self, nbytes: int) -> bool:
        """Whether a file of `nbytes` keeps our files (not taken yet, or handed back) within their
        budget: files their receivers took since are unlinked first (only then: a stat each)."""
        if self._file_bytes + nbytes > limits.DIRECT_SHM_MAX_PENDING_BYTES:
            for name in [n for n in self._files if not self._shm.exists(n)]:
                self._expire(name)
        return self._file_bytes + nbytes <= limits.DIRECT_SHM_MAX_PENDING_BYTES

    def _drop_files(self, channel: _Channel) -> None:
        """Unlink the files written for `channel`'s path, which closed: nobody takes them now."""
        while channel.files:
            self._expire(channel.files.popleft())

    def _forget(self, name: bytes) -> _File | None:
        file = self._files.pop(name, None)
        if file is not None:
            file.check.cancel()
            self._file_bytes -= file.nbytes
        return file

    def _expire(self, name: bytes) -> None:
        file = self._forget(name)
        self._shm.unlink(name)
        if file is not None:
            self._shm.unlink(file.spent)

    def _shared_chunk(self, channel: _Channel, inner: list[Any]) -> list[Any] | None:
        """`inner` as a CHUNK: one whose data is a shared-memory descriptor gets a
        `shm.Incoming` in its place (read where it belongs by the reassembly, which refuses its
        stream if it is not a file of this path's, as announced). None for such a message not of
        a chunk's shape: with no frame before its descriptor, re-making its head raised an
        IndexError out of the socket's reader; with no info frame, its file went unclosed."""
        if envelope.command_of(inner) != _SHM_CHUNK:
            return inner
        if len(inner) != _CHUNK_FRAMES:
            return None
        if channel.shared:
            taken = self._shm.take(bytes(inner[-1]), channel.token, channel.incoming, channel.files_taken)
            if not taken.refused:
                channel.files_taken = taken.counter
        else:
            taken = shm.Incoming(self._shm, b"", 0, 0, 0, "shared memory on a path without it")
        return [*envelope.with_command(inner[:-1], envelope.CHUNK), taken]

    def _received(self, peer: bytes, channel: _Channel, inner: list[Any]) -> bool:
        """Hand on the chunk `inner`; whether it was a shared-memory file (read by then: up to
        `limits.DIRECT_SHM_FILE_BYTES`, as much as a whole drain of sealed chunks may hold)."""
        frames = self._shared_chunk(channel, inner)
        if frames is None:
            return False
        self.bytes_received += sum(len(f) for f in frames)
        self.on_chunk(peer, frames)
        return isinstance(frames[-1], shm.Incoming)

    def _recheck(self, sock: zmq.Socket[bytes], drain: Callable[[], None]) -> None:
        """zmq's FD is edge-triggered and any call may consume an edge: read what waits."""
        if sock not in self._scheduled and events(sock) & _POLLIN:
            self._scheduled.add(sock)
            self._loop.call_soon(drain)

    def close(self) -> None:
        for worker in list(self._lanes):
            self._close_lane(worker)
        if self._sweep is not None:  # the directory closes below: a sweep would open it again
            self._sweep.cancel()
            self._sweep = None
        if self._server is not None:
            self._loop.remove_reader(self._server.FD)
            self._server.close(linger=0)
            self._server = None
        if self._zap is not None:
            self._loop.remove_reader(self._zap.FD)
            self._zap.close(linger=0)
            self._zap = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        for name in list(self._files):
            self._expire(name)
        self._shm.close()


def _tune(sock: zmq.Socket[bytes]) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # one sealed chunk at most: anyone may connect, and what it sends is read before it is dropped
    sock.setsockopt(zmq.MAXMSGSIZE, limits.STREAM_CHUNK_BYTES + limits.DIRECT_SEAL_OVERHEAD_BYTES)
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


def _data_endpoint(endpoint: str) -> bool:
    """Whether a ticket's `endpoint` is what `DirectPaths.serve` binds: ``tcp://`` an IPv4
    address and a port."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit() or not 0 < int(port) < 65536:
        return False
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


def _event_name(event: int) -> str:
    try:
        return str(zmq.Event(event).name).lower().replace("_", " ")
    except ValueError:
        return f"event {event}"
