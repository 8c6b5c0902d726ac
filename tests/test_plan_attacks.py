"""Red team of plans (`fedptr.plan`, `wire.PutPlan`/`wire.RunPlan`): attacks an analyst-client
can run through plans, most of them with hand-crafted graphs sent by a raw client.

Every test asserts the *secure outcome* it expects: refused with the typed refusal it names
(`tests.conftest.refused`: a crash, a timeout or another error fails the test), or what comes
back does not reveal the secret (or, for robustness, the node answers in time), so an attack
that works is a failing test.

One cluster for the module: bob (with a --store) and alice own private 8x4 data; frank owns
private data too but runs with ``--release exact`` (he trusts the analyst with exact derived
values, never with writes: private data is read-only for everyone), which lets a test *see*
whether his read-only data was changed. Tests that may leave a node unusable come last.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from fedptr.nodes import plans
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fedptr
from fedptr import limits, wire
from fedptr.security import CurveKeys
from fedptr.tensors import from_raw, to_raw
from tests.conftest import refused

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

OWNERS = ("bob", "alice", "frank")
WORKERS = OWNERS
R = wire.Ref


@dataclass
class Setup:
    cluster: fedptr.Cluster
    secrets: dict[str, dict[str, torch.Tensor]]
    tmp: Path

    @property
    def client(self) -> fedptr.Client:
        return self.cluster.client

    def w(self, name: str) -> fedptr.Worker:
        return self.cluster.client.worker(name)

    async def data(self, owner: str) -> tuple[fedptr.Pointer, fedptr.Pointer]:
        x, y = await self.w(owner).search("data")
        return x, y


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="redplan-") as tmp_name:
        tmp = Path(tmp_name)
        g = torch.Generator().manual_seed(11)
        secrets: dict[str, dict[str, torch.Tensor]] = {}
        files: dict[str, dict[str, str]] = {}
        for owner in OWNERS:
            x = torch.randn(8, 4, generator=g) + 3.0  # nonzero everywhere
            y = torch.randint(0, 3, (8,), generator=g)
            secrets[owner] = {"x": x, "y": y}
            path = tmp / f"{owner}.npz"
            np.savez(path, x=x.numpy(), y=y.numpy())
            files[owner] = {"data": str(path)}
        node_args = {
            "bob": ["--store", str(tmp / "bob-store")],
            "frank": ["--release", "exact"],
        }
        async with fedptr.local_cluster(list(WORKERS), data=files, node_args=node_args, call_timeout=20.0) as c:
            yield Setup(c, secrets, tmp)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def _clean(setup: Setup) -> AsyncIterator[None]:
    yield
    for name in WORKERS:
        with contextlib.suppress(fedptr.FedptrError):
            await setup.w(name).clear()


# --- helpers -------------------------------------------------------------------------------
def max_err(estimate: torch.Tensor, secret: torch.Tensor) -> float:
    return float((estimate.double() - secret.double()).abs().max())


def assert_hidden(estimate: torch.Tensor, secret: torch.Tensor, what: str, tol: float = 1e-2) -> None:
    err = max_err(estimate, secret)
    assert err > tol, f"LEAK: recovered {what}, max abs error {err:.3g}"


def client_keys(cluster: fedptr.Cluster) -> CurveKeys | None:
    if cluster.keys_dir is not None and (cluster.keys_dir / "client.key_secret").exists():
        return CurveKeys.load(cluster.keys_dir / "client.key_secret", cluster.keys_dir / "broker.key")
    return None


async def put(client: fedptr.Client, worker: str, value: torch.Tensor, requires_grad: bool = False) -> int:
    obj_id = wire.new_object_id()
    await client.call(worker, wire.Put(obj_id, to_raw(value), requires_grad))
    return obj_id


async def get(client: fedptr.Client, worker: str, obj_id: int) -> torch.Tensor:
    reply = await client.call(worker, wire.Get(obj_id))
    assert isinstance(reply, wire.TensorReply)
    return from_raw(reply.tensor)


async def op(
    client: fedptr.Client, worker: str, name: str, args: list[Any], kwargs: dict[str, Any] | None = None
) -> int:
    result = wire.new_object_id()
    await client.call(worker, wire.Op(result, name, args, kwargs or {}))
    return result


async def run_plan(
    client: fedptr.Client, worker: str, n_inputs: int, ops: list[Any], outputs: list[int], inputs: list[int]
) -> list[int]:
    """Send a hand-made plan and run it once; returns the output ids."""
    plan_id = wire.new_object_id()
    await client.call(worker, wire.PutPlan(plan_id, n_inputs, ops, outputs))
    result_ids = [wire.new_object_id() for _ in outputs]
    await client.call(worker, wire.RunPlan(plan_id, inputs, result_ids))
    return result_ids


# --- aliasing between inputs and temporaries -----------------------------------------------
async def test_set_grad_makes_a_temporarys_gradient_alias_a_public_input(setup: Setup) -> None:
    """Plan(w, g, x): leaf = w.clone().requires_grad_(); leaf.grad = g (set_grad: an alias of
    g's storage); (leaf * x).sum().backward() accumulates x into g in place; get(g)."""
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        w = await put(c, "bob", torch.zeros(8, 4))
        g = await put(c, "bob", torch.zeros(8, 4))
        ops = [
            ["clone", [R(0)], {}],  # 3
            ["requires_grad_", [R(3)], {}],  # 4
            ["set_grad", [R(4), R(1)], {}],  # 5
            ["mul", [R(4), R(2)], {}],  # 6
            ["sum", [R(6)], {}],  # 7
            ["backward", [R(7)], {}],  # 8
        ]
        await run_plan(c, "bob", 3, ops, [8], [w, g, bx.id_at_location])
        return await get(c, "bob", g)

    assert_hidden(await attack(), setup.secrets["bob"]["x"], "bob's x via set_grad in a plan")


async def test_set_data_makes_a_temporary_alias_a_public_input(setup: Setup) -> None:
    """Plan(a, x): t = a.clone(); t.data = a (set_data: t now aliases a); t.add_(x); get(a)."""
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        a = await put(c, "bob", torch.zeros(8, 4))
        ops = [
            ["clone", [R(0)], {}],  # 2
            ["set_data", [R(2), R(0)], {}],  # 3
            ["add_", [R(2), R(1)], {}],  # 4
        ]
        await run_plan(c, "bob", 2, ops, [4], [a, bx.id_at_location])
        return await get(c, "bob", a)

    assert_hidden(await attack(), setup.secrets["bob"]["x"], "bob's x via set_data in a plan")


async def test_set_data_on_a_saved_tensor_after_the_loss_is_formed(setup: Setup) -> None:
    """Plan(w, a, x): loss = (w * a).sum() (public); a.data = x (a becomes private, the loss's
    taint was decided already, and no version bump stops autograd); loss.backward(): w.grad = x."""
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        w = await put(c, "bob", torch.zeros(8, 4), requires_grad=True)
        a = await put(c, "bob", torch.ones(8, 4))
        ops = [
            ["mul", [R(0), R(1)], {}],  # 3
            ["sum", [R(3)], {}],  # 4
            ["set_data", [R(1), R(2)], {}],  # 5
            ["backward", [R(4)], {}],  # 6
        ]
        await run_plan(c, "bob", 3, ops, [6], [w, a, bx.id_at_location])
        return await get(c, "bob", await op(c, "bob", "grad", [R(w)]))

    # stopped by torch's autograd version check (set_data bumps the version), not by the policy
    await refused(attack(), fedptr.RemoteError, match="modified by an inplace operation")


async def test_set_data_lets_a_temporary_write_read_only_private_data(setup: Setup) -> None:
    """Plan(t, fx): s = t.clone(); s.data = fx (an alias of frank's read-only data); s.zero_()."""
    c = setup.client
    fx, _ = await setup.data("frank")

    async def attack() -> torch.Tensor:
        t = await put(c, "frank", torch.ones(8, 4))
        ops = [["clone", [R(0)], {}], ["set_data", [R(2), R(1)], {}], ["zero_", [R(2)], {}]]
        await run_plan(c, "frank", 2, ops, [4], [t, fx.id_at_location])
        return await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))

    assert max_err(await attack(), setup.secrets["frank"]["x"]) < 1e-6, "WRITE: frank's read-only data was changed"


