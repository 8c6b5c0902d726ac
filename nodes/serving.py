"""A node connected and serving: the one construction the node's command line and the tests'
in-process harness (tests/harness.py) share, so both run the same wiring."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from fedptr import envelope, limits
from fedptr.link import Link
from fedptr.security import CurveKeys

from .node import Node, NodeConfig


@asynccontextmanager
async def running(
    name: str,
    broker: str,
    config: NodeConfig,
    *,
    heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S,
    liveness: int = limits.HEARTBEAT_LIVENESS,
    connect_timeout: float = limits.CONNECT_TIMEOUT_S,
    curve: CurveKeys | None = None,
    before_register: Iterable[Callable[[Node], None]] = (),
) -> AsyncIterator[Node]:
    """Node `name` registered at `broker` and serving until the block ends, then closed (its
    pool stopped, its write-ahead on disk). Each of `before_register` in turn sees the node
    before it has a name at the broker (the command line starts its metrics endpoint, then
    settles its heap). Raises FedptrError when the broker is unreachable or refuses the name."""
    link = Link(
        broker,
        name,
        envelope.ROLE_WORKER,
        heartbeat_s=heartbeat_s,
        liveness=liveness,
        connect_timeout=connect_timeout,
        curve=curve,
    )
    node = Node(name, link, config)
    # wired before registering: a request may arrive in the same read as the acceptance
    link.handler = node.handle
    link.run_handler = node.handle_ops
    link.on_session_ended = node.objects.reclaim
    for prepare in before_register:
        prepare(node)
    async with link:
        node.start()
        try:
            yield node
        finally:
            await node.aclose()
