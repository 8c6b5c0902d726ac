"""fedptr benchmarks against torch.distributed.rpc's pointer operations and a bare pyzmq broker.

    .venv/bin/python bench/run.py            # 5 rounds
    .venv/bin/python bench/run.py --quick    # 2 rounds
    .venv/bin/python bench/run.py --smoke    # 1 tiny round: checks that everything runs

Each system runs alone on the machine. A round gives each system a turn, in an order that
rotates from round to round: its processes are started, every case is measured, and they are
stopped. Nothing is paused. Every loop is bounded in count and in time. Prints a table of
medians, p99 and the range of the per-round medians, with ratios fedptr/baseline from the same
run; writes the figures as JSON (--out) and the tables, targets included, as Markdown
(--markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import zmq
from baselines import MIB, READY, REPLY, bounded, time_calls
from fl import FL_SCALES, FlScale, fl_rows, run_fl
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import envelope, wire
from fedptr.cluster import Cluster
from fedptr.processes import start_process, stop_processes

HERE = Path(__file__).parent
WORKERS = ["bob", "alice", "carol", "dave", "erin"]
START_TIMEOUT_S = 120.0
"""Longest a system may take to come up, or a baseline process to answer one command."""
STOP_TIMEOUT_S = 15.0


# --- what is measured ------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How much is measured: the same cases at every scale."""

    rounds: int
    reps: int  # base repetitions per case per round
    budget: float  # base seconds per case per round
    sizes: tuple[int, ...]  # MiB, for send, get and move
    big_reps: int  # repetitions of each send, get and move
    objects: int  # small objects stored for the memory figures
    broker_messages: int  # messages for the broker-alone figures


SCALES = {
    "full": Scale(5, 100, 5.0, (1, 16, 64), 5, 100_000, 50_000),
    "quick": Scale(2, 40, 3.0, (1, 16, 64), 3, 100_000, 50_000),
    "smoke": Scale(1, 5, 0.3, (1, 4), 2, 2_000, 2_000),
}


@dataclass(frozen=True)
class Case:
    """One timed case: `call` with `arg` on each system that has it."""

    label: str  # its key in the figures
    call: str  # the method each system runs it with
    arg: int
    n: int  # most repetitions per round
    budget: float  # about the most seconds per round
    warmup: int = 0
    """Calls made first in each round and not timed: a bulk case is timed in its steady state.
    fedptr's same-host files are written again for their path's next transfer only within
    `limits.DIRECT_SHM_SPARE_S` (1-2 s); each round starts a fresh cluster and runs the move case
    last, so without this its first move each way wrote fresh tmpfs files (2 of 5 samples, 2 of 3
    with --quick), where the send case follows the gets' stores on the same path (BENCHMARKS.md,
    "Bulk bytes, sixth pass")."""


