"""Remote autograd, models as data, private node data and the privacy policy, on the real broker
and nodes in this process (tests/harness.py).

One cluster for the module: bob and alice hold private digits and trust secure_worker (an
aggregator); eve is a worker nobody trusts.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
import pytest_asyncio
import torch
from fedptr.nodes.node import NodeConfig
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import aggregate, dp, modules, optim, wire

from . import harness

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
ROOT = Path(__file__).resolve().parents[1]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("federated_average", ROOT / "examples" / "federated_average.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["federated_average"] = module
    spec.loader.exec_module(module)
    return module


example = load_example()


SPLIT_DIR = tempfile.TemporaryDirectory(prefix="fedptr-digits-")
SPLIT = example.split_digits(Path(SPLIT_DIR.name), seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed() -> AsyncIterator[harness.InprocCluster]:
    """bob and alice own digits, with budgets, and trust secure_worker, an aggregator whose
    roster is bob and alice; eve is a worker nobody trusts. In this process (tests/harness.py):
    nothing here needs a process of its own."""
    owner = NodeConfig(trust=["secure_worker"], epsilon=100, dp_noise_multiplier=5)
    async with harness.cluster(
        ["bob", "alice", "secure_worker", "eve"],
        configs={"bob": owner, "alice": owner, "secure_worker": NodeConfig(aggregator=True, owners=["bob", "alice"])},
        data={o: {"digits": SPLIT.files[o]} for o in ("bob", "alice")},
        stores=["bob", "alice"],
        call_timeout=30.0,
    ) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def _clean(fed: harness.InprocCluster) -> AsyncIterator[None]:
    yield
    for name in ("bob", "alice", "secure_worker", "eve"):
        await fed.client.worker(name).clear()


async def digits(c: harness.InprocCluster, owner: str) -> tuple[fedptr.Pointer, fedptr.Pointer]:
    x, y = await c.client.worker(owner).search("digits")
    return x, y


@MODULE_LOOP
async def test_remote_linear_regression_matches_local(fed: harness.InprocCluster) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5]]) + 0.25
    w0 = torch.zeros(3, 1, requires_grad=True)
    b0 = torch.zeros(1, requires_grad=True)
    bob = fed.client.worker("bob")
    w, b = await bob.send(w0), await bob.send(b0)
    xp, yp = await bob.send(x), await bob.send(y)
    remote_opt = optim.SGD([w, b], lr=0.1)
    local_w, local_b = w0.detach().clone().requires_grad_(), b0.detach().clone().requires_grad_()
    local_opt = torch.optim.SGD([local_w, local_b], lr=0.1)
    for _ in range(30):
        await ((xp @ w + b - yp) ** 2).mean().backward()
        await remote_opt.step()
        await remote_opt.zero_grad()
        local_opt.zero_grad()
        ((x @ local_w + local_b - y) ** 2).mean().backward()
        local_opt.step()
    assert torch.allclose(await w.get(), local_w.detach(), atol=1e-6)  # type: ignore[arg-type]
    assert torch.allclose(await b.get(), local_b.detach(), atol=1e-6)  # type: ignore[arg-type]


@MODULE_LOOP
async def test_requires_grad_survives_send_and_grad_is_a_pointer(fed: harness.InprocCluster) -> None:
    bob = fed.client.worker("bob")
    w = await bob.send(torch.ones(3, requires_grad=True))
    await (w * w).sum().backward()
    g = w.grad
    assert isinstance(g, fedptr.Pointer) and g.location == "bob"
    assert torch.equal(await g.get(), torch.full((3,), 2.0))  # type: ignore[arg-type]
    plain = await bob.send(torch.ones(3))
    with pytest.raises(fedptr.RemoteError, match="does not require grad"):
        await (plain * plain).sum().backward()


@MODULE_LOOP
async def test_a_parameter_behind_a_chain_trains(fed: harness.InprocCluster) -> None:
    bob, alice = fed.client.worker("bob"), fed.client.worker("alice")
    w = await (await bob.send(torch.tensor([3.0], requires_grad=True))).send(alice)  # alice -> bob
    x = await (await bob.send(torch.tensor([2.0]))).send(alice)
    opt = optim.SGD([w], lr=0.1)
    for _ in range(3):
        await ((w * x - 2.0) ** 2).sum().backward()
        await opt.step()
        await opt.zero_grad()
    inner = await w.get()
    assert isinstance(inner, fedptr.Pointer) and inner.location == "bob"
    expected = torch.tensor([3.0])
    for _ in range(3):
        expected = expected - 0.1 * 2 * (expected * 2 - 2.0) * 2
    assert torch.allclose(await inner.get(), expected)  # type: ignore[arg-type]


@MODULE_LOOP
async def test_module_send_forward_train_move_get(fed: harness.InprocCluster) -> None:
    bob, eve = fed.client.worker("bob"), fed.client.worker("eve")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.0), nn.Linear(32, 3))
    x = torch.randn(5, 1, 4, 4)
    target = torch.tensor([0, 1, 2, 0, 1])
    remote = await bob.send(model)
    assert isinstance(remote, fedptr.ModulePointer) and remote.n_parameters == 4
    assert torch.allclose(await remote(await bob.send(x)).get(), model(x), atol=1e-6)  # type: ignore[arg-type]
    xp, tp = await bob.send(x), await bob.send(target)
    opt = optim.SGD(remote.parameters(), lr=0.5)
    local_opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        await functional.cross_entropy(remote(xp), tp).backward()
        await opt.step()
        await opt.zero_grad()
        local_opt.zero_grad()
        functional.cross_entropy(model(x), target).backward()
        local_opt.step()
    moved = await remote.move(eve)  # public data: it may go anywhere
    assert isinstance(moved, fedptr.ModulePointer) and moved.location == "eve"
    back = await moved.get()
    assert isinstance(back, nn.Sequential)
    for mine, theirs in zip(model.parameters(), back.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


@MODULE_LOOP
async def test_disallowed_module_is_refused(fed: harness.InprocCluster) -> None:
    bob = fed.client.worker("bob")
    with pytest.raises(fedptr.UnsupportedTypeError, match="MultiheadAttention cannot travel as a graph"):
        await bob.send(nn.MultiheadAttention(4, 2))

    class Spectral(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(x).abs()

    with pytest.raises(fedptr.UnsupportedTypeError, match=r"calls torch\._C\._fft\.fft_rfft, which is not allowed"):
        await bob.send(Spectral())
    with pytest.raises(fedptr.RemoteError, match="not an allowed layer spec"):
        await fed.client.call("bob", wire.PutModule(12345, {"type": "os.system"}, []))
    forged, params = modules.to_wire(Net())
    forged["steps"][2][1] = "builtins.eval"
    with pytest.raises(fedptr.RemoteError, match=r"step 2 of a model graph \(module 'builtins.eval'\) is not allowed"):
        await fed.client.call("bob", wire.PutModule(12346, forged, params))


class Net(nn.Module):
    """PySyft's Part 6 CNN as a class with a forward, written as in the tutorial, sized for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.fc1 = nn.Linear(2 * 2 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = functional.relu(self.conv1(x))
        x = functional.relu(self.conv2(x))
        x = functional.max_pool2d(x, 2, 2)
        x = x.view(-1, 2 * 2 * 16)
        x = functional.leaky_relu(self.fc1(x), 0.1)
        return functional.log_softmax(self.fc2(x), dim=1)


