"""A worker node: answers requests on its object store, computing here or forwarding down a chain.

Every request is handled in two phases. At receipt, synchronously and in arrival order, the
store is updated (result entries created, entries popped, forwards queued), so pipelined
requests from a client always see the effects of the ones before them. Small computations on
inputs that exist run right there; the rest finishes later: a callback when the next hop
answers, a bounded asyncio-pool task for a computation that waits for its inputs, a thread for
big ones, so the event loop keeps serving. Every request is checked against the object's owner
and the privacy policy (nodes/policy.py) before anything runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
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
    RemoteError,
)
from fedptr.failures import failure_from_error, with_hop
from fedptr.link import Link
from fedptr.ops import AGGREGATES, ALLOWED
from fedptr.tensors import dtype_name, from_raw

from . import kernels, policy
from .durable import DurableStore
from .handover import Handover
from .replies import ReplyCache, Seen
from .scheduler import Scheduler
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
    aggregator: bool = False
    min_owners: int = limits.MIN_OWNERS
    max_weight_ratio: float = limits.MAX_WEIGHT_RATIO
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 0.0


def _hop_budget(budget: float) -> float:
    return max(limits.MIN_HOP_BUDGET_S, budget - limits.HOP_MARGIN_S)


def _refs(value: Any, found: set[int]) -> None:
    if type(value) is wire.Ref:
        found.add(value.obj_id)
    elif type(value) is list:
        for v in value:
            _refs(v, found)
    elif type(value) is dict:
        for v in value.values():
            _refs(v, found)


def _rewrite(value: Any, ids: dict[int, int]) -> Any:
    """`value` with each reference replaced by the id of the object one hop down."""
    if type(value) is wire.Ref:
        return wire.Ref(ids[value.obj_id])
    if type(value) is list:
        return [_rewrite(v, ids) for v in value]
    if type(value) is dict:
        return {k: _rewrite(v, ids) for k, v in value.items()}
    return value


def _materialize(value: Any, tensors: dict[int, torch.Tensor]) -> Any:
    """`value` with references replaced by stored tensors and inline buffers by tensors."""
    t = type(value)
    if t is wire.Ref:
        return tensors[value.obj_id]
    if t is wire.RawTensor:
        return from_raw(value)
    if t is list:
        return [_materialize(v, tensors) for v in value]
    if t is dict:
        return {k: _materialize(v, tensors) for k, v in value.items()}
    return value


def _numel(values: Any) -> int:
    return sum(v.numel() for v in values if isinstance(v, torch.Tensor))


class Node:
    """The request handlers of one worker, answering through `link` (wire `handle` to it as the
    link's handler before the link registers)."""

    def __init__(self, name: str, link: Link, config: NodeConfig | None = None) -> None:
        self.name = name
        self.link = link
        self.config = config or NodeConfig()
        durable = DurableStore(self.config.store_dir) if self.config.store_dir else None
        self.store = Store(name, self.config.max_store_bytes, durable)
        self.policy = policy.PolicyConfig(
            name,
            frozenset(self.config.trust),
            self.config.aggregator,
            self.config.min_owners,
            self.config.max_weight_ratio,
            dp_noise_multiplier=self.config.dp_noise_multiplier,
            dp_clip=self.config.dp_clip,
        )
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
        self._departed: set[str] = set()
        self.scheduler = Scheduler(
            name, link.pause_reading, link.resume_reading, self.config.pool_size, self.config.max_forwards
        )
        self.handover = handover = Handover(self)
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
            wire.Has: handover.has,
        }

    def _load_data(self, tag: str, path: str) -> None:
        """Every array of an .npz file becomes a private object of this node, tagged `tag`."""
        with np.load(path, allow_pickle=False) as arrays:
            for key in sorted(arrays.files):
                value = torch.from_numpy(np.ascontiguousarray(arrays[key]))
                dtype_name(value.dtype)  # refuses dtypes that could not travel
                policy.taint(value, {self.name: self.policy.trust})
                self.store.add_data(tag, value)
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
        msg = decoded.message
        if rid != envelope.NO_REPLY:
            seen = self.replies.begin((source, rid))
            if seen is Seen.RUNNING:
                return
            if seen is Seen.ANSWERED:
                self.link.reply(source, rid, self.replies.cached((source, rid)))
                return
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
        policy.taint(tensor, policy.from_wire(msg.origins))
        self._store_new(
            source, rid, msg.obj_id, tensor, msg.owner or source, wire.Ok(list(tensor.shape), msg.tensor.dtype)
        )

    def _put_module(self, source: str, rid: bytes, msg: wire.PutModule, budget: float) -> None:
        model = modules.from_wire(msg.spec, msg.params)
        policy.taint(model, policy.from_wire(msg.origins))
        self._store_new(source, rid, msg.obj_id, model, msg.owner or source, wire.Ok())

    def _store_new(
        self, source: str, rid: bytes, obj_id: int, value: torch.Tensor | torch.nn.Module, owner: str, ok: wire.Message
    ) -> None:
        """Store and commit a received value, and answer `ok` once it is durable; nothing is kept
        when the commit or its write fails."""
        entry = Entry.tensor(value, owner)
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
        self.reply(source, rid, wire.SearchReply(list(self.store.tags.get(msg.tag, []))))

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
        removed = self.store.clear_all(departed)
        if removed:
            log.info("reclaimed %d objects of %d clients that left", len(removed), len(departed))
            self.delete_downstream(removed)

    def _clear(self, source: str, rid: bytes, msg: wire.Clear, budget: float) -> None:
        self.delete_downstream(self.store.clear(source))
        self.reply(source, rid, wire.Ok())

    def _list(self, source: str, rid: bytes, msg: wire.ListObjects, budget: float) -> None:
        snapshot = dict(self.store.entries)

        async def answer() -> None:
            pending = [e.done for e in snapshot.values() if not e.done.done()]
            if pending:
                await asyncio.wait(pending, timeout=_hop_budget(budget))
            rows = [e.row(i) for i, e in snapshot.items() if e.done.done() or e.is_pointer]
            if len(rows) > limits.MAX_LISTED_OBJECTS:
                raise OverloadedError(self.name, f"{len(rows)} objects are too many to list at once")
            self.reply(source, rid, wire.ObjectsReply(rows))

        self.spawn(answer(), source, rid)

    # --- operations --------------------------------------------------------------------
    def _op(self, source: str, rid: bytes, msg: wire.Op, budget: float) -> None:
        try:
            entries = self._operands(msg, source)
        except Exception as e:
            failed = Entry.tensor(owner=source)
            failed.sponsor = msg.sponsor
            failed.done.set_exception(e if isinstance(e, FedptrError) else _remote(e, self.name))
            with contextlib.suppress(InvalidArgumentError):
                self.store.add(msg.result_id, failed)
            raise
        location = next((e.location for e in entries.values()), None)
        if location is None:
            result = Entry.tensor(owner=source)
            result.sponsor = msg.sponsor
            self.store.add(msg.result_id, result)
            settled = all(e.done.done() for e in entries.values())
            if settled and not any(e.done.exception() for e in entries.values()):
                tensors = {i: e.done.result() for i, e in entries.items()}
                if _numel(tensors.values()) <= self.config.offload_numel:
                    # the common case: small inputs, all present; no task, no thread
                    versions = _versions(tensors)
                    self._finish(source, rid, msg, result, lambda: self._run(msg, tensors), entries, versions)
                    return
            self.scheduler.compute_later(self._compute(source, rid, msg, entries, result))
            return
        ptr = Entry.pointer(location, wire.new_object_id(), settled=False, owner=source)
        ptr.sponsor = msg.sponsor
        self.store.add(msg.result_id, ptr)
        ids = {i: e.remote_id for i, e in entries.items()}
        nested = wire.Op(
            ptr.remote_id, msg.op, _rewrite(msg.args, ids), _rewrite(msg.kwargs, ids), msg.sponsor or source
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
        ids: set[int] = set()
        _refs(msg.args, ids)
        _refs(msg.kwargs, ids)
        entries = {i: self.store.get(i, source) for i in ids}
        locations = {e.location or self.name for e in entries.values()}
        if len(locations) > 1:
            a, b = sorted(locations)[:2]
            raise LocationMismatchError(f"operands live on different workers: {a!r} and {b!r}")
        for e in entries.values():
            if e.is_pointer and e.done.done() and e.done.exception() is not None:
                raise e.done.exception()  # type: ignore[misc]
        return entries

    def _run(self, msg: wire.Op, values: dict[int, Any]) -> torch.Tensor:
        """Run an operation and give its result the union of its inputs' origins (an in-place
        update gives them to its target; `backward` to every gradient it filled)."""
        args = _materialize(msg.args, values)
        kwargs = _materialize(msg.kwargs, values)
        if msg.op in AGGREGATES:
            if msg.op == "aggregate_mean" and len(args) == 1 and not kwargs:
                return policy.aggregate(self.policy, list(args[0]), None)
            if msg.op == "aggregate_weighted_mean" and len(args) == 2 and not kwargs:
                return policy.aggregate(self.policy, list(args[0]), list(args[1]))
            raise TypeError(
                f"{msg.op} takes a list of inputs{' and a list of weights' if 'weighted' in msg.op else ''}"
            )
        result = kernels.run(msg.op, args, kwargs)
        origins = policy.merge(policy.origins_of(v) for v in values.values())
        if msg.op == "backward":
            self._taint_gradients(origins)
        policy.taint(result, origins)
        return result

    def _taint_gradients(self, origins: policy.Origins) -> None:
        if not origins:
            return
        for entry in self.store.entries.values():
            if entry.location is None and entry.done.done() and entry.done.exception() is None:
                value = entry.done.result()
                tensors = value.parameters() if isinstance(value, torch.nn.Module) else [value]
                for t in tensors:
                    if isinstance(t, torch.Tensor) and t.grad is not None:
                        policy.taint(t.grad, origins)

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
        result.done.set_result(value)
        ok = wire.Ok(list(value.shape), dtype_name(value.dtype))
        self.reply_durable(_all(durable), source, rid, ok)

    def _fail(self, source: str, rid: bytes, result: Entry, e: BaseException) -> None:
        err = e if isinstance(e, FedptrError) else _remote(e, self.name)
        if not result.done.done():
            result.done.set_exception(err)
        self.reply_error(source, rid, err)

    async def _compute(self, source: str, rid: bytes, msg: wire.Op, entries: dict[int, Entry], result: Entry) -> None:
        """The slow path: wait for inputs still being computed, and run big work on a thread."""
        try:
            tensors: dict[int, torch.Tensor] = {}
            for i, e in entries.items():
                value = await e.done
                assert value is not None
                tensors[i] = value
            versions = _versions(tensors)
            if _numel(tensors.values()) > self.config.offload_numel:
                value = await self.scheduler.offload(self._run, msg, tensors)
                self._finish(source, rid, msg, result, lambda: value, entries, versions)
            else:
                self._finish(source, rid, msg, result, lambda: self._run(msg, tensors), entries, versions)
        except Exception as e:
            self._fail(source, rid, result, e)

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


def _remote(e: BaseException, worker: str) -> RemoteError:
    return RemoteError(type(e).__name__, str(e), worker, [worker])
