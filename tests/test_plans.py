"""Plans (`fedptr.plan`) on real processes: recorded once, one message per run, same results as
the operations sent one by one, checked by the node, refused where they cannot be recorded."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
import torch
from fedptr.nodes.node import NodeConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import optim, wire
from fedptr.client import Client

from . import harness
from .conftest import refused

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)


def requests_sent(client: Client) -> int:
    return client.link.messages_sent


async def test_a_chain_of_dependent_ops_is_one_message_per_run(client: Client, bob: fedptr.Worker) -> None:
    @fedptr.plan
    def chain(x: fedptr.Pointer) -> fedptr.Pointer:
        for i in range(100):
            x = x * 1.01 + i
        return x

    x0 = torch.randn(4, 3)
    x = await bob.send(x0)
    first = chain(x)  # records, sends the plan, runs
    await first
    expected = x0.clone()
    for i in range(100):
        expected = expected * 1.01 + i
    before = requests_sent(client)
    second = chain(x)
    assert requests_sent(client) - before == 1  # the RunPlan alone
    assert second.shape == (4, 3) and second.dtype == torch.float32  # known before the reply
    assert torch.allclose(await second.get(), expected)
    assert torch.allclose(await first.get(), expected)
    objects = await bob.objects()
    assert list(objects) == [x.id_at_location]  # no intermediate result was stored


async def test_a_run_and_the_get_of_its_output_leave_together(client: Client, bob: fedptr.Worker) -> None:
    # one multipart for both: the run waits for the rest of its loop turn instead of leaving alone
    x = await bob.send(torch.ones(3))
    double = fedptr.plan(lambda t: t * 2.0)
    await double(x)
    before = client.link.multiparts_sent
    assert torch.equal(await double(x).get(), torch.full((3,), 2.0))
    assert client.link.multiparts_sent - before == 1


async def test_runs_awaited_in_turn_take_the_last_outputs_delete_with_them(client: Client, bob: fedptr.Worker) -> None:
    # each awaited run drops the previous run's output: its Delete leaves in the run's own
    # multipart (the batch the run holds for a get), not in one of its own just after, which
    # cost the broker and the node a wake more per run
    x = await bob.send(torch.ones(3))
    double = fedptr.plan(lambda t: t * 2.0)
    await double(x)
    runs = 5
    before = client.link.multiparts_sent, client.link.messages_sent
    for _ in range(runs):
        await double(x)
    sent = client.link.multiparts_sent - before[0], client.link.messages_sent - before[1]
    assert sent == (runs, 2 * runs)  # one multipart per run: the RunPlan and the last output's Delete
    assert list(await bob.objects()) == [x.id_at_location]  # every output deleted


async def test_the_replies_to_a_run_and_its_get_leave_the_node_together() -> None:
    # the node holds the plan's reply to the end of its loop turn: the get that came in the same
    # multipart is answered in that turn, and both replies leave as one multipart (one broker
    # hop, one wake of the client), as the two requests came
    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.ones(3))
        double = fedptr.plan(lambda t: t * 2.0)
        await double(x).get()
        node = c.node("bob").link
        before = node.multiparts_sent, node.messages_sent
        assert torch.equal(await double(x).get(), torch.full((3,), 2.0))
        assert (node.multiparts_sent - before[0], node.messages_sent - before[1]) == (1, 2)


async def test_a_new_shape_records_again(bob: fedptr.Worker) -> None:
    @fedptr.plan
    def rows(x: fedptr.Pointer) -> fedptr.Pointer:
        return x.sum(0) * x.shape[0]  # the shape is fixed at recording

    a = await bob.send(torch.ones(2, 3))
    b = await bob.send(torch.ones(5, 3))
    assert torch.equal(await rows(a).get(), torch.full((3,), 4.0))
    assert torch.equal(await rows(b).get(), torch.full((3,), 25.0))
    assert "2 signatures" in repr(rows)


async def test_a_training_step_matches_the_same_step_op_by_op(bob: fedptr.Worker) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    xs = [torch.randn(16, 4) for _ in range(3)]
    ys = [torch.randint(0, 3, (16,)) for _ in range(3)]

    by_ops = await bob.send(model)
    opt = optim.SGD(by_ops.parameters(), lr=0.1)
    for x, y in zip(xs, ys, strict=True):
        loss_ops = functional.cross_entropy(by_ops(await bob.send(x)), await bob.send(y))
        loss_ops.backward()
        opt.step()
        opt.zero_grad()

    planned = await bob.send(model)
    plan_opt = optim.SGD(planned.parameters(), lr=0.1)

    @fedptr.plan
    def step(x: fedptr.Pointer, y: fedptr.Pointer) -> fedptr.Pointer:
        loss = functional.cross_entropy(planned(x), y)
        loss.backward()
        plan_opt.step()
        plan_opt.zero_grad()
        return loss

    for x, y in zip(xs, ys, strict=True):
        loss = step(await bob.send(x), await bob.send(y))
    assert torch.allclose(await loss.get(), await loss_ops.get())
    trained_ops, trained_plan = await by_ops.get(), await planned.get()
    assert isinstance(trained_ops, nn.Module) and isinstance(trained_plan, nn.Module)
    for a, b in zip(trained_ops.parameters(), trained_plan.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


async def test_a_plan_returning_nothing_is_awaited_as_pending(bob: fedptr.Worker) -> None:
    @fedptr.plan
    def bump(x: fedptr.Pointer) -> None:
        x.add_(1.0)
        x.mul_(2.0)

    x = await bob.send(torch.zeros(3))
    await bump(x)
    await bump(x)
    assert torch.equal(await x.get(), torch.full((3,), 6.0))


async def test_an_async_plan_function_may_await_pointers(bob: fedptr.Worker) -> None:
    @fedptr.plan
    async def twice(x: fedptr.Pointer) -> tuple[fedptr.Pointer, fedptr.Pointer]:
        y = await (x * 2)
        return y, await (y + 1)

    y, z = twice(await bob.send(torch.ones(2)))
    assert torch.equal(await y.get(), torch.full((2,), 2.0))
    assert torch.equal(await z.get(), torch.full((2,), 3.0))


async def test_what_cannot_be_recorded_is_refused_at_once(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(2))
    on_alice = await alice.send(torch.ones(2))

    @fedptr.plan
    async def fetches(p: fedptr.Pointer) -> fedptr.Pointer:
        await (p + 1).get()
        return p + 1

    @fedptr.plan
    def identity(p: fedptr.Pointer) -> fedptr.Pointer:
        return p

    @fedptr.plan
    def mixes(p: fedptr.Pointer) -> fedptr.Pointer:
        return p + on_alice

    model = await bob.send(nn.Linear(2, 1))
    adam = optim.Adam(model.parameters())

    @fedptr.plan
    def adam_step(p: fedptr.Pointer) -> fedptr.Pointer:
        loss = model(p).sum()
        loss.backward()
        adam.step()
        return loss

    with pytest.raises(fedptr.UsageError, match="records pointer operations only"):
        fetches(x)
    with pytest.raises(fedptr.UsageError, match="not its inputs"):
        identity(x)
    with pytest.raises(fedptr.LocationMismatchError):
        mixes(x)
    with pytest.raises(fedptr.UsageError, match="Adam"):
        adam_step(x)
    with pytest.raises(fedptr.LocationMismatchError):
        identity(x, on_alice)
    assert client_is_usable(x)
    assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))


def client_is_usable(p: fedptr.Pointer) -> bool:
    return p.client.recording is None


async def test_a_failed_run_fails_its_outputs_and_the_plan_is_sent_again(bob: fedptr.Worker) -> None:
    @fedptr.plan
    def grad_of(p: fedptr.Pointer) -> fedptr.Pointer:
        return p.grad * 1  # no gradient: fails on the worker

    p = await bob.send(torch.ones(2, requires_grad=True))
    out = grad_of(p)
    with pytest.raises(fedptr.RemoteError, match="no gradient"):
        await out
    (p * 3).sum().backward()
    assert torch.equal(await grad_of(p).get(), torch.full((2,), 3.0))  # the plan was sent again


async def test_the_node_checks_a_plan_before_keeping_it(client: Client) -> None:
    bad = [
        (wire.PutPlan(1, 1, [["exec", [wire.Ref(0)], {}]], [1]), fedptr.OpNotAllowedError),
        (wire.PutPlan(1, 1, [["aggregate_mean", [[wire.Ref(0)]], {}]], [1]), fedptr.OpNotAllowedError),
        (wire.PutPlan(1, 1, [["add", [wire.Ref(0), wire.Ref(1)], {}]], [1]), fedptr.InvalidArgumentError),
        (wire.PutPlan(1, 1, [["add", [wire.Ref(0), 1], {}]], [0]), fedptr.InvalidArgumentError),
        (wire.PutPlan(1, 1, [["add", [2, 1], {}]], [1]), fedptr.InvalidArgumentError),
        (wire.PutPlan(1, 1, [["add", [wire.Ref(0)]]], [1]), fedptr.InvalidArgumentError),
        (wire.PutPlan(1, 1, [], []), fedptr.InvalidArgumentError),
    ]
    for msg, error in bad:
        with pytest.raises(error):
            try:
                await client.call("bob", msg)
            except fedptr.RemoteError as e:  # a node's argument checks travel as RemoteError
                raise fedptr.InvalidArgumentError(str(e)) if e.remote_type == "InvalidArgumentError" else e from None
    with pytest.raises(fedptr.ObjectNotFoundError, match="no plan"):
        await client.call("bob", wire.RunPlan(12345, [], []))
    x = await client.worker("bob").send(torch.ones(1))
    await client.call("bob", wire.PutPlan(7, 1, [["add", [wire.Ref(0), 1.0], {}]], [1]))
    with pytest.raises(fedptr.RemoteError, match="takes 1 inputs"):
        await client.call("bob", wire.RunPlan(7, [x.id_at_location, x.id_at_location], [client.new_id()]))
    reply = await client.call("bob", wire.RunPlan(7, [x.id_at_location], [client.new_id()]))
    assert reply == wire.PlanReply([[1]], ["float32"])


# --- the lean loop (a plan of plain operations: nodes/plans.py `Step`) -----------------------
SECRET = torch.arange(32, dtype=torch.float32).reshape(8, 4)
"""bob's private data in the lean-loop tests."""


