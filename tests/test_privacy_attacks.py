"""Privacy attacks of issue 9, classes A-H and beyond, as an analyst-client would run them.

Every test performs one attack through the public client API (plus, where the attack needs
one, a second `fedptr.connect` client, a raw `fedptr.link.Link` peer, or a node process the
attacker starts) and asserts the *secure outcome* it expects: the attack is refused with the
typed refusal the test names (`tests.conftest.refused`: a `PermissionDenied` names the data
owner; a crash, a timeout or any other error fails the test), or what it brings back does not
reveal the secret. Each was first run
against the label-check policy and watched to succeed (`docs/REDTEAM.md` records what it
recovered).

One cluster for the module: bob, alice and carol own private 8x4 data (``data``: x, y; alice
also ``spare``), each with a budget (epsilon 10) in a --store, and trust three aggregators
whose roster is the three of them: secure_worker (k = 2), agg3 (k = 3) and dp_agg (k = 2).
eve is a worker nobody trusts.
Tests that kill or restart processes come last, in file order.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import struct
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
import zmq
from torch.nn import functional

import fedptr
from fedptr import aggregate, dp, envelope, optim, wire
from fedptr.errors import BrokerUnreachable, RegistrationRefused
from fedptr.link import Link
from fedptr.pointer import remote_call
from fedptr.processes import start_process, stop_processes
from fedptr.security import CurveKeys
from fedptr.tensors import from_raw
from tests.conftest import refused

# Register the marker from here (the brief allows no edit to pyproject.toml or conftest.py):
# pytest's MarkGenerator reads the "markers" ini lines of the running config.
_CONFIG = getattr(pytest.mark, "_config", None)
if _CONFIG is not None:
    _CONFIG.addinivalue_line("markers", "privacy_attack: an attack of issue 9 that the product must refuse")

pytestmark = [pytest.mark.slow, pytest.mark.privacy_attack, pytest.mark.asyncio(loop_scope="module")]

RID = struct.Struct("<II")
"""A request id: a session's counter and its incarnation (fedptr.session)."""

OWNERS = ("bob", "alice", "carol")
ROSTER = [a for o in ("bob", "alice", "carol") for a in ("--owners", o)]
AGGREGATORS = ("secure_worker", "agg3", "dp_agg")
WORKERS = (*OWNERS, *AGGREGATORS, "eve")
DP_CLIP, DP_SIGMA = 4.0, 1.0
HEARTBEAT_S, LIVENESS = 0.2, 5


@dataclass
class Setup:
    cluster: fedptr.Cluster
    secrets: dict[str, dict[str, torch.Tensor]]
    """owner -> {"x", "y", "spare"}: the private arrays, as the test (not the attacker) knows them."""
    tmp: Path

    @property
    def client(self) -> fedptr.Client:
        return self.cluster.client

    def w(self, name: str) -> fedptr.Worker:
        return self.cluster.client.worker(name)

    async def data(self, owner: str) -> tuple[fedptr.Pointer, fedptr.Pointer]:
        x, y = await self.w(owner).search("data")
        return x, y


def _make_data(tmp: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Path]]]:
    g = torch.Generator().manual_seed(9)
    secrets: dict[str, dict[str, torch.Tensor]] = {}
    files: dict[str, dict[str, Path]] = {}
    for owner in OWNERS:
        x = torch.randn(8, 4, generator=g)
        y = torch.randint(0, 3, (8,), generator=g)
        y[0] = 2  # at least one label past a 1-class output, and a nonzero sum
        spare = torch.randn(8, 4, generator=g)
        secrets[owner] = {"x": x, "y": y, "spare": spare}
        data, extra = tmp / f"{owner}.npz", tmp / f"{owner}-spare.npz"
        np.savez(data, x=x.numpy(), y=y.numpy())
        np.savez(extra, spare=spare.numpy())
        files[owner] = {"data": data, "spare": extra}
    assert float((0.5 * secrets["alice"]["x"]).norm()) < DP_CLIP  # the DP attack's input is not clipped
    return secrets, files


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    with tempfile.TemporaryDirectory(prefix="redteam-") as tmp_name:
        tmp = Path(tmp_name)
        secrets, files = _make_data(tmp)
        trust = [a for agg in AGGREGATORS for a in ("--trust", agg)]
        node_args = {
            **{o: [*trust, "--epsilon", "10", "--store", str(tmp / f"{o}-store")] for o in OWNERS},
            "secure_worker": ["--aggregator", *ROSTER],
            "agg3": ["--aggregator", "--min-owners", "3", *ROSTER],
            "dp_agg": ["--aggregator", *ROSTER],
        }
        async with fedptr.local_cluster(
            list(WORKERS),
            data={o: {tag: str(p) for tag, p in files[o].items()} for o in OWNERS},
            node_args=node_args,
            call_timeout=20.0,
            heartbeat_s=HEARTBEAT_S,
            liveness=LIVENESS,
        ) as c:
            yield Setup(c, secrets, tmp)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def _clean(setup: Setup) -> AsyncIterator[None]:
    yield
    for name in WORKERS:
        with contextlib.suppress(fedptr.FedptrError):  # a restarted worker may still be coming back
            await setup.w(name).clear()