def cases(sc: Scale) -> list[Case]:
    n, b, big = sc.reps, sc.budget, max(sc.sizes)
    return [
        Case("put", "put", 0, 5 * n, b),
        Case("op", "op", 0, 5 * n, b),
        Case("send-op-get", "send_op_get", 0, 2 * n, b),
        Case("send-awaited-op-get", "send_awaited_op_get", 0, 2 * n, b),
        Case("100-dependent", "dependent", 100, max(3, n // 10), 2 * b),
        Case("100-dependent-plan", "dependent_plan", 100, n, b),
        Case("train-step-ops", "train_step_ops", 0, n, b),
        Case("train-step-plan", "train_step_plan", 0, n, b),
        *[Case(f"inflight-{k}", "inflight", k, max(3, 20 * n // k), b) for k in (1, 16, 256)],
        *[Case(f"{way}-{mib}MiB", way, mib, sc.big_reps, 4 * b, 1) for mib in sc.sizes for way in ("send", "get")],
        Case(f"move-{big}MiB", "move", big, sc.big_reps, 4 * b, 2),  # one each way: the moves alternate
        *[Case(f"chain-{d}", "chain", d, n, b) for d in range(1, 6)],
    ]


class System(Protocol):
    """One system's turn: the cases it has, measured while only its processes run."""

    def has(self, call: str) -> bool: ...

    async def measure(self, case: Case) -> list[float]: ...

    async def extras(self, sc: Scale) -> dict[str, float]: ...


# --- fedptr ----------------------------------------------------------------------------------
def node_args(threads: int) -> dict[str, list[str]]:
    """Extra flags for every fedptr node: ``--threads N`` when `threads` is set, as torch.rpc's
    processes get; 0 leaves torch's default in both (the cluster is started with threads=None)."""
    return {w: ["--threads", str(threads)] for w in WORKERS} if threads else {}


class Fedptr:
    """fedptr's side of each case, on a running local cluster (client in this process)."""

    CALLS: tuple[str, ...] = (
        "put",
        "op",
        "send_op_get",
        "send_awaited_op_get",
        "dependent",
        "dependent_plan",
        "train_step_ops",
        "train_step_plan",
        "inflight",
        "send",
        "get",
        "move",
        "chain",
    )

    def __init__(self, cluster: Cluster, sizes: tuple[int, ...]) -> None:
        self.cluster = cluster
        self.client = cluster.client
        self.bob, self.alice = self.client.worker("bob"), self.client.worker("alice")
        self.small = torch.ones(4)
        self.big = {mib: torch.randn(mib * MIB // 4) for mib in sizes}

    async def setup(self) -> None:
        self.x = await self.bob.send(self.small)
        self.moving = await self.bob.send(self.big[max(self.big)])
        await direct_open(self.client, "bob")  # opened in the background by that send
        # there and back once: the data paths between bob and alice open on a first
        # transfer, as the client's paths do in the sends above; torch.rpc's are open from its start
        self.moving = await (await self.moving.move(self.alice)).move(self.bob)
        self.chain_plan = fedptr.plan(lambda y: _chain(y, self.x, 100))
        await self.chain_plan(self.x)  # recorded and sent once, outside the timing
        g = torch.Generator().manual_seed(0)
        self.batch = await self.bob.send(torch.randn(32, 64, generator=g))
        self.labels = await self.bob.send(torch.randint(0, 10, (32,), generator=g))
        self.models, self.steps = [], []
        for _ in range(2):  # one model stepped op by op, one by a plan
            model = await self.bob.send(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
            assert isinstance(model, fedptr.ModulePointer)
            self.models.append(model)
            self.steps.append(_train_step(model, fedptr.optim.SGD(model.parameters(), lr=0.01)))
        self.step_plan = fedptr.plan(self.steps[1])
        await self.step_plan(self.batch, self.labels)
        self.chains = []  # chains[d - 1]: a pointer d hops from bob's tensor (bob <- alice <- ...)
        for d in range(1, 6):
            p = await self.bob.send(self.small)
            for name in WORKERS[1:d]:
                p = await p.send(self.client.worker(name))
            self.chains.append(p)

    def calls(self) -> dict[str, Callable[[int], Awaitable[Any]]]:
        return {
            "put": self.put,
            "op": self.op,
            "send_op_get": self.send_op_get,
            "send_awaited_op_get": self.send_awaited_op_get,
            "dependent": self.dependent,
            "dependent_plan": self.dependent_plan,
            "train_step_ops": self.train_step_ops,
            "train_step_plan": self.train_step_plan,
            "inflight": self.inflight,
            "send": self.send,
            "get": self.get,
            "move": self.move,
            "chain": self.chain,
        }

    def has(self, call: str) -> bool:
        return call in self.CALLS

    def untimed(self) -> dict[str, Callable[[int], Awaitable[None]]]:
        """What a case needs done before each timed call, outside the timing."""
        return {"get": self.store}

    async def measure(self, case: Case) -> list[float]:
        fn, before = self.calls()[case.call], self.untimed().get(case.call)
        samples = []
        for _ in bounded(case.n, case.budget):
            if before is not None:
                await before(case.arg)
            t0 = time.perf_counter()
            await fn(case.arg)
            samples.append(time.perf_counter() - t0)
        return samples

    async def put(self, _: int) -> None:
        await self.bob.send(self.small)

    async def op(self, _: int) -> None:
        await (self.x + self.x)

    async def send_op_get(self, _: int) -> None:
        p = self.bob.send(self.small)
        await (p + p).get()

    async def send_awaited_op_get(self, _: int) -> None:
        p = await self.bob.send(self.small)
        await (p + p).get()

    async def dependent(self, n: int) -> None:
        await _chain(self.x, self.x, n).get()

    async def dependent_plan(self, _: int) -> None:
        await self.chain_plan(self.x).get()

    async def train_step_ops(self, _: int) -> None:
        await self.steps[0](self.batch, self.labels)

    async def train_step_plan(self, _: int) -> None:
        await self.step_plan(self.batch, self.labels)

    async def inflight(self, k: int) -> None:
        ys = [self.x + self.x for _ in range(k)]
        for y in ys:
            await y

    async def send(self, mib: int) -> None:
        await self.bob.send(self.big[mib])

    async def store(self, mib: int) -> None:
        self.stored = await self.bob.send(self.big[mib])

    async def get(self, _: int) -> None:
        await self.stored.get()  # the object leaves bob: `store` puts another there before each get

    async def move(self, _: int) -> None:
        self.moving = await self.moving.move(self.alice if self.moving.location == "bob" else self.bob)

    async def chain(self, d: int) -> None:
        await (self.chains[d - 1] + 1)

    async def extras(self, sc: Scale) -> dict[str, float]:
        """The broker alone, and memory per stored object and per live pointer."""
        address = self.cluster.address
        return {  # broker_rate blocks: on a thread, so that the client's heartbeats go on
            "broker_msgs_per_s_single": await asyncio.to_thread(broker_rate, address, sc.broker_messages, 1),
            "broker_msgs_per_s_batched64": await asyncio.to_thread(broker_rate, address, 4 * sc.broker_messages, 64),
            **await self.memory(sc.objects),
        }

    async def memory(self, objects: int) -> dict[str, float]:
        """Bytes per small object on a node (RSS) and per live pointer in the client (tracemalloc)."""
        for w in WORKERS:
            await self.client.worker(w).clear()
        pid = self.cluster.pids["bob"]
        before = rss_bytes(pid)
        tracemalloc.start()
        base = await self.bob.send(torch.ones(1))
        ptrs: list[fedptr.Pointer] = []
        deadline = time.perf_counter() + 120
        while len(ptrs) < objects and time.perf_counter() < deadline:
            batch = [base + j for j in range(1000)]
            for q in batch:
                await q
            ptrs.extend(batch)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {
            "node_bytes_per_small_object": (rss_bytes(pid) - before) / len(ptrs),
            "client_bytes_per_pointer": current / len(ptrs),
            "objects_stored": len(ptrs),
        }


async def direct_open(client: fedptr.Client, worker: str) -> None:
    """Wait until `client`'s direct data path to `worker` is open (a first big send starts
    opening it in the background), so that no timed send or get goes the broker's way or pays
    for the offer and the handshake. A client on an ipc:// broker has no such path."""
    direct = client.link.direct
    if direct is None:
        return
    deadline = time.monotonic() + fedptr.limits.DIRECT_CONNECT_TIMEOUT_S
    while not direct.ready(worker.encode(), envelope.REQUEST):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no direct path to {worker} within {fedptr.limits.DIRECT_CONNECT_TIMEOUT_S} s")
        await asyncio.sleep(0.01)


def _chain(y: fedptr.Pointer, x: fedptr.Pointer, n: int) -> fedptr.Pointer:
    """`n` dependent additions: y + x + x + ..."""
    for _ in range(n):
        y = y + x
    return y


def _train_step(
    model: fedptr.ModulePointer, opt: fedptr.optim.Optimizer
) -> Callable[[fedptr.Pointer, fedptr.Pointer], fedptr.Pointer]:
    """One SGD step on a minibatch (forward, loss, backward, step, zero_grad); returns the loss."""

    def step(x: fedptr.Pointer, y: fedptr.Pointer) -> fedptr.Pointer:
        loss = functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


class FedptrCurve(Fedptr):
    """Every case, CURVE on (the default); the broker-alone and memory figures are the CURVE-off
    turn's."""

    async def extras(self, sc: Scale) -> dict[str, float]:
        return {}


class FedptrSingle(Fedptr):
    """The single-op cases only, for a variant of a cluster (ipc)."""

    CALLS = ("put", "op", "send_op_get")

    async def setup(self) -> None:
        self.x = await self.bob.send(self.small)

    async def extras(self, sc: Scale) -> dict[str, float]:
        return {}


@asynccontextmanager
async def fedptr_cluster_turn(logs: Path, sc: Scale, threads: int, curve: bool) -> AsyncIterator[Fedptr]:
    """fedptr's whole cluster, every case, with or without CURVE."""
    async with fedptr.local_cluster(
        WORKERS,
        log_dir=logs / f"curve-{curve}",
        node_args=node_args(threads),
        threads=None,
        curve=curve,
        start_timeout=START_TIMEOUT_S,
    ) as cluster:
        system = (FedptrCurve if curve else Fedptr)(cluster, sc.sizes)
        await system.setup()
        yield system


def fedptr_turn(logs: Path, sc: Scale, threads: int) -> AbstractAsyncContextManager[Fedptr]:
    """fedptr without CURVE, as torch.rpc runs (unencrypted, unauthenticated)."""
    return fedptr_cluster_turn(logs, sc, threads, False)


@asynccontextmanager
async def fedptr_single_turn(
    logs: Path, threads: int, curve: bool, transport: Literal["tcp", "ipc"]
) -> AsyncIterator[Fedptr]:
    """A two-worker cluster for the single-op cases, with `curve` and `transport`."""
    names = WORKERS[:2]
    async with fedptr.local_cluster(
        names,
        log_dir=logs / f"{transport}-curve-{curve}",
        node_args={w: a for w, a in node_args(threads).items() if w in names},
        threads=None,
        curve=curve,
        transport=transport,
        start_timeout=START_TIMEOUT_S,
    ) as cluster:
        system = FedptrSingle(cluster, (1,))
        await system.setup()
        yield system


def fedptr_curve_turn(logs: Path, sc: Scale, threads: int) -> AbstractAsyncContextManager[Fedptr]:
    """fedptr as `local_cluster` starts it by default: CURVE on, tcp."""
    return fedptr_cluster_turn(logs, sc, threads, True)


def fedptr_ipc_turn(logs: Path, sc: Scale, threads: int) -> AbstractAsyncContextManager[Fedptr]:
    """fedptr without CURVE on ipc:// instead of loopback tcp."""
    return fedptr_single_turn(logs, threads, False, "ipc")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def broker_rate(address: str, messages: int, batch: int) -> float:
    """Messages per second the fedptr broker routes from one client to one sink, alone."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sink = ctx.socket(zmq.DEALER)
    src = ctx.socket(zmq.DEALER)
    # names of their own per call: a closed socket's name stays taken a while
    sink_name, src_name = f"bench-sink-{batch}".encode(), f"bench-src-{batch}".encode()
    for s, name, role in ((sink, sink_name, envelope.ROLE_WORKER), (src, src_name, envelope.ROLE_CLIENT)):
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(address)
        s.send_multipart(envelope.build(envelope.REGISTER, name, b"\0" * 8, role))
        if not s.poll(int(START_TIMEOUT_S * 1000)) or envelope.command_of(s.recv_multipart()) != envelope.ACCEPTED:
            raise RuntimeError(f"the broker did not accept {name!r}")
    body = wire.encode(wire.Get(1))
    one = [envelope.REQUEST, sink_name, b"\1" * 8, *body]
    frames = envelope.framed(one) if batch == 1 else envelope.pack_batch([one] * batch)

    def drain(timeout_ms: int) -> int:
        got = sink.recv_multipart() if sink.poll(timeout_ms) else None
        if got is None:
            return 0
        return envelope.count(got)

    received = 0
    t0 = time.perf_counter()
    for _ in range(messages // batch):
        src.send_multipart(frames)
        received += drain(0)
    for _ in range(messages):  # at most one message each
        if received >= (messages // batch) * batch:
            break
        got = drain(5000)
        if not got:
            break
        received += got
    rate = received / (time.perf_counter() - t0)
    sink.close(0)
    src.close(0)
    return rate


# --- torch.distributed.rpc -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TorchRpc:
    """torch.distributed.rpc on TensorPipe with its defaults: a driver (rank 0) and a worker w1,
    each in its own process; the driver times each case (baselines.py)."""

    CALLS = ("put", "op", "send_op_get", "dependent", "inflight", "send", "get")

    def __init__(self, logs: Path, sizes: tuple[int, ...], threads: int) -> None:
        port, threads_arg = str(free_port()), str(threads)
        script = str(HERE / "baselines.py")
        self.worker = start_process([script, "rpc-worker", port, threads_arg], logs / "rpc-w1.log")
        self.driver = subprocess.Popen(
            [sys.executable, script, "rpc-driver", port, threads_arg, ",".join(map(str, sizes))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(logs / "rpc-w0.log", "ab"),  # noqa: SIM115  (the child owns it)
            text=True,
        )

    def has(self, call: str) -> bool:
        return call in self.CALLS

    async def read(self) -> str:
        """The driver's next line starting with @@ (without it); raises if it exits or is silent."""
        assert self.driver.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            line = await asyncio.wait_for(asyncio.to_thread(self.driver.stdout.readline), left)
            if not line:
                raise RuntimeError("the torch.rpc driver exited; see its log rpc-w0.log")
            if line.startswith(REPLY):
                return line[len(REPLY) :].strip()
        raise TimeoutError("the torch.rpc driver did not answer")

    async def started(self) -> None:
        if await self.read() != READY:
            raise RuntimeError("the torch.rpc driver did not start")

    async def measure(self, case: Case) -> list[float]:
        assert self.driver.stdin is not None
        self.driver.stdin.write(json.dumps({"case": case.call, "arg": case.arg, "n": case.n, "budget": case.budget}))
        self.driver.stdin.write("\n")
        self.driver.stdin.flush()
        samples: list[float] = json.loads(await self.read())["samples"]
        return samples

    async def extras(self, sc: Scale) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Let both processes shut torch.rpc down together, then stop what is left."""
        if self.driver.stdin is not None and self.driver.poll() is None:
            try:
                self.driver.stdin.write(json.dumps({"case": "quit"}) + "\n")
                self.driver.stdin.close()
                self.driver.wait(STOP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_processes([self.driver, self.worker])  # type: ignore[list-item]


@asynccontextmanager
async def torch_turn(logs: Path, sc: Scale, threads: int) -> AsyncIterator[TorchRpc]:
    system = TorchRpc(logs, sc.sizes, threads)
    try:
        await system.started()
        yield system
    finally:
        await asyncio.to_thread(system.close)


# --- the transport floor ---------------------------------------------------------------------
class Floor:
    """A sync DEALER client of the bare broker + echo processes: round trips, one or k at a time."""

    CALLS = ("op", "inflight")

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.payload = b"x" * 64

    def start(self) -> None:
        script = str(HERE / "baselines.py")
        broker = start_process([script, "bare-broker"], self.logs / "bare-broker.log", subprocess.PIPE)
        self.processes.append(broker)
        assert broker.stdout is not None
        endpoint = broker.stdout.readline().decode().strip()
        self.processes.append(start_process([script, "bare-echo", endpoint], self.logs / "bare-echo.log"))
        self.sock.connect(endpoint)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._probe():
            if time.monotonic() > deadline:
                raise RuntimeError("bare echo did not come up")

    def _probe(self) -> bool:
        self.sock.send_multipart([b"echo", b"probe"])
        return bool(self.sock.poll(200)) and bool(self.sock.recv_multipart())

    def has(self, call: str) -> bool:
        return call in self.CALLS

    def round_trips(self, k: int) -> None:
        for _ in range(k):
            self.sock.send_multipart([b"echo", self.payload])
        for _ in range(k):
            if not self.sock.poll(int(START_TIMEOUT_S * 1000)):
                raise TimeoutError("the bare echo did not answer")
            self.sock.recv_multipart()

    async def measure(self, case: Case) -> list[float]:
        return time_calls(self.round_trips, max(1, case.arg), case.n, case.budget)

    async def extras(self, sc: Scale) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.sock.close(0)
        stop_processes(self.processes)


@asynccontextmanager
async def floor_turn(logs: Path, sc: Scale, threads: int) -> AsyncIterator[Floor]:
    system = Floor(logs)
    try:
        await asyncio.to_thread(system.start)
        yield system
    finally:
        system.close()


# --- rounds ----------------------------------------------------------------------------------
Turn = Callable[[Path, Scale, int], AbstractAsyncContextManager[System]]
TURNS: dict[str, Turn] = {
    "fedptr": fedptr_turn,
    "torch.rpc": torch_turn,
    "floor": floor_turn,
    "fedptr+curve": fedptr_curve_turn,
    "fedptr+ipc": fedptr_ipc_turn,
}


class Samples:
    """Timings (seconds) per figure name, one list per round."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[list[float]]] = defaultdict(list)

    def add_round(self, name: str, seconds: list[float]) -> None:
        if seconds:
            self.rounds[name].append(seconds)

    def stats(self, name: str) -> dict[str, Any]:
        """Median and p99 over all samples, and the per-round medians."""
        xs = sorted(x for r in self.rounds[name] for x in r)
        return {
            "median_s": statistics.median(xs),
            "p99_s": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "round_medians_s": [statistics.median(r) for r in self.rounds[name]],
            "n": len(xs),
        }


async def run(
    sc: Scale, fl_scale: FlScale | None, logs: Path, threads: int, only: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Every round, each system's turn: start it alone, measure its cases, stop it; then the
    FL rounds (bench/fl.py), fedptr alone, unless `fl_scale` is None."""
    logs.mkdir(parents=True, exist_ok=True)
    samples, extras = Samples(), dict[str, Any]()
    names = list(TURNS)
    for r in range(sc.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            print(f"round {r + 1}/{sc.rounds}: {name}", file=sys.stderr, flush=True)
            async with TURNS[name](logs, sc, threads) as system:
                for case in cases(sc):
                    if system.has(case.call) and (not only or case.label.startswith(only)):
                        timed = await system.measure(replace(case, n=case.n + case.warmup))
                        samples.add_round(f"{case.label}/{name}", timed[case.warmup :])
                if r == sc.rounds - 1:
                    extras.update(await system.extras(sc))
    if fl_scale is not None:
        print("federated rounds", file=sys.stderr, flush=True)
        extras["fl"] = await run_fl(fl_scale, logs / "fl")
    return {**{name: samples.stats(name) for name in samples.rounds}, **extras}


# --- report ----------------------------------------------------------------------------------
Row = tuple[str, str, str, str]


class Report:
    """The rows of the results table and of the targets table, from the figures."""

    def __init__(self, figures: dict[str, Any], sizes: tuple[int, ...], system: str = "fedptr") -> None:
        self.f = figures
        self.sizes = sizes
        self.big = max(sizes)
        self.system = system
        """Whose figures: "fedptr" (CURVE off) or "fedptr+curve"."""

    def med(self, key: str) -> float:
        return float(self.f[key]["median_s"])

    def latency(self, key: str) -> str:
        fig = self.f[key]
        lo, hi = min(fig["round_medians_s"]), max(fig["round_medians_s"])
        return (
            f"{fig['median_s'] * 1e6:,.0f} µs (p99 {fig['p99_s'] * 1e6:,.0f}; rounds {lo * 1e6:,.0f}–{hi * 1e6:,.0f})"
        )

    def rate(self, key: str, per_call: float, unit: str, digits: int) -> str:
        fig = self.f[key]
        lo, hi = per_call / max(fig["round_medians_s"]), per_call / min(fig["round_medians_s"])
        return f"{per_call / fig['median_s']:,.{digits}f} {unit} (rounds {lo:,.{digits}f}–{hi:,.{digits}f})"

    def time_ratio(self, ours: str, theirs: str, times: float = 1.0) -> float:
        """fedptr's time over the baseline's: lower is better."""
        return self.med(ours) / (times * self.med(theirs))

    def rate_ratio(self, ours: str, theirs: str) -> float:
        """fedptr's rate over the baseline's: higher is better."""
        return self.med(theirs) / self.med(ours)

    def latency_row(self, what: str, label: str, base: str, base_label: str | None = None) -> Row:
        """fedptr's `label` against `base` (a system name, then what it runs) on `base_label`."""
        ours, theirs = f"{label}/{self.system}", f"{base_label or label}/{base.split(' ', 1)[0]}"
        return (what, self.latency(ours), f"{base} {self.latency(theirs)}", f"{self.time_ratio(ours, theirs):.2f}×")

    def rows(self) -> list[Row]:
        """Every row whose figures were measured (`--only` leaves some out)."""
        rows = []
        for row in [*self._rows(), *([self.extra_rows] if self.system == "fedptr" else [])]:
            try:
                made = row()
            except KeyError:
                continue
            rows.extend(made if isinstance(made, list) else [made])
        return rows

    def _rows(self) -> list[Callable[[], Row]]:
        s = self.system
        single = [
            lambda: self.latency_row("one op: CURVE off vs on (the default)", "op", "fedptr+curve CURVE on"),
            lambda: self.latency_row("one op: tcp vs ipc://", "op", "fedptr+ipc ipc://"),
            lambda: self.latency_row("send → op → get: tcp vs ipc://", "send-op-get", "fedptr+ipc ipc://"),
        ]
        rows: list[Callable[[], Row]] = [
            lambda: self.latency_row("put: `await worker.send(t)`", "put", "torch.rpc `remote(clone)`, created"),
            lambda: self.latency_row("one op, awaited: `x + x`", "op", "torch.rpc `remote(add, rrefs)`, created"),
            lambda: self.latency_row("one op vs the transport floor", "op", "floor bare-broker echo"),
            *(single if s == "fedptr" else []),
            lambda: self.latency_row(
                "send → op → get (send pipelined)", "send-op-get", "torch.rpc remote, remote, to_here"
            ),
            lambda: self.latency_row(
                "`await send` → op → get", "send-awaited-op-get", "torch.rpc remote, remote, to_here", "send-op-get"
            ),
            lambda: self.latency_row("100 dependent ops + get", "100-dependent", "torch.rpc 100 × `rpc_sync`"),
            lambda: self.latency_row(
                "100 dependent ops + get, as a plan",
                "100-dependent-plan",
                "torch.rpc 100 × `rpc_sync`",
                "100-dependent",
            ),
            lambda: (
                "training step (MLP 64-128-10, batch 32), awaited",
                f"plan {self.latency(f'train-step-plan/{s}')}",
                f"op by op {self.latency(f'train-step-ops/{s}')}",
                f"{self.time_ratio(f'train-step-plan/{s}', f'train-step-ops/{s}'):.2f}×",
            ),
        ]
        for k in (1, 16, 256):
            key = f"inflight-{k}"
            rows.append(
                lambda key=key, k=k: (  # type: ignore[misc]
                    f"throughput, {k} in flight",
                    self.rate(f"{key}/{s}", k, "ops/s", 0),
                    f"torch.rpc `rpc_async` {self.rate(f'{key}/torch.rpc', k, 'ops/s', 0)}; "
                    f"floor {self.rate(f'{key}/floor', k, 'ops/s', 0)}",
                    f"{self.rate_ratio(f'{key}/{s}', f'{key}/torch.rpc'):.2f}×",
                )
            )
        for mib in self.sizes:
            for way in ("send", "get"):
                key = f"{way}-{mib}MiB"
                rows.append(
                    lambda key=key, way=way, mib=mib: (  # type: ignore[misc]
                        f"{way} {mib} MiB",
                        self.rate(f"{key}/{s}", mib * MIB / 1e9, "GB/s", 2),
                        f"torch.rpc `rpc_sync` {self.rate(f'{key}/torch.rpc', mib * MIB / 1e9, 'GB/s', 2)}",
                        f"{self.rate_ratio(f'{key}/{s}', f'{key}/torch.rpc'):.2f}×",
                    )
                )
        move, send = f"move-{self.big}MiB/{s}", f"send-{self.big}MiB/{s}"
        rows.append(
            lambda: (
                f"move {self.big} MiB, worker to worker",
                f"{self.med(move) * 1e3:.1f} ms",
                f"one send {self.med(send) * 1e3:.1f} ms",
                f"{self.time_ratio(move, send):.2f}×",
            )
        )
        for d in range(2, 6):
            key = f"chain-{d}/{s}"
            rows.append(
                lambda key=key, d=d: (  # type: ignore[misc]
                    f"op at chain depth {d}",
                    self.latency(key),
                    f"{d} × depth 1 = {d * self.med(f'chain-1/{s}') * 1e6:,.0f} µs",
                    f"{self.time_ratio(key, f'chain-1/{s}', d):.2f}×",
                )
            )
        return rows

    def extra_rows(self) -> list[Row]:
        f = self.f
        return [
            ("broker alone, single messages", f"{f['broker_msgs_per_s_single']:,.0f} msgs/s", "—", "—"),
            ("broker alone, batches of 64", f"{f['broker_msgs_per_s_batched64']:,.0f} msgs/s", "—", "—"),
            (
                "node memory per small object",
                f"{f['node_bytes_per_small_object']:,.0f} B",
                f"{f['objects_stored']:,} objects",
                "—",
            ),
            ("client memory per live pointer", f"{f['client_bytes_per_pointer']:,.0f} B", "tracemalloc", "—"),
        ]

    def targets(self) -> list[tuple[str, str, str, str]]:
        """(target, ratio of the medians, range of the per-round ratios, met or missed), for
        the targets whose figures were measured."""
        big, s = self.big, self.system
        wanted: list[Callable[[], tuple[str, str, str, str]]] = [
            lambda: self.target("one op ≤ 1.0× torch.rpc (stretch 0.8×)", f"op/{s}", "op/torch.rpc", 1.0, stretch=0.8),
            *[
                lambda way=way: self.target(  # type: ignore[misc]
                    f"{way} {big} MiB ≥ 1.0× torch.rpc throughput",
                    f"{way}-{big}MiB/{s}",
                    f"{way}-{big}MiB/torch.rpc",
                    1.0,
                    throughput=True,
                )
                for way in ("send", "get")
            ],
            lambda: self.target(f"move {big} MiB ≤ 1.1× one send", f"move-{big}MiB/{s}", f"send-{big}MiB/{s}", 1.1),
            lambda: self.target(
                "100 dependent ops ≤ 0.1× torch.rpc (a plan)",
                f"100-dependent-plan/{s}",
                "100-dependent/torch.rpc",
                0.1,
            ),
            lambda: self.target(
                "training step: a plan ≥ 3× faster than op by op",
                f"train-step-plan/{s}",
                f"train-step-ops/{s}",
                1 / 3,
            ),
        ]
        out = []
        for target in wanted:
            with contextlib.suppress(KeyError):
                out.append(target())
        return out

    def target(
        self, what: str, ours: str, theirs: str, bound: float, stretch: float | None = None, throughput: bool = False
    ) -> tuple[str, str, str, str]:
        """A target on fedptr's time over the baseline's (at most `bound`), or with `throughput`
        on its throughput over the baseline's (at least `bound`)."""
        per_round = [
            a / b for a, b in zip(self.f[ours]["round_medians_s"], self.f[theirs]["round_medians_s"], strict=False)
        ]
        ratio, rounds = self.time_ratio(ours, theirs), [min(per_round), max(per_round)]
        if throughput:
            ratio, rounds = 1 / ratio, [1 / rounds[1], 1 / rounds[0]]

        def meets(r: float, b: float) -> bool:
            return r >= b if throughput else r <= b

        status = "met" if meets(ratio, bound) else "missed"
        if stretch is not None:
            status += f", stretch {'met' if meets(ratio, stretch) else 'missed'}"
        return what, f"{ratio:.3g}×", f"{rounds[0]:.3g}–{rounds[1]:.3g}×", status


# --- output ----------------------------------------------------------------------------------
HEADER = ("what", "fedptr", "baseline (same run)", "ratio fedptr/baseline")
TARGETS_HEADER = ("target", "ratio", "per-round ratios", "status")
FL_HEADER = ("what", "fedptr", "minimum or comparison", "ratio")
METHOD = (
    "Each system runs alone: in every round, fedptr (a broker and 5 nodes, client in the runner), "
    "torch.rpc (TensorPipe with its defaults: a driver and one worker) and the bare-broker floor each "
    "take a turn (started, measured, stopped), in an order that rotates by round; nothing is paused. "
    "Latencies: median over all samples (p99; min–max of the per-round medians). Rates come from "
    "median times. torch.rpc's cases are its pointer operations: `rpc.remote` awaited until its "
    "owner confirms creation (`rref._get_future().wait()`), `to_here` only where fedptr gets. "
    "fedptr runs without CURVE here, as torch.rpc runs without encryption; every case is measured "
    "again with `local_cluster`'s default (CURVE on) in a turn of its own (its table below), and 'tcp vs ipc://' "
    'fedptr on `local_cluster(transport="ipc")` in another. Every process keeps '
    "torch's default threads unless `--threads` says otherwise. Large buffers' chunks take the direct "
    "data path between the two peers (fedptr/direct.py), CURVE on or off."
)
CURVE_METHOD = (
    "The same cases on the same cluster with CURVE on, as `local_cluster` starts it by default, in "
    "a turn of its own; torch.rpc's figures are the same run's (unencrypted). Large buffers' "
    "chunks take the direct data path between the two peers (fedptr/direct.py), encrypted once."
)
FL_METHOD = (
    "After the rounds, fedptr alone (`local_cluster`, CURVE on, one torch thread per node): FedAvg "
    "of an `nn.Linear(1000, 1000)` (1,001,000 float32 parameters, 4.0 MB). Per round the client "
    "sends the model to each of N owners (`--release exact`, 256 private samples each), each owner "
    "takes 2 full-batch SGD steps through pointers (`fedptr.optim.SGD`), the owners concurrently, "
    "and the client gets and averages the N models. Bytes through the broker are what it received "
    "plus what it sent (every peer's link counters: the client's and each node's `NodeStats`), "
    "against the issue's minimum model × (2N + 1). Median over the rounds after a warm-up round."
)


def markdown_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def text_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows])


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.platform()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 rounds, fewer repetitions")
    mode.add_argument("--smoke", action="store_true", help="1 tiny round (small sizes): checks that it all runs")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads in torch.rpc's processes (0: its default); fedptr's nodes: see node_args",
    )
    p.add_argument("--rounds", type=int, default=0, help="override the mode's number of rounds")
    p.add_argument("--no-fl", action="store_true", help="skip the federated-learning rounds (bench/fl.py)")
    p.add_argument("--out", default=None, help="JSON figures (default bench/results.json; --smoke: in --logs)")
    p.add_argument("--markdown", default=None, help="also write the tables to this Markdown file")
    p.add_argument("--logs", default="/tmp/fedptr-bench-logs")
    p.add_argument(
        "--only", default="", help="measure only the cases whose label starts with one of these (comma-separated)"
    )
    args = p.parse_args()
    scale_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    sc = replace(SCALES[scale_name], rounds=args.rounds or SCALES[scale_name].rounds)
    out = Path(args.out) if args.out else Path(args.logs) / "results.json" if args.smoke else HERE / "results.json"
    fl_scale = None if args.no_fl else FL_SCALES[scale_name]
    only = tuple(x for x in args.only.split(",") if x)
    figures = asyncio.run(run(sc, fl_scale, Path(args.logs), args.threads, only))
    report, curve = Report(figures, sc.sizes), Report(figures, sc.sizes, "fedptr+curve")
    rows, targets = report.rows(), report.targets()
    curve_rows, curve_targets = curve.rows(), curve.targets()
    command = " ".join([".venv/bin/python bench/run.py", *sys.argv[1:]])
    config = {"scale": scale_name, **asdict(sc), "threads": args.threads, "fedptr_node_args": node_args(args.threads)}
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "command": command,
                "config": config,
                "figures": figures,
                "targets": [dict(zip(TARGETS_HEADER, t, strict=True)) for t in targets],
                "targets_curve": [dict(zip(TARGETS_HEADER, t, strict=True)) for t in curve_targets],
            },
            indent=1,
        )
    )
    print(text_table(HEADER, rows))
    print()
    print(text_table(TARGETS_HEADER, targets))
    print("\nCURVE on (the default)\n")
    print(text_table(HEADER, curve_rows))
    print()
    print(text_table(TARGETS_HEADER, curve_targets))
    fl = fl_rows(figures["fl"], fl_scale.owners) if fl_scale is not None else []
    if fl:
        print()
        print(text_table(FL_HEADER, fl))
    if args.markdown:
        lines = [
            "# Benchmarks",
            "",
            f"Machine: {machine()}. Loopback tcp. Command: `{command}`. Date: {time.strftime('%Y-%m-%d')}.",
            "",
            METHOD,
            "",
            *markdown_table(HEADER, rows),
            "",
            "## Targets",
            "",
            *markdown_table(TARGETS_HEADER, targets),
            "",
            "## CURVE on (the default)",
            "",
            CURVE_METHOD,
            "",
            *markdown_table(HEADER, curve_rows),
            "",
            *markdown_table(TARGETS_HEADER, curve_targets),
        ]
        if fl:
            lines += ["", "## Federated rounds", "", FL_METHOD, "", *markdown_table(FL_HEADER, fl)]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
