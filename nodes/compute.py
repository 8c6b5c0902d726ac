"""Running operations: one op (`Op`) or a plan run (`RunPlan`), computed here or forwarded.

An op whose operands live here gets its result entry (and its taint) at once, so that later
pipelined requests find it; its value is computed inline when its inputs are small and present,
else later (waiting for inputs, big work on a thread), and the answer waits until the result,
and every operand the op changed in place, is durable. An op on pointers is forwarded to where
the data is. A plan run is the same ops, in order, with only the outputs stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from fedptr import limits, wire
from fedptr.errors import (
    FedptrError,
    InvalidArgumentError,
    LocationMismatchError,
    OpNotAllowedError,
    QuotaExceededError,
    RemoteError,
)
from fedptr.failures import with_hop
from fedptr.ops import AGGREGATES, ALLOWED, MUTATING
from fedptr.tensors import dtype_name, from_raw

from . import guard, plans, policy
from .guard import ALIASING
from .store import Entry, all_written

if TYPE_CHECKING:
    from .node import Node


class Compute:
    """The op and plan handlers of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.config = node.config
        self.store = node.store
        self.plans = node.plans
        self.scheduler = node.scheduler

    def op(self, source: str, rid: bytes, msg: wire.Op, budget: float) -> None:
        try:
            entries = self._operands(msg, source)
            location = next((e.location for e in entries.values()), None)
            if location is None and msg.op in AGGREGATES:
                self.node.release.aggregate(source, rid, msg, entries)
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
            self.node.compute_later(self._compute(source, rid, msg, entries, result, private), source)
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
            forwarded = self.node.forward(location, nested, budget)
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
        self.node.reply_durable(all_written(durable), source, rid, ok)

    def _fail(self, source: str, rid: bytes, result: Entry, e: BaseException) -> None:
        err = e if isinstance(e, FedptrError) else _remote(e, self.name)
        if not result.done.done():
            result.done.set_exception(err)
        self.node.reply_error(source, rid, err)

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
    def put_plan(self, source: str, rid: bytes, msg: wire.PutPlan, budget: float) -> None:
        self.plans.put(source, msg.plan_id, plans.validate(msg))
        self.node.reply(source, rid, wire.Ok())

    def run_plan(self, source: str, rid: bytes, msg: wire.RunPlan, budget: float) -> None:
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

        self.node.compute_later(later(), source)

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
            self.node.reply_error(source, rid, err)
            return
        durable.extend(self._persist_changed(msg.inputs, slots, versions))
        for result, value in zip(results, outputs, strict=True):
            result.done.set_result(value)
        reply = wire.PlanReply([list(v.shape) for v in outputs], [dtype_name(v.dtype) for v in outputs])
        self.node.reply_durable(all_written(durable), source, rid, reply)

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

    def _relayed(
        self, source: str, rid: bytes, forwarded: asyncio.Future[wire.Message], ptr_id: int, ptr: Entry
    ) -> None:
        error = forwarded.exception()
        if error is not None:
            err = with_hop(error, self.name)
            ptr.done.set_exception(err)
            self.node.reply_error(source, rid, err)
        else:
            ptr.done.set_result(None)
            self.node.reply_durable(self.store.commit(ptr_id, ptr), source, rid, forwarded.result())


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


def _has_state(entry: Entry) -> bool:
    """Whether `entry` may be a model with buffers (a forward may write them); unknown counts."""
    if not entry.done.done() or entry.done.exception() is not None:
        return True
    value = entry.done.result()
    return isinstance(value, torch.nn.Module) and any(True for _ in value.buffers())


_TAINT_RULES = ALIASING | {"forward", "backward"}
"""Operations whose result taint `Compute._result_taint` decides by a rule of their own (a shared
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


def _raiser(e: BaseException) -> Callable[[], list[Any]]:
    def compute() -> list[Any]:
        raise e

    return compute


def _remote(e: BaseException, worker: str) -> RemoteError:
    return RemoteError(type(e).__name__, str(e), worker, [worker])
