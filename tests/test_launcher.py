"""The forking node launcher of local clusters (`fedptr.processes`, `fedptr.nodes.launcher`).

Real broker, launcher and nodes: the nodes are forked by the launcher, their pids are theirs
(a kill -9 of one is that node gone, and it restarts forked again), they draw different
random numbers, they die with the client that started them, and a launcher that cannot fork
safely leaves the cluster to plain processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedptr
from fedptr.processes import ForkedNode

DEADLINE_S = 60.0


def _parent(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not reaped yet, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def _until(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="the launcher forks on Linux only")]


async def test_nodes_are_forked_by_one_launcher_and_their_pids_are_theirs() -> None:
    async with fedptr.local_cluster(["bob", "alice"]) as c:
        assert c.starter.launcher is not None
        launcher = c.starter.launcher.process.pid
        for name in ("bob", "alice"):
            assert isinstance(c.processes[name], ForkedNode)
            assert _parent(c.pids[name]) == launcher
        bob, alice = c.client.worker("bob"), c.client.worker("alice")
        # each node reseeded its generator after the fork: the same draw differs
        x, y = await bob.send(torch.zeros(64)), await alice.send(torch.zeros(64))
        assert not torch.equal(await torch.rand_like(x).get(), await torch.rand_like(y).get())

        old = c.pids["bob"]
        c.signal("bob", signal.SIGKILL)  # the pid is bob's: killing it is bob gone
        assert c.processes["bob"].returncode == -signal.SIGKILL
        assert not _alive(old)
        await c.start_node("bob")  # forked again from the warm launcher
        assert c.pids["bob"] != old and _parent(c.pids["bob"]) == launcher
        z = await bob.send(torch.ones(3))
        assert (await (z * 2).get()).tolist() == [2.0, 2.0, 2.0]


CLIENT = """
import asyncio, json, fedptr

async def main():
    async with fedptr.local_cluster(["bob", "alice"]) as c:
        pids = {**c.pids, "launcher": c.starter.launcher.process.pid}
        print(json.dumps(pids), flush=True)
        await asyncio.sleep(600)  # until the test kills us

asyncio.run(main())
"""


async def test_the_launcher_and_its_nodes_die_with_the_client() -> None:
    client = subprocess.Popen([sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert client.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(client.stdout.readline), DEADLINE_S)
        pids: dict[str, int] = json.loads(line)
        assert set(pids) == {"broker", "bob", "alice", "launcher"}
        assert all(_alive(pid) for pid in pids.values())
        client.kill()  # no clean-up runs: only PR_SET_PDEATHSIG can end the rest
        client.wait()
        await _until(lambda: not any(_alive(pid) for pid in pids.values()), f"processes outlived the client: {pids}")
    finally:
        client.kill()
        client.wait()


async def test_a_launcher_that_cannot_fork_safely_leaves_plain_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy's OpenBLAS then starts a thread in the launcher: it refuses to fork, and says so
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    async with fedptr.local_cluster(["bob"]) as c:
        assert c.starter.launcher is None
        assert isinstance(c.processes["bob"], subprocess.Popen)
        assert _parent(c.pids["bob"]) == os.getpid()
        assert "forking is unsafe" in c.log("launcher")
        x = await c.client.worker("bob").send(torch.ones(2))
        assert (await (x + 1).get()).tolist() == [2.0, 2.0]