async def test_kwargs_target_of_an_in_place_op_escapes_the_aliasing_rule(setup: Setup) -> None:
    """Plan(base, x): add_(t=base, other=x): the target passed by keyword is no args[0], so the
    result gets a fresh taint and base's stays public; get(base)."""
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        base = await put(c, "bob", torch.zeros(8, 4))
        await run_plan(c, "bob", 2, [["add_", [], {"t": R(0), "other": R(1)}]], [2], [base, bx.id_at_location])
        return await get(c, "bob", base)

    await refused(attack(), fedptr.OpNotAllowedError, match="first positional argument")


async def test_kwargs_target_writes_read_only_private_data(setup: Setup) -> None:
    """Plan(fx): zero_(t=fx): the read-only check looks at args[0] only."""
    c = setup.client
    fx, _ = await setup.data("frank")

    async def attack() -> torch.Tensor:
        await run_plan(c, "frank", 1, [["zero_", [], {"t": R(0)}]], [1], [fx.id_at_location])
        return await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))

    await refused(attack(), fedptr.OpNotAllowedError, match="first positional argument")


async def test_functional_inplace_flag_writes_read_only_private_data(setup: Setup) -> None:
    """Plan(fx): F.dropout(fx, p=1, training=True, inplace=True) zeroes frank's read-only data."""
    c = setup.client
    fx, _ = await setup.data("frank")

    async def attack() -> torch.Tensor:
        ops = [["F.dropout", [R(0)], {"p": 1.0, "training": True, "inplace": True}]]
        await run_plan(c, "frank", 1, ops, [1], [fx.id_at_location])
        return await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))

    await refused(attack(), fedptr.OpNotAllowedError, match=r"may not write into an argument \(inplace=\)")


