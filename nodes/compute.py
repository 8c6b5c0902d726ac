"""Running operations: one op (`Op`) or a plan run (`RunPlan`), computed here or forwarded.

An op whose operands live here gets its result entry (and its taint) at once, so that later
pipelined requests find it; its value is computed inline when its inputs are small and present,
else later (waiting for inputs, big work on a thread; so is a node's first op on private data,
which loads torch's meta kernels: nodes/guard.py), and the answer waits until the result,
and every operand the op changed in place, is durable. An op on pointers is forwarded to where
the data is. A plan run is the same ops, in order, with only the outputs stored; a plan of
plain operations (nodes/plans.py) runs them on a lean loop, its taints decided at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedptr import envelope, limits, metrics, wire
from fedptr.errors import (
    FedptrError,
    InvalidArgumentError,
    LocationMismatchError,
    OpNotAllowedError,
    QuotaExceededError,
    RemoteError,
)
from fedptr.failures import failure_from_error, with_hop
from fedptr.ops import AGGREGATES, ALIASING, ALLOWED, MUTATING
from fedptr.tensors import dtype_name, from_raw

from . import guard, kernels, plans, policy
from .saved import Recorder
from .store import Entry, all_written, without_frames

log = logging.getLogger("fedptr.node")

if TYPE_CHECKING:
    from fedptr.link import Link
    from fedptr.session import Incoming

    from .node import Node


@dataclass(slots=True, eq=False)
class _Run:
    """One request's computation: a single op, or a plan run. Its `ops` run in order; op i reads
    the values of its `operands[i]` (key -> entry) and adds its own at key `ops[i].result_id`,
    for the entry `results[i]` (whose taint says whether it runs as private). A single op's keys
    are object ids; a plan's are its slots, `ids` the object ids of its inputs. `inputs` are
    the stored entries it reads by key; `outputs` those it stores, as (key, object id, entry)."""

    source: str
    rid: bytes
    ops: Sequence[wire.Op]
    operands: Sequence[dict[int, Entry]]
    results: Sequence[Entry]
    inputs: dict[int, Entry]
    ids: Sequence[int] | None
    outputs: list[tuple[int, int, Entry]]
    plan: bool
    """Whether it answers as a plan run (`PlanReply`) or as one op (`Ok`)."""
    lean: _Lean | None = None
    """A plan run on the lean loop (then `operands` and `results` are empty)."""
    graph: Recorder | None = None
    """What it saves for backward, when it may build an autograd graph (nodes/saved.py): an
    input tracks gradients or is a model, or it is a plan that may make one track them."""
    numel: int = 0
    """The elements of its input tensors, counted by `_values`: a single op's operands are its
    inputs, so its offload decision needs no second pass over them."""


class _Oks:
    """The lane's answers not sent yet: the ids of a run's consecutive ops answered with one
    `Ok`, sent at once (`Link.reply_each`) when another answer is due or the run ends."""

    __slots__ = ("link", "ok", "rids", "source")

    def __init__(self, link: Link, source: str) -> None:
        self.link = link
        self.source = source
        self.ok: wire.Ok | None = None
        self.rids: list[bytes] = []

    def send(self) -> None:
        rids = self.rids
        if rids:
            self.rids = []
            assert self.ok is not None  # (set before the first id joins)
            self.link.reply_each(self.source, rids, self.ok)


@dataclass(slots=True, eq=False)
class _Lean:
    """What a plan run on the lean loop (`nodes.plans.Step`) reads besides the values: its steps,
    the inputs each slot derives from (`deps`), each input's origins as the run arrived and which
    of them have any (`tainted`, a bitmask), and the slots the run stores."""

    steps: Sequence[plans.Step]
    deps: Sequence[int]
    origins: Sequence[policy.Origins]
    tainted: int
    outputs: Sequence[int]
    quick: Sequence[plans.Quick | None]
    widest: int

    def taint(self, slot: int) -> policy.Taint:
        """Slot `slot`'s taint: the origins of the inputs it derives from, merged (a fresh one,
        as `policy.result_taint` gives a plain operation's result)."""
        hit = self.deps[slot] & self.tainted
        if not hit:
            return policy.Taint({})
        return policy.Taint(policy.merge(o for i, o in enumerate(self.origins) if hit >> i & 1))

    def private(self, slot: int) -> bool:
        return bool(self.deps[slot] & self.tainted)


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
        """Run one operation here (its results' entries and taints made now), release an aggregate,
        or forward the operation to the worker its operands point to."""
        try:
            entries, location, tainted = self._operands(msg, source)
            if location is None and msg.op in AGGREGATES:
                self.node.release.aggregate(source, rid, msg, entries)
                return
            if location is not None:
                taint = policy.Taint()
            elif msg.op in policy.TAINT_RULES:
                taint = self._result_taint(msg, entries, source)
            elif tainted:  # no operand is written: the operands decide alone
                taint = policy.result_taint(msg.op, entries.values())
            else:  # and all are public: `policy.result_taint`'s verdict, read off `_operands`' pass
                taint = policy.Taint({})
        except Exception as e:
            for result_id in (msg.result_id, *msg.more_ids):
                self._store_failed(result_id, source, e, msg.sponsor)
            raise
        if location is None:
            # a one-op run whose keys are the object ids themselves; each further result of a
            # multi-output op gets a taint of its own, by the same rule
            outputs: list[tuple[int, int, Entry]] = []
            for result_id in (msg.result_id, *msg.more_ids):
                # pending, built positionally (not `Entry.tensor`, a call more): keywords cost a
                # third more, on every op
                result = Entry(None, 0, source, _copy(taint) if outputs else taint)
                result.sponsor = msg.sponsor
                self.store.add(result_id, result)
                outputs.append((result_id, result_id, result))
            self._start(_Run(source, rid, (msg,), (entries,), (outputs[0][2],), entries, None, outputs, False))
            return
        result_ids = [msg.result_id, *msg.more_ids]
        ptrs = [Entry.pointer(location, wire.new_object_id(), settled=False, owner=source) for _ in result_ids]
        for result_id, ptr in zip(result_ids, ptrs, strict=True):
            ptr.sponsor = msg.sponsor
            self.store.add(result_id, ptr)
        ids = {i: e.remote_id for i, e in entries.items()}
        nested = wire.Op(
            ptrs[0].remote_id,
            msg.op,
            wire.rewrite_refs(msg.args, ids),
            wire.rewrite_refs(msg.kwargs, ids),
            msg.sponsor or source,
            [p.remote_id for p in ptrs[1:]],
        )
        try:
            forwarded = self.node.forward(location, nested, budget)
        except FedptrError as e:
            for ptr in ptrs:
                ptr.fail(e)
            raise

        def relayed(f: asyncio.Future[wire.Message]) -> None:
            self._relayed(source, rid, f, result_ids, ptrs)

        # answered later, outside this handler: a step that raises still answers the op
        forwarded.add_done_callback(self.node.answering(source, rid, relayed))

    def ops(self, source: str, requests: Sequence[Incoming]) -> None:
        """Handle a run of `source`'s consecutive `Op` requests, in order, each exactly as
        `Node.handle` would (its answer, its result's entry, taint, charge and reply record). An
        op of the common kind takes the lane below: its own request only, nothing deferred
        before it, no write-ahead, a plain public op on settled tensors of the caller's, small,
        one result. Everything that lane does not cover (a resend, an op that writes, aliases,
        aggregates or runs on private data, a pointer, a pending or failed operand, a sponsor,
        keywords) is handed to `Node.handle` at that op, before anything of it is done here.

        Per op the lane does the per-op path's checks in one frame: no dispatch, no `_Run`, no
        separate operand, compute and finish calls (15 of the node's 40 Python calls per op).
        Its errors (a kernel's, a refused charge) finish on the per-op path (`_finish`), so a
        failing op is answered, stored and charged as there, and the ops after it see the same
        state."""
        node = self.node
        store = self.store
        # with a write-ahead every op answers once its result is written: the per-op path
        lane = store.wal is None and not node.figures.debug
        entries, taken = store.entries, store.taken
        replies = node.replies
        running, answered = replies._running, replies._replies  # `ReplyCache.begin`'s tables, read inline
        ordered = node._ordered
        offload = self.config.offload_numel
        oks = _Oks(node.link, source)
        counted = 0
        for _, rid, decoded in requests:
            # each op on its own, as the link handles each request: a bug met in one is logged,
            # and the ops after it still go
            result: Entry | None = None
            key = (source, rid)
            try:
                msg: wire.Op = decoded.message  # type: ignore[assignment]  # (a run holds only ops: `Link._handle`)
                op = msg.op
                fn = _LANE.get(op)
                if (
                    fn is None
                    or not lane
                    or key in running
                    or key in answered
                    or source in ordered
                    or msg.kwargs
                    or msg.more_ids
                    or msg.sponsor
                    or rid == envelope.NO_REPLY
                ):
                    oks.send()  # every answer before this op's leaves before any of its
                    node.handle(source, rid, decoded)
                    continue
                result_id = msg.result_id
                args: list[Any] = []
                values: dict[int, Any] = {}
                numel = 0
                for a in msg.args:  # `_operands` and `_values` for the lane's ops: one pass, no call
                    if type(a) is wire.Ref:
                        i = a.obj_id
                        e = entries.get(i)
                        if (
                            e is None
                            or e.owner != source
                            or e.sponsor
                            or e.taint.origins
                            or e.location is not None
                            or not e.settled
                            or e.error is not None
                        ):
                            break
                        v = e.value
                        if type(v) is not torch.Tensor or v.requires_grad:
                            break
                        numel += v.numel()
                        args.append(v)
                        values[i] = v
                    elif type(a) in _SCALARS:
                        args.append(a)
                    else:
                        break
                else:
                    if numel <= offload and result_id not in entries and result_id not in taken:
                        counted += 1
                        running[key] = ("Op", time.monotonic())  # `ReplyCache.begin` of a new request
                        result = Entry(None, 0, source, policy.Taint({}))  # public operands: a public result
                        try:
                            store.add(result_id, result)
                        except Exception as e:  # refused (the object quota): as `Node._dispatch` answers it
                            result = None
                            oks.send()
                            node.reply_error(source, rid, e)
                            continue
                        self._lane(source, rid, msg, fn, args, values, result, oks)
                        continue
                oks.send()
                node.handle(source, rid, decoded)
            except Exception as e:
                log.exception("failed to handle a request of %r", source)
                self._unanswered(source, rid, None if result is None else (msg.result_id, result), e, oks)
        oks.send()
        if counted:
            figures = node.figures.requests
            figures["Op"] = figures.get("Op", 0) + counted

    def _unanswered(
        self, source: str, rid: bytes, result: tuple[int, Entry] | None, error: Exception, oks: _Oks
    ) -> None:
        """After a bug met in `ops`: an op the lane took (registered as running; `result` its id
        and pending entry) and left unanswered gets a typed failure, and its result fails with
        it (uncharged), so that neither the caller nor the ops pipelined on it wait for ever."""
        try:
            oks.send()
        except Exception:
            log.exception("failed to answer a run of %r", source)
        if result is None or (source, rid) not in self.node.replies._running:
            return  # not the lane's, or answered (its cache entry is kept before it is sent)
        err = error if isinstance(error, FedptrError) else _remote(error, self.name)
        result_id, entry = result
        if not entry.settled:
            self.store.uncommit(result_id, entry)
            entry.fail(err)
        self.node.reply_error(source, rid, err)

    def _lane(
        self,
        source: str,
        rid: bytes,
        msg: wire.Op,
        fn: Callable[..., Any],
        args: list[Any],
        values: dict[int, Any],
        result: Entry,
        oks: _Oks,
    ) -> None:
        """Compute, store and answer an op on `Compute.ops`' lane: `guard.run`, `Store.commit`
        and `_finish` for a public op of one result on settled tensors, without a write-ahead.
        Its `Ok` joins `oks`, sent with the run's others; its errors finish on the per-op path,
        which commits, fails and answers as for any op (after the `Ok`s before it)."""
        result_id = msg.result_id
        try:
            value = fn(*args)  # `kernels.run`: a flat list of tensors and numbers needs no decoding
            if type(value) is not torch.Tensor:
                (value,) = kernels.results(kernels.checked(msg.op, value), 1)
            value = guard.unshared(value, args, {})
        except Exception as e:
            oks.send()
            self._finish(self._lane_run(source, rid, msg, result), values, {}, e)
            return
        values[result_id] = value
        try:
            self.store.commit(result_id, result, value)
        except Exception:  # refused (the store's cap, a quota): charged and answered as `_finish` does
            oks.send()
            self._finish(self._lane_run(source, rid, msg, result), values, {}, None)
            return
        result.settle(value)
        ok = _OKS.get((value.shape, value.dtype)) or _ok((value,))
        node = self.node
        # kept before it is sent (`Node.reply` sends first): a fault after this line leaves the
        # op answered, not running (`_unanswered`)
        started = node.replies.finish((source, rid), ok)
        if ok is not oks.ok:
            oks.send()
            oks.ok = ok
        oks.rids.append(rid)
        if started is not None:  # `NodeFigures.finished` for an Ok, inline
            latencies = node.figures.latencies.by_key
            hist = latencies.get("Op")
            if hist is None:
                hist = latencies["Op"] = metrics.Histogram()
            hist.observe(time.monotonic() - started[1])

    def _lane_run(self, source: str, rid: bytes, msg: wire.Op, result: Entry) -> _Run:
        """The per-op path's `_Run` of a lane's op, for `_finish` (its errors)."""
        entries = self.store.entries
        inputs = {a.obj_id: entries[a.obj_id] for a in msg.args if type(a) is wire.Ref}
        return _Run(
            source, rid, (msg,), (inputs,), (result,), inputs, None, [(msg.result_id, msg.result_id, result)], False
        )

    def _operands(self, msg: wire.Op, source: str) -> tuple[dict[int, Entry], str | None, bool]:
        """The op's stored operands by id, each checked against its owner and sponsor, the
        worker they point to (None: they are here), and whether any is private (has origins).
        One pass: this runs for every op."""
        if msg.op not in ALLOWED:
            raise OpNotAllowedError("", f"operation {msg.op!r} is not allowed")
        if msg.kwargs or msg.op in ALIASING:  # what check_call refuses needs one or the other
            policy.check_call(msg.op, msg.args, msg.kwargs, _is_ref)
        if msg.more_ids:
            guard.check_results(msg.op, 1 + len(msg.more_ids))
            if len({msg.result_id, *msg.more_ids}) != 1 + len(msg.more_ids) or any(
                i in self.store.entries for i in msg.more_ids
            ):
                raise InvalidArgumentError("an operation's result ids are distinct and new")
        ids: set[int] = set()
        wire.refs(msg.args, ids)
        if msg.kwargs:
            wire.refs(msg.kwargs, ids)
        principal = msg.sponsor or source
        entries: dict[int, Entry] = {}
        locations: set[str] = set()
        location: str | None = None
        failed: BaseException | None = None
        tainted = False
        stored = self.store.entries
        for i in ids:
            e = stored.get(i)  # an operand of the caller's own: read here, a call less per operand
            if e is None or e.owner != source:
                e = self.store.get(i, source)  # raises ObjectNotFoundError or PermissionDenied, as the owner decides
            entries[i] = e
            if e.sponsor:  # only an object held for a client can refuse a principal: a call less per operand
                self.store.check_principal(i, e, principal)
            if e.taint.origins:
                tainted = True
            location = e.location
            locations.add(location or self.name)
            if location is not None and e.error is not None:
                failed = e.error  # a pointer whose hop failed
        if len(locations) > 1:
            a, b = sorted(locations)[:2]
            raise LocationMismatchError(f"operands live on different workers: {a!r} and {b!r}")
        if failed is not None:
            raise failed
        return entries, location, tainted

    def _result_taint(
        self, msg: wire.Op, entries: dict[int, Entry], source: str, temporaries: Iterable[Entry] = ()
    ) -> policy.Taint:
        """The rule (`policy.result_taint`) applied to an op as it arrives: its operands, the one
        it may write (its first positional argument), whether a forward's model may have state
        to write, and, for a backward, what may get a gradient: every model and gradient-tracking
        tensor of the caller, and a plan's `temporaries` (its results so far, not computed yet)."""
        if msg.op not in policy.TAINT_RULES:  # no operand is written: the operands decide alone
            return policy.result_taint(msg.op, entries.values())
        first = msg.args[0] if msg.args else None
        target_id = first.obj_id if type(first) is wire.Ref else 0
        target = entries.get(target_id) if type(first) is wire.Ref else None
        if msg.op == "forward":
            return policy.result_taint(
                "forward", entries.values(), target, target_id, writes_state=target is not None and _has_state(target)
            )
        if msg.op == "backward":
            gradients = itertools.chain(self._gradient_holders(source), temporaries)
            return policy.result_taint("backward", entries.values(), target, target_id, gradients=gradients)
        return policy.result_taint(msg.op, entries.values(), target, target_id)

    def _gradient_holders(self, source: str) -> Iterator[Entry]:
        """`source`'s models and gradient-tracking tensors held here (a backward may reach them)."""
        for e in self.store.entries.values():
            if e.owner == source and e.location is None:
                value = e.value
                if isinstance(value, torch.nn.Module) or getattr(value, "requires_grad", False):
                    yield e

    # --- plans ---------------------------------------------------------------------------
    def put_plan(self, source: str, rid: bytes, msg: wire.PutPlan, budget: float) -> None:
        self.plans.put(source, msg.plan_id, plans.validate(msg))
        self.node.reply(source, rid, wire.Ok())

    def run_plan(self, source: str, rid: bytes, msg: wire.RunPlan, budget: float) -> None:
        """Run a plan as its operations would run one by one: taints decided now, in order, by
        `_result_taint`; values computed on the single ops' path (`_start`). Only the outputs are
        stored."""
        plan = self.plans.get(source, msg.plan_id)
        if len(msg.inputs) != plan.n_inputs or len(msg.result_ids) != len(plan.outputs):
            raise InvalidArgumentError(
                f"plan {msg.plan_id} takes {plan.n_inputs} inputs and makes {len(plan.outputs)} outputs"
            )
        if len(set(msg.result_ids)) != len(msg.result_ids) or any(i in self.store.entries for i in msg.result_ids):
            raise InvalidArgumentError("a run's result ids are distinct and new")
        try:
            slots = [self.store.get(i, source) for i in msg.inputs]
            for obj_id, e in zip(msg.inputs, slots, strict=True):
                self.store.check_principal(obj_id, e, source)
                if e.is_pointer:
                    raise InvalidArgumentError(f"a plan runs where its inputs are: object {obj_id} is a pointer")
            self.store.admit(source, len(msg.result_ids))  # all its outputs are stored, or none
            if plan.steps is not None:
                self._run_lean(source, rid, msg, plan, slots)
                return
            # the intermediate results' entries stay pending: they are never stored,
            # awaited or listed, only asked for their taint (and counted as state a forward may write)
            operands: list[dict[int, Entry]] = []
            firsts: list[Entry] = []
            for op, reads in zip(plan.ops, plan.reads, strict=True):
                temporaries = slots[plan.n_inputs :] if op.op == "backward" else ()
                operands.append({s: slots[s] for s in reads})
                taint = self._result_taint(op, operands[-1], source, temporaries)
                slots.append(Entry(owner=source, taint=taint))
                firsts.append(slots[-1])  # whose taint says whether the op runs as private
                slots.extend(Entry(owner=source, taint=_copy(taint)) for _ in op.more_ids)
        except Exception as e:
            for result_id in msg.result_ids:
                self._store_failed(result_id, source, e)
            raise
        outputs: list[tuple[int, int, Entry]] = []
        for result_id, out in zip(msg.result_ids, plan.outputs, strict=True):
            result = Entry.tensor(owner=source, taint=slots[out].taint)
            self.store.add(result_id, result)
            outputs.append((out, result_id, result))
        inputs = dict(enumerate(slots[: plan.n_inputs]))
        # its ops may include `requires_grad_`: its graph is recorded whatever its inputs are
        run = _Run(source, rid, plan.ops, operands, firsts, inputs, msg.inputs, outputs, plan=True, graph=Recorder())
        self._start(run)

    def _run_lean(self, source: str, rid: bytes, msg: wire.RunPlan, plan: plans.Plan, inputs: list[Entry]) -> None:
        """Run a plan of plain operations (`plan.steps`): every taint is decided now, at once,
        from the inputs' (nodes/plans.py says why that is the per-operation rule's verdict), and
        the values are computed by `_compute_lean`."""
        assert plan.steps is not None
        origins = [e.taint.origins for e in inputs]
        tainted = 0
        for i, o in enumerate(origins):
            if o:
                tainted |= 1 << i
        lean = _Lean(plan.steps, plan.deps, origins, tainted, plan.outputs, plan.quick, plan.widest)
        outputs: list[tuple[int, int, Entry]] = []
        for result_id, out in zip(msg.result_ids, plan.outputs, strict=True):
            result = Entry.tensor(owner=source, taint=lean.taint(out))
            self.store.add(result_id, result)
            outputs.append((out, result_id, result))
        run = _Run(source, rid, plan.ops, (), (), dict(enumerate(inputs)), msg.inputs, outputs, plan=True, lean=lean)
        self._start(run)

    # --- the one execution path of ops and plan runs -------------------------------------
    def _start(self, run: _Run) -> None:
        """Compute `run` now when its inputs are there, as far as `_compute` runs inline, and
        the rest later (`_later`): this peer's later requests wait until it is done."""
        versions: dict[int, int] = {}
        values = _values(run, versions)
        done = 0
        if values is not None:
            try:
                done = self._compute(run, values, 0, True)  # (positional: per op)
            except Exception as e:
                self._finish(run, values, versions, e)
                return
            if done == len(run.ops):
                self._finish(run, values, versions, None)
                return
        self.node.compute_later(self._later(run, values, versions, done), run.source, run.rid)

    async def _later(self, run: _Run, values: dict[int, Any] | None, versions: dict[int, int], done: int) -> None:
        """The slow path: wait for inputs still being computed, then go on, big work on a thread."""
        error: Exception | None = None
        try:
            if values is None:
                for entry in run.inputs.values():
                    await entry.wait()  # raises the error an input failed with
                values = _values(run, versions)
                assert values is not None  # every input settled without an error
                done = self._compute(run, values, 0, True)  # (positional: per op)
            if done < len(run.ops):
                await self.scheduler.offload(self._compute, run, values, done)
        except Exception as e:
            # without frames: this coroutine's is among them, and `error` kept in it was a cycle
            # holding the run's values (and its context's frames, the thread's) until the cyclic
            # GC ran, which on a node waits for NODE_GC_THRESHOLD allocations
            error = without_frames(e)
        if values is None:
            versions.clear()  # an input failed before anything ran: no input was changed
        self._finish(run, values or {}, versions, error)

    def _compute(self, run: _Run, values: dict[int, Any], start: int, inline: bool = False) -> int:
        """Compute the operations from `start` through the guard, adding each value to
        `values`; returns how many are done. `inline` (on the event loop) stops before an
        operation whose operands are big, or after `limits.PLAN_INLINE_OPS`."""
        graph = run.graph
        if graph is not None and not graph.active:
            with graph:  # what its ops save for backward is recorded, to be charged by `_finish`
                return self._compute(run, values, start, inline)
        if run.lean is not None:
            return self._compute_lean(run.lean, values, start, inline)
        for i in range(start, len(run.ops)):
            op = run.ops[i]
            entries = run.operands[i]
            # a single op reads exactly its inputs: `values` itself, before its result is added
            single = run.ids is None
            operands = values if single else {k: values[k] for k in entries}
            # private when its result is (taint only grows: never less than on arrival)
            private = bool(run.results[i].taint.origins)
            if inline and (
                i - start >= limits.PLAN_INLINE_OPS
                or (run.numel if single else _numel(operands.values())) > self.config.offload_numel
                or (private and not guard.is_warm())  # the meta kernels load on the thread, not the loop
            ):
                return i
            # through the guard (nodes/guard.py): on private operands, no value can steer a
            # size, an error or whether it succeeds; as many results as the op has ids
            args = _materialize(op.args, operands)
            kwargs = _materialize(op.kwargs, operands) if op.kwargs else {}
            # the refusal is wanted on private operands only: no closure made for every public op
            refuse = _refusal(op.op, operands, entries) if private else _public
            results = guard.run(op.op, args, kwargs, private, refuse, 1 + len(op.more_ids))
            values[op.result_id] = results[0]
            if op.more_ids:
                for key, value in zip(op.more_ids, results[1:], strict=True):
                    values[key] = value
        return len(run.ops)

    def _compute_lean(self, lean: _Lean, values: dict[int, Any], start: int, inline: bool) -> int:
        """`_compute` for a plan of plain operations. A public operation whose inputs are all
        tensors calls its kernel directly; anything else (a private operation, a model among the
        inputs) goes through `guard.run` as a single op does. A view operation's result is
        copied at once (`Step.view`); any other result may share storage with what it reads
        (`float` of a float returns it): no plain operation writes an operand, so that is unseen
        until the run ends, when each output that shares storage with an input, an input's
        gradient or another output is copied (`_unalias`), as `guard.run` copies a single op's
        result. A check per result cost ~0.35 µs of the ~1.3 µs each operation takes.

        A run with no private input and no model among its inputs takes its `Quick` steps in
        `_quick`, a loop with nothing else per step (decided once per run: every result of such
        a run is public, and every operand a tensor)."""
        steps = lean.steps
        # whether every input is a tensor (then a public step calls its kernel directly), and,
        # inline, the most elements of any value so far: a step reads at most that many per
        # operand, so most steps need not add up their operands' sizes. One pass over the
        # inputs: inline runs start at step 0, when the values are the inputs alone
        direct, peak = True, 0
        for i in range(len(lean.origins)):
            v = values[i]
            if not isinstance(v, torch.Tensor):
                direct = False
            elif inline and (n := v.numel()) > peak:
                peak = n
        stop = min(len(steps), start + limits.PLAN_INLINE_OPS) if inline else len(steps)
        quick = lean.quick if direct and not lean.tainted else None
        # while no value holds more than `bound` elements, no step reads more than `offload`
        # in all (at most `widest` operands): quick steps need no size check of their own
        bound = self.config.offload_numel // lean.widest if inline else sys.maxsize
        i = start
        while i < stop:
            if quick is not None and quick[i] is not None and peak <= bound:
                i, peak = _quick(quick, values, i, stop, peak, bound)
                continue
            grown = self._lean_step(lean, steps[i], values, direct, inline, peak)
            if grown is None:
                return i  # the rest on the thread
            peak = grown
            i += 1
        if stop == len(steps):
            _unalias(lean, values)
        return stop

    def _lean_step(
        self, lean: _Lean, step: plans.Step, values: dict[int, Any], direct: bool, inline: bool, peak: int
    ) -> int | None:
        """Compute one step of a lean run (`_compute_lean`); returns the most elements of any
        value so far (`peak`, inline), or None when the step must not run inline."""
        op, fn, step_args, step_kwargs, reads, result, count, refs, pick, spread, view, frees = step
        tainted = lean.tainted
        private = tainted and lean.deps[result] & tainted
        offload = self.config.offload_numel
        if inline and (
            (peak * len(reads) > offload and _numel(values[s] for s in reads) > offload)
            or (private and not guard.is_warm())  # the meta kernels load on the thread, not the loop
        ):
            return None
        if pick is not None:
            args: Any = pick(values) if spread else (pick(values),)
            kwargs: dict[str, Any] = {}
        else:
            if refs is None:
                args = _materialize(step_args, values)
            else:
                args = step_args.copy()
                for pos, slot in refs:
                    args[pos] = values[slot]
            kwargs = _materialize(step_kwargs, values) if step_kwargs else {}
        if direct and not private:
            value = fn(*args, **kwargs) if kwargs else fn(*args)
            if count == 1 and type(value) is torch.Tensor and not view:  # the common case: no calls
                results: tuple[torch.Tensor, ...] = (value,)
            else:
                results = kernels.results(kernels.checked(op, value), count)
                if view:
                    results = tuple(guard.unshared(r, args, kwargs) for r in results)
        else:
            results = guard.run(op, args, kwargs, bool(private), self._refusal(lean, step, values), count)
        for key, r in enumerate(results, result):
            values[key] = r
            if inline and (n := r.numel()) > peak:
                peak = n
        for s in frees:
            del values[s]
        return peak

    @staticmethod
    def _refusal(lean: _Lean, step: plans.Step, values: dict[int, Any]) -> Callable[[], Exception]:
        """The refusal of `step` on private data, as `_compute` words it for the same operation."""

        def refuse() -> Exception:
            operands = [values[s] for s in step.reads if not lean.private(s)]
            public = [list(v.shape) for v in operands if isinstance(v, torch.Tensor)]
            return policy.refuse_op(lean.taint(step.result), step.op, public)

        return refuse

    def _finish(self, run: _Run, values: dict[int, Any], versions: dict[int, int], error: Exception | None) -> None:
        """Store the outputs and answer once they, and every input the run changed in place
        (`versions`: the input tensors' versions before it ran), are durable. A failed run fails
        every output; the inputs it changed are persisted all the same (disk follows memory)."""
        durable: list[asyncio.Future[None] | None] = []
        outputs: list[torch.Tensor] = []
        # A single in-place op's result is an alias of its target, which the client deletes once
        # the update settled (a delete nothing acknowledges): stored, a crash before that delete
        # landed would bring it back as a copy. It lives in memory only; the target, changed,
        # is persisted below.
        alias = not run.plan and run.ops[0].op in MUTATING
        if error is None:
            try:
                graph = run.graph
                for key, obj_id, result in run.outputs:
                    value = values[key]
                    outputs.append(value)
                    durable.append(self.store.commit(obj_id, result, value, not alias))  # (not alias: durable)
                if graph is not None or alias:  # (an in-place op may be `set_grad`)
                    results = [result for *_, result in run.outputs]
                    if graph is not None and (graph.storages or graph.saved) and results:
                        # the graph lives as long as the outputs holding it: charged to their client;
                        # after they are, so that a saved result is charged once
                        self.store.hold_graph(results[0].account, graph, [*run.inputs.values(), *results])
                    if graph is not None and any(op.op in _GROWERS for op in run.ops):
                        # a backward may give any of the caller's stored values a gradient
                        self.store.recharge(itertools.chain(self._gradient_holders(run.source), run.inputs.values()))
                    elif alias:
                        self.store.recharge(run.inputs.values())
            except Exception as e:
                error = without_frames(e)  # its frames include this one (see `_later`)
                # the results committed before the refused one (or all, the graph refused) are
                # failed below: none may stay charged or written ahead
                for _, obj_id, result in run.outputs[: len(durable) + 1]:
                    durable.append(self.store.uncommit(obj_id, result))
        for key, before in versions.items():
            value = values[key]  # the input tensor the run read (its entry's value)
            if value._version != before:
                durable.append(self.store.persist(key if run.ids is None else run.ids[key], run.inputs[key], value))
        if self.store.wal is not None:  # a model among the inputs that the run changed (its mode, buffers) too
            for key, entry in run.inputs.items():
                if key not in versions:
                    durable.append(self.store.persist_changed(key if run.ids is None else run.ids[key], entry))
        if error is not None:
            err = error if isinstance(error, FedptrError) else _remote(error, self.name)
            for _, _, result in run.outputs:
                if not result.settled:
                    result.fail(err)
            # answered once disk agrees with memory (what was removed, what the inputs became)
            self.node.reply_durable(all_written(durable), run.source, run.rid, failure_from_error(err, self.name))
            return
        for i, (_, _, result) in enumerate(run.outputs):  # one value per output, as committed above
            result.settle(outputs[i])
        reply: wire.Message
        written = all_written(durable) if any(durable) else None  # nothing queued: no call (per op)
        if run.plan:
            reply = wire.PlanReply([list(v.shape) for v in outputs], [dtype_name(v.dtype) for v in outputs])
            if written is None:
                # the get of an output usually came in the same multipart as the run, and is
                # answered in this loop turn: both replies then leave as one multipart
                self.node.link.hold_turn()
        else:
            # the table read here (a call less per op); `_ok` builds and keeps what it lacks
            first = outputs[0]
            known = _OKS.get((first.shape, first.dtype)) if len(outputs) == 1 else None
            reply = known if known is not None else _ok(outputs)
        if written is None:  # nothing to wait for: answered now, without `reply_durable`'s hop (per op)
            self.node.reply(run.source, run.rid, reply)
        else:
            self.node.reply_durable(written, run.source, run.rid, reply)

    def _store_failed(self, result_id: int, source: str, e: BaseException, sponsor: str = "") -> None:
        """Keep `result_id` as failed with `e`, so requests pipelined behind it fail the same way."""
        failed = Entry.tensor(owner=source)
        failed.sponsor = sponsor
        failed.fail(e if isinstance(e, FedptrError) else _remote(e, self.name))
        with contextlib.suppress(InvalidArgumentError, QuotaExceededError):  # then not found, as failed
            self.store.add(result_id, failed)

    def _relayed(
        self, source: str, rid: bytes, forwarded: asyncio.Future[wire.Message], ids: list[int], ptrs: list[Entry]
    ) -> None:
        error = forwarded.exception()
        if error is not None:
            err = with_hop(error, self.name)
            for ptr in ptrs:
                ptr.fail(err)
            self.node.reply_error(source, rid, err)
        else:
            for ptr in ptrs:
                ptr.settle(None)
            durable = all_written([self.store.commit(i, p) for i, p in zip(ids, ptrs, strict=True)])
            self.node.reply_durable(durable, source, rid, forwarded.result())


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
        out = []
        for v in value:  # a loop, not a list comprehension (a call more in 3.11): this runs per op
            out.append(tensors[v.obj_id] if type(v) is wire.Ref else _materialize(v, tensors))
        return out
    if t is dict:
        return {k: _materialize(v, tensors) for k, v in value.items()}
    return value


