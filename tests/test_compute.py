"""The node's one execution path for single ops and plan runs (nodes/compute.py), on the
in-process harness: what a run changed in place reaches the disk even when the run then fails,
for a single op as for a plan (they once had two paths, and only the plan's persisted it); and
the table its answers come from."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import types
import weakref
from collections.abc import Callable
from concurrent.futures import thread
from typing import Any

import numpy as np
import pytest
import torch
from fedptr.nodes import compute, guard
from fedptr.nodes.node import NodeConfig
from fedptr.nodes.scheduler import Scheduler
from fedptr.nodes.store import Entry
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fedptr
from fedptr import limits, wire
from fedptr.errors import InvalidArgumentError, OverloadedError
from tests.conftest import refused

from . import harness

N = 1000
"""Elements of the tensor written in place (float32: 4,000 bytes)."""


@pytest.mark.parametrize("as_plan", [False, True], ids=["op", "plan"])
async def test_an_in_place_write_whose_result_cannot_be_stored_still_reaches_the_disk(as_plan: bool) -> None:
    # room for x and a little: the op's result (for the single op an alias of x, charged as a new
    # object; for the plan a copy) does not fit, so the run fails after it changed x
    configs = {"bob": NodeConfig(max_store_bytes=4 * N + 1000)}
    async with harness.cluster(["bob"], configs=configs, stores=["bob"]) as c:
        x = await c.worker("bob").send(torch.zeros(N))

        @fedptr.plan
        def bump(t: fedptr.Pointer) -> fedptr.Pointer:
            t.add_(1.0)
            return t * 1.0

        result = bump(x) if as_plan else x.add_(1.0)
        with pytest.raises(fedptr.StoreFullError):
            await result
        node = c.node("bob")
        in_memory = node.store.entries[x.id_at_location].result()
        assert torch.equal(in_memory, torch.ones(N))  # the write happened before the failure
        await c.restart_node("bob")
        restored = c.node("bob").store.entries[x.id_at_location].result()
        assert torch.equal(restored, in_memory)  # what a restart serves is what was served


async def test_a_stopping_nodes_scheduler_refuses_new_work_typed() -> None:
    # a request still in flight while its node stops (a SecAgg+ owner stopped mid-round) used
    # to reach its peer as torch's untyped "cannot schedule new futures after shutdown"
    scheduler = Scheduler("bob", lambda: None, lambda: None)
    assert await scheduler.offload(sum, [1, 2]) == 3
    scheduler.trim_heap_soon()
    await scheduler.aclose()
    with pytest.raises(OverloadedError, match="stopping"):
        await scheduler.offload(sum, [1, 2])
    scheduler.trim_heap_soon()  # a departure noticed while stopping schedules nothing
    assert scheduler._trimming is None


@pytest.mark.parametrize("raises", [False, True])
async def test_offloaded_work_lets_go_of_its_arguments_before_its_result_is_awaited(
    raises: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor keeps a work item (its function and arguments) until after the loop has the
    result; a thread descheduled there kept a DP-SGD run's model alive after its delete, and the
    store, which charges storages until they are freed, counted it in one twin world only (CI
    run 35). Here the thread is held right after the result, as a busy machine holds it. When
    the work raises, the scheduler's frames let go too; a caller's frames the error passed
    through keep their locals as long as the error lives (the stalled work item's future holds
    it): a window as short as the stall, left."""
    held, go_on = threading.Event(), threading.Event()
    run = thread._WorkItem.run

    def run_then_stall(item: Any) -> None:
        run(item)
        held.set()
        go_on.wait(10)

    monkeypatch.setattr(thread._WorkItem, "run", run_then_stall)
    scheduler = Scheduler("bob", lambda: None, lambda: None)
    model = nn.Linear(3, 4)
    gone = weakref.ref(model)

    def step(m: nn.Module) -> int:
        if raises:
            raise ValueError("refused")
        return sum(p.numel() for p in m.parameters())

    try:
        with contextlib.suppress(ValueError):
            assert await scheduler.offload(step, model) == 16
        del model
        assert held.wait(10)
        gc.collect()
        assert gone() is None, "the worker thread still holds the model"
    finally:
        go_on.set()
        await scheduler.aclose()


