"""Pointers that feel like tensors (issue 11): inferred shapes and dtypes checked against the
node for every allow-listed op, indexing against local torch, and each idiom the issue lists."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import optim
from fedptr.ops import ALLOWED, TENSOR_METHODS
from fedptr.pointer import Pointer
from tests.conftest import examples

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)

SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=list(HealthCheck))
DEADLINE_S = 60.0

T = Any  # a Pointer or a local tensor: every case runs on both


def _2d(x: T) -> T:
    return x.reshape(-1, x.shape[-1])


def _3d(x: T) -> T:
    return x.reshape(1, -1, x.shape[-1])


def _target(x: T) -> torch.Tensor:
    return torch.zeros(_2d(x).shape[0], dtype=torch.long)


CASES: dict[str, Callable[[T], T]] = {
    # arithmetic (the reflected ones through Python's operators)
    "add": lambda x: x + x,
    "sub": lambda x: x - 1,
    "mul": lambda x: x * x,
    "div": lambda x: x / 2,
    "true_divide": lambda x: x.true_divide(x),
    "floor_divide": lambda x: x // 2,
    "remainder": lambda x: x % 2,
    "fmod": lambda x: x.fmod(2),
    "pow": lambda x: x**2,
    "neg": lambda x: -x,
    "abs": lambda x: abs(x),
    "matmul": lambda x: _2d(x) @ _2d(x).t(),
    "mm": lambda x: _2d(x).mm(_2d(x).t()),
    "bmm": lambda x: _3d(x).bmm(_3d(x).transpose(1, 2)),
    "dot": lambda x: x.flatten().dot(x.flatten()),
    "outer": lambda x: x.flatten().outer(x.flatten()),
    "maximum": lambda x: x.maximum(x * 2),
    "minimum": lambda x: x.minimum(x * 2),
    "__radd__": lambda x: 1 + x,
    "__rsub__": lambda x: 1 - x,
    "__rmul__": lambda x: 3 * x,
    "__rtruediv__": lambda x: 1 / x,
    "__rmatmul__": lambda x: torch.ones(2, x.shape[0]) @ x.reshape(x.shape[0], -1),
    "__rpow__": lambda x: 2**x,
    "__rfloordiv__": lambda x: 7 // x,
    "__rmod__": lambda x: 7 % x,
    # comparisons
    "eq": lambda x: x.eq(x),
    "ne": lambda x: x.ne(2),
    "lt": lambda x: x < 2,
    "le": lambda x: x <= 2,
    "gt": lambda x: x > 2,
    "ge": lambda x: x >= 2,
    "logical_and": lambda x: (x > 1).logical_and(x < 3),
    "logical_or": lambda x: (x > 1).logical_or(x < 3),
    "logical_not": lambda x: ~(x > 1),
    # reductions
    "sum": lambda x: x.sum(0, dtype=torch.float64),
    "mean": lambda x: x.mean(-1, keepdim=True),
    "prod": lambda x: x.prod(),
    "amax": lambda x: x.amax(0),
    "amin": lambda x: x.amin(),
    "argmax": lambda x: x.argmax(),
    "argmin": lambda x: x.argmin(0),
    "std": lambda x: x.std(),
    "var": lambda x: x.var(0),
    "norm": lambda x: x.norm(),
    "all": lambda x: (x > 0).all(),
    "any": lambda x: (x > 2).any(0),
    "cumsum": lambda x: x.cumsum(0),
    "logsumexp": lambda x: x.logsumexp(-1),
    "max": lambda x: x.max(),
    "min": lambda x: x.min(),
    # reshaping and selection
    "reshape": lambda x: x.reshape(-1),
    "view": lambda x: x.view(-1, 1),
    "flatten": lambda x: x.flatten(),
    "squeeze": lambda x: x.unsqueeze(0).squeeze(0),
    "unsqueeze": lambda x: x.unsqueeze(-1),
    "t": lambda x: _2d(x).t(),
    "transpose": lambda x: x.transpose(0, -1),
    "permute": lambda x: x.permute(*reversed(range(x.dim()))),
    "contiguous": lambda x: x.contiguous(),
    "clone": lambda x: x.clone(),
    "expand": lambda x: x.unsqueeze(0).expand(2, *x.shape),
    "repeat": lambda x: x.repeat(2, *[1] * (x.dim() - 1)),
    "flip": lambda x: x.flip(0),
    "narrow": lambda x: x.narrow(0, 0, 1),
    "index_select": lambda x: x.index_select(0, torch.tensor([0, 0])),
    "diagonal": lambda x: _2d(x).diagonal(),
    "gather": lambda x: x.gather(0, torch.zeros(x.shape, dtype=torch.long)),
    "masked_fill": lambda x: x.masked_fill(x > 2, 0.0),
    "masked_select": lambda x: x.masked_select(x > 2),
    "nonzero": lambda x: (x > 2).nonzero(),
    "tril": lambda x: _2d(x).tril(),
    "triu": lambda x: _2d(x).triu(1),
    # element-wise
    "exp": lambda x: x.exp(),
    "log": lambda x: x.log(),
    "log1p": lambda x: x.log1p(),
    "expm1": lambda x: x.expm1(),
    "sqrt": lambda x: x.sqrt(),
    "rsqrt": lambda x: x.rsqrt(),
    "square": lambda x: x.square(),
    "sin": lambda x: torch.sin(x),
    "cos": lambda x: x.cos(),
    "tanh": lambda x: torch.tanh(x),
    "sigmoid": lambda x: x.sigmoid(),
    "relu": lambda x: torch.relu(x - 2),
    "clamp": lambda x: x.clamp(1, 2),
    "floor": lambda x: x.floor(),
    "ceil": lambda x: x.ceil(),
    "round": lambda x: x.round(),
    "sign": lambda x: x.sign(),
    "reciprocal": lambda x: x.reciprocal(),
    "softmax": lambda x: x.softmax(0),
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    # conversions
    "float": lambda x: x.long().float(),
    "double": lambda x: x.double(),
    "half": lambda x: x.half(),
    "bfloat16": lambda x: x.bfloat16(),
    "int": lambda x: x.int(),
    "long": lambda x: x.long(),
    "bool": lambda x: x.bool(),
    "to": lambda x: x.to(torch.float64).to("cpu"),
    "detach": lambda x: x.detach(),
    "type_as": lambda x: x.type_as(torch.zeros(1, dtype=torch.int16)),
    # torch functions
    "cat": lambda x: torch.cat([x, x]),
    "stack": lambda x: torch.stack([x, x], -1),
    "where": lambda x: torch.where(x > 2, x, x * 0),
    "zeros_like": lambda x: torch.zeros_like(x),
    "ones_like": lambda x: torch.ones_like(x, dtype=torch.int32),
    "full_like": lambda x: torch.full_like(x, 3.0),
    "rand_like": lambda x: torch.rand_like(x),
    "randn_like": lambda x: torch.randn_like(x, dtype=torch.float64),
    # torch.nn.functional
    "F.relu": lambda x: functional.relu(x - 2),
    "F.softmax": lambda x: functional.softmax(x, dim=-1),
    "F.log_softmax": lambda x: functional.log_softmax(x, dim=0, dtype=torch.float64),
    "F.linear": lambda x: functional.linear(x, torch.ones(3, x.shape[-1]), torch.zeros(3)),
    "F.gelu": lambda x: functional.gelu(x),
    "F.sigmoid": lambda x: functional.sigmoid(x),
    "F.tanh": lambda x: functional.tanh(x),
    "F.leaky_relu": lambda x: functional.leaky_relu(x, 0.1),
    "F.elu": lambda x: functional.elu(x),
    "F.silu": lambda x: functional.silu(x),
    "F.dropout": lambda x: functional.dropout(x, 0.5),
    "F.nll_loss": lambda x: functional.nll_loss(functional.log_softmax(_2d(x), 1), _target(x)),
    "F.cross_entropy": lambda x: functional.cross_entropy(_2d(x), _target(x)),
    "F.mse_loss": lambda x: functional.mse_loss(x, x * 2),
    "F.l1_loss": lambda x: functional.l1_loss(x, x * 2, reduction="none"),
    "F.binary_cross_entropy": lambda x: functional.binary_cross_entropy(torch.sigmoid(x), torch.ones(x.shape)),
    "F.binary_cross_entropy_with_logits": lambda x: functional.binary_cross_entropy_with_logits(x, x.sigmoid()),
    "F.one_hot": lambda x: functional.one_hot(x.long() % 3, 3),
    "F.normalize": lambda x: functional.normalize(x, dim=-1),
    "F.pad": lambda x: functional.pad(x, (1, 2)),
    "F.conv1d": lambda x: functional.conv1d(_3d(x), torch.ones(2, _3d(x).shape[1], 1)),
    "F.conv2d": lambda x: functional.conv2d(_3d(x).unsqueeze(0), torch.ones(2, 1, 1, 1)),
    "F.max_pool2d": lambda x: functional.max_pool2d(_3d(x), 1),
    "F.avg_pool2d": lambda x: functional.avg_pool2d(_3d(x), 1),
    "F.embedding": lambda x: functional.embedding(x.long() % 4, torch.ones(4, 2)),
    "F.layer_norm": lambda x: functional.layer_norm(x, x.shape[-1:]),
    # in-place updates return the updated pointer, whose description does not change
    "add_": lambda x: x.clone().add_(1),
    "sub_": lambda x: x.clone().sub_(1, alpha=2),
    "mul_": lambda x: x.clone().mul_(2),
    "div_": lambda x: x.clone().div_(2),
    "zero_": lambda x: x.clone().zero_(),
    "addcmul_": lambda x: x.clone().addcmul_(x, x, value=0.5),
    "addcdiv_": lambda x: x.clone().addcdiv_(x, x + 1, value=0.5),
    "copy_": lambda x: x.clone().copy_(x * 3),
    "fill_": lambda x: x.clone().fill_(7),
    "clamp_": lambda x: x.clone().clamp_(0, 1),
    "getitem": lambda x: x[0],
    "setitem": lambda x: x.clone(),  # see test_item_assignment_matches_torch
}
DATA_DEPENDENT = {"masked_select", "nonzero"}
"""Their shape depends on the values: known once awaited."""


def test_every_case_is_an_allowed_op() -> None:
    # coverage of every op is tests/test_opinfo.py's; these cases add random shapes
    assert set(CASES) <= set(ALLOWED), set(CASES) - set(ALLOWED)


def test_every_tensor_method_is_a_pointer_method() -> None:
    missing = [n for n in TENSOR_METHODS if not n.startswith("__") and not callable(getattr(Pointer, n, None))]
    assert missing == []


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**16))
async def test_inferred_shape_and_dtype_match_the_node_for_every_op(
    bob: fedptr.Worker, shape: list[int], seed: int
) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 4 + 0.5
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        results = {name: case(p) for name, case in CASES.items()}
        for name, r in results.items():
            assert isinstance(r, Pointer), name
            assert (r.meta is None) == (name in DATA_DEPENDENT), name
        # awaiting checks the node's shape and dtype against the inferred ones (ProtocolError if not)
        await asyncio.gather(*results.values())
        for name, r in results.items():
            local = CASES[name](x.clone())
            assert (r.shape, r.dtype) == (local.shape, local.dtype), name


indices = st.one_of(
    st.integers(-1, 1),
    st.none(),
    st.just(Ellipsis),
    st.builds(slice, st.one_of(st.none(), st.integers(-3, 3)), st.one_of(st.none(), st.integers(-3, 3))),
    st.builds(slice, st.none(), st.none(), st.integers(1, 3)),
)


@SETTINGS
@given(shape=st.lists(st.integers(2, 4), min_size=1, max_size=3), key=st.lists(indices, min_size=1, max_size=3))
async def test_indexing_matches_torch(bob: fedptr.Worker, shape: list[int], key: list[Any]) -> None:
    if key.count(Ellipsis) > 1 or sum(k is not None and k is not Ellipsis for k in key) > len(shape):
        return
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    index = tuple(key)
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        r = p[index]
        assert r.shape == x[index].shape
        assert torch.equal(await r.get(), x[index])  # type: ignore[arg-type]


async def test_index_and_mask_pointers(bob: fedptr.Worker) -> None:
    x = torch.arange(12.0).reshape(3, 4)
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        idx = await bob.send(torch.tensor([2, 0]))
        assert torch.equal(await p[idx].get(), x[torch.tensor([2, 0])])  # type: ignore[arg-type]
        assert torch.equal(await p[[0, 0], 1:].get(), x[[0, 0], 1:])  # type: ignore[arg-type]
        masked = p[p > 5]
        with pytest.raises(fedptr.DataDependentError, match="await"):
            _ = masked.shape
        assert (await masked).shape == (6,)
        assert torch.equal(await masked.get(), x[x > 5])  # type: ignore[arg-type]
        start = (await bob.send(torch.tensor(1))).long()
        assert torch.equal(await p[start:].get(), x[1:])  # type: ignore[arg-type]


async def test_item_assignment_matches_torch(bob: fedptr.Worker) -> None:
    x = torch.zeros(3, 4)
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        p[0] = 1.0
        p[1:, ::2] = torch.tensor([5.0, 6.0])
        p[p > 5.5] = -1.0
        p[..., -1] = await bob.send(torch.full((3,), 9.0))
        for key, value in [(0, 1.0), ((slice(1, None), slice(None, None, 2)), torch.tensor([5.0, 6.0]))]:
            x[key] = value
        x[x > 5.5] = -1.0
        x[..., -1] = 9.0
        assert torch.equal(await p.get(), x)  # type: ignore[arg-type]


async def test_shape_dtype_size_dim_numel_len_without_a_round_trip(client: fedptr.Client, bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        x = await bob.send(torch.ones(3, 4, dtype=torch.float64, requires_grad=True))
        sent = client.link.messages_sent
        y = (x @ torch.ones(4, 2, dtype=torch.float64)).sum(1)
        assert (y.shape, y.dtype, y.device, y.requires_grad) == ((3,), torch.float64, torch.device("cpu"), True)
        assert (x.size(), x.size(1), x.dim(), x.ndim, x.numel(), len(x)) == ((3, 4), 4, 2, 2, 12, 3)
        assert client.link.messages_sent - sent <= 2  # the two ops (matmul, sum), nothing else
        assert "float64[3, 4], requires_grad" in repr(x)
        await y


async def test_python_truthiness_is_refused_not_guessed(bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        x = await bob.send(torch.tensor([1, 200]))
        for attempt in (
            lambda: bool(x > 100),
            lambda: [0, 1][x],  # __index__
            lambda: list(x),
            lambda: int(x),
            lambda: len(x.sum()),
        ):
            with pytest.raises(TypeError) as info:
                attempt()
            assert isinstance(info.value, fedptr.FedptrError)
        with pytest.raises(fedptr.DataDependentError, match="await the pointer or get"):
            if x > 100:
                pass
        assert await (x > 100).any().item() is True


async def test_equality_is_identity_and_eq_is_element_wise(client: fedptr.Client, bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        p0, p1 = await bob.send(torch.ones(2)), await bob.send(torch.ones(2))
        sent = client.link.messages_sent
        assert p0 not in [p1] and p0 in [p1, p0]
        assert [p0, p1].index(p1) == 1
        assert (p0 == None) is False and (p0 != None) is True  # noqa: E711
        assert len({p0, p1, p0}) == 2 and {p0: 1}[p0] == 1
        assert client.link.messages_sent == sent  # none of that went to bob
        assert torch.equal(await p0.eq(p1).get(), torch.tensor([True, True]))  # type: ignore[arg-type]
        assert torch.equal(await torch.eq(p0, 1).get(), torch.tensor([True, True]))  # type: ignore[arg-type]


async def test_dtype_and_device_arguments_travel(bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        x = await bob.send(torch.tensor([1, 2, 3]))
        s = x.sum(dtype=torch.float64)
        assert s.dtype == torch.float64
        assert torch.equal(await s.get(), torch.tensor(6.0, dtype=torch.float64))  # type: ignore[arg-type]
        y = x.to(torch.device("cpu"), torch.float16)
        assert (await y).dtype == torch.float16
        with pytest.raises(fedptr.InvalidArgumentError, match="cpu only"):
            x.to(torch.device("meta"))


async def test_functional_calls_run_remotely(bob: fedptr.Worker) -> None:
    x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    w, b = torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        for f in (functional.relu, lambda t: functional.softmax(t, dim=1), lambda t: functional.log_softmax(t, 1)):
            assert torch.allclose(await f(p).get(), f(x))  # type: ignore[arg-type, no-untyped-call]
        assert torch.allclose(await functional.linear(p, w, b).get(), functional.linear(x, w, b))  # type: ignore[arg-type]


async def test_the_new_methods_work(bob: fedptr.Worker) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    async with asyncio.timeout(DEADLINE_S):
        p = await bob.send(x)
        assert torch.equal(await p.int().get(), x.int())  # type: ignore[arg-type]
        assert torch.equal(await p.narrow(1, 1, 2).floor().cumsum(0).get(), x.narrow(1, 1, 2).floor().cumsum(0))  # type: ignore[arg-type]
        assert torch.equal(await p.expand(2, 2, 3).repeat(1, 1, 2).get(), x.expand(2, 2, 3).repeat(1, 1, 2))  # type: ignore[arg-type]
        assert await p.max().item() == 5.0 and await p.sum().item() == 15.0
        assert await p.tolist() == x.tolist()
        values, indices = p.max(0)  # with a dim, torch's (values, indices): a pointer each
        assert torch.equal(await indices.get(), x.max(0).indices)  # type: ignore[arg-type]
        assert torch.equal(await values.get(), x.max(0).values)  # type: ignore[arg-type]


async def test_get_keeps_requires_grad(bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        w = await bob.send(torch.ones(2, requires_grad=True))
        back = await (w * 2).get()
        assert isinstance(back, torch.Tensor) and back.requires_grad
        assert not (await (await bob.send(torch.ones(2))).get()).requires_grad  # type: ignore[union-attr]


async def test_unawaited_updates_happen_and_their_errors_surface_on_the_next_await(bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        w = await bob.send(torch.ones(3, requires_grad=True))
        opt = optim.SGD([w], lr=0.5)
        (w * w).sum().backward()  # not awaited: still runs
        opt.step()  # not awaited: still runs (it used to do nothing)
        opt.zero_grad()
        assert torch.equal(await w.clone().get(), torch.zeros(3))  # type: ignore[arg-type]
        w.sub_(torch.ones(4))  # fails on bob
        other = bob.send(torch.ones(1))
        with pytest.raises(fedptr.RemoteError, match="size of tensor"):
            await other  # the next await on bob raises it, once
        await other
        bad = await bob.send(torch.ones(3))
        pending = optim.SGD([bad], lr=1.0).step()  # no gradient
        with pytest.raises(fedptr.RemoteError, match="no gradient"):
            await pending
        await bad


async def test_in_place_operators_update_the_remote_tensor(bob: fedptr.Worker) -> None:
    async with asyncio.timeout(DEADLINE_S):
        w = await bob.send(torch.tensor([1.0, 2.0], requires_grad=True))
        same = w
        await (w * w).sum().backward()
        w -= 0.5 * w.grad
        assert w is same
        w += 1
        w *= 2
        w /= 4
        w.grad *= 0
        assert torch.equal(await w.grad.get(), torch.zeros(2))  # type: ignore[arg-type]
        w.data -= 1.0
        w.data = await bob.send(torch.tensor([7.0, 8.0]))
        w.grad = None
        back = await w.get()
        assert torch.equal(back, torch.tensor([7.0, 8.0])) and back.requires_grad  # type: ignore[union-attr]


async def test_model_pointers_behave_like_modules(bob: fedptr.Worker) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2), nn.Sigmoid())
    async with asyncio.timeout(DEADLINE_S):
        mp = await bob.send(model)
        assert isinstance(mp, fedptr.ModulePointer)
        assert mp.parameters() == mp.parameters() and mp.parameters()[0] is mp[0].weight
        assert [n for n, _ in mp.named_parameters()] == [n for n, _ in model.named_parameters()]
        assert mp[-2].bias.shape == (2,) and list(mp.state_dict()) == list(model.state_dict())
        x = await bob.send(torch.ones(16, 4))
        assert mp(x).shape == (16, 2)
        a, b = mp(x), mp(x)
        assert await (a - b).abs().sum().item() > 0  # training mode: dropout on
        mp.eval()
        a, b = mp(x), mp(x)
        assert await (a - b).abs().sum().item() == 0  # eval: dropout off
        mp.train()
        linear = await bob.send(nn.Linear(3, 1))
        assert isinstance(linear, fedptr.ModulePointer) and linear.weight.shape == (1, 3)


async def test_more_layers_travel_and_run(bob: fedptr.Worker) -> None:
    layers: list[tuple[nn.Module, torch.Tensor]] = [
        (nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.BatchNorm1d(3), nn.GELU()), torch.randn(4, 2, 8)),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.AvgPool2d(1)),
            torch.randn(2, 1, 8, 8),
        ),
        (nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.LayerNorm(4), nn.Softmax(-1)), torch.tensor([[1, 2, 0]])),
        (nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(1), nn.Identity()), torch.randn(2, 3)),
        (nn.LSTM(3, 5, batch_first=True), torch.randn(2, 4, 3)),
        (nn.GRU(3, 5, num_layers=2), torch.randn(4, 2, 3)),
    ]
    async with asyncio.timeout(DEADLINE_S):
        for model, x in layers:
            model.eval()
            expected = model(x)
            expected = expected[0] if isinstance(expected, tuple) else expected
            mp = await bob.send(model)
            out = mp(await bob.send(x))
            assert out.shape == expected.shape
            assert torch.allclose(await out.get(), expected, atol=1e-5), model  # type: ignore[arg-type]
            back = await mp.get()
            assert isinstance(back, nn.Module)
            for (name, mine), theirs in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
                assert torch.equal(mine, theirs), name


async def test_adam_and_momentum_match_torch(bob: fedptr.Worker) -> None:
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.randn(16, 1)
    async with asyncio.timeout(DEADLINE_S):
        for make in (
            lambda ps: optim.Adam(ps, lr=0.05, weight_decay=0.01, amsgrad=True),
            lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        ):
            torch.manual_seed(1)
            local = nn.Linear(3, 1)
            remote = await bob.send(local)
            xp, yp = await bob.send(x), await bob.send(y)
            ropt = make(remote.parameters())  # type: ignore[attr-defined]
            lopt = (torch.optim.Adam if isinstance(ropt, optim.Adam) else torch.optim.SGD)(
                local.parameters(), **{k: v for k, v in ropt.defaults.items() if k != "maximize"}
            )
            for _ in range(5):
                ropt.zero_grad()
                functional.mse_loss(remote(xp), yp).backward()
                ropt.step()
                lopt.zero_grad()
                functional.mse_loss(local(x), y).backward()
                lopt.step()
            back = await remote.get()
            for mine, theirs in zip(local.parameters(), back.parameters(), strict=True):  # type: ignore[union-attr]
                assert torch.allclose(mine, theirs, atol=1e-5)


@pytest.mark.slow  # a process cluster
async def test_cluster_start_and_stop_without_a_with_block() -> None:
    async with asyncio.timeout(DEADLINE_S):
        cluster = await fedptr.local_cluster(["solo"]).start()
        try:
            assert "solo" in repr(cluster) and cluster.client.name in repr(cluster.client)
            p = await cluster.client.worker("solo").send(torch.ones(1))
            assert torch.equal(await (p + 1).get(), torch.full((1,), 2.0))  # type: ignore[arg-type]
        finally:
            await cluster.stop()
        await cluster.stop()  # idempotent


@pytest.mark.slow  # a fresh interpreter
def test_submodules_are_attributes_and_the_package_import_stays_light() -> None:
    code = (
        "import sys, fedptr; assert 'torch' not in sys.modules; "
        "import fedptr.wire, fedptr.envelope; assert 'torch' not in sys.modules; "
        "print(fedptr.optim.SGD.__name__, fedptr.data.FederatedDataLoader.__name__, fedptr.aggregate.mean.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["SGD", "FederatedDataLoader", "mean"]


async def test_inference_remembered_by_operand_tells_equal_scalars_and_changed_pointers_apart(
    bob: fedptr.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client remembers an op's inferred result by the identity of its operands' meta
    tensors and the type and value of its scalars (`pointer._INFERRED`): 1, 1.0 and True give
    three dtypes, a pointer whose requires_grad changed is a new operand, and each inferred
    result agrees with the worker's (an await compares them), met first or again."""
    from fedptr import limits
    from fedptr import pointer as pointer_module

    monkeypatch.setattr(pointer_module, "_INFERRED", {})
    local = torch.arange(3)
    p = await bob.send(local)
    for _ in range(2):  # computed, then remembered
        for scalar in (1, 1.0, True, 2.5, False):
            q = p + scalar
            assert q.dtype == (local + scalar).dtype, scalar
            await q
    f = p.float()
    assert not (f * 2).requires_grad
    f.requires_grad_()
    doubled = f * 2
    assert doubled.requires_grad
    await doubled
    monkeypatch.setattr(limits, "INFERRED_BY_OPERANDS", 3)
    for n in range(5):
        assert (p + n).shape == (3,)
    assert 0 < len(pointer_module._INFERRED) <= 3