async def test_batchnorm_running_stats_of_a_model_input(setup: Setup) -> None:
    """Plan(model, x): model(x).sum() in training mode updates BatchNorm's running mean in place
    with x's column means; forward taints its result, not the model; state(model, running_mean)."""
    bob = setup.w("bob")
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        model = await bob.send(nn.Sequential(nn.BatchNorm1d(4)))
        await run_plan(
            c,
            "bob",
            2,
            [["forward", [R(0), R(1)], {}], ["sum", [R(2)], {}]],
            [3],
            [model.id_at_location, bx.id_at_location],
        )
        mean = await op(c, "bob", "state", [R(model.id_at_location), "0.running_mean"])
        return await get(c, "bob", mean) / 0.1

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


async def test_a_parameter_alias_made_inside_a_plan_carries_its_write_to_the_model(setup: Setup) -> None:
    """Plan(model, x): w = parameter(model, 0) (an intermediate result, never stored), w.zero_(),
    w.add_(x[:3]); then get the model: its weight would be bob's first three rows."""
    bob = setup.w("bob")
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        model = await bob.send(nn.Linear(4, 3, bias=False))
        await run_plan(
            c,
            "bob",
            2,
            [
                ["parameter", [R(0), 0], {}],
                ["zero_", [R(2)], {}],
                ["narrow", [R(1), 0, 0, 3], {}],
                ["add_", [R(2), R(4)], {}],
                ["sum", [R(5)], {}],
            ],
            [6],
            [model.id_at_location, bx.id_at_location],
        )
        with pytest.raises(fedptr.PermissionDenied):  # the run went through; the model is now bob's
            await model.get()
        trained = await op(c, "bob", "parameter", [R(model.id_at_location), 0])
        return await get(c, "bob", trained)

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


# --- the same roots sent one operation at a time (is the leak plan-specific?) ---------------
async def test_single_ops_set_grad_alias(setup: Setup) -> None:
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        w = await put(c, "bob", torch.zeros(8, 4), requires_grad=True)
        g = await put(c, "bob", torch.zeros(8, 4))
        await op(c, "bob", "set_grad", [R(w), R(g)])
        loss = await op(c, "bob", "sum", [R(await op(c, "bob", "mul", [R(w), R(bx.id_at_location)]))])
        await op(c, "bob", "backward", [R(loss)])
        return await get(c, "bob", g)

    assert_hidden(await attack(), setup.secrets["bob"]["x"], "bob's x via set_grad, op by op")


async def test_single_ops_set_data_alias(setup: Setup) -> None:
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        a = await put(c, "bob", torch.zeros(8, 4))
        t = await put(c, "bob", torch.zeros(8, 4))
        await op(c, "bob", "set_data", [R(t), R(a)])
        await op(c, "bob", "add_", [R(t), R(bx.id_at_location)])
        return await get(c, "bob", a)

    assert_hidden(await attack(), setup.secrets["bob"]["x"], "bob's x via set_data, op by op")


async def test_single_ops_set_data_after_the_loss(setup: Setup) -> None:
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        w = await put(c, "bob", torch.zeros(8, 4), requires_grad=True)
        a = await put(c, "bob", torch.ones(8, 4))
        loss = await op(c, "bob", "sum", [R(await op(c, "bob", "mul", [R(w), R(a)]))])
        await op(c, "bob", "set_data", [R(a), R(bx.id_at_location)])
        await op(c, "bob", "backward", [R(loss)])
        return await get(c, "bob", await op(c, "bob", "grad", [R(w)]))

    # stopped by torch's autograd version check (set_data bumps the version), not by the policy
    await refused(attack(), fedptr.RemoteError, match="modified by an inplace operation")


async def test_single_ops_kwargs_target(setup: Setup) -> None:
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        base = await put(c, "bob", torch.zeros(8, 4))
        await op(c, "bob", "add_", [], {"t": R(base), "other": R(bx.id_at_location)})
        return await get(c, "bob", base)

    await refused(attack(), fedptr.OpNotAllowedError, match="first positional argument")


