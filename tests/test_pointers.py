"""Pointer behaviour across real processes: chains, move, concurrency, garbage collection, errors, dtypes."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
import torch

import fedptr
from fedptr import link as linkmod
from fedptr import wire
from fedptr.pointer import effect
from tests import harness
from tests.conftest import eventually

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)

CHAIN = ["bob", "alice", "carol", "dave", "erin"]


async def all_empty(client: fedptr.Client) -> bool:
    return all([await client.worker(n).objects() == {} for n in CHAIN])


async def test_chain_five_hops_deep(client: fedptr.Client) -> None:
    x = torch.arange(6.0)
    p = await client.worker(CHAIN[0]).send(x)
    for name in CHAIN[1:]:
        p = await p.send(client.worker(name))
    assert p.location == "erin"
    y = (p * 2 + 1).sum()
    await y
    # the result sits on bob, with a pointer to it at each hop
    for name in CHAIN[1:]:
        kinds = sorted(i.kind for i in (await client.worker(name).objects()).values())
        assert kinds == ["pointer", "pointer"], name
    bob_tensors = [i for i in (await client.worker("bob").objects()).values() if i.kind == "tensor"]
    assert sorted(i.preview for i in bob_tensors) == sorted([x.tolist(), [36.0]])  # type: ignore[type-var]
    value = y
    for expected_location in ["dave", "carol", "alice", "bob"]:
        got = await value.get()
        assert isinstance(got, fedptr.Pointer) and got.location == expected_location
        value = got
    assert torch.equal(await value.get(), torch.tensor(36.0))
    del p
    gc.collect()
    assert await eventually(lambda: all_empty(client))


async def test_move_sends_bytes_worker_to_worker(
    client: fedptr.Client, bob: fedptr.Worker, alice: fedptr.Worker
) -> None:
    x = torch.randn(1 << 20)  # 4 MiB
    p = await bob.send(x)
    before = client.bytes_received
    q = await p.move(alice)
    received = client.bytes_received - before
    assert received < 4096, f"the client received {received} bytes during a move of 4 MiB"
    assert q.location == "alice"
    assert await bob.objects() == {}
    with pytest.raises(fedptr.ConsumedPointerError):
        await p.get()
    assert torch.equal(await q.get(), x)


async def test_move_to_current_location_is_a_noop(bob: fedptr.Worker) -> None:
    p = await bob.send(torch.ones(3))
    assert await p.move(bob) is p
    assert torch.equal(await p.get(), torch.ones(3))


async def test_move_of_a_pointer_moves_the_data_at_the_end(
    bob: fedptr.Worker, alice: fedptr.Worker, client: fedptr.Client
) -> None:
    carol = client.worker("carol")
    p = await (await bob.send(torch.tensor([7, 8]))).send(alice)
    q = await p.move(carol)
    assert q.location == "carol"
    assert await bob.objects() == {} and await alice.objects() == {}
    assert torch.equal(await q.get(), torch.tensor([7, 8]))


async def test_thousand_concurrent_operations(bob: fedptr.Worker) -> None:
    base = await bob.send(torch.arange(4))
    results = await asyncio.gather(*[(base + i).get() for i in range(1000)])
    for i, r in enumerate(results):
        assert torch.equal(r, torch.arange(4) + i)  # type: ignore[arg-type]


async def test_an_awaited_op_resumes_on_the_loop_turn_after_its_reply(bob: fedptr.Worker) -> None:
    """Between the reply settling the request and the awaiting task running again: one loop
    turn, not two (`asyncio.wait` or `shield` wake the task from a callback of a callback)."""
    x = await bob.send(torch.ones(2))
    link = bob.client.link
    settled_turns: list[int] = []
    turns = 0

    def tick() -> None:
        nonlocal turns
        turns += 1
        if turns < 10:
            asyncio.get_running_loop().call_soon(tick)

    relay = link.on_settled
    assert relay is not None

    def spy(dest: str, fut: asyncio.Future[wire.Message]) -> None:
        relay(dest, fut)
        if not settled_turns:
            settled_turns.append(turns)
            asyncio.get_running_loop().call_soon(tick)  # counts the turns from here on

    link.on_settled = spy
    try:
        await (x + x)
        resumed_after = turns - settled_turns[0]
    finally:
        link.on_settled = relay
    assert resumed_after == 0, f"the awaiting task resumed {resumed_after} turn(s) late"


async def test_a_reply_leaves_in_its_requests_drain_and_leaves_the_loop_nothing_to_run(
    cluster: harness.InprocCluster, bob: fedptr.Worker
) -> None:
    """The node answers an awaited op inside the drain that read it, and closes the reply's batch
    there: no flush of its own waits on the loop's queue after that drain (a lone reply sent at
    once, then a `call_soon` to close the batch, cost the node one loop turn per awaited op).
    Read from the loop's ready queue (asyncio's own field), as nothing else shows it."""
    x = await bob.send(torch.ones(2))
    link = cluster.node("bob").link
    loop = asyncio.get_running_loop()
    drain = link._drain
    after: list[tuple[int, list[asyncio.Handle]]] = []

    def spy() -> None:
        sent = link.multiparts_sent
        drain()
        flushes = [h for h in loop._ready if not h.cancelled() and h._callback == link._flush_batch]  # type: ignore[attr-defined]
        after.append((link.multiparts_sent - sent, flushes))

    assert link._sock is not None
    fd = link._sock.FD
    link._drain = spy  # type: ignore[method-assign]  # for a drain the link schedules itself
    loop.remove_reader(fd)
    loop.add_reader(fd, spy)  # for a drain the socket's FD wakes
    try:
        await (x + x)
    finally:
        del link._drain
        loop.remove_reader(fd)
        loop.add_reader(fd, link._drain)
    answered = [flushes for sent, flushes in after if sent]
    assert answered, "the node sent nothing from a drain: this test no longer sees its reply"
    assert answered == [[]] * len(answered), "a drain left a flush of its reply's batch to a turn of its own"


async def test_the_node_reads_its_sockets_events_once_per_awaited_op(
    cluster: harness.InprocCluster, bob: fedptr.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each zmq.EVENTS read is a pass of libzmq's command processing (a `poll` and a `getpid`).
    The node must read them after its reply's send (the send may consume the FD's read edge);
    that read also tells its drain that nothing more waits, so it reads them once per awaited
    op, not a second time before the send."""
    x = await bob.send(torch.ones(2))
    sock = cluster.node("bob").link._sock
    reads = 0
    real = linkmod.events

    def counted(s: Any) -> int:
        nonlocal reads
        reads += s is sock
        return real(s)

    await (x + x)  # the first op's result meta is cached: later ones take the same path
    monkeypatch.setattr(linkmod, "events", counted)
    for _ in range(5):
        await (x + x)
    assert reads == 5, f"the node read its socket's zmq.EVENTS {reads} times for 5 awaited ops"


