"""An in-process cluster: the real broker (broker/router.py), real nodes (nodes/serving.py,
which the node's command line runs too) and a real client, in this process and on this asyncio
loop, over ``zmq inproc://``. Every socket comes from ``zmq.Context.instance()``, which is what
inproc needs: the same code as the processes, started in milliseconds. Over ``tcp://`` (loopback)
the peers open direct data paths to each other (fedptr/direct.py), with shared memory.

It lives under tests/ because the library must never import the broker or the node
(tests/test_imports.py). What only processes show stays with `fedptr.local_cluster`: kill -9,
SIGSTOP, namespaces, the command line, CURVE.

    async with harness.cluster(["bob", "alice"], configs={"bob": NodeConfig(epsilon=10)}) as c:
        x = await c.worker("bob").send(torch.ones(3))
        c.node("bob").store          # white-box checks
        await c.restart_node("bob")  # a new Node on the same store directory
        await c.restart_broker()     # a new broker on the same endpoint
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fedptr.broker.router import Broker, BrokerConfig
from fedptr.nodes.node import Node, NodeConfig
from fedptr.nodes.serving import running

import fedptr

STOP_TIMEOUT_S = 10.0
"""Seconds a node or the broker may take to stop (a node writes its queued changes to disk)."""

NODE: ContextVar[str | None] = ContextVar("harness_node", default=None)
"""The name of the node whose code runs (None: the client's or the test's). Set in each node's
serving task, so its callbacks and the tasks it spawns carry it: a test hook can tell the nodes
apart (tests/test_sensitivity.py seeds each node's random draws by its name)."""

_endpoints = itertools.count()
"""inproc names are per context, and the context is the process's: each cluster takes its own."""

Arrays = Mapping[str, torch.Tensor | np.ndarray[Any, Any]]


@dataclass
class _Served:
    """A task that serves until `stop` is set, and how it is stopped."""

    task: asyncio.Task[None]
    stop: asyncio.Event

    async def end(self) -> None:
        self.stop.set()
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await self.task


@dataclass
class InprocCluster:
    """A broker, nodes and a client on this loop. `configs` holds each node's `NodeConfig`
    (what its command-line flags would set); a restarted node gets the same one."""

    address: str
    configs: dict[str, NodeConfig]
    heartbeat_s: float
    liveness: int
    call_timeout: float
    broker: Broker | None = None
    _client: fedptr.Client | None = field(default=None, repr=False)
    nodes: dict[str, Node] = field(default_factory=dict)
    _broker_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _served: dict[str, _Served] = field(default_factory=dict, repr=False)

    @property
    def client(self) -> fedptr.Client:
        """The cluster's own client, connected."""
        assert self._client is not None, "the cluster is starting"
        return self._client

    def worker(self, name: str) -> fedptr.Worker:
        return self.client.worker(name)

    def node(self, name: str) -> Node:
        """The running `Node` object of worker `name`, for white-box checks."""
        return self.nodes[name]

    def connect(self, **options: Any) -> AbstractAsyncContextManager[fedptr.Client]:
        """Another client of this cluster; `options` are `fedptr.connect`'s."""
        options = {"timeout": self.call_timeout, "heartbeat_s": self.heartbeat_s, "liveness": self.liveness} | options
        return fedptr.connect(self.address, **options)

    def client_keys(self, index: int = 0) -> None:
        """No CURVE in-process (as `fedptr.Cluster.client_keys` with ``curve=False``): a raw
        socket on this cluster connects without keys."""
        return None

    # --- the broker ----------------------------------------------------------------------
    def start_broker(self) -> None:
        """A new broker on the cluster's endpoint: it knows no one, and every peer registers
        again within its heartbeat liveness, as after a broker process restarts."""
        assert self.broker is None, "the broker runs"
        config = BrokerConfig(bind=self.address, heartbeat_s=self.heartbeat_s, liveness=self.liveness)
        self.broker = Broker(config)
        self._broker_task = asyncio.create_task(self.broker.serve_async(), name="broker")

    async def stop_broker(self) -> None:
        """Stop routing and close the broker's socket (its peers hear nothing more)."""
        broker, task = self.broker, self._broker_task
        assert broker is not None and task is not None, "the broker is not running"
        self.broker = self._broker_task = None
        broker.stop()
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await task
        finally:
            broker.close()

    async def restart_broker(self) -> None:
        """Stop the broker and start a new one. Needs ``transport="ipc"`` or ``"tcp"``: an inproc
        connection is never made again once its bound end closes (zmq reconnects ipc and tcp)."""
        assert not self.address.startswith("inproc://"), 'a broker restart needs harness.cluster(..., transport="ipc")'
        await self.stop_broker()
        self.start_broker()
        await self.all_registered()

    async def all_registered(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait until the broker knows every running node and the cluster's client (after a
        restart each registers again within its heartbeat liveness)."""
        names = {n.encode() for n in self._served} | {self.client.name.encode()}
        async with asyncio.timeout(timeout):
            while self.broker is None or not names <= self.broker.table.by_name.keys():
                await asyncio.sleep(fedptr.limits.POLL_INTERVAL_S)

    # --- nodes -----------------------------------------------------------------------------
    async def start_node(self, name: str) -> Node:
        """Start worker `name` with its config (a store directory included: a restart restores
        it); returns once it registered."""
        assert name not in self._served, f"{name} runs"
        ready: asyncio.Future[Node] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def serve() -> None:
            NODE.set(name)
            try:
                async with running(
                    name,
                    self.address,
                    self.configs[name],
                    heartbeat_s=self.heartbeat_s,
                    liveness=self.liveness,
                    connect_timeout=self.call_timeout,
                ) as node:
                    ready.set_result(node)
                    await stop.wait()
            except BaseException as e:
                if not ready.done():
                    ready.set_exception(e)
                raise

        served = _Served(asyncio.create_task(serve(), name=f"node {name}"), stop)
        try:
            node = await ready
        except BaseException:
            await asyncio.gather(served.task, return_exceptions=True)
            raise
        self._served[name] = served
        self.nodes[name] = node
        return node

    async def stop_node(self, name: str) -> None:
        """Stop worker `name` as SIGTERM does: it says goodbye, and what it queued reaches disk."""
        served = self._served.pop(name)
        self.nodes.pop(name, None)
        await served.end()

    async def restart_node(self, name: str) -> Node:
        """A new `Node` for `name` on the same config and store directory."""
        await self.stop_node(name)
        return await self.start_node(name)

    async def _stop_all(self) -> None:
        for name in list(self._served):
            await self.stop_node(name)
        if self.broker is not None:
            await self.stop_broker()


def _with_data(config: NodeConfig, arrays: Mapping[str, Arrays | str | Path], where: Path) -> NodeConfig:
    """`config` loading `arrays` (tag -> an .npz path, or arrays written to one here) as private data."""
    files = dict(config.data)
    for tag, value in arrays.items():
        if isinstance(value, str | Path):
            files[tag] = str(value)
            continue
        path = where / f"{tag}.npz"
        np.savez(path, **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        files[tag] = str(path)
    return replace(config, data=files)


def _free_port() -> int:
    """A loopback port free now (the broker binds it at once; zmq binds with SO_REUSEADDR)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def cluster(
    names: Sequence[str],
    *,
    configs: Mapping[str, NodeConfig] | None = None,
    data: Mapping[str, Mapping[str, Arrays | str | Path]] | None = None,
    stores: Sequence[str] = (),
    call_timeout: float = 10.0,
    heartbeat_s: float = fedptr.limits.HEARTBEAT_INTERVAL_S,
    liveness: int = fedptr.limits.HEARTBEAT_LIVENESS,
    transport: Literal["inproc", "ipc", "tcp"] = "inproc",
) -> AsyncIterator[InprocCluster]:
    """A broker, a node per name and a connected client, all stopped on exit.

    `configs` maps a worker to its `NodeConfig` (the default one otherwise); `data` maps a
    worker to its private datasets, tag -> arrays (by key) or an .npz path; each worker in
    `stores` gets a fresh store directory (unless its config names one): a budget (`epsilon`)
    needs one, as ``--epsilon`` needs ``--store``. `transport` ``"ipc"`` (a socket file, still in
    this process) is for tests that restart the broker; ``"tcp"`` (a loopback port) for tests of
    the direct data path and its shared memory, which open on a tcp:// broker only."""
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedptr-inproc-")))
        node_configs: dict[str, NodeConfig] = {}
        for name in names:
            config = (configs or {}).get(name, NodeConfig())
            if name in stores and config.store_dir is None:
                config = replace(config, store_dir=str(tmp / f"{name}-store"))
            if data and name in data:
                where = tmp / f"{name}-data"
                where.mkdir()
                config = _with_data(config, data[name], where)
            node_configs[name] = config
        address = {
            "inproc": lambda: f"inproc://fedptr-harness-{next(_endpoints)}",
            "ipc": lambda: f"ipc://{tmp}/broker",
            "tcp": lambda: f"tcp://127.0.0.1:{_free_port()}",
        }[transport]()
        shell = InprocCluster(address, node_configs, heartbeat_s, liveness, call_timeout)
        shell.start_broker()
        stack.push_async_callback(shell._stop_all)
        for name in names:
            await shell.start_node(name)
        shell._client = await stack.enter_async_context(shell.connect())
        yield shell
