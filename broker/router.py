"""The broker's routing loop: a tight synchronous ROUTER loop that swaps envelope names.

A peer's message ``[identity, PROTOCOL, command, dest, rid, *body]`` goes out as
``[dest_identity, PROTOCOL, command, source_name, rid, *body]``; body frames are passed on as
the same zmq frames, never copied or decoded.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from fedptr import envelope, limits
from fedptr.errors import ProtocolError
from fedptr.security import allowed_keys
from fedptr.zio import recv_frames, send_frames

log = logging.getLogger("fedptr.broker")


class _DenialLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """pyzmq's authenticator logs refusals at debug level; every refusal must be seen."""

    def debug(self, msg: object, *args: Any, **kwargs: Any) -> None:
        text = str(msg) % args if args else str(msg)
        self.log(logging.WARNING if "DENIED" in text else logging.DEBUG, "ZAP: %s", text, **kwargs)


@dataclass
class BrokerConfig:
    """What the broker's command line sets."""

    bind: str = "tcp://127.0.0.1:5555"
    max_message_bytes: int = limits.MAX_MESSAGE_BYTES
    max_peers: int = limits.BROKER_MAX_PEERS
    hwm: int = limits.SOCKET_HWM
    heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S
    liveness: int = limits.HEARTBEAT_LIVENESS
    curve_secret: str | None = None
    """The broker's ``.key_secret`` file: with it, only CURVE peers whose keys are in `allow` get in."""
    allow: str | None = None
    """Directory of allowed public keys; ``NAME.key`` binds the worker name NAME to its key."""


@dataclass
class RoutingTable:
    """Names to identities and back; `workers` holds the names registered as workers."""

    by_name: dict[bytes, bytes] = field(default_factory=dict)
    by_identity: dict[bytes, bytes] = field(default_factory=dict)
    workers: set[bytes] = field(default_factory=set)
    heard: dict[bytes, float] = field(default_factory=dict)
    """Registered identity -> when the broker last received anything from it (monotonic s)."""

    def add(self, name: bytes, identity: bytes, role: bytes, now: float) -> None:
        self.by_name[name] = identity
        self.by_identity[identity] = name
        self.heard[identity] = now
        if role == envelope.ROLE_WORKER:
            self.workers.add(name)

    def remove_identity(self, identity: bytes) -> bytes | None:
        name = self.by_identity.pop(identity, None)
        self.heard.pop(identity, None)
        if name is not None:
            self.by_name.pop(name, None)
            self.workers.discard(name)
        return name

    def sizes(self) -> tuple[int, int, int, int]:
        """Lengths of every table: after peers leave they return to their baseline."""
        return len(self.by_name), len(self.by_identity), len(self.workers), len(self.heard)


