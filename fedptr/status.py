"""What `fedptr status` and `fedptr objects` ask a running cluster, without importing torch.

`cluster_status` registers with the broker as a client, reads the broker's STATS (table sizes,
counters and, per peer, heartbeat age and queue), lists the workers and asks each for its
figures (`wire.NodeStats`), all at once and each within `timeout` seconds: a worker that does
not answer in time is reported ``unresponsive``, one the broker no longer knows ``down``.
Nothing waits longer than the deadline, however broken the cluster.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from fedptr import envelope, limits, wire
from fedptr.errors import DeadlineExceeded, FedptrError, LostWorkerError, ProtocolError, UnknownWorkerError
from fedptr.link import Link
from fedptr.security import CurveKeys


@dataclass(frozen=True)
class PeerStatus:
    """One registered peer as the broker sees it."""

    name: str
    worker: bool
    heard_ms: int
    """Milliseconds since the broker last heard from it."""
    pending: int
    """Requests delivered to it and not yet answered (its queue, as far as the broker knows)."""
    refused: int
    """Messages refused because its queue at the broker was full."""
    delivered: int


@dataclass(frozen=True)
class WorkerStatus:
    """One worker: `state` is ``up``, ``unresponsive`` (no answer within the deadline), ``down``
    (not registered) or ``error`` (it answered with an error: `detail`)."""

    name: str
    state: str
    role: str = ""
    figures: dict[str, int | float] = field(default_factory=dict)
    budget: dict[str, int | float] | None = None
    """Privacy budget left, by name; None when the node reports none."""
    heard_ms: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class ClusterStatus:
    """A cluster at one moment: the broker's counters and peers, and every worker."""

    address: str
    broker: dict[str, int]
    """The broker's counters (table sizes, routed, dropped): the asking client counts among its peers."""
    peers: list[PeerStatus]
    """Every registered peer but the asking client."""
    workers: list[WorkerStatus]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data (``fedptr status --json``)."""
        return asdict(self)


def split_stats(stats: dict[str, int]) -> tuple[dict[str, int], list[PeerStatus]]:
    """The broker's STATS as its own counters and one `PeerStatus` per peer."""
    counters: dict[str, int] = {}
    fields: dict[str, dict[str, int]] = {}
    for key, value in stats.items():
        if key.startswith(envelope.STATS_PEER_PREFIX):
            name, _, what = key[len(envelope.STATS_PEER_PREFIX) :].rpartition(".")
            fields.setdefault(name, {})[what] = value
        else:
            counters[key] = value
    peers = [
        PeerStatus(
            name,
            bool(f.get("worker", 0)),
            f.get("heard_ms", 0),
            f.get("pending", 0),
            f.get("refused", 0),
            f.get("delivered", 0),
        )
        for name, f in sorted(fields.items())
    ]
    return counters, peers


@asynccontextmanager
async def _link(address: str, curve: CurveKeys | None, timeout: float) -> AsyncIterator[Link]:
    link = Link(address, f"status-{secrets.token_hex(4)}", envelope.ROLE_CLIENT, connect_timeout=timeout, curve=curve)
    async with link:
        yield link


async def _worker(link: Link, name: str, heard: int | None, timeout: float) -> WorkerStatus:
    try:
        reply = await link.request(name, wire.NodeStats(), timeout)
    except DeadlineExceeded:
        return WorkerStatus(name, "unresponsive", heard_ms=heard, detail=f"no answer within {timeout:g} s")
    except (LostWorkerError, UnknownWorkerError) as e:
        return WorkerStatus(name, "down", heard_ms=heard, detail=str(e))
    except FedptrError as e:  # an older node that does not know NodeStats, say
        return WorkerStatus(name, "error", heard_ms=heard, detail=str(e))
    if not isinstance(reply, wire.NodeStatsReply):
        return WorkerStatus(name, "error", heard_ms=heard, detail=f"answered {type(reply).__name__}")
    budget = dict(reply.budget) if reply.budget else None
    return WorkerStatus(name, "up", reply.role, dict(reply.figures), budget, heard)


async def cluster_status(
    address: str,
    expected: Sequence[str] = (),
    curve: CurveKeys | None = None,
    timeout: float = limits.STATUS_TIMEOUT_S,
) -> ClusterStatus:
    """The status of the cluster whose broker is at `address`. `expected` names workers that
    should run (a cluster file's nodes): those not registered are reported ``down``. Raises
    BrokerUnreachable when the broker does not answer within `timeout` seconds."""
    async with _link(address, curve, timeout) as link:
        stats, names = await asyncio.gather(link.broker_stats(timeout), link.list_workers(timeout))
        counters, peers = split_stats(stats)
        heard = {p.name: p.heard_ms for p in peers}
        found = await asyncio.gather(*(_worker(link, n, heard.get(n), timeout) for n in names))
    missing = [WorkerStatus(n, "down", detail="not registered") for n in expected if n not in names]
    workers = sorted([*found, *missing], key=lambda w: w.name)
    return ClusterStatus(address, counters, [p for p in peers if p.name != link.name], workers)


async def list_objects(
    address: str, worker: str, curve: CurveKeys | None = None, timeout: float = limits.STATUS_TIMEOUT_S
) -> list[wire.ObjectRow]:
    """Worker `worker`'s objects (ids, kinds, shapes, dtypes, owners, where pointers point).
    Raises BrokerUnreachable, UnknownWorkerError, DeadlineExceeded, or ProtocolError."""
    async with _link(address, curve, timeout) as link:
        reply = await link.request(worker, wire.ListObjects(), timeout)
    if not isinstance(reply, wire.ObjectsReply):
        raise ProtocolError(f"expected ObjectsReply, got {type(reply).__name__}")
    return sorted(reply.rows, key=lambda r: (r.kind, r.obj_id))
