"""What a node keeps per client comes back to its start after a stream of departures: a few
hundred clients each send, pipeline operations they never await, start a stream they never end
and a stream the node refuses, and leave. Counted as records (the node's and its session's
per-client tables), not as RSS: a record that outlives its client is a leak whatever the heap
does. On the in-process harness (the real broker, node and client code)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fedptr.nodes.node import Node

import fedptr
from fedptr import envelope
from tests.conftest import eventually

from . import harness

DEPARTURES = 200
PARALLEL = 10
OPS = 20
PEER_STREAM_BYTES = 16 << 20
"""The node's per-peer stream budget in this test (bytes): a departing client's unfinished
stream fits it, and its second stream, announced as large again, is refused."""
SETTLE_S = 10.0
"""Longest wait (s) for the node's per-client records to come back once the last client left;
a departed client's streams would otherwise stay `limits.STREAM_TIMEOUT_S` (60 s)."""


def per_client_records(node: Node) -> dict[str, int]:
    """The node's records that belong to one client or another (each empty when no client is
    connected and none left anything behind), and the stream bytes they hold."""
    session = node.link.session
    streams = session._reassembly
    return {
        "objects": len(node.store.entries),
        "accounts": len(node.store.accounts),
        "cached replies": len(node.replies),
        "running requests": node.replies.running,
        "plans": len(node.plans._by_peer),
        "ordered queues": len(node._ordered),
        "partial streams": len(streams),
        "partial stream bytes": streams.pending_bytes,
        "refused streams": streams.refused,
        "held messages": len(session._held),
    }


def _chunk(client: fedptr.Client, total: int) -> None:
    """Start a stream to bob of a `total`-byte buffer with its first byte (its message never follows)."""
    rid = client.link.session.next_request_id()
    info = envelope.CHUNK_INFO.pack(envelope.REQUEST, 1, 0, total)
    client.link._push_frames(envelope.framed([envelope.CHUNK, b"bob", rid, info, b"x"]))
    client.link.session._next_rid()  # that id is the stream's: the client's next request takes another


async def _depart(cluster: harness.InprocCluster) -> dict[str, int]:
    """One client's visit; returns the node's records just before it left."""
    async with cluster.connect() as client:
        x = client.worker("bob").send(torch.ones(1000))
        pending = [x + float(i) for i in range(OPS)]
        await x
        _chunk(client, PEER_STREAM_BYTES // 2)  # held by the node until its message ends
        _chunk(client, PEER_STREAM_BYTES)  # over this client's budget: refused, its reason kept
        await client.worker("bob").objects()  # both chunks are in (bob answers in order)
        del pending  # left unawaited: the session's end reclaims what they made
        return per_client_records(cluster.node("bob"))


@pytest.mark.slow  # hundreds of sessions: 7-20 s
async def test_a_nodes_per_client_records_come_back_after_hundreds_of_departures() -> None:
    async with harness.cluster(["bob"], call_timeout=60.0) as c:
        node = c.node("bob")
        node.link.session._reassembly.max_peer_bytes = PEER_STREAM_BYTES
        await c.worker("bob").objects()
        start = per_client_records(node)
        seen = start
        for _ in range(0, DEPARTURES, PARALLEL):
            for records in await asyncio.gather(*(_depart(c) for _ in range(PARALLEL))):
                seen = {k: max(v, records[k]) for k, v in seen.items()}
        # the clients did fill each table while they were there
        assert all(seen[k] > start[k] for k in ("objects", "accounts", "partial streams", "refused streams")), seen

        async def back() -> bool:
            return per_client_records(node) == start

        assert await eventually(back, timeout=SETTLE_S), (
            f"after {DEPARTURES} departures the node kept {per_client_records(node)}, it started with {start}"
        )
