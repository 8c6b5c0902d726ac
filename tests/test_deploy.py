"""deploy/local.py: starts a broker and named nodes in the foreground and stops them on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import fedptr
from tests.conftest import alive

ROOT = Path(__file__).resolve().parents[1]


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


async def test_local_launcher_serves_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy" / "local.py"), "bob", "alice", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.startswith("broker at tcp://127.0.0.1:"), line
        address = line.split()[2].rstrip(";")
        async with fedptr.connect(address, timeout=10) as client:
            assert await client.workers() == ["alice", "bob"]
            p = await (await client.worker("bob").send(torch.ones(2))).send(client.worker("alice"))
            inner = await p.get()
            assert isinstance(inner, fedptr.Pointer)
            assert torch.equal(await inner.get(), torch.ones(2))  # type: ignore[arg-type]
        children = _children(proc.pid)
        assert len(children) == 3  # the broker and two nodes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while any(alive(c) for c in children) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(alive(c) for c in children)
    finally:
        if proc.poll() is None:
            proc.kill()
