"""Streaming of large buffers: splitting, reassembly, bounds, and an interrupted transfer at a real node."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

import fedptr
from fedptr import envelope, limits, wire
from fedptr.errors import ProtocolError
from fedptr.streams import Reassembly, split
from fedptr.tensors import from_raw, to_raw
from tests.test_robustness import raw_socket, recv, register


def put_message(t: torch.Tensor, rid: bytes = b"r" * 8) -> list[object]:
    return [envelope.REQUEST, b"bob", rid, *wire.encode(wire.Put(1, to_raw(t)))]


def test_split_and_reassemble_round_trip() -> None:
    t = torch.randn(300_000)  # 1.2 MB
    parts = split(put_message(t), threshold=100_000, chunk=64_000)
    chunks, message = parts[:-1], parts[-1]
    assert len(chunks) == -(-t.numel() * 4 // 64_000)
    assert all(c[0] == envelope.CHUNK for c in chunks) and message[4] == b""
    r = Reassembly()
    for c in chunks:
        r.add(b"alice", c[2], c[3], c[4])  # type: ignore[arg-type]
    assert r.pending_bytes == t.numel() * 4
    body = r.complete(envelope.REQUEST, b"alice", b"r" * 8, message[3:])
    decoded = wire.decode(body).message
    assert isinstance(decoded, wire.Put)
    assert torch.equal(from_raw(decoded.tensor), t)
    assert r.pending_bytes == 0 and len(r) == 0


@settings(max_examples=40, deadline=None)
@given(
    nbytes=st.integers(1, 3 << 20),
    chunk=st.integers(1 << 10, 1 << 20),
    first=st.integers(0, 1 << 16),
    reverse=st.booleans(),
)
def test_a_reassembled_buffer_starts_aligned(nbytes: int, chunk: int, first: int, reverse: bool) -> None:
    """Every reassembled buffer starts at a multiple of `limits.STREAM_BUFFER_ALIGN_BYTES`,
    whatever its size and chunks and their order, and holds the bytes sent: the kernel copies a
    shared-memory file into it ~3x slower when it does not (numpy's buffers start 16 bytes past a
    page)."""
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    message = [envelope.REQUEST, b"bob", b"r" * 8, b"header", memoryview(data)]
    parts = split(message, threshold=0, chunk=chunk, first=first)
    chunks = parts[:-1][::-1] if reverse else parts[:-1]
    r = Reassembly()
    for c in chunks:
        r.add(b"alice", c[2], c[3], c[4])
    body = r.complete(envelope.REQUEST, b"alice", b"r" * 8, parts[-1][3:])
    out = np.frombuffer(body[1], dtype=np.uint8)
    assert out.ctypes.data % limits.STREAM_BUFFER_ALIGN_BYTES == 0, hex(out.ctypes.data)
    assert np.array_equal(out, data)


def test_small_messages_are_not_split() -> None:
    message = put_message(torch.ones(10))
    assert split(message) == [message]


def test_incomplete_stream_is_refused() -> None:
    t = torch.randn(100_000)
    parts = split(put_message(t), threshold=1000, chunk=100_000)
    r = Reassembly()
    r.add(b"alice", parts[0][2], parts[0][3], parts[0][4])  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="incomplete"):
        r.complete(envelope.REQUEST, b"alice", b"r" * 8, parts[-1][3:])
    assert r.pending_bytes == 0


@pytest.mark.parametrize(
    "info",
    [
        b"short",
        envelope.CHUNK_INFO.pack(b"Z", 1, 0, 10),
        envelope.CHUNK_INFO.pack(envelope.REQUEST, 0, 0, 10),
        envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 8, 10),
        envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 1 << 62),
    ],
)
def test_bad_chunks_are_refused(info: bytes) -> None:
    with pytest.raises(ProtocolError):
        Reassembly().add(b"alice", b"r" * 8, info, b"x" * 4)


def test_stream_bytes_are_bounded_and_stale_streams_dropped() -> None:
    r = Reassembly(max_bytes=1000, timeout=0.05)
    r.add(b"a", b"1" * 8, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 800), b"x" * 10)
    with pytest.raises(ProtocolError, match="exceed"):
        r.add(b"a", b"2" * 8, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 800), b"x" * 10)
    time.sleep(0.06)
    r.purge()
    assert r.pending_bytes == 0 and len(r) == 0


async def test_interrupted_stream_leaves_node_serving(cluster: fedptr.Cluster, bob: fedptr.Worker) -> None:
    sock: zmq.asyncio.Socket = raw_socket(cluster)
    assert (await register(sock, b"quitter")).command == envelope.ACCEPTED
    t = torch.randn(2 << 20)  # 8 MiB: streamed
    parts = split(put_message(t, rid=envelope.request_id_bytes(7)))
    for part in parts[: len(parts) // 2]:  # half the chunks, then the message: the sender "died" mid-way
        await sock.send_multipart(envelope.framed(part), copy=False)
    await sock.send_multipart(envelope.framed(parts[-1]), copy=False)
    [reply] = envelope.parse(await recv(sock))
    assert reply.command == envelope.REPLY and reply.rid == envelope.request_id_bytes(7)
    failure = wire.decode(reply.body).message
    assert isinstance(failure, wire.Failure) and failure.code == "protocol"
    assert "incomplete" in failure.message
    sock.close()
    assert await bob.objects() == {}
    big = torch.randn(2 << 20)
    assert torch.equal(await (await bob.send(big)).get(), big)  # type: ignore[arg-type]


def test_chunk_info_layout() -> None:
    info = envelope.CHUNK_INFO.pack(envelope.REPLY, 3, 1 << 33, 1 << 34)
    assert len(info) == 21
    assert envelope.CHUNK_INFO.unpack(info) == (envelope.REPLY, 3, 1 << 33, 1 << 34)
