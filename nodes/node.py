"""A worker node: answers requests on its object store, computing here or forwarding down a chain.

Every request is handled in two phases. At receipt, synchronously and in arrival order, the
store is updated (result entries created, entries popped, forwards queued), so pipelined
requests from a client always see the effects of the ones before them. Small computations on
inputs that exist run right there; the rest finishes later: a callback when the next hop
answers, a bounded asyncio-pool task for a computation that waits for its inputs, a thread for
big ones, so the event loop keeps serving. While a peer's deferred computation runs, that
peer's later requests wait in arrival order behind it (`_ordered`): a small operation whose
operands are there must not overtake a big one on a thread that reads or writes them. Every
request is checked against the object's owner and the privacy policy (nodes/policy.py) before
anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedptr import envelope, limits, modules, wire
from fedptr.errors import (
    FedptrError,
    InvalidArgumentError,
    LocationMismatchError,
    OpNotAllowedError,
    OverloadedError,
    PermissionDenied,
    QuotaExceededError,
    RemoteError,
)
from fedptr.failures import failure_from_error, with_hop
from fedptr.link import Link
from fedptr.ops import AGGREGATES, ALLOWED, MUTATING
from fedptr.tensors import dtype_name, from_raw, to_raw

from . import audit, guard, mechanisms, plans, policy
from .audit import AuditLog
from .budget import Budget
from .durable import DurableStore
from .guard import ALIASING
from .handover import Handover
from .replies import ReplyCache, Seen
from .scheduler import Scheduler
from .secure import SecureRounds
from .stats import NodeFigures
from .store import Entry, Store

log = logging.getLogger("fedptr.node")


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


def _hop_budget(budget: float) -> float:
    return max(limits.MIN_HOP_BUDGET_S, budget - limits.HOP_MARGIN_S)


def _materialize(value: Any, tensors: dict[int, torch.Tensor]) -> Any:
    """`value` with references replaced by stored tensors and inline buffers by tensors."""
    if not value and type(value) is dict:
        return {}  # most operations take no keywords: nothing to walk
    t = type(value)
    if t is wire.Ref:
        return tensors[value.obj_id]
    if t is wire.RawTensor:
        return from_raw(value)
    if t is list:  # references inline: most arguments are flat lists of them
        return [tensors[v.obj_id] if type(v) is wire.Ref else _materialize(v, tensors) for v in value]
    if t is dict:
        return {k: _materialize(v, tensors) for k, v in value.items()}
    return value


def _numel(values: Iterable[Any]) -> int:
    n = 0
    for v in values:  # a loop, not sum() over a generator: this runs for every operation
        if isinstance(v, torch.Tensor):
            n += v.numel()
    return n


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
        guard.warm_up()
        for tag, path in self.config.data.items():
            self._load_data(tag, path)
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
        self._departed: set[str] = set()
        self._ordered: dict[str, deque[tuple[bytes, wire.Decoded]]] = {}
        """Per peer with a deferred computation running: its requests that arrived since, in order."""
        self._deferred: set[str] = set()
        """The peers whose latest request is a deferred computation still running."""
        self._queued = 0
        self.scheduler = Scheduler(
            name, link.pause_reading, link.resume_reading, self.config.pool_size, self.config.max_forwards
        )
        self.handover = handover = Handover(self)
        self.figures = NodeFigures(self)
        """Counts, latencies and the `wire.NodeStats` answer (nodes/stats.py)."""
        if self.config.epsilon is not None:
            self.figures.budget_provider = lambda: {
                "epsilon_left": self.budget.left,
                "epsilon_spent": self.budget.spent,
            }
        self._handlers: dict[type[wire.Message], Callable[[str, bytes, Any, float], None]] = {
            wire.Put: self._put,
            wire.PutPointer: self._put_pointer,
            wire.Op: self._op,
            wire.Get: handover.get,
            wire.Move: handover.move,
            wire.Delete: self._delete,
            wire.ListObjects: self._list,
            wire.Clear: self._clear,
            wire.PutModule: self._put_module,
            wire.Search: self._search,
            wire.Grant: handover.grant,
            wire.Contribute: self._contribute,
            wire.PutContribution: self._put_contribution,
            wire.DPTrain: self._dp_train,
            wire.Budget: self._budget,
            wire.NodeStats: self.figures.handle,
            wire.Has: handover.has,
            wire.PutPlan: self._put_plan,
            wire.RunPlan: self._run_plan,
        }
        self._handlers.update(SecureRounds(self).handlers())

    def _load_data(self, tag: str, path: str) -> None:
        """Every array of an .npz file becomes a private object of this node, tagged `tag`."""
        with np.load(path, allow_pickle=False) as arrays:
            for key in sorted(arrays.files):
                value = torch.from_numpy(np.ascontiguousarray(arrays[key]))
                dtype_name(value.dtype)  # refuses dtypes that could not travel
                self.store.add_data(tag, value, policy.Taint(self.policy.own_origins()))
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
            seen = self.replies.begin((source, rid))
            if seen is Seen.RUNNING:
                return
            if seen is Seen.ANSWERED:
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

    def _dispatch(self, source: str, rid: bytes, decoded: wire.Decoded) -> None:
        msg = decoded.message
        self.figures.started(source, rid, msg)
        budget = decoded.budget_ms / 1000 if decoded.budget_ms else limits.CALL_TIMEOUT_S
        handler = self._handlers.get(type(msg))
        try:
            if handler is None:
                raise OpNotAllowedError("", f"{type(msg).__name__} is not a request")
            handler(source, rid, msg, budget)
        except Exception as e:
            self.reply_error(source, rid, e)

    # --- services (nodes/handover.py uses these too) -----------------------------------
    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None:
        """Answer request `rid` of `dest`, and keep the answer for a replay."""
        self.link.reply(dest, rid, msg)
        if rid != envelope.NO_REPLY:
            self.replies.finish((dest, rid), msg)
            self.figures.finished(dest, rid, msg)

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

    def compute_later(self, coro: Coroutine[Any, Any, None], source: str) -> None:
        """Run a computation of `source`'s in the pool; its later requests wait until it is done."""
        self._ordered.setdefault(source, deque())
        self._deferred.add(source)
        done = self.scheduler.compute_later(coro)
        done.add_done_callback(lambda _: self._computed(source))

    def _computed(self, source: str) -> None:
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

    def forward(self, dest: str, msg: wire.Message, budget: float) -> asyncio.Future[wire.Message]:
        """Send `msg` one hop on; its future settles by the caller's budget less a margin."""
        if self.link.in_flight >= self.config.max_forwards:
            raise OverloadedError(self.name, f"{self.link.in_flight} forwarded requests already waiting")
        return self.link.request_nowait(dest, msg, _hop_budget(budget))

    def delete_downstream(self, entries: list[Entry]) -> None:
        """Tell the next hop of every pointer in `entries` to delete what it points to."""
        by_location: dict[str, list[int]] = defaultdict(list)
        for entry in entries:
            if entry.location is not None:
                by_location[entry.location].append(entry.remote_id)
        for location, ids in by_location.items():
            for delete in wire.deletes(ids):
                self.link.notify(location, delete)

    # --- store requests ----------------------------------------------------------------
    def _put(self, source: str, rid: bytes, msg: wire.Put, budget: float) -> None:
        tensor = from_raw(msg.tensor)
        if msg.requires_grad:
            tensor.requires_grad_(True)
        # a peer's stated origins can only add restrictions: they are kept, never trusted to lift one
        taint = policy.Taint(policy.from_wire(msg.origins))
        ok = wire.Ok(list(tensor.shape), msg.tensor.dtype)
        self._store_new(source, rid, msg.obj_id, Entry.tensor(tensor, msg.owner or source, taint), ok)

    def _put_module(self, source: str, rid: bytes, msg: wire.PutModule, budget: float) -> None:
        model = modules.from_wire(msg.spec, msg.params)
        taint = policy.Taint(policy.from_wire(msg.origins))
        self._store_new(source, rid, msg.obj_id, Entry.tensor(model, msg.owner or source, taint), wire.Ok())

    def _store_new(self, source: str, rid: bytes, obj_id: int, entry: Entry, ok: wire.Message) -> None:
        """Store and commit a received value (`entry`, settled), and answer `ok` once it is
        durable; nothing is kept when the commit or its write fails."""
        value = entry.done.result()
        self.store.add(obj_id, entry)
        try:
            durable = self.store.commit(obj_id, entry, value)
        except Exception:
            self.store.discard(obj_id)
            raise
        self.reply_durable(durable, source, rid, ok, lambda: self._drop_if(obj_id, entry))

    def _drop_if(self, obj_id: int, entry: Entry) -> None:
        if self.store.entries.get(obj_id) is entry:
            self.store.discard(obj_id)

    def _search(self, source: str, rid: bytes, msg: wire.Search, budget: float) -> None:
        ids = list(self.store.tags.get(msg.tag, []))
        values = [self.store.entries[i].done.result() for i in ids]
        shapes: list[wire.Value] = [list(v.shape) for v in values]
        self.reply(source, rid, wire.SearchReply(ids, shapes, [dtype_name(v.dtype) for v in values]))

    def _put_pointer(self, source: str, rid: bytes, msg: wire.PutPointer, budget: float) -> None:
        if not envelope.valid_name(msg.location.encode()):
            raise InvalidArgumentError(f"bad worker name {msg.location!r}")
        entry = Entry.pointer(msg.location, msg.id_at_location, settled=True, owner=source)
        self.store.add(msg.obj_id, entry)
        durable = self.store.commit(msg.obj_id, entry)
        self.reply_durable(durable, source, rid, wire.Ok(), lambda: self._drop_if(msg.obj_id, entry))

    def _delete(self, source: str, rid: bytes, msg: wire.Delete, budget: float) -> None:
        popped = []
        for obj_id in msg.obj_ids:
            entry = self.store.entries.get(obj_id)
            if entry is None:
                continue
            if entry.owner != source:
                log.warning("refused %r the deletion of object %d, which it does not own", source, obj_id)
                continue
            self.store.discard(obj_id)
            popped.append(entry)
        self.delete_downstream(popped)

    def reclaim(self, client: str) -> None:
        """Delete what a client whose session ended owned (the Link's on_session_ended). Clients
        that leave in the same loop turn are reclaimed together, in one pass over the store."""
        if not self._departed:
            asyncio.get_running_loop().call_soon(self._reclaim_departed)
        self._departed.add(client)

    def _reclaim_departed(self) -> None:
        departed, self._departed = self._departed, set()
        self.replies.forget_peers(departed)
        self.plans.forget(departed)
        removed = self.store.clear_all(departed)
        if removed:
            log.info("reclaimed %d objects of %d clients that left", len(removed), len(departed))
            self.delete_downstream(removed)
        self.scheduler.trim_heap_soon()  # what they held is freed to malloc, not yet to the OS

    def _clear(self, source: str, rid: bytes, msg: wire.Clear, budget: float) -> None:
        self.delete_downstream(self.store.clear(source))
        self.reply_durable(self.store.barrier(), source, rid, wire.Ok())  # the removals are on disk

    def _list(self, source: str, rid: bytes, msg: wire.ListObjects, budget: float) -> None:
        snapshot = dict(self.store.entries)
        barrier = self.store.barrier()  # a listing promises only what a restart keeps

        async def answer() -> None:
            pending = [e.done for e in snapshot.values() if not e.done.done()]
            if barrier is not None:
                pending.append(barrier)
            if pending:
                await asyncio.wait(pending, timeout=_hop_budget(budget))
            if barrier is not None:  # a listing promises only what is durable
                if not barrier.done():
                    raise OverloadedError(self.name, "its disk did not catch up with the listing in time")
                if barrier.exception() is not None:
                    raise barrier.exception()  # type: ignore[misc]
            rows = [
                dataclasses.replace(e.row(i), owner=e.owner)
                for i, e in snapshot.items()
                if e.done.done() or e.is_pointer
            ]
            if len(rows) > limits.MAX_LISTED_OBJECTS:
                raise OverloadedError(self.name, f"{len(rows)} objects are too many to list at once")
            self.reply(source, rid, wire.ObjectsReply(rows))

        self.spawn(answer(), source, rid)

    # --- operations --------------------------------------------------------------------
    def _op(self, source: str, rid: bytes, msg: wire.Op, budget: float) -> None:
        try:
            entries = self._operands(msg, source)
            location = next((e.location for e in entries.values()), None)
            if location is None and msg.op in AGGREGATES:
                self._release_aggregate(source, rid, msg, entries)
                return
            taint = self._result_taint(msg, entries, source) if location is None else policy.Taint()
        except Exception as e:
            self._store_failed(msg.result_id, source, e, msg.sponsor)
            raise
        if location is None:
            # the result's taint is the union of its operands' (an aliasing target's included):
            # it is private exactly when an operand is, decided once for the request
            private = bool(taint)
            result = Entry.tensor(owner=source, taint=taint)
            result.sponsor = msg.sponsor
            self.store.add(msg.result_id, result)
            tensors = _values(entries)
            if tensors is not None and _numel(tensors.values()) <= self.config.offload_numel:
                # the common case: small inputs, all present; no task, no thread
                versions = _versions(tensors)
                compute = lambda: self._run(msg, tensors, private, entries)  # noqa: E731
                self._finish(source, rid, msg, result, compute, entries, versions)
                return
            self.compute_later(self._compute(source, rid, msg, entries, result, private), source)
            return
        ptr = Entry.pointer(location, wire.new_object_id(), settled=False, owner=source)
        ptr.sponsor = msg.sponsor
        self.store.add(msg.result_id, ptr)
        ids = {i: e.remote_id for i, e in entries.items()}
        nested = wire.Op(
            ptr.remote_id,
            msg.op,
            wire.rewrite_refs(msg.args, ids),
            wire.rewrite_refs(msg.kwargs, ids),
            msg.sponsor or source,
        )
        try:
            forwarded = self.forward(location, nested, budget)
        except FedptrError as e:
            ptr.done.set_exception(e)
            raise
        forwarded.add_done_callback(lambda f: self._relayed(source, rid, f, msg.result_id, ptr))

    def _operands(self, msg: wire.Op, source: str) -> dict[int, Entry]:
        if msg.op not in ALLOWED:
            raise OpNotAllowedError("", f"operation {msg.op!r} is not allowed")
        guard.check_call(msg.op, msg.args, msg.kwargs, _is_ref)
        ids: set[int] = set()
        wire.refs(msg.args, ids)
        wire.refs(msg.kwargs, ids)
        entries = {i: self.store.get(i, source) for i in ids}
        for i, e in entries.items():
            self.store.check_principal(i, e, msg.sponsor or source)
        locations = {e.location or self.name for e in entries.values()}
        if len(locations) > 1:
            a, b = sorted(locations)[:2]
            raise LocationMismatchError(f"operands live on different workers: {a!r} and {b!r}")
        for e in entries.values():
            if e.is_pointer and e.done.done() and e.done.exception() is not None:
                raise e.done.exception()  # type: ignore[misc]
        return entries

    def _result_taint(
        self, msg: wire.Op, entries: dict[int, Entry], source: str, temporaries: Iterable[Entry] = ()
    ) -> policy.Taint:
        """Decide, as the request arrives, what the result derives from (taint only grows, so
        deciding early is safe). Aliasing results share their target's taint; in-place writes
        add to it, and private data and contributions refuse them. A plan's `temporaries` (its
        results so far, not yet computed) all count as gradient-tracking for a backward."""
        if msg.op not in _TAINT_RULES and not any(e.taint for e in entries.values()):
            return policy.Taint()  # the common case: a plain operation on public operands
        origins = policy.merge(e.taint.origins for e in entries.values())
        first = msg.args[0] if msg.args else None
        target = entries.get(first.obj_id) if type(first) is wire.Ref else None
        if msg.op in ALIASING and target is not None:
            if target.readonly and msg.op in MUTATING:
                raise policy.refuse_write(target.readonly, f"{msg.op} on object {first.obj_id}")  # type: ignore[union-attr]
            target.taint.add(origins)
            return target.taint
        if msg.op == "forward" and target is not None and _has_state(target):
            # training mode updates a model's buffers (BatchNorm's running statistics) in place
            if target.readonly:
                raise policy.refuse_write(target.readonly, f"forward of model {first.obj_id}")  # type: ignore[union-attr]
            target.taint.add(origins)
        if msg.op == "backward" and origins:
            # every model and gradient-tracking tensor of the caller may get a gradient from it
            for e in self.store.entries.values():
                if e.owner == source and e.location is None and not e.readonly:
                    value = e.done.result() if e.done.done() and not e.done.exception() else None
                    if isinstance(value, torch.nn.Module) or getattr(value, "requires_grad", False):
                        e.taint.add(origins)
            for e in temporaries:
                e.taint.add(origins)
        return policy.Taint(dict(origins))

    def _run(self, msg: wire.Op, values: dict[int, Any], private: bool, entries: dict[int, Entry]) -> torch.Tensor:
        """Run an operation through the guard (nodes/guard.py): on private operands, no value
        can steer a size, an error or whether it succeeds."""
        args = _materialize(msg.args, values)
        kwargs = _materialize(msg.kwargs, values)

        def refuse() -> Exception:
            taint = policy.Taint(policy.merge(e.taint.origins for e in entries.values()))
            public = [list(v.shape) for i, v in values.items() if isinstance(v, torch.Tensor) and not entries[i].taint]
            return policy.refuse_op(taint, msg.op, public)

        return guard.run(msg.op, args, kwargs, private, refuse)

    def _release_aggregate(self, source: str, rid: bytes, msg: wire.Op, entries: dict[int, Entry]) -> None:
        """M1 at the aggregator: the noised mean of single-use contributions, released."""
        if not self.policy.aggregator:
            raise PermissionDenied(self.name, f"{self.name!r} is not an aggregator; nothing is released here")
        refs = msg.args[0] if len(msg.args) == 1 and type(msg.args[0]) is list else None
        if msg.op != "aggregate_mean" or refs is None or msg.kwargs or not all(type(r) is wire.Ref for r in refs):
            raise InvalidArgumentError("aggregate_mean takes one list of contributions")
        chosen = [entries[r.obj_id] for r in refs]  # type: ignore[union-attr]
        if len({id(e) for e in chosen}) != len(chosen) or any(e.contribution is None for e in chosen):
            raise PermissionDenied(self.name, "an aggregate takes distinct DP contributions only (fedptr.dp)")
        values = [e.done.result() for e in chosen]
        contributions = [e.contribution for e in chosen if e.contribution is not None]
        mean = mechanisms.release_mean(values, contributions, self.policy.owners, self.policy.min_owners)
        for r in refs:
            self.store.discard(r.obj_id)  # type: ignore[union-attr]  # single use
        result = Entry.tensor(mean, source)
        result.released = "dp"
        self.store.add(msg.result_id, result)
        # the reply waits for the contributions' removal too: an acknowledged release has used them up
        durable = _all([self.store.commit(msg.result_id, result, mean), self.store.barrier()])
        owners = sorted(c.owner for c in contributions)
        self.audit.record("release", source, object=msg.result_id, owners=owners, mechanism="dp-mean")
        self.reply_durable(durable, source, rid, wire.Ok(list(mean.shape), dtype_name(mean.dtype)))

    def _finish(
        self,
        source: str,
        rid: bytes,
        msg: wire.Op,
        result: Entry,
        compute: Callable[[], torch.Tensor],
        operands: dict[int, Entry],
        versions: dict[int, int],
    ) -> None:
        """Store an operation's result and answer once it, and every operand the operation
        changed in place (`versions` were their tensors' versions before it ran), is durable."""
        try:
            value = compute()
            durable = [self.store.commit(msg.result_id, result, value)]
            for obj_id, before in versions.items():
                operand = operands[obj_id]
                tensor = operand.done.result()
                if tensor._version != before:
                    durable.append(self.store.persist(obj_id, operand, tensor))
        except Exception as e:
            self._fail(source, rid, result, e)
            return
        result.settle(value)
        ok = wire.Ok(list(value.shape), dtype_name(value.dtype))
        self.reply_durable(_all(durable), source, rid, ok)

    def _fail(self, source: str, rid: bytes, result: Entry, e: BaseException) -> None:
        err = e if isinstance(e, FedptrError) else _remote(e, self.name)
        if not result.done.done():
            result.done.set_exception(err)
        self.reply_error(source, rid, err)

    async def _compute(
        self, source: str, rid: bytes, msg: wire.Op, entries: dict[int, Entry], result: Entry, private: bool
    ) -> None:
        """The slow path: wait for inputs still being computed, and run big work on a thread."""
        try:
            tensors: dict[int, torch.Tensor] = {}
            for i, e in entries.items():
                value = await e.done
                assert value is not None
                tensors[i] = value
            versions = _versions(tensors)
            if _numel(tensors.values()) > self.config.offload_numel:
                value = await self.scheduler.offload(self._run, msg, tensors, private, entries)
                self._finish(source, rid, msg, result, lambda: value, entries, versions)
            else:
                compute = lambda: self._run(msg, tensors, private, entries)  # noqa: E731
                self._finish(source, rid, msg, result, compute, entries, versions)
        except Exception as e:
            self._fail(source, rid, result, e)

    # --- plans ---------------------------------------------------------------------------
    def _put_plan(self, source: str, rid: bytes, msg: wire.PutPlan, budget: float) -> None:
        self.plans.put(source, msg.plan_id, plans.validate(msg))
        self.reply(source, rid, wire.Ok())

    def _run_plan(self, source: str, rid: bytes, msg: wire.RunPlan, budget: float) -> None:
        """Run a plan as its operations would run one by one: taints decided now, in order, by
        `_result_taint`; values computed by `_run` (the guard), inline or later as `_op` does.
        Only the outputs are stored."""
        plan = self.plans.get(source, msg.plan_id)
        if len(msg.inputs) != plan.n_inputs or len(msg.result_ids) != len(plan.outputs):
            raise InvalidArgumentError(
                f"plan {msg.plan_id} takes {plan.n_inputs} inputs and makes {len(plan.outputs)} outputs"
            )
        if len(set(msg.result_ids)) != len(msg.result_ids) or any(i in self.store.entries for i in msg.result_ids):
            raise InvalidArgumentError("a run's result ids are distinct and new")
        results = []
        try:
            slots = [self.store.get(i, source) for i in msg.inputs]
            for obj_id, e in zip(msg.inputs, slots, strict=True):
                self.store.check_principal(obj_id, e, source)
                if e.is_pointer:
                    raise InvalidArgumentError(f"a plan runs where its inputs are: object {obj_id} is a pointer")
            self.store.admit(source, len(msg.result_ids))  # all its outputs are stored, or none
            # the intermediate results' entries share one pending future: they are never stored,
            # awaited or listed, only asked for their taint (and counted as state a forward may write)
            unsettled: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            for op, reads in zip(plan.ops, plan.reads, strict=True):
                temporaries = slots[plan.n_inputs :] if op.op == "backward" else ()
                taint = self._result_taint(op, {s: slots[s] for s in reads}, source, temporaries)
                slots.append(Entry(unsettled, owner=source, taint=taint))
        except Exception as e:
            for result_id in msg.result_ids:
                self._store_failed(result_id, source, e)
            raise
        for result_id, out in zip(msg.result_ids, plan.outputs, strict=True):
            result = Entry.tensor(owner=source, taint=slots[out].taint)
            self.store.add(result_id, result)
            results.append(result)
        inputs = slots[: plan.n_inputs]
        finish = functools.partial(self._finish_plan, source, rid, msg, plan, slots, results)
        values: list[Any] = []
        versions: dict[int, int] = {}
        done = 0
        if all(e.done.done() and e.done.exception() is None for e in inputs):
            # as single operations run: inline while the operands are small, for a bounded stretch
            values = [e.done.result() for e in inputs]
            versions.update(_versions(dict(enumerate(values))))
            try:
                done = self._compute_plan(plan, slots, values, 0, inline=True)
            except Exception as e:
                finish(versions, _raiser(e))
                return
            if done == len(plan.ops):
                finish(versions, lambda: values)
                return

        async def later() -> None:
            try:
                if not values:
                    values.extend([await e.done for e in inputs])
                    versions.update(_versions(dict(enumerate(values))))
                await self.scheduler.offload(self._compute_plan, plan, slots, values, done)
            except Exception as e:
                finish(versions, _raiser(e))
                return
            finish(versions, lambda: values)

        self.compute_later(later(), source)

    def _compute_plan(
        self, plan: plans.Plan, slots: list[Entry], values: list[Any], start: int, inline: bool = False
    ) -> int:
        """Compute the operations from `start` through the guard (`_run`), appending each value to
        `values` (the inputs' first); returns how many are done. `inline` (on the event loop)
        stops before an operation whose operands are big, or after `limits.PLAN_INLINE_OPS`."""
        for i in range(start, len(plan.ops)):
            reads = plan.reads[i]
            operands = {s: values[s] for s in reads}
            if inline and (
                i - start >= limits.PLAN_INLINE_OPS or _numel(operands.values()) > self.config.offload_numel
            ):
                return i
            entries = {s: slots[s] for s in reads}
            values.append(self._run(plan.ops[i], operands, any(e.taint for e in entries.values()), entries))
        return len(plan.ops)

    def _finish_plan(
        self,
        source: str,
        rid: bytes,
        msg: wire.RunPlan,
        plan: plans.Plan,
        slots: list[Entry],
        results: list[Entry],
        versions: dict[int, int],
        compute: Callable[[], list[Any]],
    ) -> None:
        """Store a run's outputs and answer once they, and every input the run changed in place
        (`versions`: its input tensors' versions, by input position, before it ran), are durable.
        A failed run fails every output; the inputs it changed are persisted all the same."""
        try:
            values = compute()
            outputs = [values[o] for o in plan.outputs]
            if not all(isinstance(v, torch.Tensor) for v in outputs):
                raise InvalidArgumentError("a plan's outputs are tensors")
            durable = [self.store.commit(i, r, v) for i, r, v in zip(msg.result_ids, results, outputs, strict=True)]
        except Exception as e:
            self._persist_changed(msg.inputs, slots, versions)
            err = e if isinstance(e, FedptrError) else _remote(e, self.name)
            for result in results:
                if not result.done.done():
                    result.done.set_exception(err)
            self.reply_error(source, rid, err)
            return
        durable.extend(self._persist_changed(msg.inputs, slots, versions))
        for result, value in zip(results, outputs, strict=True):
            result.done.set_result(value)
        reply = wire.PlanReply([list(v.shape) for v in outputs], [dtype_name(v.dtype) for v in outputs])
        self.reply_durable(_all(durable), source, rid, reply)

    def _persist_changed(
        self, ids: list[int], slots: list[Entry], versions: dict[int, int]
    ) -> list[asyncio.Future[None] | None]:
        """Queue the writes of the inputs (`ids`, their entries first in `slots`) whose tensors
        changed in place since `versions`."""
        return [
            self.store.persist(ids[k], slots[k], slots[k].done.result())
            for k, before in versions.items()
            if slots[k].done.result()._version != before
        ]

    def _store_failed(self, result_id: int, source: str, e: BaseException, sponsor: str = "") -> None:
        """Keep `result_id` as failed with `e`, so requests pipelined behind it fail the same way."""
        failed = Entry.tensor(owner=source)
        failed.sponsor = sponsor
        failed.done.set_exception(e if isinstance(e, FedptrError) else _remote(e, self.name))
        with contextlib.suppress(InvalidArgumentError, QuotaExceededError):  # then not found, as failed
            self.store.add(result_id, failed)

    # --- differential privacy ----------------------------------------------------------
    def _contribute(self, source: str, rid: bytes, msg: wire.Contribute, budget: float) -> None:
        """M1 at a data owner: clip, charge, and send a single-use contribution to an aggregator."""
        entry = self.store.get(msg.obj_id, source)
        others = [o for o in entry.taint.owners if o != self.name]
        if others:
            raise PermissionDenied(others[0], f"a contribution of {self.name!r} may derive from its own data only")
        if msg.aggregator not in self.policy.trust:
            raise PermissionDenied(self.name, f"{self.name!r} does not trust {msg.aggregator!r} with contributions")

        async def answer() -> None:
            value = await entry.done
            if not isinstance(value, torch.Tensor) or entry.location is not None:
                raise InvalidArgumentError("a contribution is a tensor held on its owner's node")
            clipped = mechanisms.clip(value, self.config.dp_clip)
            spent = await self.scheduler.offload(self.budget.charge, self.config.dp_noise_multiplier, 1.0, 1)
            self.audit.record(audit.CONTRIBUTION, source, object=msg.obj_id, to=msg.aggregator, epsilon_spent=spent)
            put = wire.PutContribution(
                msg.new_id, to_raw(clipped), self.config.dp_clip, self.config.dp_noise_multiplier, source
            )
            try:
                await self.forward(msg.aggregator, put, budget)
            except FedptrError as e:
                raise with_hop(e, self.name) from None
            self.reply(source, rid, wire.BudgetReply(self.name, spent, self.budget.left))

        self.spawn(answer(), source, rid)

    def _put_contribution(self, source: str, rid: bytes, msg: wire.PutContribution, budget: float) -> None:
        """M1 at the aggregator: keep a contribution of a roster owner, read-only and single-use."""
        if not self.policy.aggregator or source not in self.policy.owners:
            raise PermissionDenied(source, f"{self.name!r} takes contributions only from its roster of data owners")
        if not (msg.clip > 0 and msg.noise_multiplier > 0):
            raise InvalidArgumentError("a contribution needs a clip bound and a noise multiplier above 0")
        value = from_raw(msg.tensor)
        entry = Entry.tensor(value, msg.owner, policy.Taint({source: frozenset({self.name})}))
        entry.readonly = source
        entry.contribution = mechanisms.Contribution(source, msg.clip, msg.noise_multiplier)
        self._store_new(source, rid, msg.obj_id, entry, wire.Ok(list(value.shape), msg.tensor.dtype))

    def _dp_train(self, source: str, rid: bytes, msg: wire.DPTrain, budget: float) -> None:
        """M2: DP-SGD on this node's own data; every step is charged before it runs."""
        model_entry = self.store.get(msg.model_id, source)
        data = [self.store.get(i) for i in (msg.x_id, msg.y_id)]
        if any(e.readonly != self.name for e in data):
            raise PermissionDenied(self.name, "DP-SGD trains on this node's own private data only (found by search)")
        if model_entry.taint:
            raise PermissionDenied(
                model_entry.taint.owners[0], "this model already derives from private data outside DP-SGD"
            )

        async def answer() -> None:
            try:
                model = await model_entry.done
                x, y = data[0].done.result(), data[1].done.result()
                if not isinstance(model, torch.nn.Module) or len(x) != len(y):
                    raise InvalidArgumentError("DP-SGD takes a model and inputs and targets of one length")
                mechanisms.check_run(msg, len(x))
                mechanisms.check_per_sample(model)
                spent = await self.scheduler.offload(self._train_charged, model, x, y, msg, data[0].taint)
            except Exception as e:
                self.reply_error(source, rid, e)
                return
            self.audit.record(audit.DP_TRAIN, source, object=msg.model_id, steps=msg.steps, epsilon_spent=spent)
            model_entry.released = "dp"
            durable = self.store.persist(msg.model_id, model_entry, model)
            self.reply_durable(durable, source, rid, wire.BudgetReply(self.name, spent, self.budget.left))

        self.compute_later(answer(), source)  # it trains the model in place: later requests wait

    def _train_charged(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        config: wire.DPTrain,
        taint: policy.Taint,
    ) -> float:
        """On a worker thread: check the run from shapes alone, charge every step, then train."""
        try:
            mechanisms.check_model(model, x, y, config)
        except Exception:
            raise policy.refuse_op(taint, "dp_train", []) from None
        spent = self.budget.charge(config.noise_multiplier, config.sample_rate, config.steps)
        mechanisms.dp_sgd(model, x, y, config)
        return spent

    def _budget(self, source: str, rid: bytes, msg: wire.Budget, budget: float) -> None:
        self.reply(source, rid, wire.BudgetReply(self.name, self.budget.spent, self.budget.left))

    def _relayed(
        self, source: str, rid: bytes, forwarded: asyncio.Future[wire.Message], ptr_id: int, ptr: Entry
    ) -> None:
        error = forwarded.exception()
        if error is not None:
            err = with_hop(error, self.name)
            ptr.done.set_exception(err)
            self.reply_error(source, rid, err)
        else:
            ptr.done.set_result(None)
            self.reply_durable(self.store.commit(ptr_id, ptr), source, rid, forwarded.result())