async def test_an_awaited_request_leaves_the_loop_no_pass_to_close_its_batch(bob: fedptr.Worker) -> None:
    """A lone request goes out at once and opens a batch for the rest of its turn; when its task
    then waits on it, nothing can join, and the batch is closed there: the loop must find no
    flush of it due on the next pass (a `call_soon` to close it cost the client one more pass,
    an `epoll_wait`, per awaited op). Read from the loop's queues (asyncio's own fields)."""
    x = await bob.send(torch.ones(2))
    link = bob.client.link
    loop = asyncio.get_running_loop()
    due: list[list[asyncio.Handle]] = []
    closers = {link._flush_batch, getattr(link, "_close_turn", None)}

    def check() -> None:  # queued before the request: runs first on the next pass
        queued = [*loop._ready, *loop._scheduled]  # type: ignore[attr-defined]
        due.append([h for h in queued if not h.cancelled() and h._callback in closers])  # type: ignore[attr-defined]

    loop.call_soon(check)
    y = x + x
    assert link.batching, "a lone request opened no batch: this test no longer sees it"
    await y
    assert due == [[]], "a pass of the loop was left to close the batch of an awaited request"


async def test_a_delete_that_leaves_with_the_next_request_leaves_the_loop_nothing_to_run(bob: fedptr.Worker) -> None:
    """A result dropped and an op issued in the same turn (each `await (x + x)` of a loop): the
    delete leaves with the op, and the flush the drop scheduled must not cost the event loop a
    turn of its own (a `call_soon` callback did, once per awaited op; a cancelled timer does
    not). Read from the loop's queues (asyncio's own fields), as nothing else shows it."""
    x = await bob.send(torch.ones(2))
    y = x + x
    await y
    loop = asyncio.get_running_loop()
    flush = bob.client._flush_deletes

    def flushes_due() -> list[asyncio.Handle]:
        queued = [*loop._ready, *loop._scheduled]  # type: ignore[attr-defined]
        return [h for h in queued if not h.cancelled() and h._callback == flush]  # type: ignore[attr-defined]

    del y
    assert flushes_due(), "the drop scheduled no flush: this test no longer sees it"
    z = x + x  # takes the delete with it
    assert flushes_due() == []
    await z
    del z  # no request follows: the delete still leaves, on its own
    assert await eventually(lambda: _holds_only(bob, x.id_at_location))


