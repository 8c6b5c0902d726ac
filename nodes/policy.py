"""The privacy policy a node enforces: what derives from private data, and how it may leave.

This file is the whole rule, as pure functions of what the node knows when a request arrives
(operand taints, which operand is written, the op's name); nodes/compute.py, nodes/release.py
and nodes/secure.py call them and do nothing policy-relevant of their own.

Every stored entry carries a `Taint`: the data owners whose private data its value derives
from, each with the workers that owner trusts. Taint belongs to the *storage*, not to a Python
tensor: every operation's result is a fresh copy, except where aliasing is the point (an
in-place op's result is its target, a model's parameter is the model's), and those share one
`Taint` object, so a write through any alias taints them all. Taint is decided when a request
arrives, in arrival order, and only ever grows:

* an operation's result derives from the union of its operands;
* an in-place update adds its operands to its target (private data itself is read-only);
* `backward` on a tainted loss taints every model and gradient-tracking tensor of its caller;
* a call that could write anything but its first positional argument (``out=``, ``inplace=``)
  is refused, so that the written object is always the one the rule sees (`check_call`).

What may leave (`release_kind`): public values; values every owner of which runs with
``--release exact`` (no protection against the analyst: PySyft 0.2's model); and the outputs of
the DP mechanisms in `nodes/mechanisms.py`. Moves go only to workers every owner trusts.
Origins are set by the node that loads the data; a value received from a peer keeps the origins
the peer stated (a claim can only add restrictions, never lift one).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedptr import limits
from fedptr.errors import OpNotAllowedError, PermissionDenied
from fedptr.ops import ALIASING, MUTATING, WRITING_KEYWORDS

Origins = dict[str, frozenset[str]]
"""Data owner -> the workers it trusts with what derives from its data."""

ANALYST = "*"
"""In an owner's trust set: ``--release exact``, the analyst may fetch exact derived values."""

TAINT_RULES = ALIASING | {"forward", "backward"}
"""Operations whose result taint `result_taint` decides by a rule of their own (a shared taint,
a write to a model, gradients everywhere), even on public operands."""

TARGET_KEYWORDS = frozenset({"self", "t", "input", "tensor", "model"})
"""Names the first parameter of an aliasing operation goes by: its target is given by position."""


@dataclass(eq=False, slots=True)
class Taint:
    """The origins of one storage, shared by every entry that aliases it, from the first alias
    on: an entry made for an alias takes its target's Taint object itself. It is falsy while
    empty, so code that may receive a shared one tests ``is None``, never ``or``."""

    origins: Origins = field(default_factory=dict)

    def add(self, origins: Origins) -> None:
        """Derive from `origins` too (taint only grows)."""
        if origins:
            self.origins = merge([self.origins, origins])

    def __bool__(self) -> bool:
        return bool(self.origins)

    @property
    def owners(self) -> list[str]:
        """The data owners, sorted."""
        return sorted(self.origins)


@dataclass
class PolicyConfig:
    """What a node's flags set."""

    name: str
    trust: frozenset[str] = frozenset()
    """Workers this node, as a data owner, lets its private data (and what derives from it) go to."""
    release_exact: bool = False
    """``--release exact``: this owner trusts the analyst with exact derived values."""
    aggregator: bool = False
    """Whether this node releases DP aggregates of contributions."""
    owners: frozenset[str] = frozenset()
    """An aggregator's roster: the data owners whose contributions it accepts."""
    min_owners: int = limits.MIN_OWNERS
    """k: a released aggregate combines contributions of at least this many distinct owners."""

    def own_origins(self) -> Origins:
        """The origins of data this node loads."""
        trusted = self.trust | ({ANALYST} if self.release_exact else frozenset())
        return {self.name: frozenset(trusted)}


class Stored(Protocol):
    """What the rule reads of a stored object (nodes/store.py's `Entry`)."""

    taint: Taint
    readonly: str
    """The data owner whose private data (or DP contribution) it is; "" for anything writable."""


class Contributed(Protocol):
    """What an aggregate's rule reads of a stored contribution."""

    @property
    def contribution(self) -> object | None: ...


def merge(all_origins: Iterable[Origins]) -> Origins:
    """The union of owners; each owner trusts what every part says it trusts (the intersection)."""
    out: Origins = {}
    for origins in all_origins:
        for owner, trusted in origins.items():
            out[owner] = out.get(owner, trusted) & trusted
    return out