# --- helpers -------------------------------------------------------------------------------
def max_err(estimate: torch.Tensor, secret: torch.Tensor) -> float:
    return float((estimate.double() - secret.double()).abs().max())


def assert_hidden(estimate: torch.Tensor, secret: torch.Tensor, what: str, tol: float = 1e-2) -> None:
    """Secure outcome of an attack that is not refused: the estimate is not within `tol` of the secret everywhere."""
    err = max_err(estimate, secret)
    assert err > tol, f"LEAK: recovered {what}, max abs error {err:.3g}"


def client_keys(cluster: fedptr.Cluster) -> CurveKeys | None:
    """The cluster's client key pair when it runs with CURVE (the fixed product's default)."""
    if cluster.keys_dir is not None and (cluster.keys_dir / "client.key_secret").exists():
        return CurveKeys.load(cluster.keys_dir / "client.key_secret", cluster.keys_dir / "broker.key")
    return None


async def tensor(p: Any) -> torch.Tensor:
    value = await p.get()
    assert isinstance(value, torch.Tensor)
    return value


# --- A: the aggregator checks owner labels, not what is aggregated -------------------------
async def test_a_zeroed_partner_cannot_release_raw_data(setup: Setup) -> None:
    """mean([alice_x * 1, bob_x.sum() * 0 + zeros]) is alice_x / 2."""
    secure = setup.w("secure_worker")

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        bx, _ = await setup.data("bob")
        a = await (ax * 1).move(secure)
        b = await (bx.sum() * 0 + torch.zeros(8, 4)).move(secure)
        return 2 * await tensor(aggregate.mean([a, b]))

    await refused(attack(), fedptr.PermissionDenied, owner="secure_worker", match="distinct DP contributions only")


async def test_a_zero_weighted_partner_cannot_release_an_individual_gradient(setup: Setup) -> None:
    """mean([bob_grad, alice_grad * 0]) is bob's own gradient / 2."""
    secure = setup.w("secure_worker")
    w0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))

    async def grad_on(owner: str) -> fedptr.Pointer:
        x, y = await setup.data(owner)
        w = await setup.w(owner).send(w0.clone().requires_grad_(True))
        await functional.cross_entropy(x @ w, y).backward()
        return w.grad

    async def attack() -> torch.Tensor:
        gb = await (await grad_on("bob")).move(secure)
        ga = await (await grad_on("alice") * 0).move(secure)
        return 2 * await tensor(aggregate.mean([gb, ga]))

    await refused(attack(), fedptr.PermissionDenied, owner="secure_worker", match="distinct DP contributions only")


async def test_a_scaled_input_cannot_dominate_a_release(setup: Setup) -> None:
    """mean([bob_x * 2**30, alice_x]), once, with an honest partner, is bob_x * 2**29 + noise."""
    secure = setup.w("secure_worker")

    async def attack() -> torch.Tensor:
        bx, _ = await setup.data("bob")
        ax, _ = await setup.data("alice")
        b = await (bx * 2.0**30).move(secure)
        a = await (ax * 1).move(secure)
        return await tensor(aggregate.mean([b, a])) / 2.0**29

    await refused(attack(), fedptr.PermissionDenied, owner="secure_worker", match="distinct DP contributions only")


