"""A peer back under its name on a new connection before the broker missed its beats: a node
killed (no goodbye, tests/nemesis.py) and restarted at once reclaims its name, and the broker
tells the peers that had requests at the old one (LostWorkerError at once, not at their
deadline); a client back that way keeps its objects (its session did not end)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import zmq
import zmq.asyncio

import fedptr
from fedptr import envelope, wire
from fedptr.tensors import to_raw

from . import harness
from .nemesis import Death

CALL_TIMEOUT_S = 10.0


@pytest.mark.asyncio
async def test_a_request_at_a_killed_node_restarted_at_once_fails_as_lost_not_at_its_deadline() -> None:
    async with harness.cluster(["alice"], stores=["alice"], heartbeat_s=0.1, call_timeout=CALL_TIMEOUT_S) as c:
        death = Death(message=1)  # alice dies just before she replies
        death.watch(c.node("alice"))
        started = time.monotonic()
        p = c.worker("alice").send(torch.ones(4))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            while not death.dead:
                await asyncio.sleep(fedptr.limits.POLL_INTERVAL_S)
        death.kill()
        await c.restart_node("alice")  # registers at once: the old connection is gone
        with pytest.raises(fedptr.LostWorkerError):
            await p
        assert time.monotonic() - started < CALL_TIMEOUT_S / 2
        # the send was durable before the reply: the new incarnation holds it
        assert p.id_at_location in await c.worker("alice").objects()


async def _answer(sock: zmq.asyncio.Socket, *commands: bytes) -> list[bytes]:
    """The next message of one of `commands` that `sock` receives (beats and notices skipped)."""
    async with asyncio.timeout(CALL_TIMEOUT_S):
        while True:
            frames = await sock.recv_multipart()
            if envelope.command_of(frames) in commands:
                return frames


async def _registered(ctx: zmq.asyncio.Context, address: str, name: bytes) -> zmq.asyncio.Socket:
    """A raw client connection registered as `name`; a name still taken (the broker has not yet
    seen the old connection go) is asked for again, as the link does."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    register = envelope.build(envelope.REGISTER, name, envelope.request_id_bytes(1), envelope.ROLE_CLIENT)
    async with asyncio.timeout(CALL_TIMEOUT_S):
        while True:
            await sock.send_multipart(register)
            answer = await _answer(sock, envelope.ACCEPTED, envelope.BROKER_ERROR)
            if envelope.command_of(answer) == envelope.ACCEPTED:
                return sock
            await asyncio.sleep(fedptr.limits.POLL_INTERVAL_S)


@pytest.mark.asyncio
async def test_a_client_back_under_its_name_on_a_new_connection_keeps_its_objects() -> None:
    # the broker forgets the old connection when the name is reclaimed: as gone silent, so that
    # the workers keep that client's objects (they reclaim them when its session ends)
    async with harness.cluster(["bob"], transport="ipc", heartbeat_s=0.1) as c:
        ctx = zmq.asyncio.Context()
        try:
            old = await _registered(ctx, c.address, b"comeback")
            put = wire.encode(wire.Put(42, to_raw(torch.ones(3))), int(CALL_TIMEOUT_S * 1000))
            await old.send_multipart(envelope.build(envelope.REQUEST, b"bob", envelope.request_id_bytes(2), *put))
            await _answer(old, envelope.REPLY)
            assert 42 in c.node("bob").store.entries
            old.close(linger=0)  # its connection is gone, within a beat: no silence verdict yet
            new = await _registered(ctx, c.address, b"comeback")
            await asyncio.sleep(3 * c.heartbeat_s)  # a LOST notice would have reached bob by now
            assert 42 in c.node("bob").store.entries
            new.close(linger=0)
        finally:
            ctx.destroy(linger=0)