async def test_single_ops_functional_inplace_on_read_only_data(setup: Setup) -> None:
    c = setup.client
    fx, _ = await setup.data("frank")

    async def attack() -> torch.Tensor:
        await op(c, "frank", "F.dropout", [R(fx.id_at_location)], {"p": 1.0, "training": True, "inplace": True})
        return await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))

    await refused(attack(), fedptr.OpNotAllowedError, match=r"may not write into an argument \(inplace=\)")


async def test_single_ops_batchnorm_running_stats(setup: Setup) -> None:
    bob = setup.w("bob")
    c = setup.client
    bx, _ = await setup.data("bob")

    async def attack() -> torch.Tensor:
        model = await bob.send(nn.Sequential(nn.BatchNorm1d(4)))
        await op(c, "bob", "forward", [R(model.id_at_location), R(bx.id_at_location)])
        mean = await op(c, "bob", "state", [R(model.id_at_location), "0.running_mean"])
        return await get(c, "bob", mean) / 0.1

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


# --- plain operations that write an operand (lean loop, and op by op) ----------------------
def lean(n_inputs: int, ops: list[Any], outputs: list[int]) -> bool:
    """Whether the node runs this plan on its lean loop (plain operations only)."""
    return plans.validate(wire.PutPlan(0, n_inputs, ops, outputs)).steps is not None


async def test_a_positional_out_writes_private_values_into_a_public_input(setup: Setup) -> None:
    """Plan(x, p): F.normalize(x, 2.0, 1, 1e-12, p): F.normalize's fifth parameter is `out`,
    which the keyword check never sees; a private op's real run writes normalize(x) into the
    public p, whose taint nothing grows; get(p). The same op sent alone, too."""
    c = setup.client
    bx, _ = await setup.data("bob")
    ops = [["F.normalize", [R(0), 2.0, 1, 1e-12, R(1)], {}]]
    assert lean(2, ops, [2])
    p = await put(c, "bob", torch.zeros(8, 4))
    await refused(run_plan(c, "bob", 2, ops, [2], [bx.id_at_location, p]), fedptr.PermissionDenied, owner="bob")
    assert torch.equal(await get(c, "bob", p), torch.zeros(8, 4)), "LEAK: a plain op wrote bob's x into p"
    alone = op(c, "bob", "F.normalize", [R(bx.id_at_location), 2.0, 1, 1e-12, R(p)])
    await refused(alone, fedptr.PermissionDenied, owner="bob")
    assert torch.equal(await get(c, "bob", p), torch.zeros(8, 4)), "LEAK: a single op wrote bob's x into p"


async def test_a_non_leaf_tensors_gradient_is_handed_out_as_a_copy(setup: Setup) -> None:
    """t = p * 1 (public, not a leaf: p tracks gradients); set_grad(t, zeros); g = grad(t), in a
    lean plan or alone: the alias check skipped a non-leaf's gradient (torch fills none, but
    set_grad gives one), so g was t's gradient itself; add_(g, x) made g private and t.grad bob's
    x, while t stayed public; a second grad(t), get."""
    c = setup.client
    bx, _ = await setup.data("bob")
    ops = [["grad", [R(0)], {}]]
    assert lean(1, ops, [1])

    async def attack(in_a_plan: bool) -> torch.Tensor:
        p = await put(c, "bob", torch.ones(8, 4), requires_grad=True)
        t = await op(c, "bob", "mul", [R(p), 1.0])
        await op(c, "bob", "set_grad", [R(t), R(await put(c, "bob", torch.zeros(8, 4)))])

        async def grad() -> int:
            if in_a_plan:
                [g] = await run_plan(c, "bob", 1, ops, [1], [t])
                return g
            return await op(c, "bob", "grad", [R(t)])

        await op(c, "bob", "add_", [R(await grad()), R(bx.id_at_location)])
        return await get(c, "bob", await grad())

    for in_a_plan in (True, False):
        got = await attack(in_a_plan)
        assert torch.equal(got, torch.zeros(8, 4)), f"LEAK: bob's x through a non-leaf's gradient ({in_a_plan=})"


async def test_a_positional_out_writes_read_only_private_data(setup: Setup) -> None:
    """Plan(t, fx): F.normalize(t, 2.0, 1, 1e-12, fx) overwrites frank's read-only data."""
    c = setup.client
    fx, _ = await setup.data("frank")
    t = await put(c, "frank", torch.ones(8, 4))
    ops = [["F.normalize", [R(0), 2.0, 1, 1e-12, R(1)], {}]]
    await refused(run_plan(c, "frank", 2, ops, [2], [t, fx.id_at_location]), fedptr.PermissionDenied, owner="frank")
    now = await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))
    assert max_err(now, setup.secrets["frank"]["x"]) < 1e-6, "WRITE: frank's read-only data was changed"


