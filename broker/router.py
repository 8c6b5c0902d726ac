"""The broker's routing loop: a tight synchronous ROUTER loop that swaps envelope names.

A peer's message ``[identity, head(command, dest, rid, small body), *big]`` goes out as
``[dest_identity, head(command, source_name, rid, small body), *big]`` (`fedptr.envelope`): the small
body frames inlined in the head (`limits.INLINE_FRAME_BYTES` each at most) are copied into the
re-made head, the big ones passed on as the same zmq frames; none is ever decoded. A FANOUT is
first taken apart into the messages it stands for, one per destination, which are then routed
exactly as if each had come alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from fedptr import envelope, heap, limits
from fedptr.errors import ProtocolError
from fedptr.logs import rid_extra
from fedptr.security import allowed_keys
from fedptr.zio import events, recv_with_last, send_frames

from .stats import BrokerStats

log = logging.getLogger("fedptr.broker")

_POLLIN = int(zmq.POLLIN)


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
    timed: bool = False
    """Time every command and count bytes (for ``--metrics-port``)."""


@dataclass
class RoutingTable:
    """Names to identities and back; `workers` holds the names registered as workers.

    `senders` and `contacts` record who sent requests to whom, so that a departure is told only
    to the peers it concerns: those that asked it something (their calls on it must fail) and
    those it asked something; a client's departure is also told to every worker (its objects
    there are reclaimed), O(workers) per departure. `senders` keeps the last request id each
    sender had relayed to the name (the latest issued, of those expecting a reply): its LOST
    notice says which of its calls may have gone to the peer that is gone, so a later one
    (relayed to the peer that took the name again) is not failed."""

    by_name: dict[bytes, bytes] = field(default_factory=dict)
    by_identity: dict[bytes, bytes] = field(default_factory=dict)
    workers: set[bytes] = field(default_factory=set)
    heard: dict[bytes, float] = field(default_factory=dict)
    """Registered identity -> when the broker last received anything from it (monotonic s)."""
    senders: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)
    """Name -> identities that sent it a request -> the latest such request's id expecting a
    reply (b"" when it sent only no-reply requests)."""
    contacts: dict[bytes, set[bytes]] = field(default_factory=dict)
    """Identity -> names it sent a request to."""

    def add(self, name: bytes, identity: bytes, role: bytes, now: float) -> None:
        self.by_name[name] = identity
        self.by_identity[identity] = name
        self.heard[identity] = now
        if role == envelope.ROLE_WORKER:
            self.workers.add(name)

    def note_requests(self, source_identity: bytes, dest: bytes, rids: Sequence[bytes]) -> None:
        """`source_identity` sent requests `rids` (in that order) to `dest`. The latest id is
        kept, not the last relayed: a session may relay its requests out of order (a streamed
        one's message follows its chunks), and a LOST notice must cover every request relayed to
        the peer gone. Called once per batch and destination, not per request."""
        senders = self.senders.get(dest)
        if senders is None:
            senders = self.senders[dest] = {}
        last = senders.get(source_identity, b"")
        no_reply = envelope.NO_REPLY
        if (
            len(rids) > 1
            and rids[0] != no_reply
            and envelope.ascending(rids)
            and (not last or envelope.request_after(rids[0], last))
        ):
            last = rids[-1]  # each after the one before (none NO_REPLY): the fold below would end on the last
        else:
            for rid in rids:
                # a no-reply request (a Delete) is never the latest: no LOST notice can fail it,
                # and, of no session's incarnation, it would count as after every id, so the
                # notice would fail every call to the name, even those the name's next holder got
                if rid != no_reply and (not last or (rid != last and envelope.request_after(rid, last))):
                    last = rid
        senders[source_identity] = last  # b"": only no-reply requests, so LOST fails none of its calls
        contacts = self.contacts.get(source_identity)
        if contacts is None:
            contacts = self.contacts[source_identity] = set()
        contacts.add(dest)

    def concerned(self, identity: bytes, name: bytes) -> set[bytes]:
        """Live identities that the departure of `name` (at `identity`) concerns."""
        out = set(self.senders.get(name, ()))
        out.update(self.by_name[n] for n in self.contacts.get(identity, ()) if n in self.by_name)
        out.discard(identity)
        return {i for i in out if i in self.by_identity}

    def remove_identity(self, identity: bytes) -> bytes | None:
        name = self.by_identity.pop(identity, None)
        self.heard.pop(identity, None)
        for dest in self.contacts.pop(identity, ()):
            senders = self.senders.get(dest)
            if senders is not None:
                senders.pop(identity, None)
                if not senders:
                    del self.senders[dest]
        if name is not None:
            self.by_name.pop(name, None)
            self.workers.discard(name)
            for sender in self.senders.pop(name, ()):
                contacts = self.contacts.get(sender)
                if contacts is not None:
                    contacts.discard(name)
        return name

    def sizes(self) -> dict[str, int]:
        """Lengths of every table: after peers leave they return to their baseline."""
        return {
            "peers": len(self.by_name),
            "identities": len(self.by_identity),
            "workers": len(self.workers),
            "heard": len(self.heard),
            "links": sum(len(s) for s in self.senders.values()),
        }


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
        self._own_copies = self.endpoint.startswith("inproc://")
        """Relayed frames are copied for each destination: over inproc:// zmq hands the receiver
        the sender's very memory (every destination of a fan-out the same), and a node's tensor
        wraps a received frame without a copy and is written in place (a write on bob showed in
        carol's copy of a broadcast). Across processes each receiver reads into its own buffer."""
        self.table = RoutingTable()
        self.dropped = 0
        self.routed = 0
        self.stats = BrokerStats(self, config.timed)
        """Per-peer queues and liveness for STATS; counters and latencies for metrics (broker/stats.py)."""
        self._running = True
        """Until `stop()`: set here, so a stop that comes before `serve()` is not lost."""
        self._now = time.monotonic()
        self._next_beat = self._now
        self._last_beat = self._now
        self._registering_key = b""
        self._client_keys: OrderedDict[bytes, bytes] = OrderedDict()
        """Client name -> the key that first registered it (oldest forgotten first)."""
        self._vanished: set[bytes] = set()
        """Peers a send found gone, forgotten after the message at hand (never mid-send)."""
        self._silent: dict[bytes, bytes] = {}
        """Identity -> name of clients forgotten for their silence (the newest `max_peers`):
        if one says goodbye before it registers again, its session ended after all."""
        self._notices: dict[bytes, list[list[Any]]] = {}
        """LOST notices waiting to go out, per peer, sent together each loop turn."""
        self._trim_at: float | None = None
        """When to give the heap's free pages back to the OS (`fedptr/heap.py`): a little after
        a client left, once for the departures meanwhile (None: no departure since the last)."""
        self._wake: asyncio.Event | None = None
        """Set by `stop()` to end `serve_async` at once (None unless it runs)."""

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
        """Route until `stop()`, blocking this thread (the broker process). Each wake is one `turn`."""
        # zmq_poll itself, not zmq.Poller: the Poller's bookkeeping cost 2 us per turn
        watched: list[tuple[zmq.Socket[bytes], int]] = [(self.sock, _POLLIN)]
        if self._monitor is not None:
            watched.append((self._monitor, _POLLIN))
        beat_ms = max(1, int(self.config.heartbeat_s * 1000))
        while self._running:
            readable = False
            for sock, _ in zmq_poll(watched, beat_ms):
                if sock is self.sock:
                    readable = True
                else:
                    self._log_refusals()
            self.turn(readable)

    async def serve_async(self) -> None:
        """Route until `stop()` on the running asyncio loop instead of a thread of its own: the
        same `turn`s, woken by the socket's FD or the next heartbeat. For a broker that shares
        its process and loop with nodes and clients over ``inproc://`` (the tests' harness)."""
        loop = asyncio.get_running_loop()
        self._wake = wake = asyncio.Event()
        loop.add_reader(self.sock.FD, wake.set)
        if self._monitor is not None:
            loop.add_reader(self._monitor.FD, self._log_refusals)
            self._log_refusals()  # its FD is edge-triggered: read what came before the reader
        try:
            while self._running:
                # reading zmq.EVENTS re-arms the edge-triggered FD, so it is read after clearing
                wake.clear()
                if events(self.sock) & _POLLIN:
                    self.turn(True)
                    await asyncio.sleep(0)  # a bounded batch per loop turn: the peers' tasks run too
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, self._next_beat - time.monotonic())):
                        await wake.wait()
                self.turn(False)
        finally:
            loop.remove_reader(self.sock.FD)
            if self._monitor is not None:
                loop.remove_reader(self._monitor.FD)
            self._wake = None

    def turn(self, readable: bool) -> None:
        """One wake of the loop: when `readable`, drain the queued messages (up to a bound); then
        send the notices they caused, then beat if a heartbeat interval has passed."""
        if readable:
            self._now = time.monotonic()
            self._receive()
        self._now = time.monotonic()
        if self._now >= self._next_beat:
            self._heartbeat()
        self._settle_departures()
        if self._trim_at is not None and self._now >= self._trim_at:
            self._trim_at = None
            heap.trim()

    def _receive(self) -> None:
        sock = self.sock
        heard = self.table.heard
        timed = self.stats.timed
        secure = self.bound_keys is not None
        for _ in range(limits.BROKER_DRAIN_BATCH):
            try:  # small frames as bytes: relayed by copy, no Frame object kept per frame
                frames, last = recv_with_last(sock, 2, limits.RECV_COPY_BYTES)  # identity, head
            except zmq.Again:
                break
            if secure and envelope.command_of(frames[1:2]) == envelope.REGISTER:
                # the sender's authenticated key matters only where names are bound to keys;
                # reading it from every message cost the CURVE broker a Frame per frame
                self._registering_key = str(last.get("User-Id")).encode()
            if frames[0] in heard:
                heard[frames[0]] = self._now
            started = time.perf_counter() if timed else 0.0
            try:
                self.handle(frames)
                if timed:
                    self.stats.handled(frames, started)
            except Exception:  # a bug must not take the broker down: log it, keep routing
                log.exception("failed to handle a message; dropped it")
            if not events(sock) & _POLLIN:  # cheaper than the zmq.Again a recv would raise
                break

    def _log_refusals(self) -> None:
        """Log the handshakes the monitor saw fail. Called only when its socket is readable (a
        poll of it every turn cost the CURVE broker a Poller and a syscall per message)."""
        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            log.warning("refused a connection from %s: %s", event["endpoint"], _event_name(event["event"]))

    def _heartbeat(self) -> None:
        """Beat every peer; forget those silent for `liveness` intervals, unless the broker's
        own loop was what stalled (then the silence is its own, and no verdict is given)."""
        gap = self._now - self._last_beat
        self._last_beat = self._now
        self._next_beat = self._now + self.config.heartbeat_s
        if gap > 2 * self.config.heartbeat_s:
            log.warning("the broker's loop stalled for %.1f s; no liveness verdict this beat", gap)
        else:
            deadline = self._now - self.config.heartbeat_s * self.config.liveness
            for identity in [i for i, t in self.table.heard.items() if t < deadline]:
                self._forget(identity, envelope.GONE_SILENT)
        beat = envelope.build(envelope.HEARTBEAT, b"", envelope.NO_REPLY)
        for identity in list(self.table.heard):
            self._send(identity, beat)

    def _forget(self, identity: bytes, why: bytes) -> None:
        """Drop a peer, and queue a LOST notice for each peer it concerns (sent by
        `_settle_departures`, batched per peer, so no send happens while the table changes)."""
        name = self.table.by_identity.get(identity)
        if name is None:
            return
        role = envelope.ROLE_WORKER if name in self.table.workers else envelope.ROLE_CLIENT
        concerned = self.table.concerned(identity, name)
        relayed = dict(self.table.senders.get(name, ()))  # read before the table forgets the name
        if role == envelope.ROLE_CLIENT:
            # every worker may hold objects of a client (sent there before that worker or this
            # broker restarted, or deletes lost meanwhile): each is told, to reclaim them
            concerned.update(self.table.by_name[w] for w in self.table.workers if w in self.table.by_name)
        self.table.remove_identity(identity)
        self.stats.on_gone(name, why)
        level = logging.INFO if why == envelope.GONE_DISCONNECTED else logging.WARNING
        log.log(level, "peer %r is gone (%s)", name.decode(errors="replace"), why.decode())
        for other in concerned:
            # the latest of its requests relayed to the peer now gone (b"": none): its later
            # ones went, or will go, to whoever holds the name next, or get an error
            last = relayed.get(other, b"")
            notice = envelope.message(envelope.LOST, name, envelope.NO_REPLY, [role, why, last])
            self._notices.setdefault(other, []).append(notice)
        if role == envelope.ROLE_CLIENT and self._trim_at is None:
            self._trim_at = self._now + limits.HEAP_TRIM_DELAY_S
        if role == envelope.ROLE_CLIENT and why == envelope.GONE_SILENT:
            self._silent[identity] = name
            while len(self._silent) > self.config.max_peers:
                self._silent.pop(next(iter(self._silent)))

    def _goodbye_after_silence(self, identity: bytes) -> None:
        """A client forgotten for its silence says goodbye before it registered again: its
        session ended after all, and every worker is told (to reclaim its objects), unless
        the name was registered again meanwhile."""
        name = self._silent.pop(identity, None)
        if name is None or name in self.table.by_name:
            return
        log.info("client %r, forgotten as silent, said goodbye", name)
        notice = envelope.message(
            envelope.LOST, name, envelope.NO_REPLY, [envelope.ROLE_CLIENT, envelope.GONE_DISCONNECTED]
        )
        for worker in self.table.workers:
            other = self.table.by_name.get(worker)
            if other is not None:
                self._notices.setdefault(other, []).append(notice)

    def _settle_departures(self) -> None:
        """Send the queued LOST notices, and forget the peers found gone while sending, until
        nothing is left: a loop, never recursion, however many peers vanish at once."""
        while self._vanished or self._notices:
            vanished, self._vanished = self._vanished, set()
            for identity in vanished:
                self._forget(identity, envelope.GONE_CLOSED)
            notices, self._notices = self._notices, {}
            for identity, messages in notices.items():
                if identity in self.table.by_identity:
                    frames = envelope.framed(messages[0]) if len(messages) == 1 else envelope.pack_batch(messages)
                    self._send(identity, frames)

    def stop(self) -> None:
        self._running = False
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        """Close the monitor before the socket it watches (the other order fails at exit)."""
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

    # --- one message -------------------------------------------------------------------
    def handle(self, frames: list[Any]) -> None:
        """Route or answer one multipart: the sender's identity, then a fedptr envelope (a
        single message or a BATCH). Garbage is dropped with a (rate-limited) log line."""
        identity = frames[0]
        source = self.table.by_identity.get(identity)
        if source is not None and self._relay(identity, source, frames):
            return
        try:
            messages = envelope.parse(frames[1:])
        except ProtocolError as e:
            self._drop(str(e))
            return
        first = messages[0]
        command = first.command
        if command in _ROUTED:
            self._route(identity, messages)
        elif len(messages) > 1:
            self._drop(f"command {command[:8]!r} in a batch")
        elif command == envelope.REGISTER:
            self._register(identity, first)
        elif command == envelope.LIST:
            names = sorted(self.table.workers)
            self._send(identity, envelope.build(envelope.LIST, b"", first.rid, *names))
        elif command == envelope.STATS:
            stats = self.table.sizes() | {"routed": self.routed, "dropped": self.dropped}
            counters = [f"{k}={v}".encode() for k, v in stats.items()]
            counters += [f.encode() for f in self.stats.peer_frames(self._now)]
            self._send(identity, envelope.build(envelope.STATS, b"", first.rid, *counters))
        elif command == envelope.DISCONNECT:
            if identity in self.table.by_identity:
                self._forget(identity, envelope.GONE_DISCONNECTED)
            else:
                self._goodbye_after_silence(identity)
        elif command == envelope.HEARTBEAT:
            if identity not in self.table.by_identity:
                # a peer we forgot (it was stopped, or this broker restarted): ask it to register
                self._error(identity, b"", envelope.NO_REPLY, envelope.REASON_NOT_REGISTERED, "register again")
        else:
            self._drop(f"unknown command {command[:8]!r}")

    def _relay(self, identity: bytes, source: bytes, frames: list[Any]) -> bool:
        """`_route`'s fast path, for a registered peer's requests, replies and chunks to known
        names (what the broker relays most): `envelope.relay` names each for `source` straight
        from the received head, and the tables and counters are told once per destination.
        Returns False, having done nothing, for anything else (a FANOUT, an unknown name, a
        malformed multipart, debug logging of each message): the general path then takes it."""
        if self.stats.debug:
            return False
        relayed = envelope.relay(frames[1:], source)
        if relayed is None:
            return False
        by_name = self.table.by_name
        try:
            dests = [by_name[r.name] for r in relayed]
        except KeyError:
            return False
        for r in relayed:
            if r.requests:
                self.table.note_requests(identity, r.name, r.requests)
        for r, dest_identity in zip(relayed, dests, strict=True):
            self._sent(identity, source, dest_identity, r)
        return True

    def _route(self, identity: bytes, messages: list[envelope.Envelope]) -> None:
        """Deliver requests, replies and chunks, each with its name swapped for the source's,
        batched per destination."""
        source = self.table.by_identity.get(identity)
        by_dest: dict[bytes, list[list[Any]]] = {}
        if any(m.command == envelope.FANOUT for m in messages):
            messages = self._unfanned(messages)
        for m in messages:
            if m.command not in _ROUTED:
                self._drop(f"command {m.command[:8]!r} in a routed batch")
                continue
            if source is None:
                rid = m.rid if m.command == envelope.REQUEST else envelope.NO_REPLY
                self._error(identity, m.name, rid, envelope.REASON_NOT_REGISTERED, "register first")
                continue
            dest_identity = self.table.by_name.get(m.name)
            if dest_identity is None:
                if m.command == envelope.REQUEST:
                    self._error(identity, m.name, m.rid, envelope.REASON_UNKNOWN_NAME, "no such worker")
                else:
                    log.info("reply for %r dropped: no such peer", m.name.decode(errors="replace"))
                continue
            if m.command == envelope.REQUEST:
                self.table.note_requests(identity, m.name, (m.rid,))
            by_dest.setdefault(dest_identity, []).append(envelope.message(m.command, source, m.rid, m.body))
        if source is not None:  # (else by_dest is empty: every message was answered an error)
            for dest_identity, batch in by_dest.items():
                self._deliver(identity, source, dest_identity, batch)

    def _unfanned(self, messages: list[envelope.Envelope]) -> list[envelope.Envelope]:
        """`messages` with each FANOUT replaced by the messages it stands for; a malformed one
        is dropped whole (none of its destinations sees any of it)."""
        out: list[envelope.Envelope] = []
        for m in messages:
            if m.command != envelope.FANOUT:
                out.append(m)
                continue
            try:
                out.extend(envelope.unfan(m))
            except ProtocolError as e:
                self._drop(f"fan-out: {e}")
        return out

    def _deliver(self, identity: bytes, source: bytes, dest_identity: bytes, messages: list[list[Any]]) -> None:
        """Send `messages` to one peer, as a batch when there are several (see `_sent`)."""
        frames = envelope.framed(messages[0]) if len(messages) == 1 else envelope.pack_batch(messages)
        dest = self.table.by_identity.get(dest_identity, b"?")
        requests = [m[2] for m in messages if m[0] == envelope.REQUEST]
        replies = sum(envelope.replies_in(m) for m in messages)
        if self._sent(
            identity, source, dest_identity, envelope.Relayed(dest, frames, requests, replies, len(messages))
        ):
            self.stats.on_routed(dest, messages)

    def _sent(self, identity: bytes, source: bytes, dest_identity: bytes, r: envelope.Relayed) -> bool:
        """Send `r`'s frames (from `source`) to peer `r.name`, and whether they went; on failure,
        tell the sender of each request why."""
        reason = self._send(dest_identity, r.frames)
        if reason is None:
            self.routed += r.messages
            self.stats.on_delivered(r.name, source, r.messages, r.requests, r.replies)
            return True
        for rid in r.requests:
            self._error(identity, r.name, rid, reason, "worker unreachable")
        return False

    def _register(self, identity: bytes, m: envelope.Envelope) -> None:
        name, rid = m.name, m.rid
        role = bytes(m.body[0]) if m.body else b""
        if not envelope.valid_name(name) or role not in envelope.ROLES:
            self._error(identity, name, rid, envelope.REASON_BAD_NAME, "bad name or role")
            return
        if self.bound_keys is not None and not self._key_may_claim(name, role):
            log.warning("refused %r: its key is not the one bound to that name", name.decode(errors="replace"))
            self._error(identity, name, rid, envelope.REASON_FORBIDDEN, "this key may not use that name")
            return
        holder = self.table.by_name.get(name)
        if holder is not None and holder != identity:
            # A restarted peer reclaims its name once the old connection is gone.
            probe = envelope.build(envelope.HEARTBEAT, b"", envelope.NO_REPLY)
            if self._send(holder, probe, forget=False) is None:
                log.warning("refused %r: name taken", name.decode(errors="replace"), extra=rid_extra(rid))
                self._error(identity, name, rid, envelope.REASON_NAME_TAKEN, f"name {name.decode()!r} is taken")
                return
            # the old connection is forgotten as gone silent: the peers with requests at it hear
            # LOST now (a node killed and restarted at once), not at their deadlines. Silent, not
            # closed: a client that comes back on a new connection keeps its session's objects
            self._forget(holder, envelope.GONE_SILENT)
        if holder is None and len(self.table.by_name) >= self.config.max_peers:
            self._error(identity, name, rid, envelope.REASON_FULL, "broker has too many peers")
            return
        old = self.table.by_identity.get(identity)
        if old is not None and old != name:
            self.table.remove_identity(identity)
        self.table.add(name, identity, role, self._now)
        self._silent.pop(identity, None)
        log.info("registered %s %r", role.decode(), name.decode(errors="replace"))
        self._send(identity, envelope.build(envelope.ACCEPTED, name, rid))

    def _key_may_claim(self, name: bytes, role: bytes) -> bool:
        """A worker name needs the key bound to it in the allow directory. A client name is
        bound to the first key that registers it, for as long as the broker remembers it, so no
        other key can take it over (a paused client that comes back keeps its name)."""
        assert self.bound_keys is not None
        bound = self.bound_keys.get(name)
        if bound is not None:
            return bound == self._registering_key
        if role != envelope.ROLE_CLIENT:
            return False
        claimed = self._client_keys.get(name)
        if claimed is None:
            self._client_keys[name] = self._registering_key
            if len(self._client_keys) > limits.BROKER_MAX_CLIENT_BINDINGS:
                self._client_keys.popitem(last=False)
            return True
        self._client_keys.move_to_end(name)
        return claimed == self._registering_key

    def _send(self, identity: bytes, frames: list[Any], forget: bool = True) -> bytes | None:
        """Send to peer `identity` without blocking. Returns None, or the reason it failed; a
        vanished peer is noted, to be forgotten once this message is handled (`forget`)."""
        try:
            if self._own_copies:  # a frame's memoryview is not immutable to `send_frames`: copied
                frames = [f.buffer if type(f) is zmq.Frame else f for f in frames]
            send_frames(self.sock, [identity, *frames])
            return None
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                if forget and identity in self.table.by_identity:
                    self._vanished.add(identity)
                return envelope.REASON_LOST
            if e.errno == errno.EAGAIN:
                self.stats.on_refused(self.table.by_identity.get(identity))
                log.warning(
                    "peer %r is not reading (queue full); message refused", self.table.by_identity.get(identity)
                )
                return envelope.REASON_OVERLOADED
            raise

    def _error(self, identity: bytes, name: bytes, rid: bytes, reason: bytes, text: str) -> None:
        self.stats.on_error(reason)
        self._send(identity, envelope.build(envelope.BROKER_ERROR, name, rid, reason, text.encode()))

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % limits.BROKER_LOG_EVERY == 0:
            log.warning("dropped garbage message (%s); %d dropped so far", why, self.dropped)


_ROUTED = frozenset({envelope.REQUEST, envelope.REPLY, envelope.ACKS, envelope.CHUNK, envelope.FANOUT})


def _event_name(event: int) -> str:
    """A socket monitor event as words (`handshake failed: no detail`), not a number."""
    try:
        return str(zmq.Event(event).name).lower().replace("_", " ")
    except ValueError:
        return f"event {event}"
