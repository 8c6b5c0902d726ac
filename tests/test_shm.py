"""Same-host shared memory on the direct path (fedptr/shm.py, fedptr/direct.py).

On a real CURVE cluster (broker and node processes): a large send and get go through shared
memory and leave no file behind; on a cluster without CURVE, 64 MiB sends, gets and moves do
too; a client whose directory the node does not share (the probe fails) falls back to the
sealed chunks. On a real data socket in this process: a peer cannot
name another path's file. On files: every refusal (a name not of the path, a replay, a symlink,
the wrong size or file, a file gone) is a typed error that fails its stream at once, nothing is
read past a stream budget and the file is unlinked anyway, the sender unlinks what nobody took,
and a crashed sender's files (a real process, killed) are swept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
import zmq

import fedptr
from fedptr import envelope, limits, shm
from fedptr.direct import _SHM_CHUNK, DirectPaths, _channel
from fedptr.errors import ProtocolError
from fedptr.session import Session
from fedptr.streams import Reassembly
from tests.conftest import eventually
from tests.test_direct import GREETING, data_socket

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
MIB = 1 << 20
TOKEN = b"t" * 32


def ours(pid: int) -> list[str]:
    """The shared-memory files process `pid` made that are still there."""
    return [f for f in os.listdir(limits.DIRECT_SHM_DIR) if f.startswith("fedptr-") and f"-{pid}-" in f]


# --- on a CURVE cluster ------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(["bob"], curve=True) as c:
        yield c


async def opened(client: fedptr.Client, worker: str) -> DirectPaths:
    """`client`'s direct paths, once its path to `worker` is up (a transfer opens it)."""
    await (await client.worker(worker).send(torch.zeros(2 * MIB))).get()
    direct = client._link.direct
    assert direct is not None

    async def up() -> bool:
        lane = direct._lanes.get(worker.encode())
        return lane is not None and lane.ready

    assert await eventually(up, timeout=15.0), "no direct path opened"
    return direct


@MODULE_LOOP
async def test_send_and_get_go_through_shared_memory_and_leave_nothing(
    secure: fedptr.Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "DIRECT_SHM_SPARE_S", 2.0)  # the client's files outlive a slow turn
    direct = await opened(secure.client, "bob")
    lane = direct._lanes[b"bob"]
    assert lane.channel is not None and lane.channel.shared, "the probe did not prove the shared directory"
    assert not lane.probe, "the probe file outlived the greeting"
    sealed_before, files_before = lane.channel.sent, lane.channel.files_sent
    t = torch.randn(4 * MIB)  # 16 MiB
    p = await secure.client.worker("bob").send(t)
    assert torch.equal(await p.get(), t)
    files = lane.channel.files_sent - files_before
    assert files >= 1 and lane.channel.files_taken >= 1  # each way, a file
    # sealed: each file's descriptor, and at most one more (not 16 chunks of 1 MiB)
    assert lane.channel.sent - sealed_before <= files + 1, "the bytes went as sealed chunks"
    # each file read is handed back to its maker, which writes later chunks into it (the oldest
    # first: while the node still reads the newest, a fresh file may be needed, and the pool grows)
    rewritten = direct.files_rewritten
    p = await secure.client.worker("bob").send(t)
    assert direct.files_rewritten > rewritten, "the send wrote fresh files only, none handed back"
    assert torch.equal(await p.get(), t)
    await nothing_left(os.getpid(), secure.pids["bob"])


@MODULE_LOOP
async def test_a_buffer_read_from_shared_memory_lands_page_aligned(secure: fedptr.Cluster) -> None:
    """A 16 MiB get (a 4 KiB first chunk through the broker, then 4 MiB files read into one buffer)
    gives a tensor over a buffer that starts at a multiple of `limits.STREAM_BUFFER_ALIGN_BYTES`:
    the kernel's copy of each file into a buffer 16 bytes past a page (numpy's) ran ~3x slower."""
    direct = await opened(secure.client, "bob")
    files = direct._lanes[b"bob"].channel.files_taken  # type: ignore[union-attr]
    t = torch.randn(4 * MIB)
    got = await (await secure.client.worker("bob").send(t)).get()
    assert direct._lanes[b"bob"].channel.files_taken > files, "the get took no shared-memory file"  # type: ignore[union-attr]
    assert got.data_ptr() % limits.STREAM_BUFFER_ALIGN_BYTES == 0, hex(got.data_ptr())
    assert torch.equal(got, t)


