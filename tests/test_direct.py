"""The direct data path (fedptr/direct.py): chunks of large buffers peer to peer, CURVE on.

The session's holding of a message until its chunks are in is tested sans-IO; the path itself on a
real CURVE cluster (broker and node processes): transfers take it, a key the worker did not admit
through the broker is refused at the handshake, and a path that breaks falls back to the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

import fedptr
from fedptr import envelope, wire
from fedptr.direct import DirectPaths
from fedptr.session import Incoming, Send, Session
from fedptr.streams import Reassembly, split
from fedptr.tensors import from_raw, to_raw
from tests.conftest import eventually

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
MIB = 1 << 20


# --- the receiving session, sans-IO ----------------------------------------------------------
def streamed_put(obj_id: int, t: torch.Tensor, rid: bytes) -> list[list[Any]]:
    return split([envelope.REQUEST, b"bob", rid, *wire.encode(wire.Put(obj_id, to_raw(t)))], 100_000, 64_000)


def delivered(message: list[Any], source: bytes = b"alice") -> list[Any]:
    """`message` as the broker hands it over: the name swapped for the source's."""
    return envelope.framed([message[0], source, *message[2:]])


def test_a_message_waits_for_its_direct_chunks_and_keeps_its_senders_order() -> None:
    bob = Session("bob", envelope.ROLE_WORKER, direct_sources={b"alice"})
    t = torch.randn(100_000)
    first, *rest, put = streamed_put(1, t, b"1" * 8)
    later = [envelope.REQUEST, b"bob", b"2" * 8, *wire.encode(wire.Get(1))]
    # through the broker, in order: the first chunk, the message, then a later request
    assert bob.receive(delivered(first), 0.0) == []
    assert bob.receive(delivered(put), 0.0) == []  # held: its chunks are still coming
    assert bob.receive(delivered(later), 0.0) == []  # held behind it, never overtaking it
    events = []
    for chunk in rest:  # the direct path: the envelope's name is not read, the path's peer is
        events += bob.receive_direct(b"alice", envelope.framed([chunk[0], b"mallory", *chunk[2:]]), 0.0)
    assert [type(e) for e in events] == [Incoming, Incoming]
    assert [e.rid for e in events if isinstance(e, Incoming)] == [b"1" * 8, b"2" * 8]
    put_message = events[0].request.message  # type: ignore[union-attr]
    assert isinstance(put_message, wire.Put) and torch.equal(from_raw(put_message.tensor), t)
    assert bob.receive(delivered(later), 0.0) != []  # nothing held any more: straight through


def test_chunks_that_never_come_fail_their_message_typed_and_free_the_ones_behind_it() -> None:
    bob = Session("bob", envelope.ROLE_WORKER, direct_sources={b"alice"}, _reassembly=Reassembly(timeout=0.01))
    first, *_lost, put = streamed_put(1, torch.randn(100_000), b"1" * 8)
    later = [envelope.REQUEST, b"bob", b"2" * 8, *wire.encode(wire.Get(1))]
    for message in (first, put, later):
        assert bob.receive(delivered(message), 0.0) == []
    time.sleep(0.02)  # the stream's own timeout, in monotonic time (Reassembly's clock)
    events = bob.tick(1.0)
    [answer] = [e for e in events if isinstance(e, Send)]
    assert answer.message[0] == envelope.REPLY and answer.message[2] == b"1" * 8
    failure = wire.decode(answer.message[3:]).message
    assert isinstance(failure, wire.Failure) and "stopped arriving" in failure.message
    assert [e.rid for e in events if isinstance(e, Incoming)] == [b"2" * 8]


def test_only_chunks_travel_the_direct_path() -> None:
    bob = Session("bob", envelope.ROLE_WORKER)
    request = [envelope.REQUEST, b"bob", b"1" * 8, *wire.encode(wire.Get(1))]
    with pytest.raises(fedptr.ProtocolError, match="only chunks"):
        bob.receive_direct(b"alice", envelope.framed(request), 0.0)


# --- the path, on a CURVE cluster ------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(["bob", "alice"], curve=True) as c:
        yield c


def paths(cluster: fedptr.Cluster) -> DirectPaths:
    direct = cluster.client._link.direct
    assert direct is not None, "a CURVE client has direct paths"
    return direct


async def path_to(cluster: fedptr.Cluster, worker: str) -> None:
    """Make a transfer open a path to `worker`, and wait (within a deadline) until it is up."""
    await (await cluster.client.worker(worker).send(torch.zeros(2 * MIB))).get()
    direct = paths(cluster)

    async def up() -> bool:
        lane = direct._lanes.get(worker.encode())
        return lane is not None and lane.ready

    assert await eventually(up, timeout=15.0), "no direct path opened"


@MODULE_LOOP
async def test_send_get_and_move_take_the_direct_path(secure: fedptr.Cluster) -> None:
    await path_to(secure, "bob")
    direct = paths(secure)
    sent, received = direct.bytes_sent, direct.bytes_received
    t = torch.randn(4 * MIB)  # 16 MiB: streamed
    p = await secure.client.worker("bob").send(t)
    assert direct.bytes_sent - sent >= 15 * MIB  # all but the first 1 MiB chunk
    q = await p.move("alice")  # bob -> alice: bob's own path to alice
    back = await q.get()
    r = await secure.client.worker("bob").send(t)
    assert torch.equal(await r.get(), t) and torch.equal(back, t)
    assert direct.bytes_received - received >= 15 * MIB  # bob's reply chunks


async def handshake(endpoint: str, server_key: bytes, public: bytes, secret: bytes) -> int:
    """Connect to a worker's data socket with this key pair; the first handshake outcome."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_key
    failed = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | failed)
    sock.connect(endpoint)
    try:
        async with asyncio.timeout(15):
            return int((await recv_monitor_message(monitor))["event"])  # type: ignore[misc]
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)


@MODULE_LOOP
async def test_a_key_not_offered_through_the_broker_is_refused(secure: fedptr.Cluster) -> None:
    public, secret = zmq.curve_keypair()
    ticket = await secure.client._link.request("bob", wire.DirectOffer(public), 10)
    assert isinstance(ticket, wire.DirectTicket) and ticket.endpoint.startswith("tcp://")
    other_public, other_secret = zmq.curve_keypair()
    refused = await handshake(ticket.endpoint, ticket.key, other_public, other_secret)
    assert refused == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    # the offered key gets in: the refusal above was for the key, not for the connection
    assert await handshake(ticket.endpoint, ticket.key, public, secret) == zmq.EVENT_HANDSHAKE_SUCCEEDED


@MODULE_LOOP
async def test_a_broken_direct_path_falls_back_to_the_broker(secure: fedptr.Cluster) -> None:
    await path_to(secure, "alice")
    direct = paths(secure)
    lane = direct._lanes[b"alice"]
    lane.sock.disconnect(lane.sock.getsockopt_string(zmq.LAST_ENDPOINT))  # the path breaks
    sent = direct.bytes_sent
    t = torch.randn(4 * MIB)
    p = await secure.client.worker("alice").send(t)  # IMMEDIATE: the socket takes no chunk
    assert direct.bytes_sent == sent and b"alice" not in direct._lanes
    assert torch.equal(await p.get(), t)
