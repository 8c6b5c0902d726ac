"""Per-client quotas on a node (issue 19): the objects a client holds, their bytes, and its
requests queued behind its computations. Past its quota a client's request is refused with
`QuotaExceededError` naming the worker; other clients are not affected, and what the client
deletes, or leaves behind when its session ends, no longer counts. On the in-process harness
(the real broker and node code)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import torch
from fedptr.nodes.durable import DurableStore
from fedptr.nodes.node import Node, NodeConfig

import fedptr
from fedptr import limits, wire
from tests.conftest import eventually

from . import harness

QUOTA_OBJECTS = 5
QUOTA_BYTES = 4096
"""(Objects: a count; bytes: tensor bytes.)"""


async def test_a_client_past_its_objects_is_refused_and_others_are_not() -> None:
    config = NodeConfig(max_client_objects=QUOTA_OBJECTS)
    async with harness.cluster(["bob"], configs={"bob": config}) as c:
        node = c.node("bob")
        async with c.connect() as greedy:
            bob = greedy.worker("bob")
            held = [await bob.send(torch.ones(2)) for _ in range(QUOTA_OBJECTS)]
            with pytest.raises(fedptr.QuotaExceededError) as refused:
                await bob.send(torch.ones(2))
            assert refused.value.worker == "bob" and str(QUOTA_OBJECTS) in refused.value.detail
            with pytest.raises(fedptr.QuotaExceededError):
                await (held[0] + 1)  # an operation's result is an object too
            # another client has its own quota
            others = [await c.worker("bob").send(torch.ones(2)) for _ in range(QUOTA_OBJECTS)]
            assert len(others) == QUOTA_OBJECTS
            # a deletion gives the room back
            held.pop()
            assert await eventually(_within(node, greedy.name, QUOTA_OBJECTS - 1, 1 << 30))
            held.append(await bob.send(torch.ones(2)))
            assert torch.equal(await held[-1].get(), torch.ones(2))
            name = greedy.name
        # the session ended: what it left behind no longer counts
        assert await eventually(_within(node, name, 0, 0))


async def test_a_loop_that_drops_each_result_stays_within_a_small_object_quota() -> None:
    """What a client drops no longer counts by its next request: an awaited loop that replaces its
    result each time never holds more than the operand and one result (a client that held small
    deletes back for a while was refused at the fourth op; see BENCHMARKS.md, branch client12)."""
    config = NodeConfig(max_client_objects=QUOTA_OBJECTS)
    async with harness.cluster(["bob"], configs={"bob": config}) as c:
        x = await c.worker("bob").send(torch.ones(2))
        y = x
        for i in range(8 * QUOTA_OBJECTS):
            y = await (x + float(i))
        assert torch.equal(await y.get(), torch.ones(2) + 8 * QUOTA_OBJECTS - 1)


async def test_a_client_past_its_bytes_is_refused_and_others_are_not() -> None:
    config = NodeConfig(max_client_bytes=QUOTA_BYTES)
    async with harness.cluster(["bob"], configs={"bob": config}) as c:
        node = c.node("bob")
        async with c.connect() as greedy:
            bob = greedy.worker("bob")
            x = await bob.send(torch.zeros(QUOTA_BYTES // 8))  # half the quota
            y = await (x + 1)  # the other half
            with pytest.raises(fedptr.QuotaExceededError) as refused:
                await (x * 2)
            assert str(QUOTA_BYTES) in refused.value.detail
            assert node.store.usage(greedy.name)[1] == QUOTA_BYTES
            big = await c.worker("bob").send(torch.zeros(QUOTA_BYTES // 4))  # another client's bytes
            assert torch.equal(await big.get(), torch.zeros(QUOTA_BYTES // 4))
            del y
            assert await eventually(_within(node, greedy.name, QUOTA_OBJECTS, QUOTA_BYTES // 2))
            assert torch.equal(await (x * 2).get(), torch.zeros(QUOTA_BYTES // 8))


async def test_a_client_past_its_queued_requests_is_refused_and_others_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queued = 8
    monkeypatch.setattr(limits, "CLIENT_MAX_QUEUED_REQUESTS", queued)
    config = NodeConfig(offload_numel=0)  # every op is deferred: the requests behind it wait
    async with harness.cluster(["bob"], configs={"bob": config}) as c, c.connect() as greedy:
        x = await greedy.worker("bob").send(torch.ones(4))
        results = [x + float(i) for i in range(10 * queued)]
        outcomes = await asyncio.gather(*results, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, fedptr.QuotaExceededError)]
        assert refused, "no request was refused"
        assert all(o is r or isinstance(o, fedptr.QuotaExceededError) for o, r in zip(outcomes, results, strict=True))
        # another client, meanwhile, is served
        assert torch.equal(await (await c.worker("bob").send(torch.ones(2)) + 1).get(), 2 * torch.ones(2))


def _within(node: Node, client: str, objects: int, nbytes: int) -> Callable[[], Awaitable[bool]]:
    """A condition for `eventually`: `client` holds at most `objects` objects of `nbytes` bytes
    in `node`'s quota accounting (deletes travel unanswered, so they land a little later)."""

    async def holds() -> bool:
        held, held_bytes = node.store.usage(client)
        return held <= objects and held_bytes <= nbytes

    return holds