def lean_plans(c: harness.InprocCluster, worker: str) -> list[bool]:
    """For each plan `worker` keeps, whether it runs on the lean loop."""
    kept = c.node(worker).plans._by_peer.values()
    return [plan.steps is not None for by_id in kept for plan in by_id.values()]


async def test_a_plain_plans_outputs_derive_from_exactly_the_inputs_they_read() -> None:
    # the lean loop decides every taint at once from the inputs': an output that reads only a
    # public input stays public, one that reads private data is private, as op by op
    async with harness.cluster(["bob"], data={"bob": {"data": {"x": SECRET}}}) as c:
        bob = c.worker("bob")
        (x,) = await bob.search("data")
        p = await bob.send(torch.ones(8, 4))

        @fedptr.plan
        def mixed(x: fedptr.Pointer, p: fedptr.Pointer) -> tuple[fedptr.Pointer, ...]:
            q = p * 2.0
            return q + 1.0, (x + q).sum(0), q.max(0)[1], torch.cat([q, q])[1:3], torch.cat([x, q])

        public, private, indices, stacked, stacked_private = mixed(x, p)
        assert torch.equal(await public.get(), torch.full((8, 4), 3.0))
        assert lean_plans(c, "bob") == [True]
        assert torch.equal(await indices.get(), torch.zeros(4, dtype=torch.int64))
        assert torch.equal(await stacked.get(), torch.full((2, 4), 2.0))  # arguments nested in a list
        await refused(private.get(), fedptr.PermissionDenied, owner="bob")
        await refused(stacked_private.get(), fedptr.PermissionDenied, owner="bob")
        await refused((x + p * 2.0).sum(0).get(), fedptr.PermissionDenied, owner="bob")  # op by op alike


