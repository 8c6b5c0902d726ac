"""The broker's operating figures: per-peer liveness and queues for STATS, and its metrics.

Everything here reads envelopes only (commands, names, request ids), never a body. ZeroMQ does
not expose how many messages wait in a ROUTER's queue for one peer, so the queue depth of a
peer is what the broker can know: the requests it delivered to that peer and has not yet seen
answered (`pending`), plus the messages refused because the peer's queue was full (`refused`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fedptr import envelope, metrics
from fedptr.logs import rid_extra

if TYPE_CHECKING:
    from .router import Broker

log = logging.getLogger("fedptr.broker")

_REGISTRATION_REFUSALS = frozenset(
    {envelope.REASON_NAME_TAKEN, envelope.REASON_BAD_NAME, envelope.REASON_FORBIDDEN, envelope.REASON_FULL}
)

COMMAND_NAMES = {
    envelope.REGISTER: "register",
    envelope.REQUEST: "request",
    envelope.REPLY: "reply",
    envelope.ACKS: "acks",
    envelope.CHUNK: "chunk",
    envelope.FANOUT: "fanout",
    envelope.BATCH: "batch",
    envelope.LIST: "list",
    envelope.STATS: "stats",
    envelope.HEARTBEAT: "heartbeat",
    envelope.DISCONNECT: "disconnect",
}
"""Broker commands as metric labels; anything else is ``other``."""


class BrokerStats:
    """Counters of one broker. `timed` (metrics on) adds per-command latencies and bytes."""

    def __init__(self, broker: Broker, timed: bool = False) -> None:
        self.broker = broker
        self.timed = timed
        self.commands: Counter[str] = Counter()
        """Multiparts received, by command (timed only)."""
        self.bytes_in = 0
        """Bytes of every frame received (timed only)."""
        self.latencies = metrics.Latencies()
        self.pending: Counter[bytes] = Counter()
        """Name -> requests delivered to it and not yet answered."""
        self.delivered: Counter[bytes] = Counter()
        """Name -> messages delivered to it."""
        self.refused: Counter[bytes] = Counter()
        """Name -> messages refused because its queue was full."""
        self.registrations_refused = 0
        self.silent = 0
        """Peers forgotten because their heartbeats stopped."""
        self.debug = log.isEnabledFor(logging.DEBUG)
        """Log every routed message with its request id (``--log-level DEBUG``)."""

    # --- the router's hooks ------------------------------------------------------------
    def handled(self, frames: Sequence[Any], started: float) -> None:
        """One multipart (identity, then envelope) was handled; it took since `started` (perf_counter)."""
        command = COMMAND_NAMES.get(envelope.command_of(frames[1:2]), "other")
        self.commands[command] += 1
        self.bytes_in += sum(len(f) for f in frames)
        self.latencies.observe(command, time.perf_counter() - started)

    def on_routed(self, dest: bytes, messages: Sequence[Sequence[Any]]) -> None:
        """The general path sent `messages` (``[command, source, rid, *body]``) to peer `dest`:
        each is logged with its request id when debugging (the fast path,
        `Broker._relay`, stands aside then)."""
        if self.debug:
            for m in messages:
                what = COMMAND_NAMES.get(bytes(m[0]), "other")
                log.debug("routed %s from %r to %r", what, _text(m[1]), _text(dest), extra=rid_extra(bytes(m[2])))

    def on_delivered(self, dest: bytes, source: bytes, count: int, requests: Sequence[bytes], replies: int) -> None:
        """`count` messages from `source` reached the queue of peer `dest`: `requests` (their
        ids) and `replies` among them. Counted per batch: the requests that expect a reply add to
        what `dest` has pending, then the replies settle what `source` had (in that order: a peer
        sending to its own name may answer, in one batch, a request of that batch)."""
        self.delivered[dest] += count
        expecting = len(requests) - requests.count(envelope.NO_REPLY)
        if expecting:
            self.pending[dest] += expecting
        if replies:
            left = self.pending.get(source, 0)
            if left > 0:
                self.pending[source] = max(0, left - replies)

    def on_error(self, reason: bytes) -> None:
        """The broker answered a BROKER_ERROR for `reason`."""
        if reason in _REGISTRATION_REFUSALS:
            self.registrations_refused += 1

    def on_refused(self, name: bytes | None) -> None:
        """A message to `name` was refused: its queue was full."""
        if name is not None:
            self.refused[name] += 1

    def on_gone(self, name: bytes, why: bytes) -> None:
        """Peer `name` was forgotten, for `why` (a GONE_* reason)."""
        self.pending.pop(name, None)
        self.delivered.pop(name, None)
        self.refused.pop(name, None)
        if why == envelope.GONE_SILENT:
            self.silent += 1

    # --- what STATS and scrapes show ---------------------------------------------------
    def peer_frames(self, now: float) -> list[str]:
        """``peer.NAME.FIELD=INT`` for every registered peer (STATS; `envelope.STATS_PEER_PREFIX`)."""
        table = self.broker.table
        out: list[str] = []
        for identity, heard in table.heard.copy().items():
            name = table.by_identity.get(identity)
            if name is None:
                continue
            prefix = f"{envelope.STATS_PEER_PREFIX}{name.decode(errors='replace')}."
            out += [
                f"{prefix}worker={int(name in table.workers)}",
                f"{prefix}heard_ms={max(0, int((now - heard) * 1000))}",
                f"{prefix}pending={self.pending.get(name, 0)}",
                f"{prefix}refused={self.refused.get(name, 0)}",
                f"{prefix}delivered={self.delivered.get(name, 0)}",
            ]
        return out

    def collect(self) -> Iterable[metrics.Metric]:
        """The broker's Prometheus families (called on the metrics server's thread at each scrape)."""
        b, p = self.broker, "broker"
        yield metrics.labelled_counter(
            "fedptr_broker_messages", "Multiparts received, by command.", p, "command", self.commands.copy()
        )
        yield metrics.counter("fedptr_bytes_in", "Bytes received (every frame).", p, self.bytes_in)
        yield metrics.counter("fedptr_broker_routed", "Messages routed to a peer.", p, b.routed)
        yield metrics.counter("fedptr_broker_dropped", "Garbage messages dropped.", p, b.dropped)
        yield self.latencies.family(
            "fedptr_broker_command_seconds", "Time the broker took to handle a multipart, by command.", "command", p
        )
        yield metrics.gauge("fedptr_broker_peers", "Registered peers (workers and clients).", p, len(b.table.by_name))
        yield metrics.gauge("fedptr_broker_workers", "Registered workers.", p, len(b.table.workers))
        workers = b.table.workers.copy()
        depth = {n.decode(errors="replace"): float(v) for n, v in self.pending.copy().items() if n in workers}
        yield metrics.labelled_gauge(
            "fedptr_broker_queue_depth", "Requests delivered to a worker and not yet answered.", p, "peer", depth
        )
        refusals = {"queue_full": float(sum(self.refused.copy().values())), "registration": self.registrations_refused}
        yield metrics.labelled_counter("fedptr_refusals", "Messages and registrations refused.", p, "reason", refusals)
        yield metrics.counter(
            "fedptr_heartbeat_misses", "Peers forgotten because their heartbeats stopped.", p, self.silent
        )


def _text(name: Any) -> str:
    return bytes(name).decode(errors="replace")