async def test_a_move_to_the_same_node_counts_once_and_a_refused_one_changes_nothing() -> None:
    # the quota's record is on the entry: a rename must move it with the entry, not count twice
    async with harness.cluster(["bob"], configs={"bob": NodeConfig(max_client_objects=2)}) as c:
        bob, client = c.worker("bob"), c.client
        x = await bob.send(torch.ones(4))
        store = c.node("bob").store
        assert store.usage(client.name) == (1, 16)
        moved = client.new_id()
        await client.call("bob", wire.Move(x.id_at_location, "bob", moved))  # stored under a new id
        assert store.usage(client.name) == (1, 16) and store.bytes == 16 and moved in store.entries
        y = await bob.send(torch.ones(2))
        assert store.usage(client.name) == (2, 24)
        with pytest.raises(fedptr.QuotaExceededError):  # its new id would be a third object
            await client.call("bob", wire.Move(y.id_at_location, "bob", client.new_id()))
        assert store.usage(client.name) == (2, 24) and y.id_at_location in store.entries  # y stays
        await bob.clear()
        assert store.usage(client.name) == (0, 0) and store.accounts == {} and store.bytes == 0


async def test_an_op_whose_second_result_is_refused_keeps_neither_result_charged_nor_on_disk() -> None:
    # a multi-result op commits its results one by one: the first fitted, the second went past
    # the quota, and the op failed; the first result's bytes must not stay charged to a failed
    # entry holding nothing, nor its tensor be written ahead (a restart would bring it back)
    config = NodeConfig(max_client_bytes=QUOTA_BYTES)
    async with harness.cluster(["bob"], configs={"bob": config}, stores=["bob"]) as c:
        node = c.node("bob")
        x = await c.worker("bob").send(torch.arange(QUOTA_BYTES // 16, dtype=torch.float64))  # half
        values, indices = x.sort()  # each result takes the other half: the second is refused
        for result in (values, indices):
            with pytest.raises(fedptr.QuotaExceededError):
                await result
        assert node.store.usage(c.client.name) == (3, QUOTA_BYTES // 2)  # only x's bytes
        assert node.store.bytes == QUOTA_BYTES // 2
        barrier = node.store.barrier()
        assert barrier is not None
        await asyncio.wait_for(barrier, 10)
        assert node.store.wal is not None
        assert set(DurableStore(node.store.wal.durable.dir).load()) == {x.id_at_location}
        # and the room is there once the failed results are deleted: a copy of x fits
        del values, indices, result
        assert await eventually(_within(node, c.client.name, 1, QUOTA_BYTES // 2))
        assert torch.equal(await (x + 0).get(), torch.arange(QUOTA_BYTES // 16, dtype=torch.float64))