async def test_a_plain_plans_results_never_share_memory_with_its_inputs_or_each_other() -> None:
    # a view of an input or of an earlier result is copied (guard.run's alias check): a later
    # write to one object must not change another, whose taint would not follow
    async with harness.cluster(["bob"]) as c:
        t = await c.worker("bob").send(torch.zeros(2, 3))

        @fedptr.plan
        def views(t: fedptr.Pointer) -> tuple[fedptr.Pointer, ...]:
            y = t * 2.0
            return y, y.view(6), t.view(6), t.detach()

        y, y_flat, t_flat, t_detached = views(t)
        await y
        assert lean_plans(c, "bob") == [True]
        await t.add_(1.0)
        await y.add_(1.0)
        assert torch.equal(await y.get(), torch.ones(2, 3))
        assert torch.equal(await y_flat.get(), torch.zeros(6))
        assert torch.equal(await t_flat.get(), torch.zeros(6))
        assert torch.equal(await t_detached.get(), torch.zeros(2, 3))


@pytest.mark.parametrize("index", [[0, 0], [{"__slice__": [0, 1, None]}]], ids=["element", "row"])
async def test_a_plain_plans_output_holds_no_more_memory_than_it_is_charged(index: list[object]) -> None:
    # getitem with basic indexing gives a view, as the VIEW ops do: of an intermediate (4 MiB
    # here) it would be stored still holding the intermediate's whole storage while charged
    # for its own few bytes, past --max-store-bytes and the client's quota (red9)
    async with harness.cluster(["bob"], configs={"bob": NodeConfig(max_store_bytes=64 * 1024)}) as c:
        p = await c.worker("bob").send(torch.ones(1, 1))
        plan = [["repeat", [wire.Ref(0), 1024, 1024], {}], ["getitem", [wire.Ref(1), *index], {}]]
        await c.client.call("bob", wire.PutPlan(7, 1, plan, [2]))
        assert lean_plans(c, "bob") == [True]
        (out,) = [c.client.new_id()]
        await c.client.call("bob", wire.RunPlan(7, [p.id_at_location], [out]))
        value = c.node("bob").store.entries[out].result()
        held, charged = value.untyped_storage().nbytes(), value.numel() * value.element_size()
        assert held == charged, f"a {charged}-byte output holds {held} bytes"