async def nothing_left(*pids: int) -> None:
    """No file of `pids` is left once `limits.DIRECT_SHM_SPARE_S` passed (files handed back are
    kept that long, for a next transfer)."""

    async def none() -> bool:
        return not any(ours(pid) for pid in pids)

    assert await eventually(none, timeout=20.0), "files were left behind"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plain() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(["bob", "alice"], curve=False) as c:
        yield c


async def delivered_to(cluster: fedptr.Cluster, worker: str) -> int:
    """Messages the broker has delivered to `worker` (a chunk through the broker counts one)."""
    stats = await cluster.client._link.broker_stats(10.0)
    return stats[f"{envelope.STATS_PEER_PREFIX}{worker}.delivered"]


@MODULE_LOOP
async def test_without_curve_64_mib_sends_gets_and_moves_go_through_shared_memory(plain: fedptr.Cluster) -> None:
    """Without CURVE there was no direct path at all: a 64 MiB send, get or move crossed the
    broker as 64 chunks of 1 MiB (each copied through three processes). The path now opens with
    CURVE off too (its keys are its own X25519 agreement's), and on one host the bytes go as
    shared-memory files: only the message and a 4 KiB first chunk reach the broker."""
    direct = await opened(plain.client, "bob")
    lane = direct._lanes[b"bob"]
    assert lane.channel is not None and lane.channel.shared, "the probe did not prove the shared directory"
    t = torch.randn(16 * MIB)  # 64 MiB
    files, sent, received = lane.channel.files_sent, direct.bytes_sent, direct.bytes_received
    before = await delivered_to(plain, "bob")
    p = await plain.client.worker("bob").send(t)
    assert await delivered_to(plain, "bob") - before <= 4, "the chunks went through the broker"
    assert direct.bytes_sent - sent >= 64 * MIB - limits.DIRECT_FIRST_CHUNK_BYTES
    assert lane.channel.files_sent - files >= 64 * MIB // limits.DIRECT_SHM_FILE_BYTES
    assert torch.equal(await p.get(), t)
    assert direct.bytes_received - received >= 64 * MIB - limits.DIRECT_FIRST_CHUNK_BYTES
    p = await plain.client.worker("bob").send(t)  # the get took the last one

    async def a_move_skips_the_broker() -> bool:
        """bob's path to alice opens on its first transfer to her (in the background): a move
        there and back until one takes it."""
        nonlocal p
        before = await delivered_to(plain, "alice")
        p = await p.move("alice")
        through_broker = await delivered_to(plain, "alice") - before
        p = await p.move("bob")
        return through_broker <= 4

    assert await eventually(a_move_skips_the_broker, timeout=30.0), "every move's chunks went through the broker"
    assert torch.equal(await p.get(), t)
    await nothing_left(os.getpid(), plain.pids["bob"], plain.pids["alice"])


