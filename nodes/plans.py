"""Plans on a node: graphs of allow-listed operations a client sends once and runs by id.

A plan (PySyft's Part 8) arrives as `wire.PutPlan` and is checked here, in full, before it is
kept: every operation is on the allow-list (aggregates excepted: they are released one by one),
every reference names an earlier slot, every output an operation's result. A run
(`wire.RunPlan`) is one message; the node runs it exactly as it runs the same operations sent
one at a time (nodes/compute.py): each result's taint is decided as the run arrives, by the same
rule, and each value is computed through the same guard. Only the intermediate results differ:
they are never stored, listed or fetchable, and leave nothing to delete.

Most plans are chains of plain operations (arithmetic, matmul, activations): none writes an
operand, reads a model or gives a gradient, so every result derives from exactly the inputs it
reads, transitively. For those `validate` also prepares `steps`: each operation's kernel, its
arguments decoded once (and, when they are all references, one call that takes them from the
values), which inputs each slot derives from (`deps`, a bitmask), which results are views
(copied at once) and after which step each intermediate is read no more (then dropped). A run then
decides every taint at once from its inputs' (the per-operation rule gives the same: a plain
operation's result derives from the union of its operands') and computes the values in a lean
loop (nodes/compute.py) instead of one stored-entry record per operation. Plans with any other
operation run op by op, as before.

Plans are kept per client, in memory: a node restart or the client's departure forgets them
(the client sends a plan again after a run fails).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from fedptr import limits, wire
from fedptr.errors import InvalidArgumentError, ObjectNotFoundError, OpNotAllowedError, OverloadedError
from fedptr.opinfo import REGISTRY, Effect
from fedptr.ops import AGGREGATES, ALLOWED

from . import guard, kernels, policy


class Step(NamedTuple):
    """One operation of a plan that runs lean, prepared once: torch's kernel, the arguments with
    their tagged values (dtypes, devices) decoded and their references to slots left in place,
    the slots it reads, and the first of its `n_results` result slots. A tuple: the lean loop
    unpacks it in one go, faster than reading its fields one by one."""

    op: str
    fn: Callable[..., Any]
    args: list[Any]
    kwargs: dict[str, Any]
    reads: tuple[int, ...]
    result: int
    n_results: int
    refs: tuple[tuple[int, int], ...] | None
    """For flat positional arguments (no list or map among them): (position, slot) of each
    reference, filled in place of walking them (`_materialize`); None otherwise."""
    pick: Callable[[Mapping[int, Any]], Any] | None
    """When every argument is a positional reference (``y + x``, ``relu(y)``): what takes them
    from the values by slot at once, a tuple of them when `spread` (more than one), else the one
    value; None otherwise (`args` is filled by `refs`, or walked)."""
    spread: bool
    view: bool
    """Whether torch gives a view of an operand (`opinfo.Effect.VIEW`): the lean loop copies it
    at once, as a single op's result is, so no later step reads a view bigger than its storage
    (``expand`` to 2^40 elements of one) and no output keeps a bigger intermediate's storage
    alive while charged for its own elements (``getitem(repeat(p, 1024, 1024), 0, 0)``)."""
    frees: tuple[int, ...]
    """The slots no later step reads and the run does not store: dropped after this step."""


class Quick(NamedTuple):
    """A step of the commonest kind (one result, not a view, every argument a positional
    reference: ``y + x``, ``relu(y)``) as a run on public tensors takes it: only what its
    kernel call and the result's slot need (`Step`'s fields of the same names)."""

    op: str
    fn: Callable[..., Any]
    pick: Callable[[Mapping[int, Any]], Any]
    spread: bool
    result: int
    frees: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan: `ops[i]` fills the next slot (its `result_id`), and one more for each of
    its `more_ids` (an op with several results), reading the slots in `reads[i]`; `outputs` are
    the slots a run stores."""

    n_inputs: int
    ops: tuple[wire.Op, ...]
    reads: tuple[frozenset[int], ...]
    outputs: tuple[int, ...]
    steps: tuple[Step, ...] | None = None
    """The operations prepared for the lean loop; None when one of them has a taint rule of its
    own, takes a model or an inline tensor (the plan then runs op by op)."""
    deps: tuple[int, ...] = ()
    """With `steps`: for each slot, the inputs it derives from, as a bitmask (bit i: input i)."""
    quick: tuple[Quick | None, ...] = ()
    """With `steps`: each step as a `Quick` one, or None when it is not of that kind."""
    widest: int = 1
    """With `steps`: the most slots one step reads."""