async def test_a_plain_plans_refusal_on_private_data_is_worded_as_the_op_alone() -> None:
    # a private operation refused by the meta run names the op and the public operands' shapes,
    # whether it runs in a plan (on an earlier private result) or alone
    async with harness.cluster(["bob"], data={"bob": {"data": {"x": SECRET}}}) as c:
        (x,) = await c.worker("bob").search("data")
        p = await c.worker("bob").send(torch.ones(3, 3))
        ids = [x.id_at_location, p.id_at_location]
        plan = [["mul", [wire.Ref(0), 2.0], {}], ["matmul", [wire.Ref(2), wire.Ref(1)], {}]]
        await c.client.call("bob", wire.PutPlan(5, 2, plan, [3]))
        assert lean_plans(c, "bob") == [True]
        in_plan = await refused(
            c.client.call("bob", wire.RunPlan(5, ids, [c.client.new_id()])), fedptr.PermissionDenied, owner="bob"
        )
        alone = await refused(
            c.client.call("bob", wire.Op(c.client.new_id(), "matmul", [wire.Ref(ids[0]), wire.Ref(ids[1])], {})),
            fedptr.PermissionDenied,
            owner="bob",
        )
        assert str(in_plan) == str(alone) and "[3, 3]" in str(in_plan)


async def test_plans_that_write_read_models_or_take_inline_tensors_run_op_by_op() -> None:
    # only plain operations run lean: a write (its taint rule), a model or an inline tensor
    # (made afresh by each run) keeps the per-operation path
    async with harness.cluster(["bob"]) as c:
        bob = c.worker("bob")
        t = await bob.send(torch.zeros(3))
        model = await bob.send(nn.Linear(3, 2))
        ran = [
            fedptr.plan(lambda t: t.add_(1.0) * 1.0)(t),
            fedptr.plan(lambda t: model(t) * 1.0)(t),
            fedptr.plan(lambda t: t + torch.ones(3))(t),
        ]
        for out in ran:
            await out
        assert lean_plans(c, "bob") == [False, False, False]
        assert torch.equal(await ran[2].get(), torch.full((3,), 2.0))