@MODULE_LOOP
async def test_a_buffer_goes_as_files_of_bounded_size(secure: fedptr.Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rest of a buffer goes as files of at most `limits.DIRECT_SHM_FILE_BYTES`, each read by
    the node in a loop turn of its own: one file of the whole rest (up to 4 GiB) was read in one
    turn, holding the node's loop (its heartbeats, every other peer) for seconds."""
    monkeypatch.setattr(limits, "DIRECT_SHM_FILE_BYTES", 4 * MIB)
    direct = await opened(secure.client, "bob")
    lane = direct._lanes[b"bob"]
    assert lane.channel is not None and lane.channel.shared
    files_before = lane.channel.files_sent
    t = torch.randn(4 * MIB)  # 16 MiB: its first 4 KiB through the broker, the rest as 4 files
    assert torch.equal(await (await secure.client.worker("bob").send(t)).get(), t)
    assert lane.channel.files_sent - files_before == 4
    await nothing_left(os.getpid(), secure.pids["bob"])


@MODULE_LOOP
async def test_a_directory_the_node_does_not_share_falls_back_to_sealed_chunks(
    secure: fedptr.Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe proves the sharing, nothing assumes it: a client whose shared-memory directory
    is not the node's gets a path without shared memory, and its transfers still arrive whole."""
    monkeypatch.setattr(limits, "DIRECT_SHM_DIR", str(tmp_path))
    async with secure.connect(1) as client:
        direct = await opened(client, "bob")
        lane = direct._lanes[b"bob"]
        assert lane.channel is not None and not lane.channel.shared
        t = torch.randn(4 * MIB)
        sealed_before = lane.channel.sent
        assert torch.equal(await (await client.worker("bob").send(t)).get(), t)
        assert lane.channel.sent - sealed_before >= 15, "not sent as sealed 1 MiB chunks"
        assert lane.channel.files_sent == 0 and list(tmp_path.iterdir()) == []


@MODULE_LOOP
async def test_a_file_the_broken_path_did_not_take_is_unlinked_at_once(secure: fedptr.Cluster) -> None:
    """The file is written before the path's socket refuses its descriptor (the path broke):
    the bytes go through the broker, and the file does not wait for its deadline."""
    direct = await opened(secure.client, "bob")
    lane = direct._lanes[b"bob"]
    lane.sock.disconnect(lane.sock.getsockopt_string(zmq.LAST_ENDPOINT))  # the path breaks
    t = torch.randn(4 * MIB)
    p = await secure.client.worker("bob").send(t)  # IMMEDIATE: the socket takes nothing
    assert b"bob" not in direct._lanes and ours(os.getpid()) == []
    assert torch.equal(await p.get(), t)


# --- one path cannot name another's file, on a real data socket ---------------------------------
@pytest_asyncio.fixture
async def worker_socket(tmp_path: Path) -> AsyncIterator[tuple[DirectPaths, list[tuple[bytes, list[Any]]]]]:
    got: list[tuple[bytes, list[Any]]] = []
    server = DirectPaths(lambda peer, frames: got.append((peer, frames)))
    server._shm = shm.Directory(str(tmp_path))
    server.serve("tcp://127.0.0.1:9")
    try:
        yield server, got
    finally:
        server.close()


async def shared_path(server: DirectPaths, directory: shm.Directory, name: bytes) -> tuple[Any, Any]:
    """`name`'s path to the data socket of `server`, greeted with a probe in `directory`: its
    keys (the connecting end's) and its socket; the worker said the path has shared memory."""
    public, secret = zmq.curve_keypair()
    channel = _channel(public, secret, server.admit(name, public).key, True)
    sock = data_socket(server.endpoint, public, channel.token)
    probe = directory.probe()
    assert probe is not None
    await sock.send_multipart(channel.seal([*GREETING, probe[1]]))
    async with asyncio.timeout(15):
        answer = channel.open(*(await sock.recv_multipart())[1:])
    directory.unlink(probe[0])  # as a lane does once answered
    assert answer is not None and answer[-1] == b"shared"
    return channel, sock


def shm_chunk(rid: bytes, descriptor: bytes, size: int, offset: int = 0) -> list[Any]:
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, offset, size)
    return envelope.build(_SHM_CHUNK, b"bob", rid, info, descriptor)


async def test_a_peer_cannot_name_another_paths_file(
    worker_socket: tuple[DirectPaths, list[tuple[bytes, list[Any]]]], tmp_path: Path
) -> None:
    """Mallory learns the name of a file alice wrote for her path (a listing of the directory
    shows it) and sends its descriptor over her own path: the worker refuses it, typed, and
    neither reads nor unlinks alice's file; alice's own descriptor then delivers her bytes."""
    server, got = worker_socket
    directory = shm.Directory(str(tmp_path))
    peers = {}
    for name in (b"alice", b"mallory"):
        peers[name] = await shared_path(server, directory, name)
    try:
        alice, mallory = peers[b"alice"][0], peers[b"mallory"][0]
        data = os.urandom(3 * MIB)
        written = directory.write(shm.tag(alice.token, alice.outgoing, 1), 1, memoryview(data))
        assert written is not None
        name, descriptor = written
        reassembly = Reassembly()
        for who, channel in ((b"mallory", mallory), (b"alice", alice)):
            await peers[who][1].send_multipart(channel.seal(shm_chunk(b"rid-0001", descriptor, len(data))))
            async with asyncio.timeout(15):
                while len(got) < (1 if who == b"mallory" else 2):
                    await asyncio.sleep(0.01)
        (mallory_peer, mallory_frames), (alice_peer, alice_frames) = got
        assert (mallory_peer, alice_peer) == (b"mallory", b"alice")
        with pytest.raises(ProtocolError, match="not of this path"):
            reassembly.add(b"mallory", b"rid-0001", mallory_frames[-2], mallory_frames[-1])
        assert (tmp_path / name.decode()).exists(), "mallory's descriptor unlinked alice's file"
        reassembly.add(b"alice", b"rid-0001", alice_frames[-2], alice_frames[-1])
        body = reassembly.complete(envelope.REQUEST, b"alice", b"rid-0001", [b"header", b""])
        assert bytes(body[1]) == data and not (tmp_path / name.decode()).exists()
    finally:
        for _, sock in peers.values():
            sock.close(linger=0)


async def test_a_descriptor_out_of_a_chunks_place_is_dropped_and_the_socket_reads_on(tmp_path: Path) -> None:
    """Mallory seals shared-memory chunks not of a chunk's shape (a head alone, a head and a
    descriptor with no info): the worker hands on chunk-shaped messages only, and her next chunk
    arrives. (Re-making the head of a message with no frame before its descriptor raised an
    IndexError out of the data socket's reader, and the messages drained with it were left
    unread until another came; the one with no info reached the session, its file unclosed.
    On the six-frame envelope, a descriptor in a request id's place raised a TypeError there.)"""
    directory = shm.Directory(str(tmp_path))
    session = Session("bob", envelope.ROLE_WORKER)
    got: list[list[Any]] = []

    def on_chunk(peer: bytes, frames: list[Any]) -> None:  # as the link's: a ProtocolError drops the message
        got.append(frames)
        with contextlib.suppress(ProtocolError):
            session.receive_direct(peer, frames, 0.0)

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    server = DirectPaths(on_chunk)
    server._shm = directory
    server.serve("tcp://127.0.0.1:9")
    channel, sock = await shared_path(server, directory, b"mallory")
    try:
        written = directory.write(shm.tag(channel.token, channel.outgoing, 1), 1, memoryview(bytes(MIB)))
        assert written is not None
        data = os.urandom(4096)
        info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, len(data))
        head = envelope.build(_SHM_CHUNK, b"bob", b"rid-0001")
        for malformed in ([*head, written[1]], head):
            await sock.send_multipart(channel.seal(malformed))
        await sock.send_multipart(channel.seal(envelope.build(envelope.CHUNK, b"bob", b"rid-0001", info, data)))

        async def arrived() -> bool:
            return any(bytes(f[-1]) == data for f in got if not isinstance(f[-1], shm.Incoming))

        assert await eventually(arrived, timeout=10.0), "the chunk after the malformed one never arrived"
        assert errors == [], "an exception escaped the data socket's reader"
        assert [len(f) for f in got] == [3]
    finally:
        loop.set_exception_handler(None)
        sock.close(linger=0)
        server.close()