_SCALARS = (int, float, bool)
"""The plain arguments an op on the lane (`Compute.ops`) may take besides its operands."""

_LANE: dict[str, Callable[..., Any]] = {
    name: fn
    for name, fn in kernels.OPERATIONS.items()
    if name in ALLOWED and name not in ALIASING | MUTATING | AGGREGATES | policy.TAINT_RULES | kernels.MODEL_ONLY
}
"""The ops `Compute.ops` runs on its lane, with their kernels: plain ones, which write no
operand, alias none, release nothing and need no model."""

_GROWERS = frozenset({"backward", "set_grad", "set_data"})
"""Ops that make stored values hold more (gradients, a bigger storage), which the store then charges."""

_OKS: dict[tuple[torch.Size, torch.dtype], wire.Ok] = {}
"""The `Ok` of one result, by its shape and dtype: nearly every op is answered with one of a few,
and a message takes about 1 µs to build (up to `limits.OK_HEADER_TABLE_SIZE`, as the wire's
table of their encodings). Shared safely: a message is never changed once built."""


def _ok(outputs: Sequence[torch.Tensor]) -> wire.Ok:
    """The answer to an op that computed `outputs`: their shapes and dtypes."""
    first = outputs[0]
    if len(outputs) == 1:
        key = (first.shape, first.dtype)
        ok = _OKS.get(key)
        if ok is None:
            ok = wire.Ok(list(first.shape), dtype_name(first.dtype))
            if len(_OKS) < limits.OK_HEADER_TABLE_SIZE:
                _OKS[key] = ok
        return ok
    more: list[wire.Value] = [[list(v.shape), dtype_name(v.dtype)] for v in outputs[1:]]
    return wire.Ok(list(first.shape), dtype_name(first.dtype), more)