def to_wire(origins: Origins) -> dict[str, Any]:
    return {owner: sorted(trusted) for owner, trusted in origins.items()}


def from_wire(data: Mapping[str, Any]) -> Origins:
    """Origins a peer stated; malformed entries raise ValueError."""
    out: Origins = {}
    for owner, trusted in data.items():
        if type(trusted) is not list or not all(type(t) is str for t in trusted):
            raise ValueError("origins must map owners to lists of worker names")
        out[owner] = frozenset(trusted)
    return out


RELEASES = (
    "only DP releases leave: fedptr.dp.train then get the model, fedptr.dp.contribute then "
    "fedptr.aggregate.mean, or fedptr.dp.secure_mean"
)
"""The DP releases, the ways out of a data owner's node, named in each refusal of a get: PySyft's
`.get()` fetched anything, and a newcomer's next question is what to call instead."""


def refuse_pinned(node: str) -> PermissionDenied:
    """The refusal of a get, move or send of the data `node` was started with (``--data``)."""
    return PermissionDenied(node, f"data a worker was started with stays there: compute on it there; {RELEASES}", node)


def release_kind(taint: Taint, released: str) -> str:
    """How a value may leave this node: ``"public"``, ``"exact"``, a mechanism's kind (``"dp"``),
    or raise PermissionDenied naming an owner."""
    if not taint:
        return released or "public"
    closed = [o for o, trusted in sorted(taint.origins.items()) if ANALYST not in trusted]
    if not closed:
        return "exact"
    raise PermissionDenied(
        closed[0], f"this object derives from the private data of {closed[0]!r}, which stays on its node; {RELEASES}"
    )


def check_move(taint: Taint, dest: str) -> None:
    """Refuse moving a value to `dest` unless each owner is `dest` or trusts it."""
    for owner, trusted in sorted(taint.origins.items()):
        if dest != owner and dest not in trusted and ANALYST not in trusted:
            raise PermissionDenied(owner, f"{owner!r} does not trust {dest!r} with its data{_trust_hint(dest)}")


def _trust_hint(dest: str) -> str:
    """How an owner comes to trust `dest`: said in each trust refusal, since only the owner's
    operator can change it (the client cannot)."""
    return f" (its node's --trust {dest}, or trust = [{dest!r}] in its cluster file)"


def refuse_write(owner: str, what: str) -> PermissionDenied:
    """The refusal of a write to private data (it is read-only)."""
    return PermissionDenied(owner, f"{what}: a data owner's private data is read-only")


def refuse_op(taint: Taint, op: str, public_shapes: list[list[int]]) -> PermissionDenied:
    """The generic refusal of an operation on private data: the op's name and the shapes of its
    public operands only, never torch's message (which may quote private values)."""
    shapes = ", ".join(str(s) for s in public_shapes) or "none"
    return PermissionDenied(
        taint.owners[0],
        f"{op} cannot run on private data with these arguments (private data may be a tensor operand "
        f"only, never a size, index or count; public operand shapes: {shapes})",
    )


def check_call(op: str, args: list[Any], kwargs: dict[str, Any], is_ref: Callable[[Any], bool]) -> None:
    """Refuse a call whose writes the policy could not see: a `WRITING_KEYWORDS` keyword, or an
    aliasing operation whose target is not its first positional argument (a stored object,
    `is_ref`). Raises OpNotAllowedError (a typed refusal the client receives as
    such, whatever the data); run before the taint is decided."""
    # anything but None or False counts as given: F.embedding's max_norm=0.0 writes too
    writing = (
        [k for k in WRITING_KEYWORDS & kwargs.keys() if kwargs[k] is not None and kwargs[k] is not False]
        if kwargs
        else None
    )
    if writing:
        raise OpNotAllowedError("", f"{op} may not write into an argument ({sorted(writing)[0]}=)")
    if op in ALIASING and (not args or not is_ref(args[0]) or TARGET_KEYWORDS & kwargs.keys()):
        raise OpNotAllowedError("", f"{op} takes the object it changes as its first positional argument")