async def test_a_plan_used_again_with_a_new_cluster_records_and_sends_itself_there() -> None:
    """A plan is kept per worker name and shapes, but what a worker holds is a client's: a new
    cluster (a notebook's second `local_cluster`, a reconnected client) whose worker has the same
    name must be sent the plan again, not run a plan id that worker never heard of (found by
    branch cycles: the first run failed with ObjectNotFoundError)."""
    w = torch.ones(3)

    @fedptr.plan
    def step(x: fedptr.Pointer) -> fedptr.Pointer:
        return x * 2 + 1

    for _ in range(2):
        async with harness.cluster(["bob"]) as c:
            x = await c.worker("bob").send(w)
            assert torch.equal(await step(x).get(), w * 2 + 1)


_GROWING = st.sampled_from(["mul_col", "add_row", "relu", "sum0", "mul_self"])
"""Steps of a public chain: broadcasting against a column (n, 1) or a row (1, m) can grow its
value, ``sum(0, keepdim=True)`` shrinks it; all but the sum take references only (quick steps)."""


def _step(name: str, y: Any, col: Any, row: Any) -> Any:
    if name == "mul_col":
        return y * col
    if name == "add_row":
        return y + row
    if name == "relu":
        return functional.relu(y)
    if name == "mul_self":
        return y * y
    return y.sum(0, keepdim=True)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    n=st.integers(1, 12),
    m=st.integers(1, 12),
    offload=st.integers(1, 100),
    names=st.lists(_GROWING, min_size=1, max_size=10),
)
def test_a_plain_plan_runs_inline_until_the_first_step_whose_operands_are_big(
    n: int, m: int, offload: int, names: list[str]
) -> None:
    # the event loop runs a step inline only while its operands hold at most `offload_numel`
    # elements in all; from the first that holds more, the run goes on on the thread. A public
    # run takes its steps in a quick loop that checks no operand: it must stop where the rule does
    col, row = torch.rand(n, 1), torch.rand(1, m)
    expected, operands = col, []
    for i, name in enumerate(names):  # the elements of the distinct values a step reads
        more = {"mul_col": n if i else 0, "add_row": m}.get(name, 0)  # (y is col before the first step)
        operands.append(expected.numel() + more)
        expected = _step(name, expected, col, row)
    first_big = next((i for i, k in enumerate(operands) if k > offload), len(names))

    async def run() -> None:
        async with harness.cluster(["bob"], configs={"bob": NodeConfig(offload_numel=offload)}) as c:
            bob = c.worker("bob")
            cp, rp = await bob.send(col), await bob.send(row)
            compute = c.node("bob").compute
            inline: list[tuple[int, int]] = []
            lean = compute._compute_lean

            def spied(lean_run: Any, values: dict[int, Any], start: int, on_loop: bool) -> int:
                done = lean(lean_run, values, start, on_loop)
                if on_loop:
                    inline.append((start, done))
                return done

            compute._compute_lean = spied  # type: ignore[method-assign]
            chain = fedptr.plan(lambda y, r: functools.reduce(lambda v, k: _step(k, v, y, r), names, y))
            got = await chain(cp, rp).get()
            assert lean_plans(c, "bob") == [True]
            assert inline == [(0, first_big)]
            assert torch.allclose(got, expected)

    asyncio.run(run())
