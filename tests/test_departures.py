"""Mass departures: 2,000 raw wire-protocol peers (tests/rawpeers.py, no torch) leave at once by
disconnecting, by SIGSTOP and by SIGKILL. The broker must live, forget them all, and a live
client's calls meanwhile must all succeed with their p99 under the call deadline."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

import fedptr
from tests.conftest import alive, eventually

pytestmark = [pytest.mark.slow, pytest.mark.destructive]

BEAT_S = 1.0
LIVENESS = 3
CALL_TIMEOUT_S = 2.0
PEERS_PER_HELPER = 1000
HELPERS = 2
READY_TIMEOUT_S = 150.0


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster() -> AsyncIterator[fedptr.Cluster]:
    # the raw peers carry no keys: this measures the broker, with CURVE off
    async with fedptr.local_cluster(
        ["bob"], call_timeout=CALL_TIMEOUT_S, heartbeat_s=BEAT_S, liveness=LIVENESS, curve=False
    ) as c:
        yield c


def _spawn(address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rawpeers", address, str(PEERS_PER_HELPER), "bob", str(BEAT_S / 2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )


async def _ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), READY_TIMEOUT_S)
    assert line.strip() == b"ready", line


async def _peers(client: fedptr.Client) -> int:
    return (await client.link.broker_stats(CALL_TIMEOUT_S))["peers"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["disconnect", "sigstop", "sigkill"])
@pytest.mark.asyncio(loop_scope="module")
async def test_broker_survives_two_thousand_peers_leaving_at_once(cluster: fedptr.Cluster, how: str) -> None:
    client = cluster.client
    x = await client.worker("bob").send(torch.ones(4))
    baseline = await _peers(client)
    helpers = [_spawn(cluster.address) for _ in range(HELPERS)]
    try:
        await asyncio.gather(*(_ready(h) for h in helpers))
        assert await _peers(client) == baseline + HELPERS * PEERS_PER_HELPER
        latencies: list[float] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    await (x + 1)
                except fedptr.FedptrError as e:
                    errors.append(e)
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.005)

        prober = asyncio.ensure_future(probe())
        await asyncio.sleep(0.3)
        left_at = time.monotonic()
        for h in helpers:
            if how == "disconnect":
                assert h.stdin is not None
                h.stdin.write(b"disconnect\n")
                h.stdin.flush()
            else:
                h.send_signal(signal.SIGSTOP if how == "sigstop" else signal.SIGKILL)
        gone = await eventually(lambda: _is(client, baseline), timeout=BEAT_S * LIVENESS * 10)
        forgotten_after = time.monotonic() - left_at
        await asyncio.sleep(BEAT_S * LIVENESS)
        stop.set()
        await prober
        assert gone, f"the broker still has {await _peers(client)} peers, {baseline} expected"
        assert alive(cluster.pids["broker"])
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print(
            f"\n{how}: {HELPERS * PEERS_PER_HELPER} peers forgotten in {forgotten_after:.2f} s; live client "
            f"{len(latencies)} calls, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms, errors {len(errors)}"
        )
        assert not errors, errors[:3]
        assert p99 < CALL_TIMEOUT_S
        assert await client.workers() == ["bob"]
    finally:
        for h in helpers:
            if h.poll() is None:
                h.kill()
            h.wait()


async def _is(client: fedptr.Client, peers: int) -> bool:
    return await _peers(client) == peers