def _accuracy(model: nn.Module) -> float:
    with torch.no_grad():
        return float((model(SPLIT.test_x).argmax(1) == SPLIT.test_y).float().mean())


@MODULE_LOOP
@pytest.mark.slow  # a full training run beside the local one: 7-20 s
async def test_a_model_class_trains_remotely_through_pointers_as_locally(fed: fedptr.Cluster) -> None:
    eve = fed.client.worker("eve")
    torch.manual_seed(0)
    local = Net()
    remote = await eve.send(copy.deepcopy(local))
    assert isinstance(remote, fedptr.ModulePointer) and remote.n_parameters == 8
    x, y = SPLIT.pooled_x[:512], SPLIT.pooled_y[:512]
    xp, yp = await eve.send(x), await eve.send(y)
    opt, local_opt = optim.Adam(remote.parameters(), lr=0.01), torch.optim.Adam(local.parameters(), lr=0.01)
    for _ in range(30):
        functional.nll_loss(remote(xp), yp).backward()
        opt.step()
        opt.zero_grad()
        local_opt.zero_grad()
        functional.nll_loss(local(x), y).backward()
        local_opt.step()
    remote.eval()
    trained = await remote.get()
    assert list(trained.state_dict()) == list(local.state_dict())
    for mine, theirs in zip(local.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.allclose(mine, theirs, atol=5e-3)  # 30 float32 steps, threads apart
    fresh = Net()
    fresh.load_state_dict(trained.state_dict())  # what comes back loads into the user's own class
    assert _accuracy(fresh) > 0.8


@MODULE_LOOP
async def test_a_model_class_trains_with_dp_sgd_on_private_digits(fed: fedptr.Cluster) -> None:
    bob = fed.client.worker("bob")
    x, y = await digits(fed, "bob")
    torch.manual_seed(0)
    model = await bob.send(Net())
    with pytest.raises(fedptr.PermissionDenied):
        await model(x).get()  # a forward on private data is private, as for a Sequential
    spent = await dp.train(
        model, x, y, lr=4.0, sample_rate=0.2, steps=40, max_grad_norm=1.0, noise_multiplier=0.8, loss="cross_entropy"
    )
    assert spent.epsilon_spent > 0
    trained = await model.get()  # released: DP-SGD only
    assert _accuracy(trained) > 0.3  # bob holds mostly 0-4s: well above chance, not the best


@MODULE_LOOP
async def test_search_finds_private_data_that_stays_put(fed: harness.InprocCluster) -> None:
    bob = fed.client.worker("bob")
    x, y = await digits(fed, "bob")
    objects = await bob.objects()
    assert objects[x.id_at_location].shape[1] == 64 and objects[x.id_at_location].preview is None
    del x, y
    await bob.clear()
    assert len(await bob.search("digits")) == 2
    assert await bob.search("nothing") == []


@MODULE_LOOP
async def test_every_refusal_of_the_policy(fed: harness.InprocCluster) -> None:
    client = fed.client
    bob, secure, eve = (client.worker(n) for n in ("bob", "secure_worker", "eve"))
    x, y = await digits(fed, "bob")

    async def denied(aw: object, owner: str) -> fedptr.PermissionDenied:
        with pytest.raises(fedptr.PermissionDenied) as info:
            await aw  # type: ignore[misc]
        assert info.value.owner == owner, info.value
        return info.value

    await denied(x.get(), "bob")  # private data
    await denied((x * 2).sum().get(), "bob")  # a derived tensor
    model = await bob.send(nn.Linear(64, 10))
    assert isinstance(model, fedptr.ModulePointer)
    loss = functional.cross_entropy(model(x), y)
    await loss.backward()
    weight = model.parameters()[0]
    await denied(weight.grad.get(), "bob")  # a gradient
    await denied(loss.get(), "bob")  # a loss
    await optim.SGD(model.parameters(), lr=0.1).step()
    await denied(model.get(), "bob")  # a model trained on private data without DP
    await denied(x.zero_(), "bob")  # private data is read-only
    await denied(loss.move(eve), "bob")  # a move to an untrusted node
    moved = await (loss + 0).move(secure)  # trusted: allowed, and still private there
    assert moved.location == "secure_worker"
    await denied(moved.get(), "bob")
    await denied(aggregate.mean([moved, moved]), "secure_worker")  # not contributions
    await denied(x.move(secure), "bob")  # the data itself stays where it was loaded
    await denied(dp.contribute(x.mean(0), eve), "bob")  # a contribution goes to a trusted aggregator only


@MODULE_LOOP
async def test_dp_mean_of_contributions_is_released_once(fed: harness.InprocCluster) -> None:
    client = fed.client
    _bob, _alice, secure = (client.worker(n) for n in ("bob", "alice", "secure_worker"))
    (xb, _), (xa, _) = await digits(fed, "bob"), await digits(fed, "alice")
    cb, spent_b = await dp.contribute(xb.mean(0), secure)
    ca, _ = await dp.contribute(xa.mean(0), secure)
    assert spent_b.owner == "bob" and spent_b.epsilon_spent > 0 and cb.location == "secure_worker"
    with pytest.raises(fedptr.PermissionDenied, match="at least 2 owners"):
        await aggregate.mean([cb])  # fewer than k owners
    cb2, _ = await dp.contribute(xb.mean(0) * 2, secure)
    with pytest.raises(fedptr.PermissionDenied, match="one contribution per owner"):
        await aggregate.mean([cb, cb2, ca])
    with pytest.raises(fedptr.PermissionDenied, match="read-only"):
        await cb.mul_(1000)  # a contribution's clip bound cannot be undone on the aggregator
    released = await aggregate.mean([cb, ca]).get()
    assert isinstance(released, torch.Tensor) and released.shape == (64,)
    with pytest.raises((fedptr.PermissionDenied, fedptr.ObjectNotFoundError)):
        await aggregate.mean([cb, ca])  # single use: they were consumed
    with pytest.raises(fedptr.PermissionDenied, match="not an aggregator"):
        await aggregate.mean([xb.mean(0), xb.mean(0)])


@MODULE_LOOP
async def test_client_sees_only_dp_releases(fed: harness.InprocCluster) -> None:
    received: list[wire.Message] = []
    fed.client.link.on_reply = received.append
    try:
        sigma = example.noise_for(8.0, 2, 3)
        result = await example.train_federated(
            fed.client, SPLIT, 8.0, sigma, rounds=2, local_steps=3, lr=2.0, seed=0, quiet=True
        )
    finally:
        fed.client.link.on_reply = None
    data = [m for m in received if isinstance(m, (wire.TensorReply, wire.ModuleReply))]
    assert len(data) == 2 * 2  # per round: the DP-trained model of each owner
    assert all(m.release == "dp" for m in data), [m.release for m in data]  # type: ignore[union-attr]
    assert set(result.spent) == {"bob", "alice"} and all(e > 0 for e in result.spent.values())


@MODULE_LOOP
@pytest.mark.slow  # ~6 s of federated rounds: outside the fast loop (-m "not slow"), in the full suite
async def test_dp_federated_training_learns(fed: harness.InprocCluster) -> None:
    sigma = example.noise_for(8.0, 6, 10)
    result = await example.train_federated(fed.client, SPLIT, 8.0, sigma, 6, 10, lr=2.0, seed=0, quiet=True)
    assert result.federated_accuracy > 0.8, result


SECURE_TOLERANCE = 0.08
"""How far secure aggregation's accuracy may be from M1's in the small DP-FedAvg run below. The
two runs draw different noise (the nodes seed it from the OS): with 4 owners, at epsilon 50 the
noise alone moved the accuracy by 14 points between two runs, so the test runs at epsilon 1000
(noise multiplier 0.06), where it moves it by a few; a broken release (a wrong mean, a lost
survivor's update) costs tens of points. bench/secure_fedavg.py compares 8 owners at epsilon 8."""


EPSILON = 1000.0


@pytest.mark.slow  # ~12 s of secure rounds: outside the fast loop (-m "not slow"), in the full suite
async def test_secure_dp_fedavg_with_a_dropout_matches_m1() -> None:
    """The issue's "done when", CI-sized: DP-FedAvg with 4 owner processes and an aggregator,
    o4's node killed mid-release in round 3 of 4, once with M1 and once with SecAgg+. Both
    finish with the 3 survivors, each owner charged the same epsilon in both, and the secure
    run's accuracy is within SECURE_TOLERANCE of M1's."""
    runs = {
        secure: await example.run_fedavg(
            EPSILON, secure, n_owners=4, rounds=4, local_steps=5, seed=0, drop_one=True, quiet=True
        )
        for secure in (False, True)
    }
    m1, secure = runs[False], runs[True]
    for r in (m1, secure):
        assert list(r.dropped) == ["o4"], r.dropped
        assert r.federated_accuracy > 0.75, r
        assert 0 < max(r.spent.values()) <= EPSILON * 0.99 + 1e-6
    assert "round 3" in secure.dropped["o4"] or "round 4, local training" in secure.dropped["o4"]
    assert {o: round(e, 6) for o, e in secure.spent.items() if o != "o4"} == {
        o: round(e, 6) for o, e in m1.spent.items() if o != "o4"
    }
    assert abs(secure.federated_accuracy - m1.federated_accuracy) <= SECURE_TOLERANCE, (m1, secure)
