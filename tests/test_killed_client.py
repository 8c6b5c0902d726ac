"""A client process killed (SIGKILL) while it streams large tensors to a node over the direct path
as shared-memory files (`fedptr.shm`) on this host, at a kill point drawn (seeded: `KILL_SEED`)
among its sends' files: just before the n-th is written, or once written and before its
descriptor leaves (the file no one was told of); and, on an ipc:// cluster (no direct path),
just before the n-th chunk leaves for the broker. And a client killed mid-get, the node the
sender of a large reply (nemesis7): before or after it reads the node's n-th shared-memory file,
before it takes the n-th sealed chunk of the direct path (no shared memory), or the n-th chunk
through the broker; another client's gets go on meanwhile and must all return their value.

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
import torch
from fedptr.nodes.node import Node

from fedptr import limits, wire
from fedptr.tensors import from_raw

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


async def _killed_at(script: str, c: harness.InprocCluster, bob: Node, at: int, phase: str) -> tuple[str, int]:
    """Run a client `script` against `c` until it kills itself at its kill point (`at`, `phase`):
    its name and pid, once the object it reported acknowledged was seen held by `bob`."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", script, c.address, str(at), phase),
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
    return name, proc.pid


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
            name, pid = await _killed_at(CLIENT, c, bob, at, phase)
            where = f"seed {seed}, kill {kill} {phase} file {at} (client {name}, pid {pid})"

            async def reclaimed(name: str = name, pid: int = pid) -> bool:
                return (
                    (direct is None or name.encode() not in direct.sources)
                    and bob.store.usage(name) == (0, 0)
                    and not any(e.owner == name for e in bob.store.entries.values())
                    and session._reassembly._peer_bytes[name.encode()] == 0
                    and not _files_of(pid)
                )

            assert await eventually(reclaimed, timeout=GONE_S), (
                f"{where}: usage {bob.store.usage(name)}, "
                f"partial bytes {session._reassembly._peer_bytes[name.encode()]}, files {_files_of(pid)}"
            )
        assert len(session._reassembly) == 0 and bob.store.usage(c.client.name) == (0, 0)


GETTER = """
import asyncio, os, signal, sys, torch, fedptr
from fedptr import limits, link, session, shm, wire

at, phase = int(sys.argv[2]), sys.argv[3]
if phase == "sealed":
    limits.DIRECT_SHM_DIR = ""  # no probe file: the path carries sealed chunks, no shared memory
seen = 0

def dying(original, before):
    # the kill point: the at-th chunk this client receives, on the path `phase` names
    def counted(*args, **kwargs):
        global seen
        seen += 1
        if seen == at and before:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if seen == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return counted

if phase in ("file", "read"):  # the node's n-th reply file: before it is read, or once handed back
    shm.Incoming.place = dying(shm.Incoming.place, phase == "file")
elif phase == "sealed":
    link.Link._direct_chunk = dying(link.Link._direct_chunk, True)
else:  # through the broker
    session.Session._chunk = dying(session.Session._chunk, True)

async def main():
    async with fedptr.connect(sys.argv[1], timeout=30.0) as client:
        kept = await client.worker("bob").send(torch.randn(8 << 20))
        print(client.name, kept.id_at_location, flush=True)
        for _ in range(1000):  # 32 MiB each (a Get alone: `Pointer.get` would delete it)
            await client.request_nowait("bob", wire.Get(kept.id_at_location))

asyncio.run(main())
"""
GET_PATHS = {
    "shm": ("tcp", ["file", "read"], FILES_PER_SEND),
    "sealed": ("tcp", ["sealed"], CHUNKS_PER_SEND),
    "broker": ("ipc", ["chunk"], CHUNKS_PER_SEND),
}
"""Per path of a reply, the cluster's transport, the kill points drawn, and the chunks of one get
that reach them (the first chunk of each buffer takes the broker)."""


@pytest.mark.asyncio
@pytest.mark.parametrize("path", list(GET_PATHS))
async def test_a_client_killed_mid_get_leaves_nothing_on_the_node(path: str) -> None:
    if not os.path.isdir(limits.DIRECT_SHM_DIR):
        pytest.skip(f"no {limits.DIRECT_SHM_DIR}")
    seed = int(os.environ.get("KILL_SEED", "5"))
    draw = random.Random(f"{seed}-{path}")
    transport, phases, per_get = GET_PATHS[path]
    async with harness.cluster(["bob"], transport=transport, call_timeout=30.0) as c:
        bob = c.node("bob")
        session, direct = bob.link.session, bob.link.direct
        mine = torch.randn(8 << 20)
        kept = await c.worker("bob").send(mine)
        held = bob.store.held_bytes()
        stop = asyncio.Event()

        async def other_client() -> int:
            gets = 0
            while not stop.is_set():  # each get returns the value, whatever the other client does
                reply = await c.client.request_nowait("bob", wire.Get(kept.id_at_location))
                assert isinstance(reply, wire.TensorReply) and torch.equal(from_raw(reply.tensor), mine)
                gets += 1
            return gets

        for kill in range(KILLS):
            at, phase = draw.randint(1, 3 * per_get), draw.choice(phases)
            stop.clear()
            getting = asyncio.ensure_future(other_client())
            try:
                name, pid = await _killed_at(GETTER, c, bob, at, phase)
            finally:
                stop.set()
            assert await asyncio.wait_for(getting, 60.0) > 0
            where = f"seed {seed}, kill {kill} {phase} chunk {at} (client {name}, pid {pid})"

            async def reclaimed(name: str = name, pid: int = pid) -> bool:
                return (
                    (direct is None or (name.encode() not in direct.sources and name.encode() not in direct._routes))
                    and bob.store.usage(name) == (0, 0)
                    and not any(e.owner == name for e in bob.store.entries.values())
                    and bob.store.held_bytes() == held  # what the acknowledged objects imply: the other client's
                    and session._reassembly._peer_bytes[name.encode()] == 0
                    and not bob.link._outbox  # the reply's stream to the dead client did not stay queued
                    and (direct is None or direct._file_bytes == 0)  # its reply files (and the others', read) went
                    and not _files_of(pid)
                    and not _files_of(os.getpid())
                )

            assert await eventually(reclaimed, timeout=GONE_S), (
                f"{where}: usage {bob.store.usage(name)}, held {bob.store.held_bytes()} of {held}, "
                f"outbox {len(bob.link._outbox)}, node files {direct and direct._file_bytes} bytes, "
                f"files {_files_of(pid) + _files_of(os.getpid())}"
            )
        assert len(session._reassembly) == 0 and bob.store.usage(c.client.name) == (1, mine.nbytes)
        assert torch.equal(await kept.get(), mine)  # acknowledged before the kills, intact
