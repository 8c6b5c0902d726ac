"""Models as checked graphs (fedptr/graphs.py), without processes: what a model class becomes on
the wire, that the node's rebuild computes what the class computes, and every refusal, typed and
naming what it refuses, on the client (capture) and on the node (a forged spec)."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest
import torch
from torch import nn
from torch.nn import functional

from fedptr import graphs, meta, modules
from fedptr.errors import UnsupportedTypeError


class Net(nn.Module):
    """PySyft's Part 6 CNN, written as in the tutorial, sized for the 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 3, 1)
        self.conv2 = nn.Conv2d(20, 50, 3, 1)
        self.fc1 = nn.Linear(2 * 2 * 50, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = functional.relu(self.conv1(x))
        x = functional.relu(self.conv2(x))
        x = functional.max_pool2d(x, 2, 2)
        x = x.view(-1, 2 * 2 * 50)
        x = functional.relu(self.fc1(x))
        x = self.fc2(x)
        return functional.log_softmax(x, dim=1)


class Residual(nn.Module):
    """A residual block with a layer outside LAYERS (LeakyReLU), a BatchNorm, a parameter and a
    buffer of its own, and indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 6), nn.LeakyReLU(0.2), nn.Linear(6, 6))
        self.norm = nn.BatchNorm1d(6)
        self.gain = nn.Parameter(torch.full((6,), 0.5))
        self.register_buffer("offset", torch.arange(6.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.body(x)) * self.gain + self.offset
        return torch.cat([h[:, :3], h[:, 3:].tanh()], dim=1) + x.size(0) * x.shape[1]


def _wire(spec: dict[str, Any]) -> dict[str, Any]:
    unpacked: dict[str, Any] = msgpack.unpackb(msgpack.packb(spec))
    return unpacked


@pytest.mark.parametrize("make, shape", [(Net, (5, 64)), (Residual, (5, 6))])
def test_a_model_class_is_rebuilt_from_its_graph_and_computes_the_same(make: type[nn.Module], shape: Any) -> None:
    torch.manual_seed(0)
    model = make()
    spec, _ = modules.to_wire(model)
    assert spec["type"] == graphs.GRAPH
    rebuilt = modules.build(_wire(spec))
    modules.load_parameters(rebuilt, list(model.state_dict().values()))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    x = torch.randn(*shape)
    for mode in (True, False):
        model.train(mode)
        rebuilt.train(mode)
        assert torch.allclose(rebuilt(x), model(x), atol=1e-6)
    assert modules.to_wire(rebuilt)[0] == rebuilt.spec  # a rebuilt model travels on unchanged
    assert meta.model(_wire(spec))(torch.empty(*shape, device="meta")).shape == model(x).shape


def test_a_sequential_with_a_layer_outside_the_list_travels_as_a_graph() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 2))
    spec, _ = modules.to_wire(model)
    assert spec["type"] == graphs.GRAPH
    rebuilt = modules.from_wire(_wire(spec), modules.to_wire(model)[1])
    x = torch.randn(7, 3)
    assert torch.allclose(rebuilt(x), model(x))


class Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Spectral(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(x).real


class Writer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.w.data.add_(x.mean())
        return x * self.w


class PlainTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask = torch.ones(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize(
    "model, named",
    [
        (Branchy(), "data-dependent control flow"),
        (Spectral(), "fft"),
        (Writer(), "reads .*data"),
        (PlainTensor(), "mask is a plain tensor attribute"),
        (nn.MultiheadAttention(4, 2), "MultiheadAttention cannot travel"),
    ],
)
def test_what_cannot_travel_is_refused_on_the_client_naming_it(model: nn.Module, named: str) -> None:
    with pytest.raises(UnsupportedTypeError, match=named):
        modules.to_wire(model)


def _net_spec() -> dict[str, Any]:
    return _wire(modules.to_wire(Net())[0])


def _forge(change: Any) -> dict[str, Any]:
    spec = _net_spec()
    change(spec)
    return spec


_X = {"step": 0}
_EMBED = [{"step": 0}, {"step": 1}]
"""F.embedding's indices and weight, as steps."""


def _step(spec: dict[str, Any], op: str) -> list[Any]:
    return next(s for s in spec["steps"] if s[0] == op)


@pytest.mark.parametrize(
    "forge, named",
    [
        (lambda s: _step(s, "function").__setitem__(1, "builtins.exec"), "not allowed"),
        (lambda s: _step(s, "method").__setitem__(1, "add_"), "not allowed"),
        (lambda s: _step(s, "method").__setitem__(1, "__class__"), "not allowed"),
        (lambda s: s["steps"].insert(-1, ["function", "getattr", [{"step": 0}, "__class__"], {}]), "not allowed"),
        (lambda s: _step(s, "module").__setitem__(1, "conv1.weight"), "not allowed"),
        (lambda s: _step(s, "function")[3].__setitem__("inplace", True), "writes in place"),
        (lambda s: _step(s, "function")[3].__setitem__("out", {"step": 0}), "writes in place"),
        # by position, and F.embedding's max_norm (renormalizes the rows its indices pick: a
        # forward on private labels would write which ones into a public parameter)
        (lambda s: (_step(s, "function")[3].clear(), _step(s, "function")[2].append(True)), "writes in place"),
        (lambda s: s["steps"].insert(-1, ["function", "F.embedding", _EMBED, {"max_norm": 1.0}]), "writes in place"),
        (lambda s: s["steps"].insert(-1, ["function", "F.embedding", [*_EMBED, None, 1.0], {}]), "writes in place"),
        (lambda s: s["steps"].insert(-1, ["function", "F.normalize", [_X, 2.0, 1, 1e-12, _X], {}]), "writes in place"),
        (lambda s: _step(s, "function")[2].__setitem__(0, {"step": 10_000}), "not before it"),
        (lambda s: s["steps"].pop(), "ends with its output"),
        (lambda s: s["steps"].insert(3, ["input", "y", [], {}]), "inputs come first"),
        (lambda s: s["tree"]["children"].append(["__dict__", {"children": []}]), "attribute name"),
        (lambda s: s["tree"]["children"].append(["a.b", {"children": []}]), "attribute name"),
        (lambda s: s["tree"]["children"].append(["training", {"children": []}]), "not a valid model graph"),
        (lambda s: s["tree"].__setitem__("parameters", [["w", [1 << 20, 1 << 20], "float32", True]]), "at most"),
        (lambda s: s["tree"]["children"][0][1]["layer"].__setitem__("type", "os.system"), "not an allowed layer"),
    ],
)
def test_a_forged_graph_is_refused_by_the_node_naming_why(forge: Any, named: str) -> None:
    spec = _forge(forge)
    with pytest.raises(ValueError, match=named):
        modules.build(spec)


def test_a_rebuilt_forward_cannot_write_its_parameters() -> None:
    model = Residual()
    rebuilt = modules.from_wire(_wire(modules.to_wire(model)[0]), modules.to_wire(model)[1])
    before = {k: v.clone() for k, v in rebuilt.state_dict().items() if "norm" not in k}
    rebuilt.eval()
    rebuilt(torch.randn(4, 6))
    after = copy.deepcopy({k: v for k, v in rebuilt.state_dict().items() if "norm" not in k})
    assert all(torch.equal(before[k], after[k]) for k in before)