def validate(msg: wire.PutPlan) -> Plan:
    """The plan `msg` describes. Raises OpNotAllowedError for an operation off the allow-list and
    InvalidArgumentError for anything else malformed (limits, references, outputs)."""
    if not 0 <= msg.n_inputs <= limits.MAX_PLAN_INPUTS:
        raise InvalidArgumentError(f"a plan takes 0 to {limits.MAX_PLAN_INPUTS} inputs, not {msg.n_inputs}")
    if not 1 <= len(msg.ops) <= limits.MAX_PLAN_OPS:
        raise InvalidArgumentError(f"a plan has 1 to {limits.MAX_PLAN_OPS} operations, not {len(msg.ops)}")
    ops: list[wire.Op] = []
    reads: list[frozenset[int]] = []
    slot = msg.n_inputs
    for i, item in enumerate(msg.ops):
        if not (type(item) is list and len(item) in (3, 4) and type(item[0]) is str):
            raise InvalidArgumentError(f"plan operation {i} is not [op, args, kwargs] or [op, args, kwargs, results]")
        name, args, kwargs, *counted = item
        count = counted[0] if counted else 1
        if type(args) is not list or type(kwargs) is not dict or type(count) is not int:
            raise InvalidArgumentError(f"plan operation {i} is not [op, args, kwargs] or [op, args, kwargs, results]")
        if name not in ALLOWED or name in AGGREGATES:
            raise OpNotAllowedError("", f"operation {str(name)[:64]!r} is not allowed in a plan")
        policy.check_call(name, args, kwargs, lambda v: type(v) is wire.Ref)
        if count != 1:
            guard.check_results(name, count)
        found: set[int] = set()
        wire.refs(args, found)
        wire.refs(kwargs, found)
        if not found:
            raise InvalidArgumentError(f"plan operation {i} ({name}) reads no slot")
        if not all(0 <= s < slot for s in found):
            raise InvalidArgumentError(f"plan operation {i} ({name}) reads a slot that is not filled before it")
        ops.append(wire.Op(slot, name, args, kwargs, more_ids=list(range(slot + 1, slot + count))))
        reads.append(frozenset(found))
        slot += count
    end = slot
    if len(set(msg.outputs)) != len(msg.outputs) or not all(msg.n_inputs <= o < end for o in msg.outputs):
        raise InvalidArgumentError("a plan's outputs are distinct results of its operations")
    plan = Plan(msg.n_inputs, tuple(ops), tuple(reads), tuple(msg.outputs))
    steps = _steps(plan)
    if steps is None:
        return plan
    deps = [1 << i for i in range(plan.n_inputs)]
    for step in steps:
        derived = 0
        for s in step.reads:
            derived |= deps[s]
        deps.extend([derived] * step.n_results)
    quick = tuple(
        Quick(s.op, s.fn, s.pick, s.spread, s.result, s.frees)
        if s.pick is not None and s.n_results == 1 and not s.view
        else None
        for s in steps
    )
    widest = max(len(s.reads) for s in steps)
    return Plan(plan.n_inputs, plan.ops, plan.reads, plan.outputs, steps, tuple(deps), quick, widest)


def _steps(plan: Plan) -> tuple[Step, ...] | None:
    """`plan`'s operations prepared for the lean loop, or None when one of them may write an
    operand or a model, give gradients (`policy.TAINT_RULES`), takes a model
    (`kernels.MODULE_OPS`: its checks read the model), or carries an inline tensor (made afresh
    by each run, and an operand the alias check must see), or a tag that does not decode."""
    steps = []
    for op, reads in zip(plan.ops, plan.reads, strict=True):
        if op.op in policy.TAINT_RULES or op.op in kernels.MODULE_OPS or _has_raw(op.args) or _has_raw(op.kwargs):
            return None
        try:
            args, kwargs = kernels.decode(op.args), kernels.decode(op.kwargs)
        except ValueError:
            return None  # the run fails as the operation alone would
        flat = not any(type(a) is list or type(a) is dict for a in args)
        refs = tuple((i, a.obj_id) for i, a in enumerate(args) if type(a) is wire.Ref) if flat else None
        only_refs = refs is not None and not kwargs and len(refs) == len(args)
        pick = operator.itemgetter(*(slot for _, slot in refs)) if refs and only_refs else None
        count = 1 + len(op.more_ids)
        fn = kernels.OPERATIONS[op.op]
        view = REGISTRY[op.op].effect is Effect.VIEW
        steps.append(
            Step(op.op, fn, args, kwargs, tuple(reads), op.result_id, count, refs, pick, len(args) > 1, view, ())
        )
    # each result the run does not store is dropped after the last step that reads it (at once
    # when none does): a chain then holds a few values, not one per operation, and torch's
    # allocator reuses the memory still in cache
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        for s in range(step.result, step.result + step.n_results):
            last[s] = i
        for s in step.reads:
            last[s] = i
    frees: list[list[int]] = [[] for _ in steps]
    for s, i in last.items():
        if s >= plan.n_inputs and s not in plan.outputs:
            frees[i].append(s)
    return tuple(step._replace(frees=tuple(f)) for step, f in zip(steps, frees, strict=True))


def _has_raw(value: Any) -> bool:
    if type(value) is wire.RawTensor:
        return True
    if type(value) is list:
        return any(_has_raw(v) for v in value)
    if type(value) is dict:
        return any(_has_raw(v) for v in value.values())
    return False


class Plans:
    """The plans each client keeps on this node, at most `limits.MAX_PLANS_PER_PEER` each."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._by_peer: dict[str, dict[int, Plan]] = {}

    def put(self, peer: str, plan_id: int, plan: Plan) -> None:
        """Keep `plan` for `peer` (replacing a plan of that id). Raises OverloadedError when the
        peer keeps too many."""
        kept = self._by_peer.setdefault(peer, {})
        if plan_id not in kept and len(kept) >= limits.MAX_PLANS_PER_PEER:
            raise OverloadedError(self.node, f"{len(kept)} plans are kept for this client already")
        kept[plan_id] = plan

    def get(self, peer: str, plan_id: int) -> Plan:
        """`peer`'s plan `plan_id`; raises ObjectNotFoundError (never sent, or forgotten by a restart)."""
        plan = self._by_peer.get(peer, {}).get(plan_id)
        if plan is None:
            raise ObjectNotFoundError("", f"no plan {plan_id} (never sent, or this worker restarted)")
        return plan

    def forget(self, peers: set[str]) -> None:
        """Drop the plans of peers whose sessions ended."""
        for peer in peers:
            self._by_peer.pop(peer, None)