async def test_the_worker_reads_one_file_per_loop_turn(tmp_path: Path) -> None:
    """Files queued on the data socket are read one per turn of the worker's loop: what is due
    (a heartbeat, another peer's message) runs between two reads, as between two drains of
    sealed chunks. (A drain read every file queued, its loop held for all of them.)"""
    directory = shm.Directory(str(tmp_path))
    session = Session("bob", envelope.ROLE_WORKER)
    loop = asyncio.get_running_loop()
    marks: list[str] = []

    def on_chunk(peer: bytes, frames: list[Any]) -> None:
        marks.append("file")
        loop.call_soon(marks.append, "turn")  # due as soon as the loop gets a turn
        session.receive_direct(peer, frames, 0.0)

    server = DirectPaths(on_chunk)
    server._shm = directory
    server.serve("tcp://127.0.0.1:9")
    channel, sock = await shared_path(server, directory, b"alice")
    try:
        data = os.urandom(3 * MIB)
        for n in range(3):
            name_tag = shm.tag(channel.token, channel.outgoing, n + 1)
            written = directory.write(name_tag, n + 1, memoryview(data)[n * MIB : (n + 1) * MIB])
            assert written is not None
            await sock.send_multipart(channel.seal(shm_chunk(b"rid-0001", written[1], len(data), n * MIB)))

        async def all_read() -> bool:
            return marks.count("file") == 3 and marks.count("turn") == 3

        assert await eventually(all_read, timeout=10.0), "the files were not all read"
        assert marks == ["file", "turn"] * 3, f"files read in one loop turn: {marks}"
        body = session._reassembly.complete(envelope.REQUEST, b"alice", b"rid-0001", [b"header", b""])
        assert bytes(body[1]) == data
        spent = [directory.spent_name(written[0], channel.token, channel.outgoing, n + 1) for n in range(3)]
        assert sorted(p.name.encode() for p in tmp_path.iterdir()) == sorted(spent), "not all handed back"
    finally:
        sock.close(linger=0)
        server.close()