async def _holds_only(worker: fedptr.Worker, obj_id: int) -> bool:
    return list(await worker.objects()) == [obj_id]


async def test_pipelined_chain_of_dependent_ops(bob: fedptr.Worker) -> None:
    y = await bob.send(torch.zeros(3))
    for _ in range(100):
        y = y + 1
    assert torch.equal(await y.get(), torch.full((3,), 100.0))


async def test_dropped_pointers_leave_nothing_behind(
    client: fedptr.Client, bob: fedptr.Worker, alice: fedptr.Worker
) -> None:
    start = await (await bob.send(torch.zeros(2))).send(alice)
    y = start
    for _ in range(1000):
        y = y + 1  # 1000 intermediate results, each dropped as soon as the next exists
    await y

    async def only_start_and_result() -> bool:
        return len(await bob.objects()) == 2 and len(await alice.objects()) == 2

    assert await eventually(only_start_and_result)
    assert torch.equal(await (await y.get()).get(), torch.full((2,), 1000.0))  # type: ignore[union-attr]
    del start, y
    gc.collect()
    assert await eventually(lambda: all_empty(client))


async def test_remote_error_is_typed_and_node_keeps_serving(bob: fedptr.Worker) -> None:
    a = await bob.send(torch.ones(2, 3))
    b = await bob.send(torch.ones(4, 5))
    bad = a @ b
    with pytest.raises(fedptr.RemoteError) as info:
        await bad
    err = info.value
    assert err.remote_type == "RuntimeError"
    assert "shapes cannot be multiplied" in err.remote_message
    assert err.worker == "bob" and err.path == ["bob"]
    # a later step of the pipeline fails with the original error
    with pytest.raises(fedptr.RemoteError) as later:
        await (bad + 1).sum().get()
    assert later.value.remote_type == "RuntimeError" and "shapes cannot be multiplied" in later.value.remote_message
    assert torch.equal(await (a + 1).get(), torch.full((2, 3), 2.0))