def _has_state(entry: Entry) -> bool:
    """Whether `entry` may be a model with buffers (a forward may write them); unknown counts."""
    if not entry.done.done() or entry.done.exception() is not None:
        return True
    value = entry.done.result()
    return isinstance(value, torch.nn.Module) and any(True for _ in value.buffers())


_TAINT_RULES = ALIASING | {"forward", "backward"}
"""Operations whose result taint `Node._result_taint` decides by a rule of their own (a shared
taint, a write to a model, gradients everywhere), even on public operands."""


def _values(entries: dict[int, Entry]) -> dict[int, Any] | None:
    """The operands' values by id when every one is settled without an error, else None."""
    values = {}
    for i, e in entries.items():
        done = e.done
        if not done.done() or done.exception() is not None:
            return None
        values[i] = done.result()
    return values


def _is_ref(value: Any) -> bool:
    return type(value) is wire.Ref


def _versions(values: dict[int, Any]) -> dict[int, int]:
    """The version counter of each tensor among `values` (an in-place update bumps it)."""
    return {i: v._version for i, v in values.items() if isinstance(v, torch.Tensor)}


def _all(durable: list[asyncio.Future[None] | None]) -> asyncio.Future[Any] | None:
    """One future for the writes in `durable` that there are (None: nothing to wait for)."""
    futures = [f for f in durable if f is not None]
    if not futures:
        return None
    if len(futures) == 1:
        return futures[0]
    return asyncio.gather(*futures)


def _raiser(e: BaseException) -> Callable[[], list[Any]]:
    def compute() -> list[Any]:
        raise e

    return compute


def _remote(e: BaseException, worker: str) -> RemoteError:
    return RemoteError(type(e).__name__, str(e), worker, [worker])