async def test_embedding_max_norm_writes_which_private_indices_were_read_into_a_public_weight(setup: Setup) -> None:
    """Plan(y, w): F.embedding(y, w, None, 1.0): max_norm renormalizes, in place, the rows of w
    that bob's private labels y index; get(w) tells which labels bob has. By position (the
    kernel's check) and by keyword (refused as the plan arrives)."""
    c = setup.client
    _, by = await setup.data("bob")
    weight = torch.full((5, 3), 10.0)
    for ops, error in [
        ([["F.embedding", [R(0), R(1), None, 1.0], {}]], fedptr.PermissionDenied),
        ([["F.embedding", [R(0), R(1)], {"max_norm": 1.0}]], fedptr.OpNotAllowedError),
    ]:
        w = await put(c, "bob", weight)
        await refused(run_plan(c, "bob", 2, ops, [2], [by.id_at_location, w]), error)
        assert torch.equal(await get(c, "bob", w), weight), "LEAK: the rows bob's labels index were renormalized"


async def test_embedding_max_norm_writes_read_only_private_data(setup: Setup) -> None:
    """Plan(i, fx): F.embedding(i, fx, None, 0.1) renormalizes frank's read-only rows."""
    c = setup.client
    fx, _ = await setup.data("frank")
    i = await put(c, "frank", torch.arange(8))
    ops = [["F.embedding", [R(0), R(1), None, 0.1], {}]]
    await refused(run_plan(c, "frank", 2, ops, [2], [i, fx.id_at_location]), fedptr.PermissionDenied, owner="frank")
    now = await get(c, "frank", await op(c, "frank", "mul", [R(fx.id_at_location), 1]))
    assert max_err(now, setup.secrets["frank"]["x"]) < 1e-6, "WRITE: frank's read-only data was changed"


async def test_an_op_whose_shape_depends_on_private_values_is_refused_in_a_plan_as_alone(setup: Setup) -> None:
    """nonzero(x) and masked_select(x, x > 3) on bob's x: the number of results is a count of
    private values. Alone each is refused; on the lean loop a step's operands came as a tuple,
    which the guard's meta stand-ins skipped, so the "meta run" was a real run on bob's x and
    the run answered with its value-dependent shape (the twin-world test found it)."""
    c = setup.client
    bx, _ = await setup.data("bob")
    x = bx.id_at_location
    m = await op(c, "bob", "gt", [R(x), 3.0])
    for ops, inputs in (
        ([["nonzero", [R(0)], {}]], [x]),
        ([["masked_select", [R(0), R(1)], {}]], [x, m]),
    ):
        n_inputs = len(inputs)
        assert lean(n_inputs, ops, [n_inputs])
        await refused(run_plan(c, "bob", n_inputs, ops, [n_inputs], inputs), fedptr.PermissionDenied, owner="bob")
        alone = op(c, "bob", ops[0][0], [R(i) for i in inputs])
        await refused(alone, fedptr.PermissionDenied, owner="bob")