async def test_remote_error_names_the_hop(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    p = await (await bob.send(torch.ones(2, 3))).send(alice)
    with pytest.raises(fedptr.RemoteError) as info:
        await p.reshape(7)
    assert info.value.worker == "bob" and info.value.path == ["alice", "bob"]


async def test_disallowed_operation_is_refused(bob: fedptr.Worker) -> None:
    p = await bob.send(torch.ones(2))
    with pytest.raises(fedptr.OpNotAllowedError) as info:
        await fedptr.pointer.remote_call("__reduce_ex__", (p, 2))
    assert info.value.worker == "bob" and "__reduce_ex__" in info.value.detail
    with pytest.raises(fedptr.UnsupportedTypeError):
        torch.nn.functional.unfold(p, 2)  # type: ignore[arg-type]


async def test_unknown_worker_fails_fast(client: fedptr.Client) -> None:
    start = time.monotonic()
    with pytest.raises(fedptr.UnknownWorkerError) as info:
        await client.worker("nobody").send(torch.ones(1))
    assert time.monotonic() - start < 1.0
    assert info.value.worker == "nobody"


async def test_unknown_worker_down_a_chain_names_the_hop(client: fedptr.Client, bob: fedptr.Worker) -> None:
    # a pointer on bob to a worker that does not exist (a client cannot make one through send)
    await client.call("bob", wire.PutPointer(424242, "ghost", 12345))
    p = fedptr.Pointer(client, "bob", 424242)
    start = time.monotonic()
    with pytest.raises(fedptr.UnknownWorkerError) as info:
        await (p + 1)
    assert time.monotonic() - start < 1.0
    assert info.value.worker == "ghost" and info.value.path == ["bob", "ghost"]


async def test_operands_on_different_workers(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    a = await bob.send(torch.ones(2))
    b = await alice.send(torch.ones(2))
    with pytest.raises(fedptr.LocationMismatchError, match="'bob' and 'alice'"):
        a + b


async def test_consumed_pointer_raises(bob: fedptr.Worker) -> None:
    p = await bob.send(torch.ones(2))
    await p.get()
    with pytest.raises(fedptr.ConsumedPointerError):
        await p.get()
    with pytest.raises(fedptr.ConsumedPointerError):
        p + 1


async def test_torch_function_and_methods(bob: fedptr.Worker) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    p = await bob.send(x)
    checks = {
        "torch.add": (torch.add(p, p), x + x),
        "matmul": (p @ p.t(), x @ x.t()),
        "mean": (p.mean(dim=0), x.mean(dim=0)),
        "neg-abs": (abs(-p), x.abs()),
        "rsub": (10 - p, 10 - x),
        "rdiv": (1 / (p + 1), 1 / (x + 1)),
        "pow": (p**2, x**2),
        "cmp": (p >= 3, x >= 3),
        "cat": (torch.cat([p, p], dim=0), torch.cat([x, x])),
        "local operand": (p * torch.tensor([1.0, 2.0, 3.0]), x * torch.tensor([1.0, 2.0, 3.0])),
        "reshape": (p.reshape(3, 2).sum(1), x.reshape(3, 2).sum(1)),
    }
    for name, (remote, local) in checks.items():
        got = await remote.get()
        assert torch.equal(got, local), name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(5, 3, dtype=torch.float32),
        torch.randn(4, dtype=torch.float64),
        torch.randn(7, dtype=torch.bfloat16),
        torch.arange(-5, 5, dtype=torch.int64),
        torch.arange(200, dtype=torch.uint8),
        torch.tensor([True, False, True]),
        torch.tensor(3.25),
        torch.zeros(0, 4),
        torch.arange(12.0).reshape(3, 4).t(),
        torch.arange(20).reshape(4, 5)[:, 1::2],
    ],
    ids=["float32", "float64", "bfloat16", "int64", "uint8", "bool", "0-d", "empty", "transposed", "strided"],
)
async def test_dtypes_and_layouts_round_trip(bob: fedptr.Worker, x: torch.Tensor) -> None:
    p = await bob.send(x)
    info = (await bob.objects())[p.id_at_location]
    assert info.shape == tuple(x.shape)
    back = await p.get()
    assert isinstance(back, torch.Tensor)
    assert back.dtype == x.dtype and back.shape == x.shape
    assert torch.equal(back, x)


