"""What a node sends is the value it checked, not what a later write made of it (review9).

A get's reply and a move's Put carry the stored tensor's bytes as a view: the link hands them to
zmq without a copy, and when the broker's queue for the node is full (a slow peer) they wait in
the link's outbox, then in zmq's, while the node goes on handling requests. An in-place write
handled meanwhile (``add_`` of another owner's data, moved here by an owner who trusts this
node) changed what left, after the get was judged public or the move checked against the
destination: alice's data left bob, unaudited and uncharged.

On the in-process harness (the real broker, nodes and client); the full queue is made by
refusing bob's link its sends (zmq.Again, as a full queue does) for as long as the test holds it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import zmq
from fedptr.nodes.node import Node, NodeConfig

from fedptr import link, wire
from fedptr.errors import FedptrError, PermissionDenied, RemoteError
from fedptr.pointer import remote_call

from . import harness
from .conftest import eventually

DEADLINE_S = 10.0
"""How long the test waits for each step it orders."""


@contextmanager
def _full_queue(monkeypatch: pytest.MonkeyPatch, node: Node) -> Iterator[None]:
    """`node`'s link can send nothing while the block runs (its queue at the broker is full)."""
    sock = node.link._sock
    send = link.send_frames

    def refused(s: Any, frames: Any) -> None:
        if s is sock:
            raise zmq.Again()
        send(s, frames)

    monkeypatch.setattr(link, "send_frames", refused)
    try:
        yield
    finally:
        monkeypatch.setattr(link, "send_frames", send)
        node.link._writable.set()  # what waited goes out now


def _first(node: Node, obj_id: int) -> float:
    """The first number of a stored tensor, or NaN while it is not there yet or pending."""
    entry = node.store.entries.get(obj_id)
    return float(entry.result().reshape(-1)[0]) if entry is not None and entry.ok else math.nan


async def _now(value: bool) -> bool:
    return value