def _quick(
    quick: Sequence[plans.Quick | None], values: dict[int, Any], i: int, stop: int, peak: int, bound: int
) -> tuple[int, int]:
    """Compute the quick steps of a public run from step `i` on, until `stop`, a step that is
    not quick, or a value of more than `bound` elements; returns where it stopped and the most
    elements of any value so far (`peak`). Per step: the kernel, a type check, the slot."""
    while i < stop:
        q = quick[i]
        if q is None:
            break
        op, fn, pick, spread, result, frees = q
        value = fn(*pick(values)) if spread else fn(pick(values))
        if type(value) is not torch.Tensor:  # a subclass, or not a tensor: what `kernels.checked` says
            (value,) = kernels.results(kernels.checked(op, value), 1)
        values[result] = value
        for s in frees:
            del values[s]
        i += 1
        if (n := value.numel()) > peak:
            peak = n
            if n > bound:
                break
    return i, peak


def _unalias(lean: _Lean, values: dict[int, Any]) -> None:
    """Copy each output of a lean run that shares storage with an input (or its gradient) or an
    earlier output: a later write to one stored object must not change another, whose taint
    would not follow. The inputs are read now, at the run's end: their gradients may have
    changed since it started (a run offloaded to a thread)."""
    held: set[int] = set()
    for i in range(len(lean.origins)):
        v = values[i]
        if isinstance(v, torch.Tensor):
            held.update(_storages(v))
    for slot in lean.outputs:
        r = values[slot]
        if r.numel():
            storage = r.untyped_storage().data_ptr()
            if storage in held:
                r = values[slot] = r.clone()
                storage = r.untyped_storage().data_ptr()
            held.add(storage)