# --- the lean loop against the same plan op by op -----------------------------------------
_UNARY = (
    *("neg", "relu", "abs", "exp", "float", "t", "clone", "detach", "flatten", "sign", "logical_not", "long"),
    *("contiguous", "double", "bool", "type_as"),  # torch may return the operand itself (type_as: of itself)
    "first",  # getitem by basic indexing: a view (red9)
    "nonzero",  # its shape counts values: refused on private data, lean or not
)
_BINARY = ("add", "mul", "sub", "maximum", "eq", "matmul", "where_mask", "getitem", "masked_select")
_MULTI = (("max", [1], 2), ("sort", [0], 2), ("split", [4], 2), ("chunk", [2], 2), ("sort", [], 2))  # last: refs only
_plain_op = st.one_of(
    st.tuples(st.just("unary"), st.sampled_from(_UNARY), st.integers(0, 99)),
    st.tuples(st.just("binary"), st.sampled_from(_BINARY), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("multi"), st.sampled_from(range(len(_MULTI))), st.integers(0, 99)),
    st.tuples(st.just("cat"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("sum"), st.integers(0, 99), st.sampled_from([0, 1, None])),
)
_INPUTS = ("bob x", "bob y", "public float", "public int", "public bool")


def _plain_plan(n_inputs: int, drawn: list[tuple[Any, ...]], pick: list[int]) -> tuple[list[Any], list[int]]:
    """A plan of plain operations over `n_inputs` inputs from `drawn` (slots chosen modulo those
    filled), and its outputs (`pick`, modulo the results)."""
    ops: list[Any] = []
    slots = n_inputs
    for kind, *rest in drawn:
        if kind == "unary":
            name, a = rest
            if name == "first":
                ops.append(["getitem", [R(a % slots), {"__slice__": [0, 2, None]}], {}])
            elif name == "type_as":
                ops.append([name, [R(a % slots), R(a % slots)], {}])
            else:
                ops.append([name, [R(a % slots)], {}])
        elif kind == "binary":
            name, a, b = rest
            if name == "where_mask":  # a private condition picks between two tensors
                ops.append(["where", [R(a % slots), R(b % slots), R(a % slots)], {}])
            else:
                ops.append([name, [R(a % slots), R(b % slots)], {}])
        elif kind == "multi":
            i, a = rest
            name, more, count = _MULTI[i]
            ops.append([name, [R(a % slots), *more], {}, count])
        elif kind == "cat":
            a, b = rest
            ops.append(["cat", [[R(a % slots), R(b % slots)]], {}])
        else:
            a, dim = rest
            ops.append(["sum", [R(a % slots)], {} if dim is None else {"dim": dim}])
        slots += ops[-1][3] if len(ops[-1]) == 4 else 1
    made = slots - n_inputs
    outputs = sorted({n_inputs + p % made for p in pick})
    return ops, outputs


async def _observe(
    c: fedptr.Client,
    plan_id: int,
    n_inputs: int,
    ops: list[Any],
    outputs: list[int],
    inputs: list[int],
    public: list[int],
) -> list[Any]:
    """What the client sees of one run of plan `plan_id` (replaced: a node keeps a client's 64
    at most) on bob: its reply (or error), an in-place write to each output, then each output's
    get (or refusal) and each of the `public` inputs'."""

    def seen(e: BaseException) -> tuple[str, str]:
        return type(e).__name__, re.sub(r"\d{6,}", "<id>", str(e))

    await c.call("bob", wire.PutPlan(plan_id, n_inputs, ops, outputs))
    result_ids = [wire.new_object_id() for _ in outputs]
    observed: list[Any] = []
    try:
        reply = await c.call("bob", wire.RunPlan(plan_id, inputs, result_ids))
        assert isinstance(reply, wire.PlanReply)
        observed.append((reply.shapes, reply.dtypes))
    except fedptr.FedptrError as e:
        observed.append(seen(e))
    # a write to each output in turn, then every output and public input read: an output that
    # shared storage with an input or another output would show the other's write too
    for obj_id in result_ids:
        try:
            await op(c, "bob", "add_", [R(obj_id), 1])
            observed.append("written")
        except fedptr.FedptrError as e:
            observed.append(seen(e))
    for obj_id in [*result_ids, *public]:
        try:
            observed.append((await get(c, "bob", obj_id)).tolist())
        except fedptr.FedptrError as e:
            observed.append(seen(e))
    return observed


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    chosen=st.lists(st.sampled_from(_INPUTS), min_size=1, max_size=4),
    drawn=st.lists(_plain_op, min_size=1, max_size=8),
    pick=st.lists(st.integers(0, 99), min_size=1, max_size=3),
)
# outputs that would share storage: a view of a public input (detach: copied at once) or of a
# view (flatten of t), and what torch returns as it is (float of a float, long of a long), an
# input or another output: the lean loop copies those at the run's end
@example(chosen=["public float"], drawn=[("unary", "detach", 0)], pick=[0])
@example(chosen=["public float", "bob x"], drawn=[("unary", "t", 0), ("unary", "flatten", 2)], pick=[1])
@example(chosen=["public float"], drawn=[("unary", "float", 0), ("unary", "float", 1)], pick=[0, 1])
@example(chosen=["public int", "bob y"], drawn=[("unary", "long", 0), ("unary", "long", 2)], pick=[0, 1])
@example(chosen=["public float"], drawn=[("unary", "float", 0), ("unary", "first", 1)], pick=[0, 1])
async def test_a_plain_plan_runs_lean_as_it_runs_op_by_op(
    setup: Setup, chosen: list[str], drawn: list[tuple[Any, ...]], pick: list[int]
) -> None:
    """A random plan of plain operations over private and public inputs (the lean loop), and the
    same plan with one more operation, an inline tensor, that keeps it op by op: the client sees
    the same replies, outputs, refusals and error texts, whatever taints the inputs have."""
    c = setup.client
    bx, by = await setup.data("bob")
    pool = {
        "bob x": bx.id_at_location,
        "bob y": by.id_at_location,
        "public float": await put(c, "bob", torch.arange(32.0).reshape(8, 4) - 7),
        "public int": await put(c, "bob", torch.arange(8) % 3),
        "public bool": await put(c, "bob", torch.arange(8) % 2 == 0),
    }
    inputs = [pool[name] for name in chosen]
    public = list(dict.fromkeys(pool[name] for name in chosen if name.startswith("public")))
    ops, outputs = _plain_plan(len(inputs), drawn, pick)
    assert lean(len(inputs), ops, outputs)
    op_by_op = [*ops, ["mul", [R(0), wire.RawTensor("float32", (), memoryview(bytes(4)))], {}]]
    assert not lean(len(inputs), op_by_op, outputs)
    on_the_lean_loop = await _observe(c, 1, len(inputs), ops, outputs, inputs, public)
    assert on_the_lean_loop == await _observe(c, 2, len(inputs), op_by_op, outputs, inputs, public)