async def test_a_two_weightings_cannot_solve_for_both_inputs(setup: Setup) -> None:
    """A weighted mean with weights [1, 1] and then [1, 2] gives two equations in b and a; the
    client can no longer choose weights (the operation is gone), and plain tensors are no
    contributions."""
    secure = setup.w("secure_worker")

    async def attack() -> tuple[torch.Tensor, torch.Tensor]:
        bx, _ = await setup.data("bob")
        ax, _ = await setup.data("alice")
        b = await (bx * 1).move(secure)
        a = await (ax * 1).move(secure)
        m1 = (await tensor(remote_call("aggregate_weighted_mean", ([b, a], [1.0, 1.0])))).double()
        m2 = (await tensor(remote_call("aggregate_weighted_mean", ([b, a], [1.0, 2.0])))).double()
        alice = 3 * m2 - 2 * m1
        return 2 * m1 - alice, alice

    await refused(attack(), fedptr.OpNotAllowedError, match="'aggregate_weighted_mean' is not allowed")


async def test_a_k3_with_two_zeroed_owners_is_refused(setup: Setup) -> None:
    """With --min-owners 3: one real input and two zeroed ones."""
    agg3 = setup.w("agg3")

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        bx, _ = await setup.data("bob")
        cx, _ = await setup.data("carol")
        inputs = [await (ax * 1).move(agg3), await (bx * 0).move(agg3), await (cx * 0).move(agg3)]
        return 3 * await tensor(aggregate.mean(inputs))

    await refused(attack(), fedptr.PermissionDenied, owner="agg3", match="distinct DP contributions only")


async def test_a_many_dp_releases_stop_at_the_budget(setup: Setup) -> None:
    """Averaging many DP releases of the same data: each is charged to the owners' budgets, so
    the releases stop long before the average reveals anything."""
    dp_agg = setup.w("dp_agg")
    released: list[torch.Tensor] = []
    ax, _ = await setup.data("alice")
    bx, _ = await setup.data("bob")
    with pytest.raises(fedptr.BudgetExhaustedError) as info:
        for _ in range(2000):
            a, _ = await dp.contribute(ax * 0.5, dp_agg)
            b, _ = await dp.contribute(bx * 0, dp_agg)
            released.append(await tensor(aggregate.mean([a, b])))
    assert info.value.owner in ("alice", "bob") and "left" in str(info.value)
    if released:
        estimate = 4 * torch.stack(released).double().mean(0)
        rmse = float(((estimate - setup.secrets["alice"]["x"].double()) ** 2).mean().sqrt())
        assert rmse > 0.5, f"LEAK: alice's x from {len(released)} DP releases: rmse {rmse:.3f}"


# --- B: owners are not verified ------------------------------------------------------------
async def test_b_forged_origins_make_no_second_owner(setup: Setup) -> None:
    """A Put from the client naming a made-up owner "mallory" in its origins."""
    secure = setup.w("secure_worker")

    async def attack() -> torch.Tensor:
        fake_id = setup.client.new_id()
        zeros = wire.RawTensor("float32", (8, 4), memoryview(bytes(8 * 4 * 4)))
        forged = wire.Put(fake_id, zeros, False, {"mallory": []})
        await setup.client.call("secure_worker", forged)
        fake = fedptr.Pointer(setup.client, "secure_worker", fake_id)
        ax, _ = await setup.data("alice")
        a = await (ax * 1).move(secure)
        return 2 * await tensor(aggregate.mean([a, fake]))

    await refused(attack(), fedptr.PermissionDenied, owner="secure_worker", match="distinct DP contributions only")


async def test_b_a_new_zero_data_owner_is_not_counted(setup: Setup) -> None:
    """Any process joins as data owner "mallory" with zeros, trusting secure_worker: with CURVE
    on (the cluster's default) it holds no allowed key, the broker never answers it, and the
    node gives up registering (status 3) without ever being listed."""
    zeros = setup.tmp / "mallory.npz"
    np.savez(zeros, z=np.zeros((8, 4), dtype=np.float32))
    log = setup.tmp / "mallory.log"
    beat = ["--heartbeat-ms", str(int(HEARTBEAT_S * 1000)), "--liveness", str(LIVENESS)]
    args = ["--name", "mallory", "--broker", setup.cluster.address, "--data", f"z={zeros}", "--register-timeout", "2"]
    proc = start_process(["-m", "fedptr.nodes", *args, "--trust", "secure_worker", *beat], log)
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert "mallory" not in await setup.client.workers(), "mallory joined as a data owner"
            assert time.monotonic() < deadline, "mallory neither joined nor gave up"
            await asyncio.sleep(0.05)
        assert proc.returncode == 3, log.read_text()
        assert "no answer from the broker" in log.read_text(), log.read_text()
    finally:
        await asyncio.to_thread(stop_processes, [proc])