def _storages(t: torch.Tensor) -> tuple[int, ...]:
    """Where `t`'s data is, and its gradient's when it has one `guard` would read: what a
    result must not share (guard.unshared)."""
    storage = t.untyped_storage().data_ptr()
    grad = t.grad if t.is_leaf or t.retains_grad else None
    return (storage,) if grad is None else (storage, grad.untyped_storage().data_ptr())


def _numel(values: Iterable[Any]) -> int:
    n = 0
    for v in values:  # a loop, not sum() over a generator: this runs for every operation
        if isinstance(v, torch.Tensor):
            n += v.numel()
    return n


def _copy(taint: policy.Taint) -> policy.Taint:
    """A taint of its own with `taint`'s origins: another result of the same op, which derives
    from what the first does but is a separate storage (its taint grows on its own)."""
    return policy.Taint(dict(taint.origins))


def _has_state(entry: Entry) -> bool:
    """Whether `entry` may be a model with buffers (a forward may write them); unknown counts."""
    if not entry.ok:
        return True
    value = entry.value
    return isinstance(value, torch.nn.Module) and any(True for _ in value.buffers())


def _values(run: _Run, versions: dict[int, int]) -> dict[int, Any] | None:
    """The values of `run`'s inputs by key when every one is settled without an error, else
    None; the version counter of each tensor among them goes into `versions` (an in-place
    update bumps it: the run persists the inputs it changed), their elements into `run.numel`,
    and the run records what it saves for backward (`run.graph`) when one tracks gradients or
    is a model. One pass: this runs for every operation."""
    values = {}
    graph = False
    numel = 0
    for i, e in run.inputs.items():
        if not e.settled or e.error is not None:
            return None
        value = values[i] = e.value
        if isinstance(value, torch.Tensor):
            versions[i] = value._version
            numel += value.numel()
            if value.requires_grad:
                graph = True
        else:  # a model
            graph = True
    run.numel = numel
    if graph and run.graph is None:
        run.graph = Recorder()
    return values


def _refusal(op: str, values: dict[int, Any], entries: dict[int, Entry]) -> Callable[[], Exception]:
    """The refusal of `op` on private operands `entries` (their `values`): the owners, and the
    shapes of the public tensor operands only."""

    def refuse() -> Exception:
        taint = policy.Taint(policy.merge(e.taint.origins for e in entries.values()))
        public = [list(v.shape) for i, v in values.items() if isinstance(v, torch.Tensor) and not entries[i].taint]
        return policy.refuse_op(taint, op, public)

    return refuse


def _public() -> Exception:
    raise AssertionError("guard.run refuses only operations on private operands")


def _is_ref(value: Any) -> bool:
    return type(value) is wire.Ref


def _remote(e: BaseException, worker: str) -> RemoteError:
    return RemoteError(type(e).__name__, str(e), worker, [worker])
