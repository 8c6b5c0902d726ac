"""The privacy policy a node enforces: what derives from private data, and how it may leave.

Every stored entry carries a `Taint`: the data owners whose private data its value derives
from, each with the workers that owner trusts. Taint belongs to the *storage*, not to a Python
tensor: every operation's result is a fresh copy, except where aliasing is the point (an
in-place op's result is its target, a model's parameter is the model's), and those share one
`Taint` object, so a write through any alias taints them all. Taint is decided when a request
arrives, in arrival order, and only ever grows:

* an operation's result derives from the union of its operands;
* an in-place update adds its operands to its target (private data itself is read-only);
* `backward` on a tainted loss taints every model and gradient-tracking tensor of its caller.

What may leave (`release_kind`): public values; values every owner of which runs with
``--release exact`` (no protection against the analyst: PySyft 0.2's model); and the outputs of
the DP mechanisms in `nodes/mechanisms.py`. Moves go only to workers every owner trusts.
Origins are set by the node that loads the data; a value received from a peer keeps the origins
the peer stated (a claim can only add restrictions, never lift one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedptr import limits
from fedptr.errors import PermissionDenied

Origins = dict[str, frozenset[str]]
"""Data owner -> the workers it trusts with what derives from its data."""

ANALYST = "*"
"""In an owner's trust set: ``--release exact``, the analyst may fetch exact derived values."""


@dataclass(eq=False)
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


def release_kind(taint: Taint, released: str) -> str:
    """How a value may leave this node: ``"public"``, ``"exact"``, a mechanism's kind (``"dp"``),
    or raise PermissionDenied naming an owner."""
    if not taint:
        return released or "public"
    closed = [o for o, trusted in sorted(taint.origins.items()) if ANALYST not in trusted]
    if not closed:
        return "exact"
    raise PermissionDenied(
        closed[0], f"this object derives from {closed[0]!r}'s private data; only DP releases leave its node"
    )


def check_move(taint: Taint, dest: str) -> None:
    """Refuse moving a value to `dest` unless each owner is `dest` or trusts it."""
    for owner, trusted in sorted(taint.origins.items()):
        if dest != owner and dest not in trusted and ANALYST not in trusted:
            raise PermissionDenied(owner, f"{owner!r} does not trust {dest!r} with its data")


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