class Broker:
    """Owns the ROUTER socket and the routing table; `serve()` runs until `stop()` or a signal."""

    def __init__(self, config: BrokerConfig, context: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.config = config
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        self.sock.setsockopt(zmq.SNDHWM, config.hwm)
        self.sock.setsockopt(zmq.RCVHWM, config.hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.bound_keys: dict[bytes, bytes] | None = None
        self._auth: ThreadAuthenticator | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        if config.curve_secret:
            self._secure(config.curve_secret, config.allow or "")
        self.sock.bind(config.bind)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.table = RoutingTable()
        self.dropped = 0
        self.routed = 0
        self._running = False
        self._now = time.monotonic()
        self._next_beat = self._now
        self._registering_key = b""

    def _secure(self, secret_file: str, allow: str) -> None:
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key")
        self._auth = ThreadAuthenticator(self.ctx, log=_DenialLog(log))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=allow)
        self.sock.curve_server = True
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret
        self.bound_keys = allowed_keys(allow)
        # zmq refuses a peer without a key (or with the wrong mechanism) before ZAP sees it;
        # the monitor socket is how those refusals reach the log.
        failed = (
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self._monitor = self.sock.get_monitor_socket(failed)

    # --- loop --------------------------------------------------------------------------
    def serve(self) -> None:
        """Route until `stop()`. Each wake drains every queued message before polling again."""
        self._running = True
        sock = self.sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        beat_ms = max(1, int(self.config.heartbeat_s * 1000))
        heard = self.table.heard
        while self._running:
            if poller.poll(beat_ms):
                self._now = time.monotonic()
                self._log_refusals()
                for _ in range(limits.BROKER_DRAIN_BATCH):
                    try:
                        frames = recv_frames(sock, 1 + envelope.ENVELOPE_FRAMES if self.bound_keys is None else 0)
                    except zmq.Again:
                        break
                    if self.bound_keys is not None:
                        frames = self._with_key(frames)
                    if frames[0] in heard:
                        heard[frames[0]] = self._now
                    try:
                        self.handle(frames)
                    except Exception:  # a bug must not take the broker down: log it, keep routing
                        log.exception("failed to handle a message; dropped it")
            self._now = time.monotonic()
            if self._now >= self._next_beat:
                self._heartbeat()

    def _log_refusals(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            log.warning("refused a connection from %s: handshake failed (%s)", event["endpoint"], event["event"])

    def _with_key(self, frames: list[Any]) -> list[Any]:
        """Secure mode: envelope frames as bytes, and the sender's authenticated key noted for a
        REGISTER (the only message where it matters: names are bound to keys there)."""
        key = frames[1].get("User-Id").encode() if len(frames) > 2 else b""
        head = [bytes(f) for f in frames[: 1 + envelope.ENVELOPE_FRAMES]]
        if len(head) > 2 and head[2] == envelope.REGISTER:
            self._registering_key = key
        return head + frames[1 + envelope.ENVELOPE_FRAMES :]

    def _heartbeat(self) -> None:
        """Beat every peer; forget (and announce) those silent for `liveness` intervals."""
        self._next_beat = self._now + self.config.heartbeat_s
        deadline = self._now - self.config.heartbeat_s * self.config.liveness
        for identity in [i for i, t in self.table.heard.items() if t < deadline]:
            self._forget(identity, envelope.GONE_SILENT)
        for identity in list(self.table.heard):
            self._send([identity, envelope.PROTOCOL, envelope.HEARTBEAT, b"", envelope.NO_REPLY])

    def _forget(self, identity: bytes, why: bytes) -> None:
        """Drop a peer and tell every other peer, so calls waiting on it fail at once."""
        role = (
            envelope.ROLE_WORKER if self.table.by_identity.get(identity) in self.table.workers else envelope.ROLE_CLIENT
        )
        name = self.table.remove_identity(identity)
        if name is None:
            return
        log.warning("peer %r is gone (%s)", name, why.decode())
        for other in list(self.table.by_identity):
            self._send([other, envelope.PROTOCOL, envelope.LOST, name, envelope.NO_REPLY, role, why])

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

    # --- one message -------------------------------------------------------------------
    def handle(self, frames: list[Any]) -> None:
        """Route or answer one message: ``[identity, PROTOCOL, command, name, rid]`` as bytes, then
        the body as zmq frames. Garbage is dropped with a (rate-limited) log line."""
        if len(frames) < 1 + envelope.ENVELOPE_FRAMES or frames[1] != envelope.PROTOCOL:
            self._drop(frames, "not a fedptr envelope")
            return
        identity = frames[0]
        command = frames[2]
        if command == envelope.REQUEST or command == envelope.REPLY or command == envelope.CHUNK:
            self._route(frames, identity)
        elif command == envelope.BATCH:
            self._route_batch(frames, identity)
        elif command == envelope.REGISTER:
            self._register(frames, identity)
        elif command == envelope.LIST:
            names = sorted(self.table.workers)
            self._send([identity, envelope.PROTOCOL, envelope.LIST, b"", frames[4], *names])
        elif command == envelope.STATS:
            peers, identities, workers, heard = self.table.sizes()
            stats = {"peers": peers, "identities": identities, "workers": workers, "heard": heard}
            stats |= {"routed": self.routed, "dropped": self.dropped}
            counters = [f"{k}={v}".encode() for k, v in stats.items()]
            self._send([identity, envelope.PROTOCOL, envelope.STATS, b"", frames[4], *counters])
        elif command == envelope.DISCONNECT:
            self._forget(identity, envelope.GONE_DISCONNECTED)
        elif command == envelope.HEARTBEAT:
            if identity not in self.table.by_identity:
                # a peer we forgot (it was stopped, or this broker restarted): ask it to register
                self._error(identity, b"", envelope.NO_REPLY, envelope.REASON_NOT_REGISTERED, "register again")
        else:
            self._drop(frames, f"unknown command {command[:8]!r}")

    def _destination(self, identity: bytes, source: bytes | None, message: list[Any]) -> bytes | None:
        """Rewrite `message` (``[command, name, rid, *body]``) for delivery: its command and rid as
        bytes and its name set to the source. Returns the destination's identity, or None after
        answering (a request to an unknown name) or dropping it."""
        command, dest, rid = bytes(message[0]), bytes(message[1]), bytes(message[2])
        if command != envelope.REQUEST and command != envelope.REPLY and command != envelope.CHUNK:
            self._drop(message, f"command {command[:8]!r} in a routed message")
            return None
        if source is None:
            if command == envelope.REQUEST:
                self._error(identity, dest, rid, envelope.REASON_NOT_REGISTERED, "register first")
            else:
                self._error(identity, dest, envelope.NO_REPLY, envelope.REASON_NOT_REGISTERED, "register again")
            return None
        dest_identity = self.table.by_name.get(dest)
        if dest_identity is None:
            if command == envelope.REQUEST:
                self._error(identity, dest, rid, envelope.REASON_UNKNOWN_NAME, "no such worker")
            else:
                log.info("reply for %r dropped: no such peer", dest)
            return None
        message[0], message[1], message[2] = command, source, rid
        return dest_identity

    def _route(self, frames: list[Any], identity: bytes) -> None:
        message = frames[2:]
        dest_identity = self._destination(identity, self.table.by_identity.get(identity), message)
        if dest_identity is not None:
            self._deliver(identity, dest_identity, [message])

    def _route_batch(self, frames: list[Any], identity: bytes) -> None:
        try:
            messages = envelope.unpack_batch(frames[3], frames[4:])
        except ProtocolError as e:
            self._drop(frames, str(e))
            return
        source = self.table.by_identity.get(identity)
        by_dest: dict[bytes, list[list[Any]]] = {}
        for message in messages:
            dest_identity = self._destination(identity, source, message)
            if dest_identity is not None:
                by_dest.setdefault(dest_identity, []).append(message)
        for dest_identity, batch in by_dest.items():
            self._deliver(identity, dest_identity, batch)

    def _deliver(self, identity: bytes, dest_identity: bytes, messages: list[list[Any]]) -> None:
        """Send `messages` to one peer, as a batch when there are several; on failure, tell the
        sender of each request why."""
        if len(messages) == 1:
            frames = [dest_identity, envelope.PROTOCOL, *messages[0]]
        else:
            frames = [dest_identity, *envelope.pack_batch(messages)]
        dest = self.table.by_identity.get(dest_identity, b"?")
        reason = self._send(frames)
        if reason is None:
            self.routed += len(messages)
            return
        for m in messages:
            if m[0] == envelope.REQUEST:
                self._error(identity, dest, m[2], reason, "worker unreachable")

    def _register(self, frames: list[Any], identity: bytes) -> None:
        name = frames[3]
        rid = frames[4]
        role = bytes(frames[5]) if len(frames) > 5 else b""
        if not envelope.valid_name(name) or role not in envelope.ROLES:
            self._error(identity, name, rid, envelope.REASON_BAD_NAME, "bad name or role")
            return
        if self.bound_keys is not None and not self._key_may_claim(name, role):
            log.warning("refused %r: its key is not the one bound to that name", name)
            self._error(identity, name, rid, envelope.REASON_FORBIDDEN, "this key may not use that name")
            return
        holder = self.table.by_name.get(name)
        if holder is not None and holder != identity:
            # A restarted peer reclaims its name once the old connection is gone.
            if self._send([holder, envelope.PROTOCOL, envelope.HEARTBEAT, b"", envelope.NO_REPLY]) is None:
                log.warning("refused %r: name taken", name)
                self._error(identity, name, rid, envelope.REASON_NAME_TAKEN, f"name {name.decode()!r} is taken")
                return
            self.table.remove_identity(holder)
        if holder is None and len(self.table.by_name) >= self.config.max_peers:
            self._error(identity, name, rid, envelope.REASON_FULL, "broker has too many peers")
            return
        old = self.table.by_identity.get(identity)
        if old is not None and old != name:
            self.table.remove_identity(identity)
        self.table.add(name, identity, role, self._now)
        log.info("registered %s %r", role.decode(), name)
        self._send([identity, envelope.PROTOCOL, envelope.ACCEPTED, name, rid])

    def _key_may_claim(self, name: bytes, role: bytes) -> bool:
        """A worker name needs the key bound to it; a client name must not be a bound name
        unless the key is the bound one."""
        assert self.bound_keys is not None
        bound = self.bound_keys.get(name)
        if bound is None:
            return role == envelope.ROLE_CLIENT
        return bound == self._registering_key

    def _send(self, frames: list[Any]) -> bytes | None:
        """Send without blocking. Returns None, or the reason it failed; a vanished peer is forgotten."""
        try:
            send_frames(self.sock, frames)
            return None
        except zmq.ZMQError as e:
            peer = bytes(frames[0])
            if e.errno == errno.EHOSTUNREACH:
                self._forget(peer, envelope.GONE_CLOSED)
                return envelope.REASON_LOST
            if e.errno == errno.EAGAIN:
                log.warning("peer %r is not reading (queue full); message refused", self.table.by_identity.get(peer))
                return envelope.REASON_OVERLOADED
            raise

    def _error(self, identity: bytes, name: bytes, rid: bytes, reason: bytes, text: str) -> None:
        self._send([identity, envelope.PROTOCOL, envelope.BROKER_ERROR, name, rid, reason, text.encode()])

    def _drop(self, frames: list[Any], why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % limits.BROKER_LOG_EVERY == 0:
            log.warning("dropped garbage message (%s); %d dropped so far", why, self.dropped)
