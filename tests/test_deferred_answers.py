"""Every request that waits on a pending value answers its own later failure, promptly.

A request whose value is still being computed when it arrives is answered later, from a step
that runs outside its handler (an entry's settle callback, a task): the handler's own
`except`, which turns what it raises into a typed Failure, no longer surrounds it. Drawn here:
each request kind that reads a value and can then fail at the disk (a get, whose audit record
is written before the value leaves; a move, whose audit record is written before it is sent;
a DP contribution, whose charge and record are written before it leaves) x a pending operand
x the disk refusing (full, an I/O error) each storage call the request makes after it arrived.
Each request must be answered well before its deadline (ok, or a typed FedptrError naming the
refused call's OSError) and release nothing when its record was refused.

The pending operand is held open by the test (the entry made pending again, its value given
back once the request waits on it): a client's own requests queue behind its deferred
computation on a node (`Node.compute_later`), so today its get of a result sees it settled;
what is drawn is the deferred path of each handler itself, which any request not so queued
(or a future path) takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fedptr.nodes import audit as audit_module
from fedptr.nodes import node as node_module
from fedptr.nodes.node import NodeConfig
from fedptr.nodes.store import Entry

import fedptr
from fedptr import dp, limits

from . import harness
from .nemesis import EIO, FULL, CrashingDisk, Disks, install

CALL_TIMEOUT_S = 10.0
"""The client's deadline: a request left unanswered fails only after this."""
ANSWER_S = 3.0
"""How soon a request must be answered once its value settled: well before its deadline."""
OWNER = NodeConfig(trust=["*", "agg"], epsilon=1e6, dp_noise_multiplier=5.0)
"""bob: his data may leave exactly (so a get of it is audited) and be contributed to agg."""

Request = Callable[[fedptr.Pointer], Awaitable[Any]]


async def _get(y: fedptr.Pointer) -> Any:
    return await y.get()


async def _move(y: fedptr.Pointer) -> Any:
    return await y.move("alice")


async def _contribute(y: fedptr.Pointer) -> Any:
    return await dp.contribute(y, "agg")


async def _pending(c: harness.InprocCluster, request: Request) -> tuple[asyncio.Future[Any], Callable[[], None]]:
    """A fresh value of bob's data made pending on bob, and `request` of it sent and waiting
    on it there; returns the request's future and what settles the value."""
    (x,) = await c.client.worker("bob").search("d")
    y = x.mean(0)
    await y
    bob = c.node("bob")
    entry: Entry = bob.store.entries[y.id_at_location]
    value, entry.settled, entry.value = entry.value, False, None  # still being computed
    running = asyncio.ensure_future(asyncio.wait_for(request(y), CALL_TIMEOUT_S))
    async with asyncio.timeout(ANSWER_S):  # until the request waits on it (a move takes it out first)
        while not entry._waiters and not running.done():
            await asyncio.sleep(limits.POLL_INTERVAL_S)
    assert not running.done(), f"{request.__name__} answered before its value settled: {running}"
    return running, lambda: entry.settle(value)


async def _case(c: harness.InprocCluster, disks: Disks, request: Request, disk: CrashingDisk) -> str:
    """`request` of a pending value, bob's disk `disk`; the value settles; the request must be
    answered within ANSWER_S, with a typed error when a call was refused."""
    disks.give(c.node("bob"), disk)
    where = f"{request.__name__}, {disk.only or 'any'} call {disk.at} refused ({disk.refuse})"
    running, settle = await _pending(c, request)
    records = len(audit_module.read(Path(c.node("bob").config.store_dir or "")))
    settle()
    try:
        async with asyncio.timeout(ANSWER_S):
            await asyncio.wait([running])
    except TimeoutError:
        raise AssertionError(f"{where}: not answered {ANSWER_S} s after its value settled") from None
    refused = disk.disarm()
    error = running.exception()
    if refused:
        assert isinstance(error, fedptr.RemoteError) and "OSError" in str(error), f"{where}: {error!r}"
        if disk.only == "audit" and disk.at == 1:  # the record's write refused: nothing recorded
            # (a whole record whose fsync was refused stays: audited, not released, the safe way)
            assert len(audit_module.read(Path(c.node("bob").config.store_dir or ""))) == records, where
        return "refused"
    assert error is None, f"{where}: {error!r}"
    return "answered"


@pytest.mark.asyncio
@pytest.mark.parametrize("request_", [_get, _move, _contribute], ids=["get", "move", "contribute"])
async def test_a_request_waiting_on_a_pending_value_answers_a_refused_write_at_once(
    request_: Request, monkeypatch: pytest.MonkeyPatch
) -> None:
    stopped: list[str] = []
    monkeypatch.setattr(node_module, "fail_stop", lambda node, why: stopped.append(why))
    disks = Disks()
    install(monkeypatch, disks)
    configs = {"bob": OWNER, "alice": NodeConfig(), "agg": NodeConfig(aggregator=True, owners=["bob"], min_owners=1)}
    async with harness.cluster(
        ["bob", "alice", "agg"],
        configs=configs,
        data={"bob": {"d": {"x": torch.ones(8, 4)}}},
        stores=["bob"],
        call_timeout=CALL_TIMEOUT_S,
    ) as c:
        counting = CrashingDisk()
        assert await _case(c, disks, request_, counting) == "answered"
        # the calls after arrival: the audit record's (write, fsync), and a contribution's charge
        kinds = {"audit": len(counting.in_audit), "charge": len(counting.in_charges)}
        assert kinds["audit"] >= 2, counting.in_audit
        outcomes = [
            await _case(c, disks, request_, CrashingDisk(at, refuse, only=kind))
            for kind, calls in kinds.items()
            for at in range(1, calls + 1)
            for refuse in (FULL, EIO)
        ]
        assert outcomes.count("refused") == 2 * sum(kinds.values()), outcomes
    print(f"{request_.__name__}: calls after arrival {kinds}; {len(outcomes)} refusals, each answered at once")
    assert not stopped, stopped  # only the audit's and the budget's calls were refused: no fail-stop
