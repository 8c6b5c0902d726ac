"""A node's operating figures: what `fedptr status` shows and ``--metrics-port`` exports.

`NodeFigures` watches every request the node handles (`started`) and every reply it sends
(`finished`): counts and latencies per request kind, failures per code, policy refusals and
releases. It answers `wire.NodeStats` with a `wire.NodeStatsReply` of counts (objects, bytes,
memory, traffic, uptime), the node's role, and the privacy budget left, which a provider set
by the privacy policy fills (`budget_provider`; none: the reply's budget is empty and status
shows "—"). Nothing here ever reads a stored value.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from fedptr import metrics, wire
from fedptr.logs import rid_extra

from .replies import Started

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fedptr.node")

BudgetProvider = Callable[[], Mapping[str, float]]
"""Gives the privacy budget left, by name (``{"epsilon": 2.5}``, or per data owner); numbers only."""

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def role_of(owner: bool, aggregator: bool) -> str:
    """``"owner"`` (it holds private data), ``"aggregator"``, both joined by ``+``, or ``"plain"``."""
    roles = [r for r, on in (("owner", owner), ("aggregator", aggregator)) if on]
    return "+".join(roles) or "plain"


class NodeFigures:
    """Counters and latencies of one node, and its `wire.NodeStats` handler."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.started_at = time.monotonic()
        self.budget_provider: BudgetProvider | None = None
        """Set by the privacy policy to report the budget left; None: no budget reported."""
        self.requests: dict[str, int] = {}
        """Requests received, by kind (``Op``, ``Get``...). A plain dict, counted once per request:
        ``+= 1`` on a `Counter` (a dict subclass) costs three times a dict's on Python 3.11."""
        self.failures: Counter[str] = Counter()
        """Failure replies, by `wire.FailureCode`."""
        self.releases: Counter[str] = Counter()
        """Tensors and models handed to a client, by release kind (``public``, ``aggregate``, ``dp``...)."""
        self.latencies = metrics.Latencies()
        self.debug = log.isEnabledFor(logging.DEBUG)
        """Log every request and reply with its request id (``--log-level DEBUG``)."""

    @property
    def role(self) -> str:
        return role_of(bool(self.node.config.data), self.node.config.aggregator)

    # --- the node's hooks --------------------------------------------------------------
    def started(self, source: str, rid: bytes, kind: str) -> None:
        """Request `rid` of `source`, a `kind` request, is being handled (after the reply cache
        let it through; the cache's record of it, `ReplyCache.begin`, holds when it arrived).
        Called with `debug` only: the node counts `requests` itself, a call less per request."""
        log.debug("request %s from %r", kind, source, extra=rid_extra(rid))

    def finished(self, dest: str, rid: bytes, reply: wire.Message, started: Started | None) -> None:
        """The reply to request `rid` of `dest` leaves; `started` is the request's record from
        the reply cache (None: it was not timed, its peer left meanwhile)."""
        if started is not None:
            # the histogram read here, not through `Latencies.observe`: a call less per reply
            kind = started[0]
            hist = self.latencies.by_key.get(kind)
            if hist is None:
                hist = self.latencies.by_key[kind] = metrics.Histogram()
            hist.observe(time.monotonic() - started[1])
        if type(reply) is wire.Ok:  # most replies: neither a failure nor a release
            pass
        elif isinstance(reply, wire.Failure):
            self.failures[reply.code] += 1
        elif isinstance(reply, (wire.TensorReply, wire.ModuleReply)) and reply.release:
            self.releases[reply.release] += 1
        if self.debug:
            log.debug("answered %r with %s", dest, type(reply).__name__, extra=rid_extra(rid))

    def handle(self, source: str, rid: bytes, msg: wire.NodeStats, budget: float) -> None:
        """Answer `wire.NodeStats` (to any peer: counts, never values)."""
        self.node.reply(source, rid, self.reply())

    # --- figures -----------------------------------------------------------------------
    def figures(self) -> dict[str, int | float]:
        """Every figure by name; the names are the `wire.NodeStatsReply.figures` keys."""
        node, link = self.node, self.node.link
        return {
            "objects": len(node.store),
            "store_bytes": node.store.held_bytes(),
            "max_store_bytes": node.store.max_bytes,
            "rss_bytes": rss_bytes(),
            "messages_in": link.messages_received,
            "messages_out": link.messages_sent,
            "bytes_in": link.bytes_received,
            "bytes_out": link.bytes_sent,
            "requests": sum(self.requests.values()),
            "pending": node.replies.running,
            "forwards_waiting": link.in_flight,
            "outbox": link.outbox_depth,
            "refusals": self.failures[wire.FailureCode.DENIED],
            "releases": sum(self.releases.values()),
            "reregistrations": link.reregistrations,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    def budget(self) -> dict[str, int | float]:
        """The privacy budget left, from the provider (empty without one, or when it fails)."""
        if self.budget_provider is None:
            return {}
        try:
            return {str(k): float(v) for k, v in self.budget_provider().items()}
        except Exception:  # a broken provider must not break status: report no budget
            log.exception("the privacy budget provider failed")
            return {}

    def reply(self) -> wire.NodeStatsReply:
        return wire.NodeStatsReply(self.figures(), self.role, self.budget())

    def collect(self) -> Iterable[metrics.Metric]:
        """The node's Prometheus families (called on the metrics server's thread at each scrape)."""
        name = self.node.name
        f = self.figures()
        yield metrics.counter("fedptr_messages_in", "Messages received.", name, f["messages_in"])
        yield metrics.counter("fedptr_messages_out", "Messages sent.", name, f["messages_out"])
        yield metrics.counter("fedptr_bytes_in", "Bytes received (every frame).", name, f["bytes_in"])
        yield metrics.counter("fedptr_bytes_out", "Bytes sent (every frame).", name, f["bytes_out"])
        yield metrics.labelled_counter(
            "fedptr_node_requests", "Requests received, by kind.", name, "kind", self.requests.copy()
        )
        yield self.latencies.family(
            "fedptr_node_request_seconds", "Time from a request's receipt to its reply, by kind.", "kind", name
        )
        yield metrics.labelled_counter(
            "fedptr_node_failures", "Failure replies, by code.", name, "code", self.failures.copy()
        )
        yield metrics.counter("fedptr_node_refusals", "Requests the privacy policy refused.", name, f["refusals"])
        yield metrics.labelled_counter(
            "fedptr_node_releases",
            "Tensors and models handed out, by release kind.",
            name,
            "release",
            self.releases.copy(),
        )
        yield metrics.gauge("fedptr_node_objects", "Objects in the store.", name, f["objects"])
        yield metrics.gauge("fedptr_node_store_bytes", "Bytes of tensors in the store.", name, f["store_bytes"])
        yield metrics.gauge("fedptr_node_queue_depth", "Requests received and not yet answered.", name, f["pending"])
        yield metrics.gauge(
            "fedptr_node_forwards_waiting",
            "Requests sent on to another worker, unanswered.",
            name,
            f["forwards_waiting"],
        )
        yield metrics.counter(
            "fedptr_heartbeat_misses",
            "Times the broker went silent past the liveness, or forgot this node, and it registered again.",
            name,
            f["reregistrations"],
        )
