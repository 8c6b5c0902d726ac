"""Secure aggregation's inputs, attacked by the client (red-team round 16, branch red15).

An owner checks a secure input when it joins a round (`SecAggJoin`: derived from its own data
alone) and reads it when the aggregator asks for the masked input (`SecAggMask`), a whole round
phase later. Between the two the client could write into the joined object: an in-place
``add_`` of a value moved to bob from alice (who trusts bob with it) made bob's secure input
carry alice's data, released under bob's charge alone, with alice's budget untouched. The
guarantee says a derived value leaves only charged first to *its owner's* budget.

On the in-process harness (the real broker, nodes and client); the rounds are driven through
the wire, as a client running its own code drives them.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import tempfile
import threading
from typing import Any

import numpy as np
import pytest
import torch
from fedptr.nodes.node import Node, NodeConfig

from fedptr import dp, wire
from fedptr.errors import DropoutError, PermissionDenied

from . import harness
from .conftest import eventually

OWNERS = ["bob", "alice", "carol"]


def _configs(tmp: str) -> dict[str, NodeConfig]:
    owner = {"epsilon": 1e4, "dp_clip": 1.0, "dp_noise_multiplier": 1.0}
    configs = {name: NodeConfig(trust=["agg"], store_dir=f"{tmp}/{name}", **owner) for name in OWNERS}  # type: ignore[arg-type]
    configs["alice"] = NodeConfig(trust=["agg", "bob"], store_dir=f"{tmp}/alice", **owner)  # type: ignore[arg-type]
    configs["agg"] = NodeConfig(aggregator=True, owners=OWNERS, min_owners=2)
    return configs


def _data() -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Within the clip bound (1), so that a contribution is its value: bob's 0.01, alice's 0.1."""
    return {name: {"data": {"x": np.full((2, 3), 0.01 * 10**i, dtype=np.float32)}} for i, name in enumerate(OWNERS)}


async def _written_after_join() -> None:
    with tempfile.TemporaryDirectory(prefix="fedptr-red15-") as tmp:
        async with harness.cluster([*OWNERS, "agg"], configs=_configs(tmp), data=_data(), call_timeout=30.0) as c:
            client = c.client
            bob, alice, carol = (c.worker(n) for n in OWNERS)
            (bx,), (ax,), (cx,) = [await w.search("data") for w in (bob, alice, carol)]
            stolen = await (ax * 1).move("bob")  # alice trusts bob with what derives from her data
            inputs = {"bob": bx * 1, "carol": cx * 1}
            round_id = secrets.token_bytes(16)
            for name, value in inputs.items():
                join = wire.SecAggJoin(round_id, value.id_at_location, "agg", list(inputs), 0)
                await client.call(name, join)
            inputs["bob"].add_(stolen)  # after bob checked its input: now it derives from alice's data too
            ask = wire.SecureMean(client.new_id(), round_id, list(inputs), [2, 3], 0)
            # bob refuses its masked input, and the round has too few owners left without it
            with pytest.raises(DropoutError, match="may derive from its own data only"):
                await client.call("agg", ask)
            assert (await dp.budget(alice)).epsilon_spent == 0.0


async def _contributed_then_written() -> None:
    with tempfile.TemporaryDirectory(prefix="fedptr-red15-") as tmp:
        async with harness.cluster([*OWNERS, "agg"], configs=_configs(tmp), data=_data(), call_timeout=30.0) as c:
            client = c.client
            bob, alice = c.worker("bob"), c.worker("alice")
            (bx,), (ax,) = await bob.search("data"), await alice.search("data")
            stolen = await (ax * 1).move("bob")
            value = bx * 1
            new_id = client.new_id()
            asked = client.request_nowait("bob", wire.Contribute(value.id_at_location, "agg", new_id))
            value.add_(stolen)  # pipelined behind the contribution, checked as it arrived
            outcome = (await asyncio.gather(asked, return_exceptions=True))[0]
            if not isinstance(outcome, PermissionDenied):  # it left: then as bob's value alone
                sent = c.node("agg").store.get(new_id).result()
                assert torch.equal(sent, torch.full((2, 3), 0.01)), f"alice's data left, uncharged: {sent}"
            assert (await dp.budget(alice)).epsilon_spent == 0.0


def test_a_contribution_written_after_its_request_carries_no_other_owners_data() -> None:
    """A contribution's value, written with alice's data by a write pipelined behind the
    request, must not leave (alice was never charged)."""
    asyncio.run(_contributed_then_written())


def test_a_secure_input_written_after_its_join_carries_no_other_owners_data() -> None:
    """Bob's secure input, written with alice's data after bob joined the round, must not be
    released (alice was never charged)."""
    asyncio.run(_written_after_join())


async def _written_while_charged() -> None:
    """Bob's float64 value within the clip bound: the contribution's "copy" was the value itself
    (`mechanisms.clip` converted to float64, a no-op, and scaled nothing), read again after the
    charge awaited its thread, by which time a write pipelined behind the check had run."""
    data = {name: {"data": {"x": np.full((2, 3), 0.01 * 10**i)}} for i, name in enumerate(OWNERS)}  # float64
    with tempfile.TemporaryDirectory(prefix="fedptr-review9-") as tmp:
        async with harness.cluster([*OWNERS, "agg"], configs=_configs(tmp), data=data, call_timeout=30.0) as c:
            client = c.client
            bob, alice = c.worker("bob"), c.worker("alice")
            (bx,), (ax,) = await bob.search("data"), await alice.search("data")
            stolen = await (ax * 1).move("bob")
            value = bx * 1
            node = c.node("bob")
            charging, written = threading.Event(), threading.Event()
            charge = node.budget.charge

            def held(*args: Any) -> float:  # on the worker thread: past the checks, the value read
                charging.set()
                written.wait(DEADLINE_S)
                return charge(*args)

            node.budget.charge = held  # type: ignore[method-assign]
            new_id = client.new_id()
            asked = client.request_nowait("bob", wire.Contribute(value.id_at_location, "agg", new_id))
            assert await eventually(lambda: _now(charging.is_set()), DEADLINE_S)
            value.add_(stolen)
            assert await eventually(lambda: _now(_read(node, value.id_at_location) > 0.05), DEADLINE_S)
            written.set()
            outcome = (await asyncio.gather(asked, return_exceptions=True))[0]
            if not isinstance(outcome, PermissionDenied):
                sent = c.node("agg").store.get(new_id).result()
                assert torch.equal(sent, torch.full((2, 3), 0.01, dtype=torch.float64)), f"alice's data left: {sent}"
            assert (await dp.budget(alice)).epsilon_spent == 0.0


async def _now(value: bool) -> bool:
    return value


def _read(node: Node, obj_id: int) -> float:
    """The first number of a stored tensor, or NaN while it is pending."""
    entry = node.store.get(obj_id)
    return float(entry.result()[0, 0]) if entry.ok else math.nan


DEADLINE_S = 10.0
"""How long the test waits for each step it orders (the node's thread, the write)."""


def test_a_contribution_is_the_value_as_checked_not_as_written_while_it_was_charged() -> None:
    """A write run while the contribution's charge was on its thread (after every check) must
    not change what leaves."""
    asyncio.run(_written_while_charged())
