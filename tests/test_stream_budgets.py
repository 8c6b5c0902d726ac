"""Per-peer stream budgets (issue 19, cause 7): a peer announcing huge buffers in a few chunk
headers uses up its own reassembly budget, not everyone's, hears why, and costs nobody else a
message. The reassembly and the session are the real code, driven without sockets."""

from __future__ import annotations

import pytest
import torch

from fedptr import envelope, wire
from fedptr.errors import ProtocolError
from fedptr.session import Incoming, Send, Session
from fedptr.streams import Reassembly, split
from fedptr.tensors import to_raw

RID = b"r" * 8


def _announce(r: Reassembly, source: bytes, rid: bytes, total: int) -> None:
    """One byte of a stream announcing a `total`-byte buffer (what the attack costs: a header)."""
    r.add(source, rid, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, total), b"x")


def test_a_peer_announcing_huge_buffers_exhausts_only_its_own_budget() -> None:
    r = Reassembly(max_bytes=10_000, max_peer_bytes=4_000)
    for i in range(4):
        _announce(r, b"mallory", bytes([i]) * 8, 1_000)
    for i in range(4, 10):  # as much again as the shared budget holds: refused to mallory alone
        with pytest.raises(ProtocolError, match="mallory"):
            _announce(r, b"mallory", bytes([i]) * 8, 1_000)
    _announce(r, b"alice", RID, 4_000)  # the shared budget has room for alice still
    assert r.pending_bytes == 8_000
    # mallory's refused message is answered with the reason, not as a torn stream
    with pytest.raises(ProtocolError, match=r"refused.*mallory"):
        r.complete(envelope.REQUEST, b"mallory", bytes([9]) * 8, [b"header", b""])
    for i in range(4):  # its streams that ended free its budget
        r.drop((envelope.REQUEST, b"mallory", bytes([i]) * 8))
    _announce(r, b"mallory", b"z" * 8, 1_000)


def test_a_refused_chunk_costs_the_other_messages_of_its_batch_nothing() -> None:
    bob = Session("bob", envelope.ROLE_WORKER)
    bob._reassembly = Reassembly(max_peer_bytes=1_000)
    refused = [envelope.CHUNK, b"mallory", RID, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 2_000), b"x"]
    put = [envelope.REQUEST, b"alice", RID, *wire.encode(wire.Put(1, to_raw(torch.ones(4))))]
    events = bob.receive(envelope.pack_batch([refused, put]), 0.0)
    assert [e.source for e in events if isinstance(e, Incoming)] == ["alice"]


def test_a_stream_within_the_budget_still_arrives_whole() -> None:
    r = Reassembly(max_bytes=1 << 20, max_peer_bytes=1 << 20)
    t = torch.arange(100_000, dtype=torch.float32)
    parts = split([envelope.REQUEST, b"bob", RID, *wire.encode(wire.Put(1, to_raw(t)))], threshold=1_000, chunk=64_000)
    for c in parts[:-1]:
        r.add(b"alice", c[2], c[3], c[4])
    body = r.complete(envelope.REQUEST, b"alice", RID, parts[-1][3:])
    put = wire.decode(body).message
    assert isinstance(put, wire.Put) and bytes(put.tensor.data) == t.numpy().tobytes()
    assert r.pending_bytes == 0


def test_the_reason_reaches_the_peer_as_a_failure_of_its_request() -> None:
    bob = Session("bob", envelope.ROLE_WORKER)
    bob._reassembly = Reassembly(max_peer_bytes=1_000)
    chunk = [envelope.CHUNK, b"mallory", RID, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 2_000), b"x"]
    bob.receive(envelope.framed(chunk), 0.0)
    ended = [envelope.REQUEST, b"mallory", RID, *wire.encode(wire.Put(1, to_raw(torch.ones(4))))]
    [answer] = [e for e in bob.receive(envelope.framed(ended), 0.0) if isinstance(e, Send)]
    failure = wire.decode(answer.message[3:]).message
    assert isinstance(failure, wire.Failure) and "would exceed its 1000 bytes" in failure.message
