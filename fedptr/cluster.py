"""`local_cluster`: a broker and one node process per name on this machine, for tests and demos.

Nodes are forked by one warm launcher where fork is safe (`fedptr.processes`), else started as
plain processes. Processes die with their parent (Linux PR_SET_PDEATHSIG), so even a crashed or
killed client leaves nothing running; on a normal exit each gets SIGTERM, then SIGKILL after a
grace period.
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from fedptr import limits
from fedptr.client import Client, Connecting, connect, wrapped_in
from fedptr.errors import DeadlineExceeded, FedptrError, InvalidArgumentError, UsageError
from fedptr.processes import NodeStarter, Process, start_broker, stop_processes, wait_registered
from fedptr.security import CurveKeys, generate

CLIENT_KEYS = 4
"""Client key pairs a CURVE local cluster makes: its own client's and spare ones for more clients."""


@dataclass
class Cluster:
    """A running local cluster: `client` is connected, `address` is the broker's, and `pids`
    maps ``"broker"`` and each worker name to its process id."""

    client: Client
    address: str
    pids: dict[str, int]
    log_dir: Path
    processes: dict[str, Process] = field(repr=False)
    starter: NodeStarter = field(repr=False)
    """What starts the nodes (and `start_node` again): the forking launcher or plain processes."""
    broker_args: list[str] = field(default_factory=list, repr=False)
    node_args: dict[str, list[str]] = field(default_factory=dict, repr=False)
    keys_dir: Path | None = None
    """With ``curve=True``: the key pairs (NAME.key, NAME.key_secret) of broker, nodes and clients."""

    def client_keys(self, index: int = 0) -> CurveKeys | None:
        """Client key pair `index` (0 is the cluster's own client's; 1 to CLIENT_KEYS - 1 are
        spare, each a distinct principal), or None when the cluster runs without CURVE."""
        if self.keys_dir is None or not (self.keys_dir / "broker.key").exists():
            return None
        name = "client" if index == 0 else f"client{index}"
        return CurveKeys.load(self.keys_dir / f"{name}.key_secret", self.keys_dir / "broker.key")

    def connect(self, key: int = 0, **options: Any) -> Connecting:
        """Another client of this cluster, authenticated with client key pair `key`; `options`
        are `fedptr.connect`'s."""
        return connect(self.address, curve=self.client_keys(key), **options)

    running: AbstractAsyncContextManager[Cluster] | None = field(default=None, repr=False)
    """What `stop` exits (set by `LocalCluster.start`)."""

    async def stop(self) -> None:
        """Close the client and stop every process (SIGTERM, then SIGKILL after a grace period).
        Calling it again does nothing."""
        running, self.running = self.running, None
        if running is not None:
            await running.__aexit__(None, None, None)

    def log(self, name: str) -> str:
        """What process `name` (``"broker"`` or a worker) has logged so far."""
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to process `name` (for fault tests: SIGKILL, SIGSTOP, SIGCONT)."""
        self.processes[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.processes[name].wait(limits.CLUSTER_STOP_GRACE_S)

    async def start_node(self, name: str, timeout: float = limits.CLUSTER_START_TIMEOUT_S) -> None:
        """Start worker `name` again (after it died), with the flags it had; returns once the
        new process says it registered."""
        log_path = self.log_dir / f"{name}.log"
        ready = f"fedptr-node {name} ready"
        before = log_path.read_text(errors="replace").count(ready)
        deadline = time.monotonic() + timeout
        argv = ["--name", name, "--broker", self.address, *self.node_args[name]]
        proc = await self.starter.start(argv, log_path, timeout)
        self.processes[name] = proc
        self.pids[name] = proc.pid
        while log_path.read_text(errors="replace").count(ready) <= before:
            if proc.poll() is not None:
                raise FedptrError(f"{name} exited with status {proc.returncode}: {self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(name, timeout, [name])
            await asyncio.sleep(limits.POLL_INTERVAL_S)

    async def restart_broker(self, timeout: float = limits.CLUSTER_START_TIMEOUT_S) -> None:
        """Start a new broker on the same address (after the old one died)."""
        proc, address = await start_broker(self.address, self.log_dir / "broker.log", timeout, self.broker_args)
        assert address == self.address, (address, self.address)
        self.processes["broker"] = proc
        self.pids["broker"] = proc.pid


HOW_TO_START = (
    "start it: cluster = await fedptr.local_cluster([...]).start() in a notebook or python -m asyncio "
    "(await cluster.stop() at the end), or async with fedptr.local_cluster([...]) as cluster: inside "
    "an async def main() run by asyncio.run(main())"
)
"""Said when a `LocalCluster` is used as the running `Cluster` it starts: forgetting the ``await
... .start()`` or the ``async`` of ``async with`` is a newcomer's first mistake."""


class LocalCluster:
    """A local cluster not started yet, as `local_cluster` returns it. Start it with
    ``cluster = await local_cluster([...]).start()`` (a REPL, a notebook) and end it with
    ``await cluster.stop()``, or use it as ``async with local_cluster([...]) as cluster:``."""

    def __init__(self, running: AbstractAsyncContextManager[Cluster]) -> None:
        self._running = running
        self._cluster: Cluster | None = None

    async def start(self) -> Cluster:
        """Start the broker and the nodes; returns the running `Cluster` once all registered.
        Raises InvalidArgumentError when called twice, and what `local_cluster` says."""
        if self._cluster is not None:
            raise InvalidArgumentError("this cluster was started already")
        cluster = await self._running.__aenter__()
        cluster.running = self._running
        self._cluster = cluster
        return cluster

    async def __aenter__(self) -> Cluster:
        return await self.start()

    def __enter__(self) -> NoReturn:
        raise UsageError(f"a local cluster is an async context manager: {HOW_TO_START}")

    def __exit__(self, *exc_info: object) -> None:
        """Never reached (`__enter__` raises); Python calls `__enter__` only when both exist."""

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute name

        def __getattr__(self, name: str) -> NoReturn:
            if hasattr(Cluster, name) or name in Cluster.__dataclass_fields__:
                raise AttributeError(f"this local cluster is not started, so it has no {name!r}: {HOW_TO_START}")
            raise AttributeError(f"'LocalCluster' object has no attribute {name!r}")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._cluster is not None:
            await self._cluster.stop()