# --- the files: every refusal typed, nothing left ----------------------------------------------
def written(directory: shm.Directory, counter: int, data: bytes) -> tuple[bytes, bytes]:
    out = directory.write(shm.tag(TOKEN, b"to worker", counter), counter, memoryview(data))
    assert out is not None
    return out


def deliver(directory: shm.Directory, descriptor: bytes, size: int, after: int = 0) -> Reassembly:
    """Take `descriptor` and add it as the one chunk of a stream of `size` bytes; raises what the reassembly raises."""
    reassembly = Reassembly()
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, size)
    reassembly.add(b"alice", b"rid-0001", info, directory.take(descriptor, TOKEN, b"to worker", after))
    return reassembly


def refused_at_once(reassembly: Reassembly, match: str) -> None:
    """The stream's message fails now with the reason (it is not left to time out)."""
    assert not reassembly.waiting(envelope.REQUEST, b"alice", b"rid-0001")
    with pytest.raises(ProtocolError, match=match):
        reassembly.complete(envelope.REQUEST, b"alice", b"rid-0001", [b"header", b""])


def test_each_bad_descriptor_is_a_typed_error_that_fails_its_stream(tmp_path: Path) -> None:
    directory = shm.Directory(str(tmp_path))
    data = os.urandom(64 * 1024)

    # a name not of the expected shape, or outside the directory
    name, descriptor = written(directory, 1, data)
    for bad in (descriptor[:24] + b"../" + name, descriptor[:24] + b"passwd", descriptor[:24] + name + b"x"):
        reassembly = Reassembly()
        info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, len(data))
        with pytest.raises(ProtocolError, match="not of this path"):
            reassembly.add(b"alice", b"rid-0001", info, directory.take(bad, TOKEN, b"to worker", 0))
        refused_at_once(reassembly, "not of this path")
    # the same file replayed (its counter is not above the last taken), or another direction's
    with pytest.raises(ProtocolError, match="not of this path"):
        deliver(directory, descriptor, len(data), after=1)
    with pytest.raises(ProtocolError, match="not of this path"):
        Reassembly().add(
            b"alice",
            b"r",
            envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, len(data)),
            directory.take(descriptor, TOKEN, b"to peer", 0),
        )
    assert (tmp_path / name.decode()).exists(), "a refused name was unlinked"
    os.unlink(tmp_path / name.decode())

    # a symlink where the file should be (to a file of the same size and inode's owner)
    name, descriptor = written(directory, 2, data)
    target = tmp_path / "elsewhere"
    os.rename(tmp_path / name.decode(), target)
    os.symlink(target, tmp_path / name.decode())
    with pytest.raises(ProtocolError, match="cannot be opened"):
        deliver(directory, descriptor, len(data))

    # the wrong size, announced or on disk
    name, descriptor = written(directory, 3, data)
    with pytest.raises(ProtocolError, match="size or the file"):
        deliver(directory, descriptor[:8] + (len(data) + 1).to_bytes(8, "big") + descriptor[16:], len(data) + 1)
    assert not (tmp_path / name.decode()).exists(), "a refused file was left behind"
    name, descriptor = written(directory, 4, data)
    os.truncate(tmp_path / name.decode(), len(data) - 1)
    with pytest.raises(ProtocolError, match="size or the file"):
        deliver(directory, descriptor, len(data))

    # another file put in its place (another inode), or none left
    name, descriptor = written(directory, 5, data)
    os.rename(tmp_path / name.decode(), tmp_path / "aside")  # kept: its inode is not reused
    (tmp_path / name.decode()).write_bytes(data)
    with pytest.raises(ProtocolError, match="size or the file"):
        deliver(directory, descriptor, len(data))
    os.unlink(tmp_path / "aside")
    name, descriptor = written(directory, 6, data)
    os.unlink(tmp_path / name.decode())
    reassembly = Reassembly()
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, len(data))
    with pytest.raises(ProtocolError, match="cannot be opened"):
        reassembly.add(b"alice", b"rid-0001", info, directory.take(descriptor, TOKEN, b"to worker", 0))
    refused_at_once(reassembly, "cannot be opened")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_a_file_over_a_stream_budget_or_over_bytes_received_is_not_read_and_is_unlinked(tmp_path: Path) -> None:
    """Per-peer budgets apply to shared memory as to chunks, and so does each byte's once."""
    directory = shm.Directory(str(tmp_path))
    data = os.urandom(MIB)
    _, descriptor = written(directory, 1, data)
    small = Reassembly(max_peer_bytes=MIB - 1)
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, MIB)
    with pytest.raises(ProtocolError, match="would exceed"):
        small.add(b"alice", b"rid-0001", info, directory.take(descriptor, TOKEN, b"to worker", 0))
    assert list(tmp_path.iterdir()) == [], "a refused file was left behind"

    reassembly = Reassembly()
    reassembly.add(b"alice", b"rid-0002", info, data[: MIB // 2])  # the first half came as a chunk
    _, descriptor = written(directory, 2, data)  # a file covering the whole buffer again
    with pytest.raises(ProtocolError, match="overlaps"):
        reassembly.add(b"alice", b"rid-0002", info, directory.take(descriptor, TOKEN, b"to worker", 1))
    assert list(tmp_path.iterdir()) == []


async def test_the_sender_unlinks_a_file_nobody_took(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "STREAM_TIMEOUT_S", 0.3)
    with _sharing(tmp_path) as (sender, channel):
        frames = _chunk(envelope.REQUEST)
        sealed, _ = sender._seal(channel, frames)
        assert sealed is not None and len(sealed[2]) < 4096, "the bytes were sealed, not written to a file"
        assert len(list(tmp_path.iterdir())) == 1

        async def gone() -> bool:
            return not list(tmp_path.iterdir())

        assert await eventually(gone, timeout=10.0), "the sender left its file behind"


async def test_files_nobody_takes_stop_at_a_budget_and_the_rest_goes_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client asks for large replies and never takes their files: what the node keeps in shared
    memory is bounded (`limits.DIRECT_SHM_MAX_PENDING_BYTES`); past it a chunk is refused whole
    (the link sends it as sealed 1 MiB chunks), and a file taken frees its part. (Unbounded, each
    reply left a file for `limits.STREAM_TIMEOUT_S`: /dev/shm, the host's memory, filled up.)"""
    monkeypatch.setattr(limits, "DIRECT_SHM_MAX_PENDING_BYTES", 5 * MIB)
    with _sharing(tmp_path) as (sender, channel):
        frames = _chunk(envelope.REPLY)
        files = [sender._seal(channel, frames)[1] for _ in range(4)]
        assert [bool(f) for f in files] == [True, True, False, False]
        assert len(list(tmp_path.iterdir())) == 2
        os.unlink(tmp_path / files[0].decode())  # the receiver took one
        assert sender._seal(channel, frames)[1], "a file taken did not free its part of the budget"
        assert len(list(tmp_path.iterdir())) == 2
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _sharing(tmp_path: Path) -> Iterator[tuple[DirectPaths, Any]]:
    """A sender's direct paths writing into `tmp_path`, and a channel whose peer shares it."""
    sender = DirectPaths(lambda peer, frames: None)
    sender._shm = shm.Directory(str(tmp_path))
    try:
        channel = _channel(*_keys(), connecting=True)
        channel.shared = True
        yield sender, channel
    finally:
        sender.close()


def _chunk(command: bytes) -> list[Any]:
    """A 2 MiB chunk of a request or reply, after its first 4 KiB."""
    info = envelope.CHUNK_INFO.pack(command, 1, 4096, 4096 + 2 * MIB)
    return envelope.build(envelope.CHUNK, b"bob", b"rid-0001", info, bytes(2 * MIB))


def _keys() -> tuple[bytes, bytes, bytes]:
    public, secret = zmq.curve_keypair()
    worker_public, _ = zmq.curve_keypair()
    return public, secret, worker_public


SENDER = """
import sys
from fedptr import shm
directory = shm.Directory(sys.argv[1])
assert directory.write(shm.tag(b"t" * 32, b"to worker", 1), 1, memoryview(bytes(1 << 20))) is not None
print("written", flush=True)
sys.stdin.read()
"""


def test_a_crashed_senders_files_are_swept(tmp_path: Path) -> None:
    """A real sender process writes a file and is killed before anyone takes it: the next
    sweep removes it. A live sender's file stays; one that sweeps saw unchanged for the stale age
    goes whoever made it (`test_a_wall_clock_step_sweeps_no_live_senders_file`)."""
    directory = shm.Directory(str(tmp_path))
    live = written(directory, 1, b"x")[0]  # ours: we are alive
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
        assert len(list(tmp_path.iterdir())) == 2
        assert directory.sweep() == 0, "a live sender's file was swept"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert directory.sweep() == 1
    assert [p.name.encode() for p in tmp_path.iterdir()] == [live]


def test_a_wall_clock_step_sweeps_no_live_senders_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep judged a file's age by its mtime against the wall clock: a clock stepped forward
    by more than `limits.DIRECT_SHM_STALE_S` (nemesis8's "Left", reasoned) made a live sender's
    file, not read yet, look stale, and it was unlinked (its transfer failed). Setting the file's
    mtime back stands for the step. The age is now what sweeps saw on the monotonic clock: a
    file stale once it stood unchanged (name, inode, mtime) through sweeps that long, whoever
    made it; a write (a warm path rewrites its files) makes it new again."""
    now = [1000.0]
    monkeypatch.setattr(shm.time, "monotonic", lambda: now[0])
    directory = shm.Directory(str(tmp_path))
    sender = shm.Directory(str(tmp_path))
    live, descriptor = written(sender, 1, b"x" * 64)
    stepped = time.time() - 10 * limits.DIRECT_SHM_STALE_S
    os.utime(tmp_path / live.decode(), (stepped, stepped))
    assert directory.sweep() == 0, "a live sender's file was swept after a wall-clock step"
    now[0] += limits.DIRECT_SHM_STALE_S / 2
    assert directory.sweep() == 0
    rewritten = sender.write(
        shm.tag(TOKEN, b"to worker", 2), 2, memoryview(b"y" * 64), *_spent(live, descriptor, tmp_path)
    )
    assert rewritten is not None
    now[0] += limits.DIRECT_SHM_STALE_S / 2 + 1
    assert directory.sweep() == 0, "a file written again was judged by its first sighting"
    now[0] += limits.DIRECT_SHM_STALE_S
    assert directory.sweep() == 1 and list(tmp_path.iterdir()) == []


def _spent(name: bytes, descriptor: bytes, where: Path) -> tuple[bytes, int]:
    """File `name` handed back as a receiver does (renamed to its spent name): what `write` takes
    to write it again."""
    spent = shm.Directory(str(where)).spent_name(name, TOKEN, b"to worker", 1)
    os.rename(where / name.decode(), where / spent.decode())
    return spent, shm.Directory.inode(descriptor)


@pytest.mark.parametrize("head", [MIB // 4, 3 * MIB // 4], ids=["most", "a small part"])
def test_a_file_after_a_chunk_completes_its_buffer_whole(tmp_path: Path, head: int) -> None:
    """A file holding the rest of a buffer is read into it at its offset, the bytes received
    before it kept; the sender's later writes to the file (through a descriptor it kept, as it
    rewrites a file handed back for its next chunk) do not reach the buffer: a mapping of the
    file, even a private one, would have shown them (it did, in the first version, for the
    pages not yet written)."""
    directory = shm.Directory(str(tmp_path))
    data = os.urandom(MIB)
    reassembly = Reassembly()
    reassembly.add(b"alice", b"rid-0001", envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, MIB), data[:head])
    out = directory.write(shm.tag(TOKEN, b"to worker", 1), 1, memoryview(data[head:]))
    assert out is not None
    kept = os.open(tmp_path / out[0].decode(), os.O_RDWR)  # the sender keeps a way to write
    try:
        info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, head, MIB)
        reassembly.add(b"alice", b"rid-0001", info, directory.take(out[1], TOKEN, b"to worker", 0))
        body = reassembly.complete(envelope.REQUEST, b"alice", b"rid-0001", [b"header", b""])
        os.pwrite(kept, bytes(MIB - head), 0)  # after the receiver took it
    finally:
        os.close(kept)
    assert bytes(body[1]) == data
    # handed back to its maker under the path's other name for it, nothing else left
    spent = directory.spent_name(out[0], TOKEN, b"to worker", 1)
    assert [p.name.encode() for p in tmp_path.iterdir()] == [spent]
    body[1][:4] = b"abcd"  # writable, as a received tensor must be


async def test_a_file_handed_back_is_written_again_for_its_own_path_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver hands a file it read back to its maker, which writes that path's next chunk
    into it (its pages already there); another path's chunk never goes into it (its receiver,
    which may have kept a descriptor, would read it), nor does a file of two links; one not
    written again within `limits.DIRECT_SHM_SPARE_S` is unlinked."""
    monkeypatch.setattr(limits, "DIRECT_SHM_SPARE_S", 0.2)
    with _sharing(tmp_path) as (sender, alice):
        bob = _channel(*_keys(), connecting=True)
        bob.shared = True
        frames = _chunk(envelope.REQUEST)

        def sent(channel: Any) -> tuple[bytes, int]:
            name = sender._seal(channel, frames)[1]
            assert name, "not written to a file"
            return name, os.stat(tmp_path / name.decode()).st_ino

        def hand_back(channel: Any, name: bytes, inode: int) -> None:  # as a receiver does once it read it
            counter = channel.files_sent
            descriptor = shm._DESCRIPTOR.pack(counter, 2 * MIB, inode) + name
            incoming = sender._shm.take(descriptor, channel.token, channel.outgoing, counter - 1)
            incoming.place(np.empty(4096 + 2 * MIB, dtype=np.uint8), 4096)
            assert not (tmp_path / name.decode()).exists(), "not handed back"

        name, inode = sent(alice)
        hand_back(alice, name, inode)
        assert sent(bob)[1] != inode, "another path's chunk went into a file alice's receiver read"
        again, rewritten = sent(alice)
        assert rewritten == inode and sender.files_rewritten == 1
        hand_back(alice, again, inode)
        os.link(tmp_path / sender._files[again].spent.decode(), tmp_path / "kept")  # a link kept to it
        third, fresh = sent(alice)
        assert fresh != inode and sender.files_rewritten == 1, "a file of two links was written"
        os.unlink(tmp_path / "kept")
        # handed back opened to every uid (the receiver's chmod): the next chunk goes into a new
        # file of 0600, not into one another uid can read (red9)
        hand_back(alice, third, fresh)
        os.chmod(tmp_path / sender._files[third].spent.decode(), 0o644)
        fourth, inode4 = sent(alice)
        assert inode4 != fresh and sender.files_rewritten == 1, "a file others can read was written"
        assert stat.S_IMODE(os.stat(tmp_path / fourth.decode()).st_mode) == 0o600
        hand_back(alice, fourth, inode4)
        sent(alice)  # rewritten: the receiver's hand-back keeps the mode (what was checked above)
        assert sender.files_rewritten == 2

        async def untaken_left() -> bool:  # bob's file and alice's last were never taken
            return len(list(tmp_path.iterdir())) == 2 and len(sender._files) == 2

        assert await eventually(untaken_left, timeout=10.0), "a file handed back was kept"


async def test_a_file_put_under_the_spent_name_leaves_no_file_of_ours_behind(tmp_path: Path) -> None:
    """The receiver, without reading the file sent, puts a file of its own under the name it
    would hand it back under (it knows the path's secret): the sender, taking that for a hand-back,
    made a fresh file for its next chunk and forgot the one never read, which then outlived its
    budget, its timeout and the path's close (red9)."""
    with _sharing(tmp_path) as (sender, alice):
        frames = _chunk(envelope.REQUEST)
        first = sender._seal(alice, frames)[1]
        (tmp_path / sender._files[first].spent.decode()).write_bytes(b"not the file sent")
        second = sender._seal(alice, frames)[1]
        assert second and sender.files_rewritten == 0
        assert first in sender._files, "a file never taken was forgotten (outside the budget and timeouts)"
    assert list(tmp_path.iterdir()) == [], "a file of ours outlived the path"


def test_a_peer_of_the_earlier_file_layout_gets_no_shared_memory(tmp_path: Path) -> None:
    """Files laid out as their whole buffer and unlinked once read (the layout before) are not
    what this one reads (its files start at offset 0, handed back once read): a probe offer of
    that layout (three words) finds no shared memory, so the two ends use sealed chunks rather
    than refuse each other's files."""
    directory = shm.Directory(str(tmp_path))
    probe = directory.probe()
    assert probe is not None
    assert directory.check_probe(probe[1])
    assert not directory.check_probe(b" ".join(probe[1].split(b" ")[:3])), "an earlier layout's offer was taken"
