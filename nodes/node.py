"""A worker node: the dispatch of each request to its handler, per-peer ordering, and replies.

The handlers live by job: the store requests in nodes/objects.py, ops and plan runs in
nodes/compute.py, hand-overs in nodes/handover.py, DP releases in nodes/release.py, secure
aggregation in nodes/secure.py; each takes this node for its services (`reply`,
`reply_durable`, `compute_later`, `spawn`, `forward`). Every request is handled in two phases.
At receipt, synchronously and in arrival order, the store is updated (result entries created,
entries popped, forwards queued), so pipelined requests from a client always see the effects
of the ones before them. What cannot finish then finishes later: a callback when the next hop
answers, a task in the bounded pool, a thread for big work. While a peer's deferred
computation runs, that peer's later requests wait in arrival order behind it (`_ordered`): a
small operation whose operands are there must not overtake a big one on a thread that reads
or writes them. Every request is checked against the object's owner and the privacy policy
(nodes/policy.py) before anything runs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack
import numpy as np
import torch

from fedptr import envelope, limits, wire
from fedptr.errors import OpNotAllowedError, OverloadedError, QuotaExceededError, RemoteError
from fedptr.failures import failure_from_error
from fedptr.link import Link
from fedptr.session import Incoming
from fedptr.tensors import dtype_name

from . import plans, policy
from .audit import AuditLog
from .budget import Budget
from .compute import Compute
from .durable import DurableStore
from .handover import Handover
from .objects import Objects
from .release import Release
from .replies import ANSWERED, NEW, ReplyCache
from .scheduler import Scheduler
from .stats import NodeFigures
from .store import Entry, Store

if TYPE_CHECKING:
    from .secure import SecureRounds

log = logging.getLogger("fedptr.node")

T = TypeVar("T")

SECURE_REQUESTS: tuple[type[wire.Message], ...] = (
    wire.SecureMean,
    wire.SecAggJoin,
    wire.SecAggAdvertise,
    wire.SecAggPeerKeys,
    wire.SecAggShare,
    wire.SecAggMask,
    wire.SecAggUnmask,
    wire.SecAggConfirm,
)
"""The requests nodes/secure.py handles: it loads (with `cryptography`, ~8 MiB of RSS) on the
first of them, so a node that never takes part in secure aggregation never pays for it."""


@dataclass
class NodeConfig:
    """What the node's command line sets."""

    pool_size: int = limits.NODE_POOL_SIZE
    max_forwards: int = limits.NODE_MAX_FORWARDS
    offload_numel: int = limits.OFFLOAD_NUMEL
    max_store_bytes: int = 0
    """Cap on the bytes of tensors stored here (0: no cap)."""
    store_dir: str | None = None
    """Where objects are persisted (None: memory only)."""
    data: dict[str, str] = field(default_factory=dict)
    """Datasets to load as private data: tag -> .npz path (loaded with allow_pickle=False)."""
    trust: list[str] = field(default_factory=list)
    """Workers this node lets its private data, and what derives from it, move to."""
    release_exact: bool = False
    """``--release exact``: derived values may be fetched exactly (no protection from the analyst)."""
    aggregator: bool = False
    owners: list[str] = field(default_factory=list)
    """An aggregator's roster: the data owners whose contributions it accepts."""
    min_owners: int = limits.MIN_OWNERS
    epsilon: float | None = None
    """This owner's privacy budget (None: it releases nothing but ``--release exact`` values)."""
    delta: float = limits.DP_DELTA
    dp_clip: float = limits.DP_CLIP
    """C: the L2 bound this owner clips its contributions to."""
    dp_noise_multiplier: float = limits.DP_NOISE_MULTIPLIER
    """sigma: the noise multiplier this owner charges a contribution for."""
    max_client_objects: int = limits.CLIENT_MAX_OBJECTS
    max_client_bytes: int = limits.CLIENT_MAX_BYTES
    """Each client's quota here: objects, and their tensor bytes (0: no cap)."""


EXIT_DISK_FAILED = 74
"""The status a node exits with when its store's disk failed a write (EX_IOERR)."""


