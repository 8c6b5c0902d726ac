"""The races red17 reasoned about a grant but did not run (red-team round 19, branch red18).

A grant (`wire.Grant`) hands an object to another client. Each client's requests are ordered only
among themselves, so the new owner's request, judged on arrival, may run after a request of the
first owner that arrived later. red17's fixes (`Store.hand_over`): an object sharing its memory
with another entry is not handed over, and a handed-over tensor that tracks gradients becomes a
new leaf on the same memory, so a graph built before the grant, by either owner, stops at it.
Each test below arranges its race's order with a long op (a 1500x1500 matmul on the node's
offload thread) in front of the request that must come last, and checks that order held.

On the in-process harness (the real broker, node and two clients).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import fedptr
from fedptr import wire
from fedptr.errors import FedptrError, RemoteError
from fedptr.pointer import remote_call

from . import harness

DEADLINE_S = 30.0
LONG = 1500
"""A LONG x LONG matmul: tens of milliseconds or more on the offload thread, while requests of the
other client run inline."""
X = np.full((4, 3), 0.5, dtype=np.float32)
"""Bob's private x."""


async def _op(client: fedptr.Client, name: str, *args: int) -> int:
    """Send op `name` on objects `args` (ids), without waiting; its result's id."""
    op = wire.Op(client.new_id(), name, [wire.Ref(a) for a in args], {})
    client.request_nowait("bob", op)
    return op.result_id


async def _fetched(client: fedptr.Client, obj_id: int) -> torch.Tensor | None:
    """What `client` gets of `obj_id`: its value, or None if refused or missing."""
    try:
        reply = await asyncio.wait_for(client.request_nowait("bob", wire.Get(obj_id)), DEADLINE_S)
    except FedptrError:
        return None
    assert isinstance(reply, wire.TensorReply)
    return torch.frombuffer(bytearray(reply.tensor.data), dtype=torch.float32).clone()


async def _long(client: fedptr.Client) -> asyncio.Future[wire.Message]:
    """A long op of `client`'s, on the offload thread: its later requests wait behind it."""
    e = await client.worker("bob").send(torch.ones(LONG, LONG))
    return client.request_nowait("bob", wire.Op(client.new_id(), "mm", [wire.Ref(e.id_at_location)] * 2, {}))


async def _deferred_grad() -> torch.Tensor | None:
    data = {"bob": {"data": {"x": X}}}
    async with harness.cluster(["bob"], data=data, call_timeout=DEADLINE_S) as c, c.connect() as other:
        a = c.client
        (bx,) = await a.worker("bob").search("data")
        leaf = await a.worker("bob").send(torch.zeros(4, 3, requires_grad=True))
        loss = await remote_call("sum", (leaf * bx,))  # its graph reaches the leaf
        await a.call("bob", wire.Grant(leaf.id_at_location, other.name))
        long = await _long(other)
        grad = await _op(other, "grad", leaf.id_at_location)  # judged on arrival, run after `long`
        await a.call("bob", wire.Op(a.new_id(), "backward", [wire.Ref(loss.id_at_location)], {}))
        assert not long.done(), "the first owner's backward ran after the new owner's grad: no race"
        await asyncio.wait_for(long, DEADLINE_S)
        return await _fetched(other, grad)


def test_a_granted_leafs_deferred_grad_races_the_first_owners_backward() -> None:
    """The new owner's ``grad(leaf)`` waits behind its long op; the first owner's
    ``backward((leaf * bob_x).sum())``, sent after it, runs inline meanwhile. The new owner
    gets no gradient holding bob's x (the old graph writes a leaf no entry holds)."""
    got = asyncio.run(_deferred_grad())
    assert got is None or not torch.equal(got, torch.from_numpy(X).reshape(-1)), (
        f"bob's x as a granted leaf's grad: {got}"
    )


async def _grantee_graph() -> torch.Tensor | None:
    data = {"bob": {"data": {"x": X}}}
    async with harness.cluster(["bob"], data=data, call_timeout=DEADLINE_S) as c, c.connect() as other:
        a = c.client
        leaf = await a.worker("bob").send(torch.zeros(4, 3, requires_grad=True))
        doubled = await remote_call("mul", (leaf, 2.0))  # tracks gradients back to the first owner's leaf
        await a.call("bob", wire.Grant(doubled.id_at_location, other.name))
        (bx,) = await other.worker("bob").search("data")
        product = await _op(other, "mul", doubled.id_at_location, bx.id_at_location)
        loss = await _op(other, "sum", product)
        await asyncio.wait_for(
            other.request_nowait("bob", wire.Op(other.new_id(), "backward", [wire.Ref(loss)], {})), DEADLINE_S
        )
        grad = await _op(a, "grad", leaf.id_at_location)
        return await _fetched(a, grad)


def test_a_graph_the_grantee_builds_does_not_reach_the_granters_leaf() -> None:
    """The reverse direction: the first owner grants ``leaf * 2`` (tracking gradients back to
    its own leaf); the new owner runs ``backward((granted * bob_x).sum())``, whose taint rule
    covers the new owner's gradient holders only. The first owner's leaf gets no gradient
    holding bob's x (2x)."""
    got = asyncio.run(_grantee_graph())
    assert got is None or not torch.equal(got, 2 * torch.from_numpy(X).reshape(-1)), f"bob's x through a grant: {got}"


async def _aliased_plan_race() -> tuple[list[str], torch.Tensor | None]:
    data = {"bob": {"data": {"x": np.full((10, 10), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob"], data=data, call_timeout=DEADLINE_S) as c, c.connect() as other:
        a = c.client
        public = await a.worker("bob").send(torch.zeros(10, 10))
        alias = await remote_call("add_", (public, 0.0))  # kept by the first owner
        refusals = []
        for granted in (alias, public):
            try:
                await a.call("bob", wire.Grant(granted.id_at_location, other.name))
            except RemoteError as e:
                refusals.append(e.remote_type)
        e = await a.worker("bob").send(torch.ones(LONG, LONG))
        plan = fedptr.plan(lambda e, p: (e @ e).sum() * 0.0 + p)
        out = plan(e, public)  # public as it arrives; `public` read after the long step
        (bx,) = await other.worker("bob").search("data")
        write = other.request_nowait(
            "bob", wire.Op(other.new_id(), "add_", [wire.Ref(alias.id_at_location), wire.Ref(bx.id_at_location)], {})
        )
        with pytest.raises(FedptrError):
            await asyncio.wait_for(write, DEADLINE_S)  # the alias is not the second client's
        return refusals, await out.get()


def test_the_plan_race_through_a_granted_alias_cannot_start() -> None:
    """red17's second hole, run: the first owner keeps an alias of its public object and grants
    the alias (or the object) to another client, then runs a plan ``(e @ e).sum() * 0.0 + p``
    whose read of ``p`` comes after a long step, while the other client's ``add_(alias,
    bob_x)`` runs inline. Both grants are refused, the write is refused, and the plan's public
    output is zeros."""
    refusals, out = asyncio.run(_aliased_plan_race())
    assert refusals == ["InvalidArgumentError"] * 2, refusals
    assert out is not None and torch.equal(out, torch.zeros(10, 10)), f"bob's x in a public plan output: {out}"
