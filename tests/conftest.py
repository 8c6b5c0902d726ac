"""Shared fixtures: the `cluster` a test runs on, and its client and workers.

By default one real cluster (broker + worker processes) serves the whole session: starting a
node process imports torch (about 1.5 s and 220 MB), so tests share it and every test starts
from empty stores (the autouse fixture clears all workers after each test). A module or test
marked ``inproc`` gets a fresh in-process cluster instead (tests/harness.py: the same broker,
node and client code on this loop over inproc://, up in milliseconds); the same emptiness
check runs after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio

import fedptr

from . import harness

WORKERS = ["bob", "alice", "carol", "dave", "erin"]

E = TypeVar("E", bound=BaseException)

SOAK_SECONDS = 35.0
"""How long the soak's workload and nemesis run by default (the CI run); ``--soak-seconds`` overrides."""
FAST_LOOP_EXAMPLES_SHARE = 5
"""The fast loop (``-m "not slow"``) draws this many times fewer examples of the long fuzz
tests than the full run, which keeps every one (`examples`)."""
_fast_loop = False


def examples(n: int) -> int:
    """A fuzz test's hypothesis example count: `n` in the full run, a `FAST_LOOP_EXAMPLES_SHARE`th
    of it in the fast loop (its two minutes are for the edit-test loop; CI runs all `n`)."""
    return max(1, n // FAST_LOOP_EXAMPLES_SHARE) if _fast_loop else n


def pytest_configure(config: pytest.Config) -> None:
    """Note whether this is the fast loop: slow tests left out by ``-m "not slow"``."""
    global _fast_loop
    _fast_loop = "not slow" in (config.getoption("markexpr") or "")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=SOAK_SECONDS,
        help="seconds of workload and faults in tests/test_soak.py (a longer run than CI's)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak's timeout grows with its length (start, healing and checks take about 4 minutes at
    most). A test on the shared process cluster (`cluster` without ``inproc``), a destructive
    test (its own processes) and the soak are ``slow``: the fast loop, ``-m "not slow"``, starts
    no process cluster."""
    seconds = float(config.getoption("--soak-seconds"))
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(seconds + 240))
        if (
            ("cluster" in getattr(item, "fixturenames", ()) and not _inproc(item))
            or item.get_closest_marker("destructive") is not None
            or item.get_closest_marker("soak") is not None
        ):
            item.add_marker(pytest.mark.slow)


def _inproc(item: pytest.Item) -> bool:
    """Whether `item` runs on an in-process cluster: marked ``inproc``, not ``inproc(False)``."""
    marker = item.get_closest_marker("inproc")
    return marker is not None and (not marker.args or bool(marker.args[0]))


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    """The ``--soak-seconds`` option."""
    return float(request.config.getoption("--soak-seconds"))


@pytest_asyncio.fixture(scope="session")
async def process_cluster() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(WORKERS, call_timeout=20.0) as c:
        yield c


@pytest_asyncio.fixture
async def inproc_cluster() -> AsyncIterator[harness.InprocCluster]:
    """A fresh in-process cluster of `WORKERS` for one test."""
    async with harness.cluster(WORKERS, call_timeout=20.0) as c:
        yield c


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> fedptr.Cluster | harness.InprocCluster:
    """The in-process cluster for tests marked ``inproc``, else the session's process cluster
    (started only when a test needs it). ``inproc(False)`` on a test in an ``inproc`` module
    sends it back to processes."""
    c: fedptr.Cluster | harness.InprocCluster = request.getfixturevalue(
        "inproc_cluster" if _inproc(request.node) else "process_cluster"
    )
    return c


@pytest.fixture
def client(cluster: fedptr.Cluster | harness.InprocCluster) -> fedptr.Client:
    return cluster.client


@pytest.fixture
def bob(client: fedptr.Client) -> fedptr.Worker:
    return client.worker("bob")


@pytest.fixture
def alice(client: fedptr.Client) -> fedptr.Worker:
    return client.worker("alice")


@pytest.fixture(autouse=True)
def _clean_stores(request: pytest.FixtureRequest) -> None:
    """Every test on `cluster` (unless destructive) leaves the stores empty: see `_emptied_after`."""
    if "cluster" in request.fixturenames and request.node.get_closest_marker("destructive") is None:
        request.getfixturevalue("_emptied_after")


@pytest_asyncio.fixture
async def _emptied_after(cluster: fedptr.Cluster | harness.InprocCluster) -> AsyncIterator[None]:
    """After the test, clears every worker and checks that every store empties. It depends on
    `cluster`, so it runs before a per-test cluster is stopped."""
    yield
    for name in WORKERS:
        await cluster.client.worker(name).clear()

    async def empty() -> bool:  # objects other workers own go as their pointers' deletes cascade
        return all([await cluster.client.worker(n).objects() == {} for n in WORKERS])

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


async def refused(attack: Awaitable[Any], error: type[E], *, owner: str | None = None, match: str | None = None) -> E:
    """Await `attack`, which must end in the refusal the test names: `error` (a privacy refusal
    is `fedptr.PermissionDenied`, naming the data `owner`) whose message matches `match`.
    A value, a crash, a timeout or any other error fails the test; the refusal is returned."""
    with pytest.raises(error, match=match) as info:
        await attack
    if owner is not None:
        assert isinstance(info.value, fedptr.PermissionDenied), info.value
        assert info.value.owner == owner, f"refused on behalf of {info.value.owner!r}, not {owner!r}: {info.value}"
    return info.value


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