# --- C: taint lives on a tensor object, data in shared storage -----------------------------
async def test_c_view_alias_carries_no_private_data_into_a_public_tensor(setup: Setup) -> None:
    """base.view(...).add_(alice_x), then base.get()."""
    alice = setup.w("alice")

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        base = await alice.send(torch.zeros(8, 4))
        await base.view(8, 4).add_(ax)
        return await tensor(base)

    assert_hidden(await attack(), setup.secrets["alice"]["x"], "alice's x via a view")


async def test_c_view_alias_shows_no_private_data_in_the_listing_preview(setup: Setup) -> None:
    """Beyond the list: no get at all; objects() previews the public alias's values to anyone."""
    alice = setup.w("alice")

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        base = await alice.send(torch.zeros(4))
        await base.view(4).add_(remote_call("narrow", (ax, 0, 0, 1)).flatten())
        async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=10) as other:
            row = (await other.worker("alice").objects())[base.id_at_location]
        return torch.full((4,), float("nan")) if row.preview is None else torch.tensor(row.preview)

    assert_hidden(await attack(), setup.secrets["alice"]["x"][0], "alice's first row from a preview")


async def test_c_weight_view_taken_before_training_cannot_read_trained_weights(setup: Setup) -> None:
    """A view of a model weight, taken before training on bob's data, fetched after it."""
    bob = setup.w("bob")
    w0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))

    async def attack() -> torch.Tensor:
        x, y = await setup.data("bob")
        model = await bob.send(torch.nn.Linear(4, 3, bias=False))
        assert isinstance(model, fedptr.ModulePointer)
        (weight,) = model.parameters()
        await weight.sub_(weight).add_(w0.clone())  # the client's chosen start
        alias = await weight.view(3, 4)
        opt = optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            await functional.cross_entropy(model(x), y).backward()
            await opt.step()
            await opt.zero_grad()
        return await tensor(alias)

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


async def test_c_held_grad_does_not_fill_after_its_tensor_is_dropped(setup: Setup) -> None:
    """g = w.grad (public zeros); drop w; backward through w * bob_x accumulates bob_x into g."""
    bob = setup.w("bob")

    async def attack() -> torch.Tensor:
        x, _ = await setup.data("bob")
        w = await bob.send(torch.zeros(8, 4, requires_grad=True))
        await (w * 0).sum().backward()
        g = await w.grad
        z = await (w * 1)
        del w
        await bob.objects()  # the delete of w went out first
        await (z * x).sum().backward()
        return await tensor(g)

    assert_hidden(await attack(), setup.secrets["bob"]["x"], "bob's x via a held gradient")


# --- D: private values become sizes and messages -------------------------------------------
async def test_d_private_value_cannot_become_a_size(setup: Setup) -> None:
    """narrow(0, 0, alice_y.sum()) and repeat(alice_y[0]): the result's shape is in objects()."""
    alice = setup.w("alice")
    y = setup.secrets["alice"]["y"]

    async def attack() -> tuple[int, int]:
        _, ay = await setup.data("alice")
        public = await alice.send(torch.arange(100.0))
        cut = await remote_call("narrow", (public, 0, 0, ay.sum()))
        first = remote_call("narrow", (ay, 0, 0, 1)).squeeze()
        rep = await remote_call("repeat", (await alice.send(torch.ones(1)), first))
        rows = await alice.objects()
        return rows[cut.id_at_location].shape[0], rows[rep.id_at_location].shape[0]

    assert int(y.sum()) < 100  # the narrow would fit: only the policy stops it
    await refused(attack(), fedptr.PermissionDenied, owner="alice", match="never a size, index or count")


