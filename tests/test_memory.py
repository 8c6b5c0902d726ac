"""Memory comes back when clients leave (issue 19, cause 6), at CI size: the workloads of
`bench/memory.py` (the issue's full 12 clients x 300 ops and 5,000 departures) on a real
broker and node process of its own, RSS read from /proc."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import fedptr
from bench import memory

pytestmark = [pytest.mark.destructive, pytest.mark.timeout(300)]

MARGIN = 48 << 20
"""How far above its start a process may stay once its clients left (bytes): the CI workloads
reach 120-240 MiB above it on the node (their results held at once, sampled as each client ends)."""

SETTLE_S = 15.0
"""Longest wait (s) for RSS to come back after the last client left (a loaded machine is slow)."""


@pytest_asyncio.fixture
async def one_node() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster([memory.WORKER], call_timeout=60.0, heartbeat_s=1.0, liveness=10) as c:
        yield c


async def test_node_memory_comes_back_after_pipelined_clients_leave(one_node: fedptr.Cluster) -> None:
    f = await memory.pipelined(one_node, clients=8, ops=60, numel=1 << 17, margin=MARGIN, settle_s=SETTLE_S)
    print(f.line("8 clients x 60 pipelined ops of 512 KiB"))
    assert f.node_peak - f.node_start > 2 * MARGIN  # the workload did hold many results at once
    assert f.node_end - f.node_start <= MARGIN, f.line("node memory stayed")
    assert f.broker_end - f.broker_start <= MARGIN, f.line("broker memory stayed")


async def test_memory_comes_back_after_departures(one_node: fedptr.Cluster) -> None:
    f = await memory.departures(one_node, count=300, parallel=10, numel=300_000, margin=MARGIN, settle_s=SETTLE_S)
    print(f.line("300 departures, 10 at a time"))
    assert f.node_end - f.node_start <= MARGIN, f.line("node memory stayed")
    assert f.broker_end - f.broker_start <= MARGIN, f.line("broker memory stayed")