async def test_answers_from_the_ok_table_carry_each_results_own_shape_and_dtype() -> None:
    # the node answers an op from a table of Ok replies by (shape, dtype): a result whose shape
    # depends on data must still report its own shape, not that of an earlier answer
    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.tensor([1.0, 2.0, 3.0]))
        shapes = []
        for threshold in (0.0, 1.0, 2.0, 0.0):
            picked = x[x > threshold]  # a data-dependent shape: known once the node answered
            await picked
            shapes.append(tuple(picked.shape))
        as_int = x.to(torch.int64)
        await as_int
        assert shapes == [(3,), (2,), (1,), (3,)]
        assert (tuple(as_int.shape), as_int.dtype) == ((3,), torch.int64)


def test_the_ok_table_shares_one_reply_per_shape_and_dtype_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compute, "_OKS", {})
    first = compute._ok([torch.zeros(2, 3)])
    assert first is compute._ok([torch.ones(2, 3)])  # built once, then shared
    assert (first.shape, first.dtype, first.more) == ([2, 3], "float32", [])
    other = compute._ok([torch.zeros(2, 3, dtype=torch.int64)])
    assert other is not first and other.dtype == "int64"
    both = compute._ok([torch.zeros(4), torch.zeros(4, dtype=torch.int64)])  # several results: never tabled
    assert (both.shape, both.dtype, both.more) == ([4], "float32", [[[4], "int64"]])
    assert len(compute._OKS) == 2
    monkeypatch.setattr(limits, "OK_HEADER_TABLE_SIZE", 2)  # full: a new shape is answered, not kept
    assert compute._ok([torch.zeros(5)]).shape == [5]
    assert len(compute._OKS) == 2


async def test_an_op_on_a_failed_result_answers_its_error_whatever_the_order_of_its_operands() -> None:
    # the run read the healthy operand's version before it met the failed one, then finished with
    # no values: looking that operand up raised inside the finish, and no answer ever left (the
    # order of the two operands follows their random ids, so it hung about every other time)
    async with harness.cluster(["bob"], call_timeout=5.0) as c:
        bob = c.worker("bob")
        x = await bob.send(torch.ones(3))
        for _ in range(20):
            failed = x.grad  # x has no gradient: this op fails on bob
            with pytest.raises(fedptr.RemoteError, match="no gradient"):
                await (x + failed)
            with pytest.raises(fedptr.RemoteError, match="no gradient"):
                await (failed + x)


async def test_a_deferred_computation_that_raises_is_answered_without_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    # a bug in the slow path must not leave the caller waiting out its deadline, and the bug's
    # message (which may hold any value) stays in the node's log
    async def broken(*_: object) -> None:
        raise KeyError("secret 42")

    monkeypatch.setattr(compute.Compute, "_later", broken)
    configs = {"bob": NodeConfig(offload_numel=1)}  # every op of more than 1 element: the slow path
    async with harness.cluster(["bob"], configs=configs, call_timeout=5.0) as c:
        x = await c.worker("bob").send(torch.ones(3))
        with pytest.raises(fedptr.RemoteError) as info:
            await (x + 1.0)
        assert info.value.remote_type == "InternalError" and "42" not in str(info.value)


async def test_results_computed_at_once_hold_no_asyncio_future() -> None:
    # A future per entry was ~12% of the node's CPU per pipelined op (bench/node_loop.py) and an
    # object more for the cyclic GC to track; an entry settled in the turn that made it needs none.
    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.ones(4))
        y = x
        chain = []
        for _ in range(20):
            y = y + x
            chain.append(y)
        assert torch.equal(await y.get(), torch.full((4,), 21.0))  # type: ignore[arg-type]
        store = c.node("bob").store
        results = [store.entries[p.id_at_location] for p in chain]
        assert all(e.ok for e in results)
        held = [r for e in results for r in gc.get_referents(e) if isinstance(r, asyncio.Future)]
        assert held == []