async def test_d_error_texts_carry_no_private_values(setup: Setup) -> None:
    """torch's messages carry the private values: "Target 2 is out of bounds", "length (13) exceeds"."""
    alice = setup.w("alice")
    y = setup.secrets["alice"]["y"]
    leaked: list[str] = []
    _, ay = await setup.data("alice")
    logits = await alice.send(torch.zeros(8, 1))
    try:
        await functional.cross_entropy(logits, ay)
    except fedptr.FedptrError as e:
        m = re.search(r"Target (\d+) is out of bounds", str(e))
        if m and int(m.group(1)) in y.tolist():
            leaked.append(f"a label of alice: {m.group(0)!r}")
    empty = await alice.send(torch.zeros(0))
    try:
        await remote_call("narrow", (empty, 0, 0, ay.sum()))
    except fedptr.FedptrError as e:
        if f"length ({int(y.sum())})" in str(e):
            leaked.append(f"sum of alice's labels: {str(e)[-60:]!r}")
    assert not leaked, "LEAK: " + "; ".join(leaked)


async def test_d_data_dependent_failure_is_no_oracle(setup: Setup) -> None:
    """Beyond the list, and not closed by generic error texts: ``1 // (alice_x[i,j] > t).long()``
    fails (integer division by zero) iff alice_x[i,j] <= t. Bisection reads alice's first row."""
    alice = setup.w("alice")
    secret = setup.secrets["alice"]["x"][0]

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        one = await alice.send(torch.ones(1, dtype=torch.int64))
        estimate = []
        for j in range(4):
            cell = await remote_call("narrow", (remote_call("narrow", (ax, 0, 0, 1)), 1, j, 1)).flatten()
            lo, hi = -8.0, 8.0
            for _ in range(16):
                mid = (lo + hi) / 2
                try:
                    await (one // (cell > mid).long())
                    lo = mid  # succeeded: cell > mid
                except fedptr.RemoteError:
                    hi = mid
            estimate.append((lo + hi) / 2)
        return torch.tensor(estimate)

    assert_hidden(await attack(), secret, "alice's first row by a failure oracle", tol=1e-2)


# --- G: a pointer chain lends authority to its middle node ---------------------------------
async def test_g_second_client_cannot_get_a_tensor_through_a_lent_pointer(setup: Setup) -> None:
    """Client 1 sends its pointer to alice; client 2 places its own PutPointer to the same object on
    alice (Worker.send of a Pointer it built from alice's listing) and gets through it."""
    secret = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    mine = await setup.w("bob").send(secret)
    held = await mine.send(setup.w("alice"))

    async def attack() -> torch.Tensor:
        async with fedptr.connect(setup.cluster.address, curve=client_keys(setup.cluster), timeout=10) as c2:
            alice2 = c2.worker("alice")
            before = await alice2.objects()
            target = next(o for o in before.values() if o.kind == "pointer" and o.location == "bob")
            # the PutPointer alone, as a raw request (Worker.send deletes it when the Grant is refused)
            put = wire.PutPointer(c2.new_id(), "bob", target.id_at_location)
            with contextlib.suppress(fedptr.PermissionDenied):
                await c2.call("alice", put)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                for obj_id, o in (await alice2.objects()).items():
                    if obj_id not in before and o.kind == "pointer" and o.id_at_location == target.id_at_location:
                        inner = await fedptr.Pointer(c2, "alice", obj_id, deletes=False).get()
                        assert isinstance(inner, fedptr.Pointer)
                        return await tensor(inner)
                await asyncio.sleep(0.05)
        pytest.fail("client 2's pointer never appeared on alice: the attack did not run")

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="held for another client")
    del held