async def _got_then_written(monkeypatch: pytest.MonkeyPatch) -> None:
    configs = {"bob": NodeConfig(), "alice": NodeConfig(trust=["bob"])}
    data = {"alice": {"data": {"x": np.full((256, 1024), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob", "alice"], configs=configs, data=data, call_timeout=30.0) as c:
        bob, alice = c.worker("bob"), c.worker("alice")
        (ax,) = await alice.search("data")
        stolen = await (ax * 1).move("bob")  # alice trusts bob with what derives from her data
        public = await bob.send(torch.zeros(256, 1024))
        node = c.node("bob")
        with _full_queue(monkeypatch, node):
            got = c.client.request_nowait("bob", wire.Get(public.id_at_location))
            assert await eventually(lambda: _now(len(node.link._outbox) > 0), DEADLINE_S)  # judged public, queued
            public.add_(stolen)
            assert await eventually(lambda: _now(_first(node, public.id_at_location) == 0.5), DEADLINE_S)
        reply = await asyncio.wait_for(got, DEADLINE_S)
        assert isinstance(reply, wire.TensorReply)
        value = torch.frombuffer(bytearray(reply.tensor.data), dtype=torch.float32)
        assert torch.equal(value, torch.zeros(256 * 1024)), f"alice's data left bob in a public get: {value}"


def test_a_gets_reply_is_the_value_it_released_not_a_later_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_got_then_written(monkeypatch))


async def _moved_then_written(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"bob": {"data": {"x": np.full((256, 1024), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob", "carol"], data=data, call_timeout=30.0) as c:
        bob = c.worker("bob")
        (bx,) = await bob.search("data")
        public = await bob.send(torch.zeros(256, 1024))
        alias = await remote_call("add_", (public, 0.0))  # an alias entry of public, kept: it stays when public moves
        node, new_id = c.node("bob"), wire.new_object_id()
        with _full_queue(monkeypatch, node):
            moved = c.client.request_nowait("bob", wire.Move(public.id_at_location, "carol", new_id))
            assert await eventually(lambda: _now(len(node.link._outbox) > 0), DEADLINE_S)  # checked public, queued
            write = wire.Op(
                wire.new_object_id(), "add_", [wire.Ref(alias.id_at_location), wire.Ref(bx.id_at_location)], {}
            )
            written = c.client.request_nowait("bob", write)
            assert await eventually(lambda: _now(_first(node, alias.id_at_location) == 0.5), DEADLINE_S)
        await asyncio.wait_for(moved, DEADLINE_S)
        await asyncio.wait_for(written, DEADLINE_S)
        reply = await asyncio.wait_for(c.client.request_nowait("carol", wire.Get(new_id)), DEADLINE_S)
        assert isinstance(reply, wire.TensorReply)
        value = torch.frombuffer(bytearray(reply.tensor.data), dtype=torch.float32)
        assert torch.equal(value, torch.zeros(256 * 1024)), f"bob's data left bob in a public move: {value}"


def test_a_moves_put_is_the_value_it_checked_not_a_later_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_moved_then_written(monkeypatch))


async def _aliased_then_handed_over() -> None:
    data = {"bob": {"data": {"x": np.full((10, 10), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob"], data=data, call_timeout=30.0) as c, c.connect() as writer:
        bob = c.worker("bob")
        public = await bob.send(torch.zeros(10, 10))
        alias = await remote_call("add_", (public, 0.0))  # an alias entry of public, kept
        handovers = [
            wire.Grant(alias.id_at_location, writer.name),
            wire.Move(alias.id_at_location, "bob", wire.new_object_id(), writer.name),
            wire.Grant(public.id_at_location, writer.name),
        ]
        for handover in handovers:
            with pytest.raises(RemoteError) as refused:
                await c.client.request_nowait("bob", handover)
            assert refused.value.remote_type == "InvalidArgumentError", refused.value
        del alias  # its delete goes out before the next request
        assert isinstance(await c.client.request_nowait("bob", handovers[-1]), wire.Ok)  # alone now: handed over
        (bx,) = await writer.worker("bob").search("data")
        write = wire.Op(
            wire.new_object_id(), "add_", [wire.Ref(public.id_at_location), wire.Ref(bx.id_at_location)], {}
        )
        assert isinstance(await writer.request_nowait("bob", write), wire.Ok)
        with pytest.raises(PermissionDenied):  # the writer's object now, and private
            await public.get()


def test_an_object_sharing_its_memory_is_not_handed_to_another_client() -> None:
    """A write through an alias kept by one client is not ordered with a computation of the
    object's new owner: before the fix, a plan of the new owner, public on arrival, read the
    value after its first long step (``(e @ e).sum() * 0.0 + p`` on a 1500x1500 ``e``, on the
    node's thread), the other client's ``add_`` of bob's data through the alias ran inline
    meanwhile, and the plan's public output held bob's data exactly (docs/REDTEAM.md, red17)."""
    asyncio.run(_aliased_then_handed_over())


async def _graph_then_granted() -> wire.Message | None:
    data = {"bob": {"data": {"x": np.full((4, 3), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob"], data=data, call_timeout=30.0) as c, c.connect() as other:
        (bx,) = await c.worker("bob").search("data")
        leaf = await c.worker("bob").send(torch.zeros(4, 3, requires_grad=True))
        loss = await remote_call("sum", (leaf * bx,))  # its graph reaches the leaf
        assert isinstance(await c.client.request_nowait("bob", wire.Grant(leaf.id_at_location, other.name)), wire.Ok)
        backward = wire.Op(wire.new_object_id(), "backward", [wire.Ref(loss.id_at_location)], {})
        assert isinstance(await c.client.request_nowait("bob", backward), wire.Ok)
        grad = wire.Op(wire.new_object_id(), "grad", [wire.Ref(leaf.id_at_location)], {})
        try:
            await other.request_nowait("bob", grad)
            return await other.request_nowait("bob", wire.Get(grad.result_id))
        except FedptrError:
            return None  # no gradient, or a private one: nothing of bob's left


def test_a_graph_built_before_a_grant_does_not_reach_the_granted_leaf() -> None:
    """A graph its first owner built before granting a leaf to another client still wrote the
    leaf's gradient: the backward's taint rule covers its caller's objects only, and the new
    owner fetched bob's x exactly as the leaf's gradient (red17)."""
    got = asyncio.run(_graph_then_granted())
    if isinstance(got, wire.TensorReply):
        value = torch.frombuffer(bytearray(got.tensor.data), dtype=torch.float32)
        assert not torch.equal(value, torch.full((12,), 0.5)), "bob's x as the gradient of a leaf granted away"