async def test_a_plan_run_on_public_inputs_then_on_private_ones_keeps_the_second_private(setup: Setup) -> None:
    """One lean plan, run first on public inputs (its taints, storages and meta runs are then
    known), then with bob's x in the place of a public input, then public again."""
    c = setup.client
    bx, _ = await setup.data("bob")
    p, q = await put(c, "bob", torch.ones(8, 4)), await put(c, "bob", torch.ones(8, 4))
    ops = [["mul", [R(0), R(1)], {}], ["t", [R(2)], {}], ["sum", [R(3)], {"dim": 0}]]
    assert lean(2, ops, [3, 4])
    plan_id = wire.new_object_id()
    await c.call("bob", wire.PutPlan(plan_id, 2, ops, [3, 4]))

    async def run(inputs: list[int]) -> list[int]:
        result_ids = [wire.new_object_id(), wire.new_object_id()]
        await c.call("bob", wire.RunPlan(plan_id, inputs, result_ids))
        return result_ids

    assert torch.equal(await get(c, "bob", (await run([p, q]))[1]), torch.full((8,), 4.0))
    for obj_id in await run([p, bx.id_at_location]):
        await refused(get(c, "bob", obj_id), fedptr.PermissionDenied, owner="bob")
    assert torch.equal(await get(c, "bob", (await run([q, p]))[1]), torch.full((8,), 4.0))


@pytest.mark.parametrize("n_inputs", [64, 65, 200])
async def test_a_private_input_past_the_64th_taints_what_reads_it(setup: Setup, n_inputs: int) -> None:
    """The lean loop's bitmasks over many inputs: the last input is bob's x, every other one
    public; what reads it is private, what reads only the one before it public."""
    c = setup.client
    bx, _ = await setup.data("bob")
    p = await put(c, "bob", torch.ones(8, 4))
    last = n_inputs - 1
    ops = [["add", [R(last), R(0)], {}], ["add", [R(last - 1), R(0)], {}]]
    assert lean(n_inputs, ops, [n_inputs, n_inputs + 1])
    private, public = await run_plan(
        c, "bob", n_inputs, ops, [n_inputs, n_inputs + 1], [p] * last + [bx.id_at_location]
    )
    await refused(get(c, "bob", private), fedptr.PermissionDenied, owner="bob")
    assert torch.equal(await get(c, "bob", public), torch.full((8, 4), 2.0))


# --- hand-crafted graphs -------------------------------------------------------------------
async def test_malformed_plans_are_refused_with_typed_errors(setup: Setup) -> None:
    c = setup.client
    a = await put(c, "bob", torch.ones(2))
    bad: list[tuple[int, list[Any], list[int]]] = [
        (1, [["add", [R(1), 1], {}]], [1]),  # reads its own slot
        (1, [["add", [R(5), 1], {}]], [1]),  # a later slot
        (1, [["add", [R(-1), 1], {}]], [1]),
        (1, [["add", [1, 2], {}]], [1]),  # reads nothing
        (1, [["add", [R(0), 1], {}]], [0]),  # outputs an input
        (1, [["add", [R(0), 1], {}]], [1, 1]),  # one output twice
        (1, [["aggregate_mean", [[R(0)]], {}]], [1]),
        (1, [["__class__", [R(0)], {}]], [1]),
        (1, [["add", [R(0)], {"x": {"y": [R(0)]}}]], [1]),  # fine shape-wise (a bad kwarg fails at run)
        (1, [["add", [R(0), 1], {}]] * (10_001), [1]),
        (2000, [["add", [R(0), 1], {}]], [2000]),
    ]
    for n_inputs, ops, outputs in bad:
        try:
            await run_plan(c, "bob", n_inputs, ops, outputs, [a] * n_inputs)
        except fedptr.FedptrError:
            continue
    assert torch.equal(await get(c, "bob", a), torch.ones(2))  # still serving


async def test_another_client_cannot_run_my_plan(setup: Setup) -> None:
    c = setup.client
    a = await put(c, "bob", torch.ones(2))
    plan_id = wire.new_object_id()
    await c.call("bob", wire.PutPlan(plan_id, 1, [["mul", [R(0), 2], {}]], [1]))
    async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=10) as other:
        mine = await put(other, "bob", torch.ones(2))
        for inputs in ([mine], [a]):  # plans are kept per client: another client's id names none
            run = other.call("bob", wire.RunPlan(plan_id, inputs, [wire.new_object_id()]))
            await refused(run, fedptr.ObjectNotFoundError, match=f"no plan {plan_id}")


