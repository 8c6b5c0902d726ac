"""The in-process harness (tests/harness.py): it starts in milliseconds, its nodes hold what the
client sends and apply the policy their config sets, a restarted node restores its store, and
a restarted broker is joined again by everyone."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from fedptr.nodes.node import NodeConfig

import fedptr
from fedptr import dp

from . import harness

SECRET = np.arange(12, dtype=np.float32).reshape(3, 4)


async def test_a_two_node_cluster_starts_in_milliseconds() -> None:
    async with harness.cluster(["bob", "alice"]):
        pass  # the first one in a process warms torch's meta kernels up
    took = []
    for _ in range(5):
        began = time.perf_counter()
        async with harness.cluster(["bob", "alice"]) as c:
            took.append(time.perf_counter() - began)
            x = await c.worker("bob").send(torch.ones(3))
            assert x.id_at_location in c.node("bob").store.entries  # the Node object answered
            assert sorted(await c.client.workers()) == ["alice", "bob"]
    print(f"2-node in-process cluster up in {1000 * min(took):.1f} ms (median {1000 * sorted(took)[2]:.1f} ms)")
    assert min(took) < 0.5


async def test_private_data_and_the_policy_come_from_the_config() -> None:
    configs = {"bob": NodeConfig(trust=["alice"]), "carol": NodeConfig(release_exact=True)}
    data = {"bob": {"d": {"x": SECRET}}, "carol": {"d": {"x": SECRET}}}
    async with harness.cluster(["bob", "alice", "carol"], configs=configs, data=data) as c:
        (x,) = await c.worker("bob").search("d")
        with pytest.raises(fedptr.PermissionDenied) as info:
            await (x * 1).get()
        assert info.value.owner == "bob"
        moved = await (x * 1).move(c.worker("alice"))  # trusted
        assert moved.location == "alice"
        with pytest.raises(fedptr.PermissionDenied):
            await (x * 1).move(c.worker("carol"))  # not trusted
        (cx,) = await c.worker("carol").search("d")
        assert torch.equal(await (cx * 1).get(), torch.from_numpy(SECRET))  # type: ignore[arg-type]


async def test_a_restarted_node_is_a_new_node_on_the_same_store() -> None:
    configs = {"bob": NodeConfig(epsilon=5.0)}
    async with harness.cluster(["bob"], configs=configs, stores=["bob"]) as c:
        bob = c.worker("bob")
        x = await bob.send(torch.arange(4.0))
        before = c.node("bob")
        spent = (await dp.budget(bob)).epsilon_spent
        after = await c.restart_node("bob")
        assert after is not before and c.node("bob") is after
        assert torch.equal(await x.get(), torch.arange(4.0))  # type: ignore[arg-type]
        assert (await dp.budget(bob)).epsilon_left == 5.0 - spent


async def test_a_restarted_broker_is_joined_again_and_pointers_survive() -> None:
    async with harness.cluster(["bob", "alice"], transport="ipc", heartbeat_s=0.1) as c:
        x = await c.worker("bob").send(torch.ones(2))
        old = c.broker
        await c.restart_broker()
        assert c.broker is not old and c.broker is not None
        assert {b"bob", b"alice"} <= c.broker.table.by_name.keys()
        assert torch.equal(await (x + 1).get(), torch.full((2,), 2.0))  # type: ignore[arg-type]


async def test_an_inproc_broker_restart_is_refused_with_a_reason() -> None:
    async with harness.cluster(["bob"]) as c:
        with pytest.raises(AssertionError, match='transport="ipc"'):
            await c.restart_broker()