# --- F: names are not identities -----------------------------------------------------------
def raw_replay(
    address: str, name: str, keys: CurveKeys | None, requests: list[tuple[bytes, wire.Message]]
) -> list[Any]:
    """Register as `name` on a bare DEALER socket and send each (request id, message) to bob
    exactly as the victim did; returns every reply body that came back within a second each."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1000)
    if keys is not None:
        keys.apply(sock)
    sock.connect(address)
    replies: list[Any] = []
    try:
        sock.send_multipart(envelope.build(envelope.REGISTER, name.encode(), b"\1" * 8, envelope.ROLE_CLIENT))
        answer = sock.recv_multipart()
        if envelope.command_of(answer) != envelope.ACCEPTED:
            return replies  # the name could not be taken
        for rid, msg in requests:
            sock.send_multipart(envelope.build(envelope.REQUEST, b"bob", rid, *wire.encode(msg, budget_ms=1000)))
        with contextlib.suppress(zmq.Again):
            while True:
                for m in envelope.parse(sock.recv_multipart()):
                    if m.command == envelope.REPLY:
                        replies.append(wire.decode(m.body).message)
    finally:
        sock.close(linger=0)
    return replies


async def replay_departed_client(cluster: fedptr.Cluster, watcher: fedptr.Client) -> str | None:
    """The attack of the two replay tests; returns what leaked, or None.

    The strongest attacker: it knows the victim's name and the exact request ids the victim
    sent (as if it had watched the wire), takes the name once the victim has left, and replays
    them at bob, hoping for replies bob kept for the victim. It also listens for the broker
    announcing the departure to a peer that never dealt with the victim."""
    secret = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    seen: list[str] = []
    keys = client_keys(cluster)
    watcher.link.on_session_ended = seen.append
    try:
        async with fedptr.connect(cluster.address, curve=keys, timeout=10) as victim:
            mine = await victim.worker("bob").send(secret)
            session = victim.link.session
            first = session.next_request_id()  # the victim's ids: its counter and incarnation
            assert torch.equal(await tensor(mine * 1), secret)
            last = session.next_request_id()
            name = victim.name
        # no peer of the victim's is told; the analyst's link must not be either
        await asyncio.sleep(LIVENESS * HEARTBEAT_S)
    finally:
        watcher.link.on_session_ended = None
    leaks = [f"the broker announced {name!r}'s departure to an unrelated peer"] if name in seen else []
    ids = [wire_id for wire_id in request_ids_between(first, last)]
    replies = await asyncio.to_thread(raw_replay, cluster.address, name, keys, [(i, wire.Get(0)) for i in ids])
    stolen = [from_raw(r.tensor) for r in replies if isinstance(r, wire.TensorReply)]
    if any(t.shape == secret.shape and torch.equal(t, secret) for t in stolen):
        leaks.append(f"{name!r} taken and its request ids replayed: got the victim's tensor exactly")
    return "; ".join(leaks) or None


def request_ids_between(first: bytes, last: bytes) -> list[bytes]:
    """Every request id a session issued from `first` to `last` (same incarnation)."""
    lo, incarnation = RID.unpack(first)
    hi, _ = RID.unpack(last)
    return [RID.pack(n, incarnation) for n in range(lo, hi + 1)]


async def test_f_departed_clients_name_is_not_announced_and_its_replies_not_replayed(setup: Setup) -> None:
    """The broker tells a client's departure only to the peers it dealt with; a peer that takes
    the name afterwards and replays the victim's exact request ids at bob gets nothing back."""
    leak = await replay_departed_client(setup.cluster, setup.client)
    assert leak is None, f"LEAK: {leak}"


async def test_f_name_takeover_and_replay_with_curve_on(setup: Setup) -> None:
    """The same on a cluster with CURVE on (victim and attacker hold an allowed client key;
    local_cluster makes one)."""
    async with fedptr.local_cluster(["bob"], curve=True, heartbeat_s=HEARTBEAT_S, liveness=LIVENESS) as c:
        leak = await replay_departed_client(c, c.client)
    assert leak is None, f"LEAK with CURVE on: {leak}"


async def test_f_impostor_cannot_take_a_crashed_aggregators_name(setup: Setup) -> None:
    """agg3 crashes; a peer registers as "agg3" to receive what bob sends it. With CURVE on (the
    cluster's default) worker names are bound to keys: without a key the broker never answers
    the impostor, and with another allowed key (a client's) it refuses the name."""
    setup.cluster.signal("agg3", signal.SIGKILL)
    try:
        await refused(
            Link(setup.cluster.address, "agg3", envelope.ROLE_WORKER, connect_timeout=2).__aenter__(),
            BrokerUnreachable,
        )
        keyed = Link(
            setup.cluster.address, "agg3", envelope.ROLE_WORKER, connect_timeout=2, curve=setup.cluster.client_keys(1)
        )
        await refused(keyed.__aenter__(), RegistrationRefused, match="may not use that name")
    finally:
        await asyncio.sleep(LIVENESS * HEARTBEAT_S)
        await setup.cluster.start_node("agg3")