@wrapped_in(LocalCluster)  # startable with ``await ...start()``, not only an async context manager
@asynccontextmanager
async def local_cluster(
    names: Sequence[str],
    *,
    transport: Literal["tcp", "ipc"] = "tcp",
    call_timeout: float = limits.CALL_TIMEOUT_S,
    start_timeout: float = limits.CLUSTER_START_TIMEOUT_S,
    node_args: Mapping[str, Sequence[str]] | None = None,
    broker_args: Sequence[str] = (),
    log_dir: str | os.PathLike[str] | None = None,
    heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S,
    liveness: int = limits.HEARTBEAT_LIVENESS,
    curve: bool = True,
    data: Mapping[str, Mapping[str, str | os.PathLike[str]]] | None = None,
    threads: int | None = limits.LOCAL_CLUSTER_THREADS,
    fork: bool = True,
) -> AsyncIterator[Cluster]:
    """A broker and one node per name: ``await local_cluster(names).start()`` starts them, waits
        until all registered, and gives the running `Cluster` (``await cluster.stop()`` ends it);
        ``async with local_cluster(names) as cluster:`` does both.

        `transport` ``"tcp"`` binds a free loopback port; ``"ipc"`` a socket file in a temporary
        directory. `node_args` adds command-line flags per worker name (``--trust``,
        ``--aggregator``, ``--store``...); `data` maps a worker to the datasets it loads as private
        data, tag -> .npz. `threads` is each node's torch intra-op threads (``--threads``; 1 by default,
    since all the processes share this machine; None: the node's own default, torch's one per core).
    `fork` (on by default, Linux only) forks the nodes from one launcher process that imported
    torch and the node code once (`fedptr.processes`); ``fork=False`` starts each node as its own
    ``python -m fedptr.nodes``. `heartbeat_s` and `liveness` apply to every process and the client (a
        dead worker is noticed within their product). `curve` (on by default) makes throwaway CURVE keys
        for the broker, every node and the client (in `Cluster.keys_dir`): every peer is
        authenticated and every worker name bound to its key; ``curve=False`` turns that off. Every process
        is stopped on exit, on errors too. Raises DeadlineExceeded if the cluster is not up within
        `start_timeout` seconds, or FedptrError (with the process's log) if a process dies while
        starting."""
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"worker names must be unique: {list(names)}")
    async with AsyncExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedptr-"))
        logs = Path(log_dir) if log_dir is not None else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        bind = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp}/broker.sock"
        # first: the launcher imports torch while the broker starts; it is closed last
        starter = NodeStarter(logs, fork)
        stack.push_async_callback(asyncio.to_thread, starter.close)
        processes: dict[str, Process] = {}
        # stopping waits for processes to exit: on a thread, so the event loop is not blocked
        stack.push_async_callback(lambda: asyncio.to_thread(stop_processes, list(reversed(processes.values()))))
        beat = ["--heartbeat-ms", str(max(1, int(heartbeat_s * 1000))), "--liveness", str(liveness)]
        keys = Path(tmp) / "keys"
        client_keys: CurveKeys | None = None
        secure: dict[str, list[str]] = {name: [] for name in ["broker", *names]}
        if curve:
            generate(keys, "broker")
            for name in [*names, "client", *(f"client{i}" for i in range(1, CLIENT_KEYS))]:
                generate(keys, name)
            secure["broker"] = ["--curve-secret", str(keys / "broker.key_secret"), "--allow", str(keys)]
            for name in names:
                secure[name] = [
                    "--curve-secret",
                    str(keys / f"{name}.key_secret"),
                    "--broker-key",
                    str(keys / "broker.key"),
                ]
            client_keys = CurveKeys.load(keys / "client.key_secret", keys / "broker.key")
        all_broker_args = [*beat, *secure["broker"], *broker_args]
        datasets = {
            name: [f"--data={tag}={path}" for tag, path in (data or {}).get(name, {}).items()] for name in names
        }
        threads_arg = [] if threads is None else ["--threads", str(threads)]
        all_node_args = {
            name: [*beat, *threads_arg, *secure[name], *datasets[name], *(node_args or {}).get(name, ())]
            for name in names
        }
        processes["broker"], address = await start_broker(bind, logs / "broker.log", start_timeout, all_broker_args)
        started = await asyncio.gather(
            *(
                starter.start(
                    ["--name", name, "--broker", address, *all_node_args[name]], logs / f"{name}.log", start_timeout
                )
                for name in names
            ),
            return_exceptions=True,
        )
        for name, proc in zip(names, started, strict=True):
            if not isinstance(proc, BaseException):
                processes[name] = proc
        for proc in started:
            if isinstance(proc, BaseException):
                raise proc
        client = await stack.enter_async_context(
            connect(address, timeout=call_timeout, heartbeat_s=heartbeat_s, liveness=liveness, curve=client_keys)
        )
        await wait_registered(client, names, processes, logs, start_timeout)
        pids = {n: p.pid for n, p in processes.items()}
        yield Cluster(client, address, pids, logs, processes, starter, all_broker_args, all_node_args, keys)
