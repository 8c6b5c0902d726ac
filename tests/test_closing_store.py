"""A `--store` node's changes after its store closed (review14).

A node closes its write-ahead while its link still delivers (`nodes/serving.py`: the store
closes inside ``async with link``): a client whose session ends then has its objects reclaimed,
and the removals are queued on a closed write-ahead. Such a change is not written, so a restart
finds the store as it was at the close, as after a crash there; the node says so, and leaves no
failed future for the garbage collector to report ("Future exception was never retrieved ...
the store is closed", seen at the end of in-process clusters).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest
import torch

from fedptr import wire

from . import harness
from .conftest import eventually


@pytest.mark.asyncio
async def test_a_client_leaving_while_its_node_closes_leaves_no_unretrieved_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    try:
        async with harness.cluster(["alice"], stores=["alice"]) as c:
            sent = await c.worker("alice").send(torch.arange(3.0))
            node = c.node("alice")
            owner = node.store.entries[sent.id_at_location].owner
            close = node.store.aclose

            async def close_then_the_client_leaves() -> None:
                await close()
                node.objects.reclaim(owner)  # the client's session ended while the node closed

            node.store.aclose = close_then_the_client_leaves
            with caplog.at_level(logging.WARNING, logger="fedptr.node"):
                await c.stop_node("alice")
                assert await eventually(_reclaimed(node))
                gc.collect()
            assert sent.id_at_location not in node.store.entries  # reclaimed in memory
            assert "not written" in caplog.text
            await c.start_node("alice")
            # the removal was not written: the acknowledged object is back, as after a crash
            back = await c.client.call("alice", wire.Get(sent.id_at_location))
            assert isinstance(back, wire.TensorReply)
    finally:
        loop.set_exception_handler(previous)
    assert not [m for m in reported if "never retrieved" in m], reported


def _reclaimed(node: Any) -> Any:
    async def done() -> bool:
        return not node.objects._departed

    return done
