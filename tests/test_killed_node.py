"""A node process killed (SIGKILL) mid-get and mid-send over the direct path as shared-memory files
(`fedptr.shm`) on this host, at a kill point drawn (seeded: `KILL_SEED`) among its files, each kind in turn: just
before the n-th reply file is written, once written and before its descriptor leaves (a file the
client was never told of), or between its read of the client's n-th file and the file's
hand-back (the rename to the client's spent name).

Two clients in this process (on a tcp:// broker, so that paths open) fetch large values from
the node, one of them also sending them. When the node dies, each pending get fails typed
(`LostWorkerError` naming the worker, or a `FedptrError` whose path names it) or completes:
none hangs. Within `GONE_S` each client holds nothing of the dead node: no partial stream of
it, and no shared-memory file of the dead process in `limits.DIRECT_SHM_DIR` (the node's
reply files are its own: only a sweep removes them once it is dead), with no path opening on
the host meanwhile. The node is restarted on its store: every acknowledged object is there
under its id with the value the client sent, and a large get works again.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from typing import Any

import pytest
import torch

from fedptr import Client, Pointer, limits
from fedptr.errors import FedptrError, LostWorkerError

from . import harness
from .conftest import eventually
from .killpoints import DYING_WRITE

pytestmark = pytest.mark.slow

NODE = (
    """
import os, signal, sys
from fedptr import shm

at, phase = int(sys.argv[3]), sys.argv[4]

def counted(counter):
    return True  # every reply file
"""
    + DYING_WRITE
    + """
taken = 0
hand_back = shm.Incoming._hand_back

def dying_hand_back(self, name):
    # the client's at-th file read, not yet handed back
    global taken
    taken += 1
    if taken == at and phase == "read":
        os.kill(os.getpid(), signal.SIGKILL)
    return hand_back(self, name)

shm.Directory.write, shm.Incoming._hand_back = dying_write, dying_hand_back
from fedptr.nodes.__main__ import main
sys.exit(main(["--name", "bob", "--broker", sys.argv[1], "--store", sys.argv[2], "--threads", "1"]))
"""
)
KILLS = 3
"""Kill points drawn per run (each a fresh node process on the same store)."""
FILES_PER_VALUE = 8
"""The shared-memory files of one 32 MiB value (`limits.DIRECT_SHM_FILE_BYTES` each)."""
PHASES = ["before", "written", "read"]
GONE_S = 10.0
"""How long a client may take to learn the node died and drop what it held of it."""
SETTLE_S = 20.0
"""How long a get pending at the kill may take to settle (fail or complete)."""


_DRAINS: set[asyncio.Task[bytes]] = set()
"""The tasks reading each node process's output until it ends."""


def _files_of(pid: int) -> list[str]:
    return [f for f in os.listdir(limits.DIRECT_SHM_DIR) if f.startswith("fedptr-") and f"-{pid}-" in f]


async def _start(address: str, store: str, at: int, phase: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", NODE, address, store, str(at), phase),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    while b"fedptr-node bob ready" not in (line := await asyncio.wait_for(proc.stdout.readline(), 60.0)):
        assert line, "the node exited before it was ready"
    _DRAINS.add(asyncio.create_task(proc.stdout.read()))  # its log must never fill the pipe and stall it
    return proc


async def _fetching(client: Client, ptr: Pointer, expected: torch.Tensor, outcomes: list[Any]) -> None:
    """Get `ptr` until a get fails; each outcome recorded (True: the value, or the error)."""
    while True:
        try:
            got = await ptr.clone().get()  # a copy: the object stays for the next
        except FedptrError as e:
            outcomes.append(e)
            return
        outcomes.append(torch.equal(got, expected))


async def _sending(ptrs: list[tuple[Pointer, torch.Tensor]], client: Client, outcomes: list[Any]) -> None:
    """Send 32 MiB values until a send fails; each acknowledged one kept (with its value)."""
    while True:
        value = torch.randn(8 << 20)
        try:
            ptrs.append((await client.worker("bob").send(value), value))
        except FedptrError as e:
            outcomes.append(e)
            return


def _names_bob(e: BaseException) -> bool:
    return (isinstance(e, LostWorkerError) and e.worker == "bob") or "bob" in getattr(e, "path", [])


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_a_node_killed_mid_get_or_mid_send_leaves_its_clients_nothing_and_its_store_whole() -> None:
    if not os.path.isdir(limits.DIRECT_SHM_DIR):
        pytest.skip(f"no {limits.DIRECT_SHM_DIR}")
    seed = int(os.environ.get("KILL_SEED", "6"))
    draw = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="fedptr-killed-node-") as store:
        async with harness.cluster([], transport="tcp", call_timeout=30.0) as c, c.connect() as other:
            clients = [c.client, other]
            kept: list[tuple[Pointer, torch.Tensor]] = []  # acknowledged: must survive every kill
            for kill in range(KILLS):
                at, phase = draw.randint(1, 3 * FILES_PER_VALUE), PHASES[kill % len(PHASES)]
                where = f"seed {seed}, kill {kill}: {phase} file {at}"
                proc = await _start(c.address, store, at, phase)
                try:
                    for ptr, value in kept:
                        assert torch.equal(await ptr.clone().get(), value), f"{where}: an acknowledged object changed"
                    big = [torch.randn(8 << 20) for _ in clients]
                    ptrs = [await client.worker("bob").send(v) for client, v in zip(clients, big, strict=True)]
                    kept += zip(ptrs, big, strict=True)
                    outcomes: list[list[Any]] = [[] for _ in range(3)]
                    fetches = [
                        asyncio.create_task(_fetching(client, ptr, v, out))
                        for client, ptr, v, out in zip(clients, ptrs, big, outcomes[:2], strict=True)
                    ]
                    sends = asyncio.create_task(_sending(kept, c.client, outcomes[2]))
                    await asyncio.wait_for(proc.wait(), 120.0)  # it kills itself at its kill point
                    await asyncio.wait_for(asyncio.gather(*fetches, sends), SETTLE_S)
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                assert proc.returncode == -signal.SIGKILL, where
                for out in outcomes:
                    *done, last = out
                    assert all(d is True for d in done), f"{where}: a get completed with another value: {out}"
                    assert isinstance(last, FedptrError) and _names_bob(last), f"{where}: {last!r}"

                async def released(pid: int = proc.pid) -> bool:
                    # the dead node's files, and ours it had not handed back (the "read" kill)
                    return (
                        not _files_of(pid)
                        and not _files_of(os.getpid())
                        and all(client.link.session._reassembly._peer_bytes[b"bob"] == 0 for client in clients)
                    )

                assert await eventually(released, timeout=GONE_S), (
                    f"{where}: files {_files_of(proc.pid)}, ours {_files_of(os.getpid())}, partial bytes "
                    f"{[client.link.session._reassembly._peer_bytes[b'bob'] for client in clients]}"
                )
            proc = await _start(c.address, store, 0, "none")
            try:
                for ptr, value in kept:
                    assert torch.equal(await ptr.get(), value), f"seed {seed}: an acknowledged object changed"
            finally:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30.0)