def result_taint(
    op: str,
    operands: Collection[Stored],
    target: Stored | None = None,
    target_id: int = 0,
    *,
    writes_state: bool = False,
    gradients: Iterable[Stored] = (),
) -> Taint:
    """What the result of `op` derives from, decided as the request arrives (taint only grows,
    so deciding early is safe). `operands` are its stored operands, `target` its first
    positional one (object `target_id`) if stored; `writes_state`: a forward's model may have
    buffers that training mode updates (unknown counts as yes); `gradients`: what a backward
    may give a gradient to (the caller's models and gradient-tracking tensors, a plan's results
    so far), read only for a backward on private operands.

    An aliasing op's result is its target's own `Taint` object (a write through any alias then
    taints them all), grown by the operands; any other result gets a fresh one, the union of
    its operands'. A write to read-only data raises PermissionDenied naming its owner."""
    if op not in TAINT_RULES:
        for e in operands:  # a loop over the origins, not any() over a generator of __bool__: per op
            if e.taint.origins:
                break
        else:
            return Taint({})  # the common case: a plain operation on public operands
    origins = merge(e.taint.origins for e in operands)
    if op in ALIASING and target is not None:
        if target.readonly and op in MUTATING:
            raise refuse_write(target.readonly, f"{op} on object {target_id}")
        target.taint.add(origins)
        return target.taint
    if op == "forward" and target is not None and writes_state:
        # training mode updates a model's buffers (BatchNorm's running statistics) in place
        if target.readonly:
            raise refuse_write(target.readonly, f"forward of model {target_id}")
        target.taint.add(origins)
    if op == "backward" and origins:
        # every model and gradient-tracking tensor of the caller may get a gradient from it
        for e in gradients:
            if not e.readonly:
                e.taint.add(origins)
    return Taint(dict(origins))


def check_own_data(config: PolicyConfig, taint: Taint, what: str) -> None:
    """Refuse `what` (a contribution, a secure input) of a value that derives from any data but
    this node's own."""
    others = [o for o in taint.owners if o != config.name]
    if others:
        raise PermissionDenied(others[0], f"{what} of {config.name!r} may derive from its own data only")


def check_contribution(config: PolicyConfig, taint: Taint, aggregator: str) -> None:
    """Refuse a DP contribution (M1) of anything but this owner's own data, or to an aggregator
    it does not trust."""
    check_own_data(config, taint, "a contribution")
    if aggregator not in config.trust:
        refusal = f"{config.name!r} does not trust {aggregator!r} with contributions{_trust_hint(aggregator)}"
        raise PermissionDenied(config.name, refusal)


def check_contributor(config: PolicyConfig, source: str) -> None:
    """Refuse a contribution unless this node is an aggregator and `source` on its roster."""
    if not config.aggregator or source not in config.owners:
        raise PermissionDenied(
            source,
            f"{config.name!r} takes contributions only from its roster of data owners "
            f"(an aggregator started with --aggregator --owners {source})",
        )


def check_aggregator(config: PolicyConfig) -> None:
    """Refuse a released aggregate anywhere but on an aggregator."""
    if not config.aggregator:
        raise PermissionDenied(config.name, f"{config.name!r} is not an aggregator; nothing is released here")


def check_aggregate(config: PolicyConfig, chosen: Sequence[Contributed]) -> None:
    """Refuse an aggregate of anything but distinct DP contributions (each is single-use)."""
    if len({id(e) for e in chosen}) != len(chosen) or any(e.contribution is None for e in chosen):
        raise PermissionDenied(config.name, "an aggregate takes distinct DP contributions only (fedptr.dp)")


def check_dp_train(
    config: PolicyConfig,
    model: Stored,
    data: Iterable[Stored],
    ids: Collection[int],
    datasets: Iterable[Collection[int]],
) -> None:
    """Refuse DP-SGD (M2) on anything but this node's own private data, inputs and targets
    (`ids`) of one dataset (one of `datasets`: the ids each tag holds), or of a model that
    already derives from private data outside DP-SGD. A sample is a row of one dataset: paired
    across two (the same people in another order), one person was in two samples, and one
    person removed from both shifted every later pair."""
    if any(e.readonly != config.name for e in data):
        raise PermissionDenied(config.name, "DP-SGD trains on this node's own private data only (found by search)")
    if not any(set(ids) <= set(dataset) for dataset in datasets):
        raise PermissionDenied(config.name, "DP-SGD takes inputs and targets of one dataset (one search tag)")
    if model.taint:
        raise PermissionDenied(model.taint.owners[0], "this model already derives from private data outside DP-SGD")
