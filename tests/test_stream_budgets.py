"""Per-peer stream budgets (issue 19, cause 7): a peer announcing huge buffers in a few chunk
headers uses up its own reassembly budget, not everyone's, hears why, and costs nobody else a
message. The reassembly and the session are the real code, driven without sockets."""

from __future__ import annotations

import pytest
import torch

from fedptr import envelope, limits, wire
from fedptr.errors import ProtocolError
from fedptr.session import Incoming, Send, Session, SessionEnded
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


def test_achunk_costs_the_other_messages_of_its_batch_nothing() -> None:
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


def test_a_peer_flooding_refused_streams_is_remembered_within_its_own_bound() -> None:
    """Each refused stream is remembered (its reason, for its message) until its message ends or
    `STREAM_TIMEOUT_S`: a peer that starts refused streams by the thousand, never ending them,
    must cost a bounded number of records, and only its own oldest are forgotten. alice's
    refused stream keeps its reason, and her next streamed message arrives whole meanwhile."""
    bob = Session("bob", envelope.ROLE_WORKER)
    bob._reassembly = r = Reassembly(max_peer_bytes=1_000)
    alice_refused = [envelope.CHUNK, b"alice", b"a" * 8, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, 2_000), b"x"]
    bob.receive(envelope.framed(alice_refused), 0.0)
    flood = 4 * limits.STREAM_MAX_REFUSED_PER_PEER
    for i in range(flood):  # one header each, a new request id each: all refused for mallory's budget
        chunk = [envelope.CHUNK, b"mallory", (i + 1).to_bytes(8, "big"), alice_refused[3], b"x"]
        bob.receive(envelope.framed(chunk), 0.0)
    assert r.refused <= limits.STREAM_MAX_REFUSED_PER_PEER + 1, r.refused  # mallory's bound, and alice's one
    # alice's refused message is still answered with its reason, not let through with an empty frame
    ended = [envelope.REQUEST, b"alice", b"a" * 8, *wire.encode(wire.Put(1, to_raw(torch.ones(4))))]
    [answer] = [e for e in bob.receive(envelope.framed(ended), 0.0) if isinstance(e, Send)]
    failure = wire.decode(answer.message[3:]).message
    assert isinstance(failure, wire.Failure) and "would exceed its 1000 bytes" in failure.message
    # and her next message, streamed within her budget, arrives whole
    t = torch.arange(200, dtype=torch.float32)
    parts = split([envelope.REQUEST, b"bob", RID, *wire.encode(wire.Put(2, to_raw(t)))], threshold=100, chunk=300)
    events = [e for p in parts for e in bob.receive(envelope.framed([p[0], b"alice", *p[2:]]), 0.0)]
    [incoming] = [e for e in events if isinstance(e, Incoming)]
    put = incoming.request.message
    assert isinstance(put, wire.Put) and bytes(put.tensor.data) == t.numpy().tobytes()
    # mallory's latest refusals still carry their reason; its oldest, forgotten, still fail (the
    # empty frame where the buffer was is no tensor) rather than pass
    for i, why in ((flood - 1, "would exceed its 1000 bytes"), (0, "tensor buffer holds 0 bytes")):
        message = [envelope.REQUEST, b"bob", (i + 1).to_bytes(8, "big"), *wire.encode(wire.Put(3, to_raw(t)))]
        mallory_ended = [envelope.REQUEST, b"mallory", *split(message, threshold=100)[-1][2:]]
        [answer] = bob.receive(envelope.framed(mallory_ended), 0.0)
        assert isinstance(answer, Send)
        failure = wire.decode(answer.message[3:]).message
        assert isinstance(failure, wire.Failure) and why in failure.message, failure


def test_a_departed_clients_streams_and_refusals_are_dropped_with_its_session() -> None:
    """A client that left mid-stream never ends its streams: the receiver drops their buffers
    and refusals when the broker says its session ended, not `STREAM_TIMEOUT_S` later."""
    bob = Session("bob", envelope.ROLE_WORKER)
    bob._reassembly = r = Reassembly(max_peer_bytes=10_000)
    for rid, total in ((b"a" * 8, 5_000), (b"b" * 8, 50_000)):  # one in progress, one refused
        bob.receive(
            envelope.framed(
                [envelope.CHUNK, b"alice", rid, envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, total), b"x"]
            ),
            0.0,
        )
    assert (r.pending_bytes, r.refused) == (5_000, 1)
    lost = envelope.message(
        envelope.LOST, b"alice", envelope.NO_REPLY, [envelope.ROLE_CLIENT, envelope.GONE_DISCONNECTED]
    )
    assert any(isinstance(e, SessionEnded) for e in bob.receive(envelope.framed(lost), 0.0))
    assert (r.pending_bytes, r.refused, len(r)) == (0, 0, 0)
