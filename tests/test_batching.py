"""Batching: messages issued within one event-loop turn travel together and each settles on its own."""

from __future__ import annotations

import asyncio

import pytest
import torch

import fedptr
from fedptr import limits, wire

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)


async def test_ops_issued_together_share_multiparts(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.arange(3))
    link = client.link
    messages, multiparts = link.messages_sent, link.multiparts_sent
    ys = [x + i for i in range(200)]  # one loop turn
    results = await asyncio.gather(*[y.get() for y in ys])  # the gets start together too
    assert all(torch.equal(r, torch.arange(3) + i) for i, r in enumerate(results))  # type: ignore[arg-type]
    sent = link.messages_sent - messages
    packed = link.multiparts_sent - multiparts
    # 200 ops + 200 gets, then the gets' second phase: their entries' deletes, a few batched Deletes
    assert 400 < sent <= 410
    assert packed < sent / 4, f"{sent} messages went out in {packed} multiparts"


async def test_lone_message_is_sent_at_once(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(1))
    before = client.link.multiparts_sent
    y = x + 1  # no await: it must already be on the socket, not waiting for the loop
    assert client.link.multiparts_sent == before + 1
    await y


async def test_a_long_turn_leaves_in_batches_as_they_fill(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(1))
    link = client.link
    before = link.multiparts_sent
    ys = [x + i for i in range(2 * limits.BATCH_MAX_MESSAGES + 1)]  # one loop turn
    # the first alone, then each batch as soon as it is full: none waits for the turn's end
    assert link.multiparts_sent == before + 3
    results = await asyncio.gather(*[y.get() for y in ys])
    assert all(torch.equal(r, torch.ones(1) + i) for i, r in enumerate(results))  # type: ignore[arg-type]


async def test_deletes_queued_before_a_lone_request_leave_in_its_multipart(
    client: fedptr.Client, bob: fedptr.Worker
) -> None:
    x = await bob.send(torch.ones(1))
    y = await (x + 1)
    dropped = y.id_at_location
    link = client.link
    multiparts, messages = link.multiparts_sent, link.messages_sent
    del y  # its delete is queued for the next loop turn
    z = x + 2  # the turn's first request leaves at once, and the delete with it, ahead of it
    assert (link.multiparts_sent, link.messages_sent) == (multiparts + 1, messages + 2)
    await z
    assert link.multiparts_sent == multiparts + 1  # no multipart of its own for the delete
    assert dropped not in await bob.objects()


async def test_errors_inside_a_batch_stay_with_their_request(client: fedptr.Client, bob: fedptr.Worker) -> None:
    alice = client.worker("alice")
    results = await asyncio.gather(
        bob.send(torch.ones(1)),
        client.worker("ghost").send(torch.ones(1)),
        alice.send(torch.ones(2)),
        return_exceptions=True,
    )
    assert isinstance(results[0], fedptr.Pointer) and results[0].location == "bob"
    assert isinstance(results[1], fedptr.UnknownWorkerError) and results[1].worker == "ghost"
    assert isinstance(results[2], fedptr.Pointer) and results[2].location == "alice"


async def test_failure_mid_pipeline_fails_every_later_step(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(2, 2))
    steps = [x + 1]
    steps.append(steps[-1].reshape(5))  # fails: 4 elements
    for _ in range(10):
        steps.append(steps[-1] * 2)
    await steps[0]
    for step in steps[1:]:
        with pytest.raises(fedptr.RemoteError) as info:
            await step
        assert info.value.remote_type == "RuntimeError" and "invalid for input of size 4" in info.value.remote_message


async def test_in_flight_bound_gives_backpressure(cluster: fedptr.Cluster) -> None:
    async with cluster.connect(max_in_flight=8) as small:
        bob = small.worker("bob")
        x = await bob.send(torch.ones(2))
        ys = [x + i for i in range(8)]
        with pytest.raises(fedptr.TooManyInFlightError, match="8 requests in flight"):
            x + 99
        # awaited calls wait for room instead of failing
        stats = await asyncio.gather(*[small.call("bob", wire.NodeStats()) for _ in range(20)])
        assert all(isinstance(s, wire.NodeStatsReply) for s in stats)
        assert [float((await y.get())[0]) for y in ys] == [1.0 + i for i in range(8)]  # type: ignore[index]
        await bob.clear()
