"""Shared fixtures: one real cluster (broker + worker processes) for the whole session.

Starting a node imports torch (about 1.5 s and 220 MB), so tests share the cluster and every
test starts from empty stores: the autouse fixture clears all workers after each test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

import fedptr

WORKERS = ["bob", "alice", "carol", "dave", "erin"]

SOAK_SECONDS = 35.0
"""How long the soak's workload and nemesis run by default (the CI run); ``--soak-seconds`` overrides."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=SOAK_SECONDS,
        help="seconds of workload and faults in tests/test_soak.py (a longer run than CI's)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak's timeout grows with its length (start, healing and checks take about 4 minutes at most)."""
    seconds = float(config.getoption("--soak-seconds"))
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(seconds + 240))


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    """The ``--soak-seconds`` option."""
    return float(request.config.getoption("--soak-seconds"))


@pytest_asyncio.fixture(scope="session")
async def cluster() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(WORKERS, call_timeout=20.0) as c:
        yield c


@pytest.fixture
def client(cluster: fedptr.Cluster) -> fedptr.Client:
    return cluster.client


@pytest.fixture
def bob(client: fedptr.Client) -> fedptr.Worker:
    return client.worker("bob")


@pytest.fixture
def alice(client: fedptr.Client) -> fedptr.Worker:
    return client.worker("alice")


@pytest_asyncio.fixture(autouse=True)
async def _clean_stores(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    if "cluster" in request.fixturenames and request.node.get_closest_marker("destructive") is None:
        c: fedptr.Cluster = request.getfixturevalue("cluster")
        for name in WORKERS:
            await c.client.worker(name).clear()

        async def empty() -> bool:  # objects other workers own go as their pointers' deletes cascade
            return all([await c.client.worker(n).objects() == {} for n in WORKERS])

        assert await eventually(empty), "stores did not empty after the test"


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; returns its last value.

    For effects that travel asynchronously by design: deletes cascade hop by hop unanswered."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if await condition():
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