async def test_a_run_with_a_duplicate_result_id_leaves_nothing_pending(setup: Setup) -> None:
    """RunPlan(.., result_ids=[r, r]): the second store.add fails after the first output entry
    was stored, unsettled; another client's objects() then waits for it."""
    c = setup.client
    a = await put(c, "bob", torch.ones(2))
    plan_id = wire.new_object_id()
    await c.call("bob", wire.PutPlan(plan_id, 1, [["mul", [R(0), 2], {}], ["mul", [R(0), 3], {}]], [1, 2]))
    r = wire.new_object_id()
    with pytest.raises(fedptr.FedptrError):
        await c.call("bob", wire.RunPlan(plan_id, [a], [r, r]))
    async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=10) as other:
        start = time.monotonic()
        await other.worker("bob").objects()
        took = time.monotonic() - start
    assert took < 3.0, f"DOS: another client's listing of bob waited {took:.1f} s for a never-settled output"


async def test_a_plan_cannot_block_the_node_with_inline_work(setup: Setup) -> None:
    """A 1-element input expanded to 1500x1500 and multiplied 20 times: a plan decides to offload
    by its inputs' size only, so the whole run would be inline on the event loop."""
    c = setup.client
    one = await put(c, "alice", torch.ones(1, 1))
    ops: list[Any] = [["expand", [R(0), 1500, 1500], {}]]  # slot 1 (cloned by the guard)
    for _ in range(20):
        ops.append(["matmul", [R(len(ops)), R(1)], {}])
        ops.append(["mul", [R(len(ops)), 0.0], {}])
    plan_id = wire.new_object_id()
    await c.call("alice", wire.PutPlan(plan_id, 1, ops, [len(ops)]))
    async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=60) as other:
        await other.call("alice", wire.NodeStats())
        began = time.monotonic()
        run = asyncio.ensure_future(c.call("alice", wire.RunPlan(plan_id, [one], [wire.new_object_id()]), timeout=120))
        took = 0.0
        while not run.done():  # probe alice for as long as the run lasts (bounded by its deadline)
            start = time.monotonic()
            with contextlib.suppress(fedptr.FedptrError):
                await other.call("alice", wire.NodeStats())
            took = max(took, time.monotonic() - start)
        ran = await run  # it must finish, not fail: a failed run proves nothing about blocking
        whole = time.monotonic() - began
    assert took < 1.0, (
        f"DOS: alice answered another client after {took:.1f} s, the run took {whole:.1f} s ({ran!r:.30})"
    )


async def test_a_giant_temporary_is_a_typed_error_and_the_node_keeps_serving(setup: Setup) -> None:
    c = setup.client
    one = await put(c, "alice", torch.ones(1, 1))
    with pytest.raises(fedptr.FedptrError):
        await run_plan(c, "alice", 1, [["expand", [R(0), 1 << 20, 1 << 20], {}], ["sum", [R(1)], {}]], [2], [one])
    ax, _ = await setup.data("alice")
    with pytest.raises(fedptr.FedptrError):  # private: the guard's clone of a huge view
        await run_plan(
            c,
            "alice",
            1,
            [["sum", [R(0)], {}], ["expand", [R(1), 1 << 20, 1 << 20], {}], ["sum", [R(2)], {}]],
            [3],
            [ax.id_at_location],
        )
    assert torch.equal(await get(c, "alice", one), torch.ones(1, 1))


async def test_a_never_settled_output_cannot_stall_the_node_for_everyone(setup: Setup) -> None:
    """Last (it may leave alice unusable): the duplicate-id run leaves output r unsettled; an op
    on r waits for it forever, so this client's later requests queue behind it; past
    NODE_MAX_ORDERED queued requests the node stops reading from everyone."""
    c = setup.client
    a = await put(c, "alice", torch.ones(2))
    plan_id = wire.new_object_id()
    await c.call("alice", wire.PutPlan(plan_id, 1, [["mul", [R(0), 2], {}], ["mul", [R(0), 3], {}]], [1, 2]))
    r = wire.new_object_id()
    with pytest.raises(fedptr.FedptrError):
        await c.call("alice", wire.RunPlan(plan_id, [a], [r, r]))
    flood = [c.request_nowait("alice", wire.Op(wire.new_object_id(), "mul", [R(r), 2], {}))]
    flood += [c.request_nowait("alice", wire.NodeStats()) for _ in range(limits.NODE_MAX_ORDERED + 8)]
    await asyncio.wait(flood[:1], timeout=10)  # the op on r was handled (or is stuck behind r)
    async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=5) as other:
        try:
            await other.call("alice", wire.NodeStats())
            stalled = None
        except fedptr.FedptrError as e:
            stalled = e
    await asyncio.gather(*flood, return_exceptions=True)
    assert stalled is None, f"DOS: alice stopped answering everyone ({type(stalled).__name__})"