async def test_a_waiter_that_gives_up_leaves_the_entry_and_the_other_waiters() -> None:
    entry = Entry.tensor(owner="c")
    gave_up, waiting = entry.wait(), entry.wait()
    gave_up.cancel()  # a task awaiting it was cancelled
    handed: list[Entry] = []
    entry.on_settled(handed.append)
    entry.fail(fedptr.StoreFullError("bob", "full"))
    with pytest.raises(fedptr.StoreFullError):
        await asyncio.wait_for(waiting, 5)
    assert entry.settled and isinstance(entry.error, fedptr.StoreFullError) and gave_up.cancelled()
    await asyncio.wait_for(_until(lambda: handed == [entry]), 5)  # a callback runs in a later turn
    with pytest.raises(fedptr.StoreFullError):
        entry.result()
    with pytest.raises(fedptr.StoreFullError):
        await asyncio.wait_for(entry.wait(), 5)  # a late waiter is told at once
    with pytest.raises(asyncio.InvalidStateError):
        entry.settle(torch.ones(1))  # settled once, for good


async def test_failed_ops_leave_no_reference_cycles_on_the_node() -> None:
    # A failed result kept its error with the traceback of the frames that raised it, whose
    # locals led back to the entry (the run, its operands): a cycle per failed op, holding its
    # operands' tensors until the cyclic GC ran (rarely, on a node: limits.NODE_GC_THRESHOLD),
    # and each op pipelined on a failed result raised the same error again, adding its frames.
    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.ones(4))
        failed = x.grad  # x has no gradient: this op fails on bob
        await (x + x)
        gc.collect()
        gc.disable()
        try:
            for _ in range(30):
                with pytest.raises(fedptr.RemoteError, match="no gradient"):
                    await (x + failed)  # an op on a failed result, which raises its stored error
                with pytest.raises(fedptr.RemoteError, match="no gradient"):
                    await (x + x.grad)  # an op that fails in its kernel, then one on its result
                with pytest.raises(fedptr.RemoteError, match="no gradient"):
                    await failed.get()  # a request answered with a stored error, not storing it
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            garbage = [
                o
                for o in gc.garbage
                if type(o).__module__.startswith("fedptr.nodes")
                or (isinstance(o, types.FrameType) and "/nodes/" in o.f_code.co_filename)
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert garbage == []
        error = c.node("bob").store.entries[failed.id_at_location].error
        assert error is not None and error.__traceback__ is None  # nothing of a frame kept


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0)


SECRET = np.arange(32, dtype=np.float32).reshape(8, 4)


async def test_an_operand_is_used_only_as_the_store_allows_it_whatever_its_state() -> None:
    # the node reads a caller's own operand straight from the store's table (`Store.get` only for
    # a missing or foreign one, branch pernode6): another client's object, one mid hand-over, a
    # deleted, a pending and a failed one, and a worker's private data must meet the verdicts
    # `Store.get` gave every operand before
    async with harness.cluster(["bob"], data={"bob": {"data": {"x": SECRET}}}) as c, c.connect() as other:
        bob, client, store = c.worker("bob"), c.client, c.node("bob").store
        held = [await bob.send(torch.ones(8, 4)), await other.worker("bob").send(torch.ones(8, 4))]
        mine, theirs = (p.id_at_location for p in held)  # the pointers held: no Delete leaves

        def add(*ids: int) -> asyncio.Future[wire.Message]:
            return asyncio.ensure_future(
                client.call("bob", wire.Op(client.new_id(), "add", [wire.Ref(i) for i in ids], {}))
            )

        assert isinstance(await add(mine, mine), wire.Ok)
        await refused(add(mine, theirs), fedptr.PermissionDenied, owner="bob", match="another peer")
        await refused(add(theirs, mine), fedptr.PermissionDenied, owner="bob", match="another peer")
        taken = store.take(mine, client.name)  # a hand-over in flight: the id holds nothing here
        await refused(add(mine, mine), fedptr.ObjectNotFoundError)
        store.put_back(mine, taken)
        assert isinstance(await add(mine, mine), wire.Ok)
        failed, pending, gone = client.new_id(), client.new_id(), client.new_id()
        store.add(failed, Entry.tensor(owner=client.name))
        store.entries[failed].fail(InvalidArgumentError("the op that made it failed"))
        await refused(add(mine, failed), fedptr.RemoteError, match="the op that made it failed")
        store.add(pending, Entry.tensor(owner=client.name))
        waiting = add(mine, pending)
        await asyncio.sleep(0.05)  # give the op time to (wrongly) run on the pending entry
        assert not waiting.done()
        store.entries[pending].settle(torch.ones(8, 4))
        assert isinstance(await asyncio.wait_for(waiting, 10), wire.Ok)
        store.add(gone, Entry.tensor(torch.ones(8, 4), client.name))
        store.discard(gone)
        await refused(add(mine, gone), fedptr.ObjectNotFoundError)
        # the worker's private data: any client computes on it, no result comes back, whatever
        # shape the op gives it (a view, an alias written in place, several results)
        (x,) = await bob.search("data")
        y = await bob.send(torch.zeros(8, 4))
        values, indices = x.sort(0)
        for derived in (x + 1.0, x.view(32), x[0], values, indices, x.t().contiguous(), y.add_(x)):
            await refused(derived.get(), fedptr.PermissionDenied, owner="bob")
        await refused(y.get(), fedptr.PermissionDenied, owner="bob")  # written with x: private too
        (theirs_x,) = await other.worker("bob").search("data")
        await refused((theirs_x * 2.0).get(), fedptr.PermissionDenied, owner="bob")


