"""The fault suite: SIGKILL and SIGSTOP on nodes and the broker, with 100 ms x 3 heartbeats.

Each test runs its own cluster (marked destructive). A Checker records every call and asserts
it settled before its deadline with a correct result or a typed fedptr error.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch

import fedptr
from tests.conftest import eventually

pytestmark = [pytest.mark.slow, pytest.mark.destructive]

BEAT_S = 0.1
LIVENESS = 3
DETECT_S = BEAT_S * LIVENESS
CALL_TIMEOUT_S = 5.0


@dataclass
class Checker:
    """Every call: how long it took and how it ended."""

    calls: list[tuple[str, float, object]] = field(default_factory=list)

    async def call(self, what: str, aw: Awaitable[Any]) -> object:
        t0 = time.monotonic()
        try:
            result: object = await aw
        except fedptr.FedptrError as e:
            result = e
        except Exception as e:  # anything else is a bug: recorded so the check fails
            result = ("untyped", e)
        self.calls.append((what, time.monotonic() - t0, result))
        return result

    def check(self) -> None:
        assert self.calls
        for what, took, result in self.calls:
            assert took < CALL_TIMEOUT_S + 0.5, f"{what} took {took:.2f} s"
            assert not (isinstance(result, tuple) and result[0] == "untyped"), f"{what}: {result}"


@pytest_asyncio.fixture(loop_scope="function")
async def cluster() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(
        ["bob", "alice"], call_timeout=CALL_TIMEOUT_S, heartbeat_s=BEAT_S, liveness=LIVENESS
    ) as c:
        yield c


@pytest.mark.asyncio(loop_scope="function")
async def test_killed_node_fails_pending_calls_fast_and_comes_back(cluster: fedptr.Cluster) -> None:
    client = cluster.client
    bob, alice = client.worker("bob"), client.worker("alice")
    keep = await alice.send(torch.ones(2))
    x = await bob.send(torch.arange(4.0))
    via_alice = await (await bob.send(torch.ones(3))).send(alice)
    checker = Checker()
    cluster.signal("bob", signal.SIGSTOP)  # so the calls below are surely pending when it dies
    direct = [asyncio.ensure_future(checker.call(f"op {i}", x + i)) for i in range(20)]
    chained = asyncio.ensure_future(checker.call("chained op", via_alice * 2))
    await asyncio.sleep(0.05)
    killed_at = time.monotonic()
    cluster.signal("bob", signal.SIGKILL)
    await asyncio.gather(*direct, chained)
    detected = time.monotonic() - killed_at
    checker.check()
    assert detected < DETECT_S + 0.5, f"lost worker noticed after {detected:.2f} s"
    for _, _, result in checker.calls[:-1]:
        assert isinstance(result, fedptr.LostWorkerError) and result.worker == "bob"
    chain_error = next(r for w, _, r in checker.calls if w == "chained op")
    assert isinstance(chain_error, fedptr.LostWorkerError)
    assert chain_error.path == ["alice", "bob"]
    # the other worker and the client carry on
    assert torch.equal(await (keep + 1).get(), torch.full((2,), 2.0))  # type: ignore[arg-type]
    # a node that comes back under the same name is accepted again
    await cluster.start_node("bob")
    assert torch.equal(await (await bob.send(torch.ones(1))).get(), torch.ones(1))


async def _registered(client: fedptr.Client, name: str) -> bool:
    return name in await client.workers()


@pytest.mark.asyncio(loop_scope="function")
async def test_stopped_node_gives_typed_errors_then_recovers(cluster: fedptr.Cluster) -> None:
    client = cluster.client
    bob = client.worker("bob")
    x = await bob.send(torch.arange(3.0))
    cluster.signal("bob", signal.SIGSTOP)
    checker = Checker()
    result = await checker.call("op on a stopped node", x + 1)
    checker.check()
    assert isinstance(result, (fedptr.LostWorkerError, fedptr.DeadlineExceeded))
    cluster.signal("bob", signal.SIGCONT)
    assert await eventually(lambda: _registered(client, "bob"), timeout=10)
    # the data lived on at the node: the old pointer works again
    assert torch.equal(await (x * 2).get(), torch.arange(3.0) * 2)  # type: ignore[arg-type]


@pytest.mark.asyncio(loop_scope="function")
async def test_broker_restart_everyone_reregisters_and_pointers_survive(cluster: fedptr.Cluster) -> None:
    client = cluster.client
    bob, alice = client.worker("bob"), client.worker("alice")
    x = await bob.send(torch.arange(5.0))
    p = await (await alice.send(torch.ones(2))).send(bob)
    checker = Checker()
    cluster.signal("broker", signal.SIGKILL)
    in_flight = asyncio.ensure_future(checker.call("op while the broker is down", x + 1))
    await asyncio.sleep(DETECT_S * 2)
    await cluster.restart_broker()
    await in_flight
    assert await eventually(lambda: _all_registered(client), timeout=10)
    checker.check()
    assert all(isinstance(r, (fedptr.Pointer, fedptr.FedptrError)) for _, _, r in checker.calls)
    assert torch.equal(await (x + 1).get(), torch.arange(5.0) + 1)  # type: ignore[arg-type]
    assert torch.equal(await _get2(p + 1), torch.full((2,), 2.0))  # type: ignore[arg-type]
    assert client.link.reregistrations >= 1


async def _get2(p: fedptr.Pointer) -> object:
    inner = await p.get()
    assert isinstance(inner, fedptr.Pointer)
    return await inner.get()


async def _all_registered(client: fedptr.Client) -> bool:
    try:
        return await client.workers() == ["alice", "bob"]
    except fedptr.FedptrError:
        return False


@pytest.mark.asyncio(loop_scope="function")
async def test_durable_store_survives_kill_9(tmp_path: object) -> None:
    store = str(tmp_path)
    async with fedptr.local_cluster(
        ["bob", "alice"],
        call_timeout=CALL_TIMEOUT_S,
        heartbeat_s=BEAT_S,
        liveness=LIVENESS,
        node_args={"bob": ["--store", store]},
    ) as c:
        bob, alice = c.client.worker("bob"), c.client.worker("alice")
        acked = {}
        for i in range(20):
            p = await bob.send(torch.full((3,), float(i)))
            acked[i] = p
        y = acked[3] * 10
        await y
        chain = await (await alice.send(torch.ones(2))).send(bob)  # a pointer entry on bob
        c.signal("bob", signal.SIGKILL)
        await c.start_node("bob")
        for i, p in acked.items():
            assert torch.equal(await (p + 0).get(), torch.full((3,), float(i)))  # type: ignore[arg-type]
        assert torch.equal(await y.get(), torch.full((3,), 30.0))  # type: ignore[arg-type]
        assert torch.equal(await _get2(chain + 1), torch.full((2,), 2.0))  # type: ignore[arg-type]


CHAIN = ["bob", "alice", "carol", "dave", "erin"]


@pytest.mark.asyncio(loop_scope="function")
async def test_kills_mid_chain_transfer_and_move_settle_and_lose_nothing() -> None:
    async with fedptr.local_cluster(CHAIN, call_timeout=CALL_TIMEOUT_S, heartbeat_s=BEAT_S, liveness=LIVENESS) as c:
        client = c.client
        w = {n: client.worker(n) for n in CHAIN}
        baseline = await client.link.broker_stats(5)
        checker = Checker()

        # a 5-hop chain loses its middle hop while an op is on the way
        p = await w["bob"].send(torch.ones(3))
        for name in CHAIN[1:]:
            p = await p.send(w[name])
        c.signal("carol", signal.SIGSTOP)
        op = asyncio.ensure_future(checker.call("op down a 5-hop chain", p + 1))
        await asyncio.sleep(0.05)
        c.signal("carol", signal.SIGKILL)
        err = await op
        assert isinstance(err, fedptr.LostWorkerError) and err.worker == "carol"
        assert err.path == ["erin", "dave", "carol"]

        # a large transfer to a node that dies mid-way
        big = torch.randn(8 << 20)  # 32 MiB, streamed in chunks
        c.signal("dave", signal.SIGSTOP)
        send = asyncio.ensure_future(checker.call("32 MiB send", w["dave"].send(big)))
        await asyncio.sleep(0.05)
        c.signal("dave", signal.SIGKILL)
        assert isinstance(await send, (fedptr.LostWorkerError, fedptr.UnknownWorkerError))  # gone, or already forgotten

        # a move whose destination dies after the data left: in doubt until the destination
        # answers again; it came back empty, so the object is back where it was, under its id
        x = await w["bob"].send(torch.arange(6.0))
        c.signal("alice", signal.SIGSTOP)
        move = asyncio.ensure_future(checker.call("move to a dying node", x.move(w["alice"])))
        await asyncio.sleep(0.05)
        c.signal("alice", signal.SIGKILL)
        moved = await move
        assert isinstance(moved, fedptr.InDoubtError) and moved.path == ["bob", "alice"]
        assert moved.candidates[0] is x

        checker.check()
        # the survivors serve; the dead are out of the broker's tables
        assert torch.equal(await (await w["erin"].send(torch.ones(1))).get(), torch.ones(1))
        stats = await client.link.broker_stats(5)
        assert stats["workers"] == baseline["workers"] - 3
        assert stats["peers"] == baseline["peers"] - 3 and stats["heard"] == stats["peers"]
        for name in ("carol", "dave", "alice"):
            await c.start_node(name)
        assert await client.resolve(moved) is x
        assert torch.equal(await (x + 0).get(), torch.arange(6.0))  # type: ignore[arg-type]
        assert (await client.link.broker_stats(5))["peers"] == baseline["peers"]


@pytest.mark.asyncio(loop_scope="function")
async def test_stopped_broker_gives_typed_errors_then_everyone_recovers(cluster: fedptr.Cluster) -> None:
    client = cluster.client
    bob = client.worker("bob")
    x = await bob.send(torch.arange(4.0))
    checker = Checker()
    cluster.signal("broker", signal.SIGSTOP)
    result = await checker.call("op while the broker is stopped", x + 1)
    checker.check()
    assert isinstance(result, (fedptr.LostWorkerError, fedptr.DeadlineExceeded))
    cluster.signal("broker", signal.SIGCONT)
    assert await eventually(lambda: _all_registered(client), timeout=10)
    assert torch.equal(await (x + 1).get(), torch.arange(4.0) + 1)  # type: ignore[arg-type]


@pytest.mark.asyncio(loop_scope="function")
async def test_a_cold_nodes_first_private_op_keeps_its_heartbeats(tmp_path: Path) -> None:
    """A node started as its own process (not forked from the warm launcher) loads torch's meta
    kernels only for its first op on private data (~0.3-0.6 s of imports): on its offload
    thread, so its 100 ms heartbeats go on, the broker never declares it lost, and the op
    succeeds. Loaded on the event loop, they stall the beats past the 300 ms liveness."""
    np.savez(tmp_path / "d.npz", x=np.arange(4.0))
    async with fedptr.local_cluster(
        ["bob"],
        fork=False,
        call_timeout=CALL_TIMEOUT_S,
        heartbeat_s=BEAT_S,
        liveness=LIVENESS,
        data={"bob": {"d": tmp_path / "d.npz"}},
        node_args={"bob": ["--release", "exact"]},
    ) as c:
        (x,) = await c.client.worker("bob").search("d")
        checker = Checker()
        result = await checker.call("the first private op", (x + 1).get())
        checker.check()
        assert isinstance(result, torch.Tensor), result
        assert torch.equal(result, torch.arange(4.0, dtype=torch.float64) + 1)