def fail_stop(node: str, why: str) -> None:
    """A write to the store failed (disk full, I/O error): its change is already in memory, where
    the next request could read it, and no rollback could undo what was read. End the process
    at once, from the write-ahead thread, before anything of the failed batch is acknowledged;
    a restart then serves exactly what the disk holds."""
    log.critical("%s: a write to the store failed, stopping so that nothing unwritten is served: %s", node, why)
    logging.shutdown()
    os._exit(EXIT_DISK_FAILED)


def data_id(key: bytes, tag: str, name: str, value: torch.Tensor) -> int:
    """The object id of dataset `tag`'s array `name` on a node whose store holds `key`
    (`DurableStore.data_key`): 63 bits of a keyed BLAKE2b of what names the array (its shape
    and dtype too: an array replaced by one of another form gets a new id, so an old pointer
    to it is refused rather than misread)."""
    what = msgpack.packb([tag, name, list(value.shape), str(value.dtype)])
    return int.from_bytes(hashlib.blake2b(what, key=key, digest_size=8).digest(), "little") >> 1


class Node:
    """The request handlers of one worker, answering through `link` (wire `handle` to it as the
    link's handler before the link registers)."""

    def __init__(self, name: str, link: Link, config: NodeConfig | None = None) -> None:
        self.name = name
        self.link = link
        self.config = config or NodeConfig()
        durable = DurableStore(self.config.store_dir) if self.config.store_dir else None
        self.store = Store(
            name,
            self.config.max_store_bytes,
            durable,
            functools.partial(fail_stop, name),
            self.config.max_client_objects,
            self.config.max_client_bytes,
        )
        self.policy = policy.PolicyConfig(
            name,
            frozenset(self.config.trust),
            self.config.release_exact,
            self.config.aggregator,
            frozenset(self.config.owners),
            self.config.min_owners,
        )
        directory = Path(self.config.store_dir) if self.config.store_dir else None
        self.budget = Budget(name, self.config.epsilon, self.config.delta, directory)
        self.audit = AuditLog(name, directory)
        id_key = None if durable is None else durable.data_key()
        for tag, path in self.config.data.items():
            self._load_data(tag, path, id_key)
        self._in_doubt = self.store.restore()
        if self.store.durable is not None:
            log.info(
                "restored %d objects from %s (%d moves in doubt)",
                len(self.store.entries) - len(self.store.pinned),
                self.config.store_dir,
                len(self._in_doubt),
            )
        self.replies = ReplyCache(name)
        self.plans = plans.Plans(name)
        self._ordered: dict[str, deque[tuple[bytes, wire.Decoded]]] = {}
        """Per peer with a deferred computation running: its requests that arrived since, in order."""
        self._deferred: set[str] = set()
        """The peers whose latest request is a deferred computation still running."""
        self._queued = 0
        self.scheduler = Scheduler(
            name, link.pause_reading, link.resume_reading, self.config.pool_size, self.config.max_forwards
        )
        self.handover = handover = Handover(self)
        self.objects = objects = Objects(self)
        self.compute = compute = Compute(self)
        self.release = release = Release(self)
        self.figures = NodeFigures(self)
        """Counts, latencies and the `wire.NodeStats` answer (nodes/stats.py)."""
        if self.config.epsilon is not None:
            self.figures.budget_provider = lambda: {
                "epsilon_left": self.budget.left,
                "epsilon_spent": self.budget.spent,
            }
        self._handlers: dict[type[wire.Message], Callable[[str, bytes, Any, float], None]] = {
            wire.Put: objects.put,
            wire.PutPointer: objects.put_pointer,
            wire.Op: compute.op,
            wire.Get: handover.get,
            wire.Move: handover.move,
            wire.Delete: objects.delete,
            wire.ListObjects: objects.list_objects,
            wire.Clear: objects.clear,
            wire.PutModule: objects.put_module,
            wire.Search: objects.search,
            wire.Grant: handover.grant,
            wire.Contribute: release.contribute,
            wire.PutContribution: release.put_contribution,
            wire.DPTrain: release.dp_train,
            wire.Budget: release.report_budget,
            wire.NodeStats: self.figures.handle,
            wire.Has: handover.has,
            wire.PutPlan: compute.put_plan,
            wire.RunPlan: compute.run_plan,
        }
        self._handlers.update(dict.fromkeys(SECURE_REQUESTS, self._secure))
        self._secure_rounds: SecureRounds | None = None

    def _secure(self, source: str, rid: bytes, msg: Any, budget: float) -> None:
        """The first secure aggregation request: load nodes/secure.py (~25 ms, on the loop: less
        than a heartbeat's slack), put its handlers in the dispatch table, and handle `msg`."""
        if self._secure_rounds is None:
            from .secure import SecureRounds

            self._secure_rounds = SecureRounds(self)
            self._handlers.update(self._secure_rounds.handlers())
        self._secure_rounds.handlers()[type(msg)](source, rid, msg, budget)

    def _load_data(self, tag: str, path: str, id_key: bytes | None) -> None:
        """Every array of an .npz file becomes a private object of this node, tagged `tag`: under
        `data_id` with a store's `id_key` (the same id after a restart), else a random id."""
        with np.load(path, allow_pickle=False) as arrays:
            for key in sorted(arrays.files):
                value = torch.from_numpy(np.ascontiguousarray(arrays[key]))
                dtype_name(value.dtype)  # refuses dtypes that could not travel
                obj_id = wire.new_object_id() if id_key is None else data_id(id_key, tag, key, value)
                self.store.add_data(obj_id, tag, value, policy.Taint(self.policy.own_origins()))
                log.info("loaded %s[%s] %s %s from %s as private data", tag, key, tuple(value.shape), value.dtype, path)

    def start(self) -> None:
        """Resume what a restart interrupted (the hand-overs in doubt); call once registered."""
        self.handover.resume(self._in_doubt)
        self._in_doubt = []

    async def aclose(self) -> None:
        """Cancel waiting work, stop the thread pool, write what is queued and close the durable store."""
        await self.handover.aclose()
        await self.scheduler.aclose()
        await self.store.aclose()

    # --- dispatch ----------------------------------------------------------------------
    def handle(self, source: str, rid: bytes, decoded: wire.Decoded) -> None:
        """Handle one request (the Link's handler). Errors become Failure replies; none escapes."""
        if rid != envelope.NO_REPLY:
            seen = self.replies.begin((source, rid), type(decoded.message).__name__)
            if seen is not NEW:  # a replay: of a running request, its one reply answers both
                if seen is ANSWERED:
                    self.link.reply(source, rid, self.replies.cached((source, rid)))
                return
        waiting = self._ordered.get(source)
        if waiting is not None:
            if len(waiting) >= limits.CLIENT_MAX_QUEUED_REQUESTS and rid != envelope.NO_REPLY:
                # its share is used up: refuse it rather than let one client pause everyone's reads
                quota = limits.CLIENT_MAX_QUEUED_REQUESTS
                self.reply_error(source, rid, QuotaExceededError("", f"{quota} requests of {source!r} already queued"))
                return
            waiting.append((rid, decoded))
            self._queued += 1
            if self._queued >= limits.NODE_MAX_ORDERED:
                self.link.pause_reading()
            return
        self._dispatch(source, rid, decoded)

    def handle_ops(self, requests: list[Incoming]) -> None:
        """Handle a run of one peer's consecutive `Op` requests (the Link's run handler), each as
        `handle` would (`Compute.ops`)."""
        self.compute.ops(requests[0].source, requests)

    def _dispatch(self, source: str, rid: bytes, decoded: wire.Decoded) -> None:
        msg = decoded.message
        kind = type(msg)
        figures = self.figures
        name, requests = kind.__name__, figures.requests  # counted here, not in `figures.started`: per request
        requests[name] = requests.get(name, 0) + 1
        if figures.debug:
            figures.started(source, rid, name)
        budget = decoded.budget_ms / 1000 if decoded.budget_ms else limits.CALL_TIMEOUT_S
        handler = self._handlers.get(kind)
        try:
            if handler is None:
                raise OpNotAllowedError("", f"{type(msg).__name__} is not a request")
            handler(source, rid, msg, budget)
        except Exception as e:
            self.reply_error(source, rid, e)

    # --- services (the handler modules use these) --------------------------------------
    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None:
        """Answer request `rid` of `dest`, and keep the answer for a replay."""
        self.link.reply(dest, rid, msg)
        if rid != envelope.NO_REPLY:
            self.figures.finished(dest, rid, msg, self.replies.finish((dest, rid), msg))

    def reply_error(self, dest: str, rid: bytes, e: BaseException) -> None:
        """Answer request `rid` of `dest` with the typed failure `e` stands for."""
        self.reply(dest, rid, failure_from_error(e, self.name))

    def reply_durable(
        self,
        durable: asyncio.Future[Any] | None,
        dest: str,
        rid: bytes,
        msg: wire.Message,
        on_failed: Callable[[], None] | None = None,
    ) -> None:
        """Answer `msg` once `durable` (the write-ahead of what the request changed) settled: the
        write-ahead rule. A failed write answers its error instead, after `on_failed`."""
        if durable is None:
            self.reply(dest, rid, msg)
            return

        def written(f: asyncio.Future[Any]) -> None:
            error = f.exception()
            if error is None:
                self.reply(dest, rid, msg)
                return
            if on_failed is not None:
                on_failed()
            self.reply_error(dest, rid, error)

        durable.add_done_callback(written)

    def answering(self, source: str, rid: bytes, step: Callable[[T], None]) -> Callable[[T], None]:
        """`step`, a later step of `source`'s request `rid` (an entry's settle callback, a
        future's done callback), answering the request with what it raises: it runs outside
        the handler, whose `except` would have (a get's audit record refused once its value
        settled raised into the loop, and the client waited out its deadline)."""

        def answered(arg: T) -> None:
            try:
                step(arg)
            except Exception as e:
                self.reply_error(source, rid, e)

        return answered

    def compute_later(self, coro: Coroutine[Any, Any, None], source: str, rid: bytes) -> None:
        """Run a computation of `source`'s request `rid` in the pool; its later requests wait until
        it is done. The computation answers `rid` itself; if it raises instead (a bug), the error
        is logged and the peer told that the node failed, rather than left to wait out its
        deadline. The error's text stays in the log: a bug's message may hold any value."""
        self._ordered.setdefault(source, deque())
        self._deferred.add(source)
        done = self.scheduler.compute_later(coro)
        done.add_done_callback(lambda f: self._computed(source, rid, f))

    def _computed(self, source: str, rid: bytes, done: asyncio.Future[None]) -> None:
        if not done.cancelled() and (error := done.exception()) is not None:
            log.error("a computation of %r raised", source, exc_info=error)
            failed = RemoteError(
                "InternalError", "the node failed computing this request (see its log)", self.name, [self.name]
            )
            self.reply_error(source, rid, failed)
        self._resume_ordered(source)

    def _resume_ordered(self, source: str) -> None:
        """Handle `source`'s requests that waited, in order, until one defers again."""
        self._deferred.discard(source)
        waiting = self._ordered[source]
        while waiting:
            rid, decoded = waiting.popleft()
            self._queued -= 1
            if self._queued == limits.NODE_MAX_ORDERED - 1:
                self.link.resume_reading()
            try:
                self._dispatch(source, rid, decoded)
            except Exception:  # one request's bug must not strand the requests behind it
                log.exception("failed to handle a request of %r", source)
            if source in self._deferred:
                return
        del self._ordered[source]

    def spawn(self, coro: Coroutine[Any, Any, None], source: str, rid: bytes) -> None:
        """Finish a request in a task; whatever it raises is the request's Failure reply."""
        self.scheduler.spawn(coro, lambda e: self.reply_error(source, rid, e))

    def forward(self, dest: str, msg: wire.Message, budget: float, resend: bool = True) -> asyncio.Future[wire.Message]:
        """Send `msg` one hop on; its future settles by the caller's budget less a margin.
        Without `resend`, it is sent once (`Session.request`)."""
        if self.link.in_flight >= self.config.max_forwards:
            raise OverloadedError(self.name, f"{self.link.in_flight} forwarded requests already waiting")
        return self.link.request_nowait(dest, msg, self.hop_budget(budget), resend)

    @staticmethod
    def hop_budget(budget: float) -> float:
        """What of a caller's `budget` (seconds) the next hop gets: less a margin for the reply."""
        return max(limits.MIN_HOP_BUDGET_S, budget - limits.HOP_MARGIN_S)

    def delete_downstream(self, entries: list[Entry]) -> None:
        """Tell the next hop of every pointer in `entries` to delete what it points to."""
        by_location: dict[str, list[int]] = defaultdict(list)
        for entry in entries:
            if entry.location is not None:
                by_location[entry.location].append(entry.remote_id)
        for location, ids in by_location.items():
            for delete in wire.deletes(ids):
                self.link.notify(location, delete)