def test_a_lean_views_operand_given_by_keyword_is_seen_too() -> None:
    # getitem takes its tensor by keyword too (getitem(t=x)): a view of an operand is copied
    # whichever way the operand came (red9); an empty one too: it holds x's whole storage
    x = torch.ones(4, 4)
    for view in (x[0], x[0:0]):
        for args, kwargs in (([x, 0], {}), ([], {"t": x})):
            copied = guard.unshared(view, args, kwargs)
            assert copied.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.data())
def test_a_result_is_copied_exactly_when_something_among_the_operands_holds_its_storage(data: st.DataObject) -> None:
    # guard.unshared walks the operands (lists, tuples, dicts, models; a leaf's gradient) in one
    # loop: drawn structures, the result's storage hidden (or not) at a drawn place in them
    base = torch.zeros(16)
    result = base[4:8]  # a view: its storage is base's

    def holder(kind: str) -> Any:
        if kind == "tensor":
            return base
        if kind == "view":
            return base[8:]
        if kind == "grad":  # a gradient set on an unrelated leaf
            t = torch.ones(16)
            t.grad = base
            return t
        model = nn.Linear(2, 2)
        if kind == "param":
            model.weight = nn.Parameter(base[:4].view(2, 2))
        return model

    def nest(leaf: Any, depth: int) -> Any:
        if depth == 0:
            return leaf
        wrap = data.draw(st.sampled_from(["list", "tuple", "dict"]))
        others = [torch.ones(3) for _ in range(data.draw(st.integers(0, 2)))]
        pos = data.draw(st.integers(0, len(others)))
        items = [*others[:pos], nest(leaf, depth - 1), *others[pos:]]
        if wrap == "dict":
            return {f"k{i}": v for i, v in enumerate(items)}
        return items if wrap == "list" else tuple(items)

    kind = data.draw(st.sampled_from(["tensor", "view", "grad", "param", "model", "none"]))
    leaf = torch.ones(5) if kind == "none" else holder(kind)
    hidden = nest(leaf, data.draw(st.integers(0, 3)))
    fillers = [torch.ones(2), 1.5, "x", None]
    args: list[Any] = [*fillers[: data.draw(st.integers(0, 4))]]
    kwargs: dict[str, Any] = {}
    if data.draw(st.booleans()):
        kwargs["k"] = hidden
    else:
        args.insert(data.draw(st.integers(0, len(args))), hidden)
    shared = kind in ("tensor", "view", "grad", "param")
    out = guard.unshared(result, args, kwargs)
    assert (out.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()) is shared
    assert (out is result) is not shared
    assert torch.equal(out, result)