async def test_64_mib_tensor(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    x = torch.randn(16 << 20)  # 64 MiB of float32
    p = await bob.send(x)
    q = await p.move(alice)
    s = await (q * 2).sum().get()
    assert torch.allclose(s, (x * 2).sum())  # type: ignore[arg-type]
    back = await q.get()
    assert torch.equal(back, x)  # type: ignore[arg-type]


async def test_a_pointer_sent_without_awaiting_is_usable_at_once(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    # sending a pointer is two-phase and runs client-side: what names the new pointer (an op, its
    # results, an in-place update, a get) must reach alice only after she stores it
    p = await bob.send(torch.arange(4.0))
    q = p.send(alice)  # not awaited
    total = (q * 2).sum()
    v, i = q.max(dim=0)
    q.add_(1)
    at_bob = await total.get()
    assert isinstance(at_bob, fedptr.Pointer) and at_bob.location == "bob"
    assert torch.equal(await at_bob.get(), torch.tensor(12.0))
    assert [await (await r.get()).get() for r in (v, i)] == [torch.tensor(3.0), torch.tensor(3)]
    assert torch.equal(await (await q.get()).get(), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    failed = (await bob.send(torch.ones(1))).send("ghost")  # the send fails: so does what uses it
    with pytest.raises(fedptr.UnknownWorkerError):
        await (failed + 1)
    failed.owned = False  # nothing was stored there: nothing to delete


async def test_clear_deletes_down_the_chain(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    p = await (await bob.send(torch.ones(2))).send(alice)
    p.owned = False  # clear() below deletes it; the pointer must not delete twice
    await alice.clear()
    assert await eventually(lambda: all_empty(alice.client))


async def test_workers_lists_registered_names(client: fedptr.Client) -> None:
    assert await client.workers() == sorted(CHAIN)


async def test_send_pipelines_and_reports_errors_late(client: fedptr.Client, bob: fedptr.Worker) -> None:
    before = client.link.messages_sent
    p = bob.send(torch.arange(3.0))
    result = (p * 2).get()  # put, op and get leave together, before any reply
    assert client.link.messages_sent - before == 2  # the get is sent once the coroutine runs
    assert torch.equal(await result, torch.tensor([0.0, 2.0, 4.0]))  # type: ignore[arg-type]
    ghost = client.worker("ghost").send(torch.ones(1))
    with pytest.raises(fedptr.UnknownWorkerError):
        await ghost
    ghost.owned = False  # nothing was stored: there is nothing to delete
    elsewhere = fedptr.Pointer(client, "ghost", 1, deletes=False)  # any pointer there: its await checks effects
    await elsewhere  # the failure was raised once, to the sent pointer's await
    unawaited = client.worker("ghost").send(torch.ones(1))
    unawaited.owned = False
    with pytest.raises(fedptr.UnknownWorkerError):
        await elsewhere  # a failed send nobody awaited: raised by the next await there


async def test_objects_of_a_client_that_left_are_reclaimed(cluster: fedptr.Cluster, client: fedptr.Client) -> None:
    bob, alice = client.worker("bob"), client.worker("alice")
    async with cluster.connect() as other:
        kept = await other.worker("bob").send(torch.ones(3))
        chained = await (await other.worker("bob").send(torch.ones(2))).send(other.worker("alice"))
        kept.owned = chained.owned = False  # as if the process died: no deletes are sent
        assert len(await bob.objects()) == 2 and len(await alice.objects()) == 1
    # it said goodbye: the workers reclaim what it owned, down its chains
    assert await eventually(lambda: all_empty(client))


async def test_listing_too_many_objects_is_refused_not_hung(bob: fedptr.Worker) -> None:
    from fedptr import limits

    x = await bob.send(torch.zeros(1))
    ys = [x + i for i in range(limits.MAX_LISTED_OBJECTS + 1)]
    await ys[-1]
    with pytest.raises(fedptr.OverloadedError, match="too many to list"):
        await bob.objects()


async def test_offloaded_ops_keep_program_order(bob: fedptr.Worker) -> None:
    """Ops on tensors big enough to run on a node's thread (over `limits.OFFLOAD_NUMEL`
    elements) happen in the order they were issued, also relative to later small ops whose
    operands are already there: un-awaited backward then grad, a read then an in-place write,
    and a get after an in-place update."""
    w0 = torch.randn(300, 300)
    w = (await bob.send(w0.clone())).requires_grad_()
    (w * 2.0).sum().backward()  # offloaded: 90,000 elements
    g = w.grad  # its operand w is settled: it would run at once, before backward
    assert torch.equal(await g.get(), torch.full((300, 300), 2.0))

    x = await bob.send(w0.clone())
    y = x.matmul(x)  # a read of x on the thread...
    x.add_(1.0)  # ...then a small write of x issued after it
    expected = w0 @ w0
    assert torch.allclose(await y.get(), expected, atol=1e-3)
    assert torch.equal(await x.get(), w0 + 1.0)

    z = await bob.send(w0.clone())
    z.mul_(3.0)  # in place, offloaded
    assert torch.equal(await z.get(), w0 * 3.0)  # the get comes after the update


async def test_a_failure_someone_awaits_is_theirs_not_raised_to_a_concurrent_await(bob: fedptr.Worker) -> None:
    # the soak's failure: a task awaiting its own (successful) pointer got another task's send
    # error, took its operation for failed, and used a pointer it had in fact handed on
    x = await bob.send(torch.ones(4))
    big = torch.zeros(1 << 19)
    failing = bob.send(big)
    big.add_(1)  # the send fails when bob acknowledges it (torn)

    async def own() -> None:
        await failing

    mine = asyncio.ensure_future(own())
    await asyncio.sleep(0)  # `mine` is now awaiting its send
    assert torch.equal(await (x + x).get(), torch.full((4,), 2.0))  # type: ignore[arg-type]
    with pytest.raises(fedptr.UsageError, match="changed in place"):
        await mine
    await x  # raised once, to its awaiter: not again here

    update = (x + x).sum().backward()  # a Pending that fails: nothing there tracks a gradient
    waiting = asyncio.ensure_future(update)
    await asyncio.sleep(0)
    assert torch.equal(await (x * 3).get(), torch.full((4,), 3.0))  # type: ignore[arg-type]
    with pytest.raises(fedptr.RemoteError, match="grad"):
        await waiting
    await x


async def test_an_await_already_waiting_leaves_a_failure_to_the_task_that_claims_it(bob: fedptr.Worker) -> None:
    # the other order: the unrelated await starts waiting for the send before its owner does
    y = await bob.send(torch.ones(4))
    big = torch.zeros(1 << 19)
    failing = bob.send(big)
    big.add_(1)
    theirs = asyncio.ensure_future(_awaited(y))
    await asyncio.sleep(0)  # `theirs` waits for bob's running updates, the send among them
    mine = asyncio.ensure_future(_awaited(failing))
    with pytest.raises(fedptr.UsageError, match="changed in place"):
        await mine
    assert await theirs is y


async def test_awaiting_the_target_of_a_failed_update_reports_it_there_alone(bob: fedptr.Worker) -> None:
    # the soak's counters: `await c.add_(...)` must report its own update, even while another
    # task already waits for bob's running updates (or it counts an update that failed)
    c = await bob.send(torch.zeros(4))
    other = await bob.send(torch.ones(4))
    c.add_(torch.ones(5))  # fails on bob: the shapes do not broadcast
    theirs = asyncio.ensure_future(_awaited(other))
    await asyncio.sleep(0)  # `theirs` waits for bob's running updates, this one among them
    with pytest.raises(fedptr.RemoteError, match="size"):
        await _awaited(c)
    assert await theirs is other
    assert torch.equal(await c.get(), torch.zeros(4))  # type: ignore[arg-type]


async def test_every_concurrent_await_of_a_pointer_waits_for_its_queued_updates(bob: fedptr.Worker) -> None:
    # issue 19: the first await claimed the queued update and the other seven returned at once,
    # before the update was acknowledged (so before it was durable: kill -9 lost it)
    c = await bob.send(torch.zeros(4))
    update = effect("add_", (c, 1))

    async def settled_when_awaited() -> bool:
        await c
        return update.done()

    assert await asyncio.gather(*(settled_when_awaited() for _ in range(8))) == [True] * 8
    c.add_(torch.ones(5))  # fails on bob: every await sharing the claim reports it
    outcomes = await asyncio.gather(*(_awaited(c) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, fedptr.RemoteError) for o in outcomes), outcomes
    assert await c is c  # reported: a later await does not raise it again
    assert torch.equal(await c.get(), torch.ones(4))  # type: ignore[arg-type]


async def _awaited(p: fedptr.Pointer) -> fedptr.Pointer:
    return await p


@pytest.mark.inproc(False)  # in one process inproc hands the node the client's own buffer, never a copy
async def test_a_pipelined_send_is_not_torn_by_a_later_change(bob: fedptr.Worker) -> None:
    small = torch.zeros(4)
    p = bob.send(small)
    small.add_(1)  # the send returned before its bytes left: a small tensor was copied
    assert torch.equal(await p.get(), torch.zeros(4))  # type: ignore[arg-type]
    big = torch.zeros(1 << 19)  # 2 MiB: sent from its memory
    q = bob.send(big)
    big.add_(1)  # changed before the worker acknowledged: the send fails rather than store torn bytes
    with pytest.raises(fedptr.UsageError, match="changed in place while it was being sent"):
        await q
    r = await bob.send(big)  # awaited, then changed: fine
    big.add_(1)
    assert torch.equal(await r.get(), torch.ones(1 << 19))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["failed op", "failed in-place update"])
async def test_a_pointer_whose_await_raised_is_deleted_without_the_cyclic_collector(
    bob: fedptr.Worker, kind: str
) -> None:
    """An await that raised must not leave the pointer in a reference cycle (the error's
    traceback keeping frames whose locals are the pointer, or the error): dropped, with the
    cyclic garbage collector off, its delete reaches the node. Both kinds: an op's result that
    failed, and the target of an in-place update that failed."""
    a = await bob.send(torch.ones(2, 3))
    b = await bob.send(torch.ones(4, 5))
    if kind == "failed op":
        p = a @ b
    else:
        p = await bob.send(torch.ones(2, 3))
        p.add_(b)
    obj_id = p.id_at_location
    gc.collect()
    gc.disable()
    try:
        try:
            await p
        except fedptr.RemoteError:
            pass
        else:
            raise AssertionError(f"{p!r} was awaited without its error")
        del p

        async def deleted() -> bool:
            return obj_id not in await bob.objects()

        assert await eventually(deleted), f"a dropped pointer ({kind}) whose await raised was not deleted"
    finally:
        gc.enable()


async def test_dropped_operand_of_an_op_waiting_for_a_send_is_deleted_after_it(
    bob: fedptr.Worker, alice: fedptr.Worker
) -> None:
    # red13: an op on a pointer still being sent (two-phase) waits in a client-side task; its
    # other operand, dropped meanwhile, was deleted at once (the deletes' timer, or a plan run's
    # `Client.hold_turn`, flushes them), so the delete reached alice before the op read it
    done = await (await bob.send(torch.tensor([1.0, 2.0]))).send(alice)  # held by alice, in order
    sending = (await bob.send(torch.tensor([10.0, 20.0]))).send(alice)  # not awaited: unordered
    y = done + sending
    del done  # the op still reads it
    z = await y.get()  # a pointer to bob's sum
    assert isinstance(z, fedptr.Pointer)
    assert torch.equal(await z.get(), torch.tensor([11.0, 22.0]))  # type: ignore[arg-type]
    del sending
