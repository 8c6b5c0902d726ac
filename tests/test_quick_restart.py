"""A node killed (no goodbye) and restarted at once, before the broker missed its beats: the new
incarnation reclaims the name, and the broker tells the peers that had requests at the old one
(LostWorkerError at once, not their deadline). In-process, on tests/nemesis.py's kill."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import fedptr

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
