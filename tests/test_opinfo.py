"""The op registry's table test, in the manner of PyTorch's OpInfo tests: every registered op
(`fedptr.opinfo.REGISTRY`) has samples here, and each sample runs

* on public inputs through pointers on an in-process cluster (tests/harness.py): every result
  (a multi-output op's each) equals what local torch computes, and its shape was known on the
  client before the worker answered (for an op whose shape is not data-dependent);
* on bob's private data: the op is refused, or none of its results can be fetched (a
  `PermissionDenied` naming bob: `conftest.refused`).

A registered op without samples fails `test_every_registered_op_has_samples`. One cluster serves
all the ops (a test per op would pay a cluster each), so one failing op names itself in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import meta, opinfo, wire
from fedptr.opinfo import REGISTRY, Call, Shape
from nodes import kernels

from . import harness
from .conftest import refused

pytestmark = pytest.mark.inproc


@dataclass
class Env:
    """What a sample works on: `a` (the first operand), `b` (a public partner of its shape),
    `ints` (class labels in 0..2) and `put`, which places a tensor or model where `a` is: locally
    the identity, remotely a send to bob."""

    a: Any
    b: Any
    ints: Any
    put: Callable[[Any], Any]
    raw: Callable[..., Any]
    """``raw(op, *args)``: issue a registry op that has no torch spelling of its own."""


Sample = Callable[[Env], Any]


def _m(name: str, *args: Any, **kwargs: Any) -> Sample:
    return lambda e: getattr(e.a, name)(*args, **kwargs)


def _m2(name: str, **kwargs: Any) -> Sample:
    return lambda e: getattr(e.a, name)(e.b, **kwargs)


def _f(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Sample:
    return lambda e: fn(e.a, *args, **kwargs)


def _f2(fn: Callable[..., Any], **kwargs: Any) -> Sample:
    return lambda e: fn(e.a, e.b, **kwargs)


def _linear(e: Env) -> Any:
    torch.manual_seed(1)
    return e.put(nn.Linear(3, 2))


def _setitem(e: Env) -> Any:
    e.a[0] = e.b[1]
    return e.a


def _backward(e: Env) -> Any:
    w = e.put(torch.ones(3, requires_grad=True))
    (e.a * w).sum().backward()
    return w.grad


def _set_grad(e: Env) -> Any:
    w = e.put(torch.zeros(4, 3, requires_grad=True))
    w.grad = e.a
    return w.grad


def _set_data(e: Env) -> Any:
    w = e.put(torch.zeros(4, 3))
    w.data = e.a
    return w


def _zero_grad(e: Env) -> Any:
    w = e.put(torch.ones(3, requires_grad=True))
    (e.a * w).sum().backward()
    if isinstance(w, fedptr.Pointer):
        w.zero_grad()
    else:
        w.grad = None
    return (w * 1, e.raw("backward", (e.a * w).sum()), w.grad)  # a fresh gradient, not added to the old


def _train(e: Env) -> Any:
    model = e.put(nn.Sequential(nn.Dropout(0.5)))
    model.train(False)
    return model(e.a)


SAMPLES: dict[str, list[Sample]] = {
    # arithmetic
    "add": [_m2("add"), lambda e: e.a + 2, _m2("add", alpha=2)], "sub": [_m2("sub"), lambda e: e.a - e.b],
    "mul": [_m2("mul"), lambda e: e.a * 3], "div": [_m2("div"), lambda e: e.a / 2],
    "true_divide": [_m2("true_divide")], "floor_divide": [_m2("floor_divide"), lambda e: e.a // 2],
    "remainder": [_m2("remainder"), lambda e: e.a % 2], "fmod": [_m2("fmod")],
    "pow": [_m("pow", 2), lambda e: e.a**2], "neg": [_m("neg"), lambda e: -e.a], "abs": [_m("abs"), lambda e: abs(e.a)],
    "matmul": [lambda e: e.a.matmul(e.b.t()), lambda e: e.a @ e.b.t()], "mm": [lambda e: e.a.mm(e.b.t())],
    "bmm": [lambda e: e.a.unsqueeze(0).bmm(e.b.t().unsqueeze(0))], "dot": [lambda e: e.a.flatten().dot(e.b.flatten())],
    "outer": [lambda e: e.a.flatten().outer(e.b.flatten())], "maximum": [_m2("maximum")], "minimum": [_m2("minimum")],
    "__radd__": [lambda e: 2.0 + e.a], "__rsub__": [lambda e: 1.0 - e.a], "__rmul__": [lambda e: 3.0 * e.a],
    "__rtruediv__": [lambda e: 1.0 / e.a], "__rmatmul__": [lambda e: torch.ones(2, 4) @ e.a],
    "__rpow__": [lambda e: 2.0**e.a], "__rfloordiv__": [lambda e: 7.0 // e.a], "__rmod__": [lambda e: 7.0 % e.a],
    # comparisons
    "eq": [_m2("eq")], "ne": [_m2("ne")], "lt": [_m2("lt"), lambda e: e.a < 0], "le": [_m2("le"), lambda e: e.a <= 0],
    "gt": [_m2("gt"), lambda e: e.a > 0], "ge": [_m2("ge"), lambda e: e.a >= 0],
    "logical_and": [_m2("logical_and")], "logical_or": [_m2("logical_or")],
    "logical_not": [_m("logical_not"), lambda e: ~(e.a > 0)],
    # reductions
    "sum": [_m("sum"), _m("sum", 1, keepdim=True), _m("sum", dtype=torch.float64)], "mean": [_m("mean", 0)],
    "prod": [_m("prod")], "amax": [_m("amax", 0)], "amin": [_m("amin", 1)], "argmax": [_m("argmax")],
    "argmin": [_m("argmin", 0)], "std": [_m("std")], "var": [_m("var", 0)], "norm": [_m("norm")], "all": [_m("all")],
    "any": [_m("any")], "cumsum": [_m("cumsum", 0)], "logsumexp": [_m("logsumexp", 1)],
    "max": [_m("max"), _m2("max"), _m("max", 0), _m("max", dim=1, keepdim=True)],
    "min": [_m("min"), _m2("min"), _m("min", 1), lambda e: torch.min(e.a, dim=0)],
    "topk": [_m("topk", 2), _m("topk", 2, dim=0, largest=False), lambda e: torch.topk(e.a, 1)],
    "sort": [_m("sort"), _m("sort", dim=0, descending=True)],
    "aminmax": [_m("aminmax"), _m("aminmax", dim=1, keepdim=True)],
    # reshaping and selection
    "reshape": [_m("reshape", -1)], "view": [_m("view", 3, 4)], "flatten": [_m("flatten")],
    "squeeze": [lambda e: e.a[None].squeeze()], "unsqueeze": [_m("unsqueeze", 0)], "t": [_m("t")],
    "transpose": [_m("transpose", 0, 1)], "permute": [_m("permute", 1, 0)], "contiguous": [_m("contiguous")],
    "clone": [_m("clone")], "expand": [lambda e: e.a[None].expand(2, -1, -1)], "repeat": [_m("repeat", 2, 1)],
    "flip": [_m("flip", 0)], "narrow": [_m("narrow", 0, 1, 2)], "index_select": [lambda e: e.a.index_select(0, e.ints)],
    "diagonal": [_m("diagonal")], "gather": [lambda e: e.a.gather(0, e.ints[None, :3])],
    "masked_fill": [lambda e: e.a.masked_fill(e.b > 0, 0.0)], "masked_select": [lambda e: e.a.masked_select(e.b > 0)],
    "nonzero": [lambda e: (e.a > 0).nonzero()], "tril": [_m("tril")], "triu": [_m("triu")],
    "split": [_m("split", 3), _m("split", [1, 2], dim=1), lambda e: torch.split(e.a, 2)],
    "chunk": [_m("chunk", 2), _m("chunk", 3, dim=1)], "unbind": [_m("unbind"), _m("unbind", 1)],
    # element-wise
    "exp": [_m("exp")], "log": [lambda e: e.a.abs().log()], "log1p": [lambda e: e.a.abs().log1p()],
    "expm1": [_m("expm1")], "sqrt": [lambda e: e.a.abs().sqrt()], "rsqrt": [lambda e: (e.a.abs() + 1).rsqrt()],
    "square": [_m("square")], "sin": [_m("sin")], "cos": [_m("cos")], "tanh": [_m("tanh")], "sigmoid": [_m("sigmoid")],
    "relu": [_m("relu")], "clamp": [_m("clamp", -0.5, 0.5), _m("clamp", min=0.0)], "floor": [_m("floor")],
    "ceil": [_m("ceil")], "round": [_m("round")], "sign": [_m("sign")], "reciprocal": [_m("reciprocal")],
    "softmax": [_m("softmax", 0)], "log_softmax": [_m("log_softmax", 1)],
    # conversions
    "float": [lambda e: e.a.long().float()], "double": [_m("double")], "half": [_m("half")],
    "bfloat16": [_m("bfloat16")],
    "int": [_m("int")], "long": [_m("long")], "bool": [_m("bool")], "type_as": [lambda e: e.a.type_as(e.ints)],
    "detach": [_m("detach")],
    "to": [_m("to", torch.float64), _m("to", "cpu"), lambda e: e.a.to(e.ints)],
    # torch.*
    "cat": [lambda e: torch.cat([e.a, e.b]), lambda e: torch.cat([e.a, e.b], dim=1)],
    "stack": [lambda e: torch.stack([e.a, e.b])], "where": [lambda e: torch.where(e.b > 0, e.a, e.b)],
    "zeros_like": [_f(torch.zeros_like)], "ones_like": [_f(torch.ones_like)], "full_like": [_f(torch.full_like, 2.0)],
    "rand_like": [lambda e: torch.rand_like(e.a) * 0], "randn_like": [lambda e: torch.randn_like(e.a) * 0],
    # torch.nn.functional.*
    "F.relu": [_f(functional.relu)], "F.softmax": [_f(functional.softmax, dim=0)],
    "F.log_softmax": [_f(functional.log_softmax, dim=1)], "F.linear": [_f2(functional.linear)],
    "F.gelu": [_f(functional.gelu)], "F.sigmoid": [_f(functional.sigmoid)], "F.tanh": [_f(functional.tanh)],
    "F.leaky_relu": [_f(functional.leaky_relu, 0.1)], "F.elu": [_f(functional.elu)], "F.silu": [_f(functional.silu)],
    "F.dropout": [_f(functional.dropout, 0.5, training=False)],
    "F.nll_loss": [lambda e: functional.nll_loss(e.a, e.ints)],
    "F.cross_entropy": [lambda e: functional.cross_entropy(e.a, e.ints)], "F.mse_loss": [_f2(functional.mse_loss)],
    "F.l1_loss": [_f2(functional.l1_loss)],
    "F.binary_cross_entropy": [lambda e: functional.binary_cross_entropy(e.a.sigmoid(), e.b.sigmoid())],
    "F.binary_cross_entropy_with_logits": [lambda e: functional.binary_cross_entropy_with_logits(e.a, e.b.sigmoid())],
    "F.one_hot": [lambda e: functional.one_hot(e.a.long().clamp(0, 2), 3)], "F.normalize": [_f(functional.normalize)],
    "F.pad": [_f(functional.pad, (1, 1))], "F.conv1d": [lambda e: functional.conv1d(e.a[None], e.b[None, :, :2])],
    "F.conv2d": [lambda e: functional.conv2d(e.a[None, None], e.b[None, None, :2, :2])],
    "F.max_pool2d": [lambda e: functional.max_pool2d(e.a[None], 2)],
    "F.avg_pool2d": [lambda e: functional.avg_pool2d(e.a[None], 2)],
    "F.embedding": [lambda e: functional.embedding(e.ints, e.a)], "F.layer_norm": [_f(functional.layer_norm, (3,))],
    # in place
    "add_": [_m2("add_")], "sub_": [_m2("sub_")], "mul_": [_m2("mul_")], "div_": [_m2("div_")], "zero_": [_m("zero_")],
    "addcmul_": [lambda e: e.a.addcmul_(e.b, e.b)], "addcdiv_": [lambda e: e.a.addcdiv_(e.b, e.b.abs() + 1)],
    "copy_": [_m2("copy_")], "fill_": [_m("fill_", 1.5)], "clamp_": [_m("clamp_", -0.5, 0.5)],
    # indexing
    "getitem": [lambda e: e.a[1:, None], lambda e: e.a[e.ints], lambda e: e.a[..., 0], lambda e: e.a[e.b > 0]],
    "setitem": [_setitem],
    # autograd
    "backward": [_backward], "grad": [_backward], "zero_grad": [_zero_grad],
    "requires_grad_": [lambda e: e.a.requires_grad_() * 1], "set_grad": [_set_grad], "set_data": [_set_data],
    # models
    "forward": [lambda e: _linear(e)(e.a)], "parameter": [lambda e: list(_linear(e).parameters())[1] * e.a[0, :2]],
    "state": [lambda e: _linear(e).state_dict()["weight"] * e.a[0]], "train": [_train],
    "cross_entropy": [lambda e: e.raw("cross_entropy", e.a, e.ints)],
    "mse_loss": [lambda e: e.raw("mse_loss", e.a, e.b)],
}  # fmt: skip
"""Samples of each registered op: `Env` -> a tensor (or tuple of them) locally, pointers remotely."""

REFUSED_ANYWHERE = {"aggregate_mean": lambda e: e.raw("aggregate_mean", [e.a])}
"""Ops with no public result to compare: a DP release runs at an aggregator on DP contributions
only (tests/test_dp.py); here, on a plain worker, it must be refused like on private data."""

X = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75], [-2.0, 1.0, 0.125], [3.0, -0.5, 1.25]])
Y = torch.tensor([[1.0, 2.0, -0.5], [-1.5, 0.5, 2.0], [0.75, -1.25, 1.0], [-0.25, 1.5, -2.0]])
LABELS = torch.tensor([0, 2, 1, 2])


def _local_raw(op: str, *args: Any) -> Any:
    return kernels.OPERATIONS[op](*args)


def _outputs(value: Any) -> list[Any]:
    return list(value) if isinstance(value, tuple | list) else [value]


def test_every_registered_op_has_samples() -> None:
    covered = set(SAMPLES) | set(REFUSED_ANYWHERE)
    missing, unknown = sorted(set(REGISTRY) - covered), sorted(covered - set(REGISTRY))
    assert not missing and not unknown, f"ops without samples: {missing}; samples of no op: {unknown}"


def test_special_kernels_and_shape_rules_match_the_registry() -> None:
    specials = {n for n, i in REGISTRY.items() if i.call is Call.SPECIAL} - set(REFUSED_ANYWHERE)
    assert set(kernels.SPECIAL) == specials
    assert set(meta._SPECIAL) == {n for n, i in REGISTRY.items() if i.shape is Shape.RULE}


def test_the_docs_op_table_is_the_registrys() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "ops.md").read_text()
    assert opinfo.markdown_table() in page, "docs/ops.md is stale: regenerate it with python -m fedptr.opinfo"


@dataclass
class _Failures:
    found: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.found.append(what)


async def test_every_op_on_public_inputs_equals_local_torch() -> None:
    failures = _Failures()
    async with harness.cluster(["bob"]) as c:
        bob = c.worker("bob")
        for name, samples in SAMPLES.items():
            for k, sample in enumerate(samples):
                label = f"{name}[{k}]"
                torch.manual_seed(0)
                local = _outputs(sample(Env(X.clone(), Y.clone(), LABELS.clone(), lambda v: v, _local_raw)))
                a, b, ints = (bob.send(t.clone()) for t in (X, Y, LABELS))
                env = Env(a, b, ints, bob.send, lambda op, *args: fedptr.pointer.remote_call(op, args))
                torch.manual_seed(0)
                remote = _outputs(sample(env))
                failures.check(len(remote) == len(local), f"{label}: {len(remote)} results, torch gives {len(local)}")
                for i, (r, want) in enumerate(zip(remote, local, strict=False)):
                    inferred = r.meta is not None
                    got = await r.get()
                    failures.check(
                        isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want.detach()),
                        f"{label} result {i}: {got!r} != torch's {want!r}",
                    )
                    if not REGISTRY[name].data_dependent:
                        failures.check(inferred, f"{label} result {i}: shape not inferred on the client")
    assert not failures.found, "\n".join(failures.found)


async def test_no_op_on_private_inputs_gives_a_gettable_result() -> None:
    data = {"bob": {"secret": {"x": X.numpy()}}}
    async with harness.cluster(["bob"], data=data) as c:
        bob = c.worker("bob")
        for name, samples in [*SAMPLES.items(), *((n, [s]) for n, s in REFUSED_ANYWHERE.items())]:
            for k, sample in enumerate(samples):
                (secret,) = await bob.search("secret")
                b, ints = bob.send(Y.clone()), bob.send(LABELS.clone())
                env = Env(secret, b, ints, bob.send, lambda op, *args: fedptr.pointer.remote_call(op, args))
                try:
                    results = _outputs(sample(env))
                    for r in results:
                        await r
                except fedptr.PermissionDenied as e:
                    assert e.owner == "bob", f"{name}[{k}] refused for {e.owner!r}"
                    continue
                for i, r in enumerate(results):
                    print(f"{name}[{k}] result {i}")  # shown by pytest when the refusal fails
                    await refused(r.get(), fedptr.PermissionDenied, owner="bob")


# --- multi-output ops: one Op, several result ids -------------------------------------------------


async def test_several_results_are_one_message_and_a_pointer_each(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = bob.send(X.clone())
    await x
    sent = client.link.messages_sent
    values, indices = x.max(dim=0)
    assert client.link.messages_sent - sent == 1  # one Op carries both result ids
    assert (values.shape, indices.dtype) == (torch.Size([3]), torch.int64)  # known before the reply
    assert values.id_at_location != indices.id_at_location
    assert torch.equal(await indices.get(), X.max(dim=0).indices)
    assert torch.equal(await (values * 2).get(), X.max(dim=0).values * 2)  # each result is an operand
    parts = x.split([1, 3])
    assert [tuple(p.shape) for p in parts] == [(1, 3), (3, 3)]
    assert torch.equal(await parts[1].get(), X[1:])


async def test_several_results_down_a_pointer_chain(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    x = await bob.send(X.clone())
    remote = await x.send(alice)  # alice holds a pointer to bob's tensor: the op is forwarded to bob
    values, indices = remote.topk(2, dim=1)
    assert remote.location == values.location == indices.location == "alice"
    got_values, got_indices = await (await values.get()).get(), await (await indices.get()).get()
    assert torch.equal(got_values, X.topk(2, dim=1).values)
    assert torch.equal(got_indices, X.topk(2, dim=1).indices)


async def test_a_plan_records_and_runs_several_results(client: fedptr.Client, bob: fedptr.Worker) -> None:
    @fedptr.plan
    def sorted_halves(x: fedptr.Pointer) -> tuple[fedptr.Pointer, ...]:
        values, indices = x.sort(dim=0)
        first, second = values.chunk(2)
        return first + 1, second, indices

    x = bob.send(X.clone())
    for _ in range(2):  # recorded on the first call, then one RunPlan message
        first, second, indices = sorted_halves(x)
        want = X.sort(dim=0)
        assert torch.equal(await first.get(), want.values[:2] + 1)
        assert torch.equal(await second.get(), want.values[2:])
        assert torch.equal(await indices.get(), want.indices)


async def test_each_result_of_private_data_is_private_and_derived_ones_too() -> None:
    async with harness.cluster(["bob"], data={"bob": {"secret": {"x": X.numpy()}}}) as c:
        (secret,) = await c.worker("bob").search("secret")
        values, indices = secret.max(dim=1)
        public = c.worker("bob").send(torch.ones(4))
        for p in (values, indices, indices.float() + public, *secret.unbind()):
            await refused(p.get(), fedptr.PermissionDenied, owner="bob")


async def test_the_number_of_results_comes_from_shapes_never_from_values(bob: fedptr.Worker) -> None:
    x = bob.send(X.clone())
    unknown = x[x > 0]  # data-dependent: its shape is learnt from the reply
    with pytest.raises(fedptr.DataDependentError):
        unknown.split(2)
    await unknown
    assert len(unknown.split(3)) == 3  # 8 positive values: known once awaited


async def _raw(client: fedptr.Client, op: str, args: list[Any], result_id: int, more_ids: list[int]) -> Any:
    return await client.call("bob", wire.Op(result_id, op, args, {}, more_ids=more_ids))


async def test_result_ids_the_op_cannot_fill_are_refused(client: fedptr.Client, bob: fedptr.Worker) -> None:
    x = bob.send(X.clone())
    await x
    ref = wire.Ref(x.id_at_location)
    ids = iter(range(1 << 40, 1 << 41))
    with pytest.raises(fedptr.RemoteError, match="add gives one result"):
        await _raw(client, "add", [ref, 1], next(ids), [next(ids)])
    with pytest.raises(fedptr.RemoteError, match="1 to 256 results"):
        await _raw(client, "unbind", [ref], next(ids), [next(ids) for _ in range(fedptr.limits.MAX_OP_RESULTS)])
    with pytest.raises(fedptr.RemoteError, match="gives 4 results, not the 2"):
        await _raw(client, "unbind", [ref], next(ids), [next(ids)])
    first = next(ids)
    with pytest.raises(fedptr.RemoteError, match="distinct and new"):
        await _raw(client, "max", [ref, 0], first, [first])
    ok = await _raw(client, "unbind", [ref], next(ids), [next(ids) for _ in range(3)])
    assert ok.more == [[[3], "float32"]] * 3