# --- E: --store drops origins --------------------------------------------------------------
async def test_e_restart_from_store_keeps_private_derived_data_private(setup: Setup) -> None:
    """bob_x * 1 is stored by bob's --store without its origins; after a restart, get it."""
    bx, _ = await setup.data("bob")
    derived = await (bx * 1)
    with pytest.raises(fedptr.PermissionDenied):
        await derived.get()  # refused before the restart
    setup.cluster.signal("bob", signal.SIGKILL)
    await setup.cluster.start_node("bob")
    await refused(tensor(derived), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


# --- H: private data is writable -----------------------------------------------------------
async def test_h_owner_data_is_read_only(setup: Setup) -> None:
    """zero_() on alice's private data destroys it for everyone (add_ would poison it)."""
    (spare,) = await setup.w("alice").search("spare")
    await refused(spare.zero_(), fedptr.PermissionDenied, owner="alice", match="private data is read-only")


# --- I: plans run many operations in one message -------------------------------------------
async def test_i_a_plans_output_derived_from_private_data_stays_private(setup: Setup) -> None:
    """A plan computes x * 1 + 0 on alice's data and returns it: fetched in one run."""

    @fedptr.plan
    def copy(x: fedptr.Pointer) -> fedptr.Pointer:
        return x * 1 + 0

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        return await tensor(copy(ax))

    await refused(attack(), fedptr.PermissionDenied, owner="alice", match="only DP releases leave")


async def test_i_a_gradient_of_a_leaf_made_inside_a_plan_stays_private(setup: Setup) -> None:
    """Inside one plan: a fresh public leaf w, loss = (w * bob_x).sum(), backward, return
    w.grad (= bob_x). The leaf is an intermediate result the store never sees."""

    @fedptr.plan
    def gradient(w: fedptr.Pointer, x: fedptr.Pointer) -> fedptr.Pointer:
        leaf = w.detach().clone().requires_grad_()
        (leaf * x).sum().backward()
        return leaf.grad * 1

    async def attack() -> torch.Tensor:
        x, _ = await setup.data("bob")
        w = await setup.w("bob").send(torch.zeros(8, 4))
        return await tensor(gradient(w, x))

    await refused(attack(), fedptr.PermissionDenied, owner="bob", match="only DP releases leave")


async def test_i_a_plan_cannot_write_into_a_public_tensor_through_a_view(setup: Setup) -> None:
    """base.view(8, 4).add_(alice_x) inside a plan, then base.get()."""

    @fedptr.plan
    def smuggle(base: fedptr.Pointer, x: fedptr.Pointer) -> None:
        base.view(8, 4).add_(x)

    async def attack() -> torch.Tensor:
        ax, _ = await setup.data("alice")
        base = await setup.w("alice").send(torch.zeros(8, 4))
        await smuggle(base, ax)
        return await tensor(base)

    assert_hidden(await attack(), setup.secrets["alice"]["x"], "alice's x via a view in a plan")


async def test_i_a_plan_cannot_write_private_data(setup: Setup) -> None:
    """zero_() of alice's spare data inside a plan."""

    @fedptr.plan
    def wipe(x: fedptr.Pointer) -> None:
        x.zero_()

    (spare,) = await setup.w("alice").search("spare")
    with pytest.raises(fedptr.PermissionDenied):
        await wipe(spare)
    assert (await (spare.abs().sum() * 0).move(setup.w("secure_worker"))) is not None  # still usable


async def test_i_a_plans_failure_is_no_oracle_on_private_values(setup: Setup) -> None:
    """narrow by a private value inside a plan: refused or zeros, whatever the value."""

    @fedptr.plan
    def probe(y: fedptr.Pointer, public: fedptr.Pointer) -> fedptr.Pointer:
        return public.narrow(0, 0, y[0]).sum() * 1

    for owner in ("alice", "carol"):
        _, y = await setup.data(owner)
        public = await setup.w(owner).send(torch.ones(8))
        await refused(
            tensor(probe(y, public)), fedptr.PermissionDenied, owner=owner, match="never a size, index or count"
        )
