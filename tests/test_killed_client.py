"""A client process killed (SIGKILL) while it streams large tensors to a node over the direct path
as shared-memory files (`fedptr.shm`) on this host, at a kill point drawn (seeded: `KILL_SEED`)
among its sends' files: just before the n-th is written, or once written and before its
descriptor leaves (the file no one was told of); and, on an ipc:// cluster (no direct path),
just before the n-th chunk leaves for the broker.

The node (in this process, on a tcp:// broker so that the path opens) must be left as the
session-end rule says once it learns the client is gone (heartbeat silence): nothing of the
client's held, in its store or its quota (the object acknowledged before the kill is reclaimed
with the rest, `Objects.reclaim`), no partial stream kept, and no shared-memory file of the dead
client's left in `limits.DIRECT_SHM_DIR`: not the ones it wrote and the node took (handed back
under the client's name), nor one it wrote and died before announcing (no one but a sweep removes
that: the node sweeps when a peer that shared memory with it leaves).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from typing import Literal

import pytest

from fedptr import limits

from . import harness
from .conftest import eventually
from .killpoints import DYING_WRITE

pytestmark = pytest.mark.slow

CLIENT = (
    """
import asyncio, os, signal, sys, torch, fedptr
from fedptr import envelope, link, shm

at, phase = int(sys.argv[2]), sys.argv[3]

def counted(counter):
    return counter > 0  # the chunks' files; the probe, counter 0, is not counted
"""
    + DYING_WRITE
    + """
shm.Directory.write = dying_write
chunks = 0
sent = link.Link._sent

def dying_chunk(self, frames):
    # through the broker (no direct path): dies before the at-th chunk leaves
    global chunks
    if phase == "chunk" and envelope.command_of(frames) == envelope.CHUNK:
        chunks += 1
        if chunks == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return sent(self, frames)

link.Link._sent = dying_chunk

async def main():
    async with fedptr.connect(sys.argv[1], timeout=30.0) as client:
        bob = client.worker("bob")
        kept = await bob.send(torch.arange(1000.0))
        print(client.name, kept.id_at_location, flush=True)
        for _ in range(1000):  # 32 MiB each: 8 files of `limits.DIRECT_SHM_FILE_BYTES`
            await bob.send(torch.randn(8 << 20))

asyncio.run(main())
"""
)
KILLS = 4
"""Kill points drawn per run (each a fresh client process)."""
FILES_PER_SEND = 8
"""The shared-memory files of one 32 MiB send (the first chunk goes through the broker)."""
CHUNKS_PER_SEND = 32
"""The chunks of one 32 MiB send through the broker (`limits.STREAM_CHUNK_BYTES`)."""
PHASES = {"tcp": (["before", "written"], FILES_PER_SEND), "ipc": (["chunk"], CHUNKS_PER_SEND)}
"""Per transport, the kill points drawn: over tcp:// the direct path opens (shared memory);
over ipc:// every chunk goes through the broker."""
GONE_S = 20.0
"""How long the node may take to learn a killed client left (3 silent heartbeats) and reclaim."""


def _files_of(pid: int) -> list[str]:
    return [f for f in os.listdir(limits.DIRECT_SHM_DIR) if f.startswith("fedptr-") and f"-{pid}-" in f]


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
async def test_a_client_killed_mid_send_leaves_nothing_on_the_node(transport: Literal["tcp", "ipc"]) -> None:
    if not os.path.isdir(limits.DIRECT_SHM_DIR):
        pytest.skip(f"no {limits.DIRECT_SHM_DIR}")
    seed = int(os.environ.get("KILL_SEED", "5"))
    draw = random.Random(seed)
    phases, per_send = PHASES[transport]
    async with harness.cluster(["bob"], transport=transport) as c:
        bob = c.node("bob")
        session, direct = bob.link.session, bob.link.direct
        assert (direct is not None) == (transport == "tcp")
        for kill in range(KILLS):
            at, phase = draw.randint(1, 3 * per_send), draw.choice(phases)
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-c", CLIENT, c.address, str(at), phase),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert proc.stdout is not None
                name, kept = (await asyncio.wait_for(proc.stdout.readline(), 60.0)).decode().split()
                assert bob.store.entries[int(kept)].owner == name  # acknowledged: held
                await asyncio.wait_for(proc.wait(), 60.0)  # it kills itself at its kill point
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.returncode == -signal.SIGKILL
            where = f"seed {seed}, kill {kill} {phase} file {at} (client {name}, pid {proc.pid})"

            async def reclaimed(name: str = name, pid: int = proc.pid) -> bool:
                return (
                    (direct is None or name.encode() not in direct.sources)
                    and bob.store.usage(name) == (0, 0)
                    and not any(e.owner == name for e in bob.store.entries.values())
                    and session._reassembly._peer_bytes[name.encode()] == 0
                    and not _files_of(pid)
                )

            assert await eventually(reclaimed, timeout=GONE_S), (
                f"{where}: usage {bob.store.usage(name)}, "
                f"partial bytes {session._reassembly._peer_bytes[name.encode()]}, files {_files_of(proc.pid)}"
            )
        assert len(session._reassembly) == 0 and bob.store.usage(c.client.name) == (0, 0)
