"""fedptr benchmarks against torch.distributed.rpc and a bare pyzmq broker, interleaved in one run.

    .venv/bin/python bench/run.py            # full run, about 3 minutes
    .venv/bin/python bench/run.py --quick    # fewer repetitions

Every case runs for R rounds; in each round fedptr and its baselines take turns, so machine
noise hits all alike. Each loop is bounded in count and in time. Prints a table of medians, p99
and ratios, writes the figures as JSON (--out) and the table as Markdown (--markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch
import zmq

import fedptr
from fedptr import envelope
from fedptr.cluster import start_process, stop_processes

HERE = Path(__file__).parent
MIB = 1 << 20
WORKERS = ["bob", "alice", "carol", "dave", "erin"]


class Samples:
    """Timings (seconds) per case name, over all rounds."""

    def __init__(self) -> None:
        self.data: dict[str, list[float]] = defaultdict(list)

    def add(self, name: str, seconds: float) -> None:
        self.data[name].append(seconds)

    def extend(self, name: str, seconds: list[float]) -> None:
        self.data[name].extend(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.data[name])

    def p99(self, name: str) -> float:
        xs = sorted(self.data[name])
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))]


async def timed_async(samples: Samples, name: str, fn: Callable[[], Awaitable[Any]], n: int, budget: float) -> None:
    end = time.perf_counter() + budget
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.add(name, time.perf_counter() - t0)
        if time.perf_counter() > end:
            break


def timed_sync(samples: Samples, name: str, fn: Callable[[], Any], n: int, budget: float) -> None:
    end = time.perf_counter() + budget
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.add(name, time.perf_counter() - t0)
        if time.perf_counter() > end:
            break


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Floor:
    """A sync DEALER client of the bare broker + echo processes."""

    def __init__(self, logs: Path) -> None:
        self.broker = start_process(
            [str(HERE / "baselines.py"), "bare-broker"], logs / "bare-broker.log", subprocess.PIPE
        )
        assert self.broker.stdout is not None
        endpoint = self.broker.stdout.readline().decode().strip()
        self.echo = start_process([str(HERE / "baselines.py"), "bare-echo", endpoint], logs / "bare-echo.log")
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.payload = b"x" * 64
        deadline = time.monotonic() + 30
        while not self.sock.poll(100, zmq.POLLOUT) or not self._probe():
            if time.monotonic() > deadline:
                raise RuntimeError("bare echo did not come up")

    def _probe(self) -> bool:
        self.sock.send_multipart([b"echo", b"probe"])
        return bool(self.sock.poll(200)) and bool(self.sock.recv_multipart())

    def round_trips(self, n: int) -> None:
        for _ in range(n):
            self.sock.send_multipart([b"echo", self.payload])
        for _ in range(n):
            self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(0)
        stop_processes([self.echo, self.broker])


class TorchRpc:
    """torch.distributed.rpc on TensorPipe: a driver (rank 0) and a worker w1, each in its own
    process; `measure` asks the driver to time one case and returns its samples (seconds).

    TensorPipe's shared-memory transport busy-polls: idle, its processes take both of this
    machine's cores. So they are stopped (SIGSTOP) except while torch.rpc is being measured, and
    each system is measured with its own processes running and the other's paused."""

    def __init__(self, logs: Path) -> None:
        port = free_port()
        self.procs = [
            start_process([str(HERE / "baselines.py"), "rpc-worker", str(r), "2", str(port)], logs / f"rpc-w{r}.log")
            for r in (1,)
        ]
        self.driver = subprocess.Popen(
            [sys.executable, str(HERE / "baselines.py"), "rpc-driver", "2", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(logs / "rpc-w0.log", "ab"),  # noqa: SIM115  (the child owns it)
            text=True,
        )
        self._read()
        self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        for p in (self.driver, *self.procs):
            p.send_signal(sig)

    def _read(self) -> str:
        assert self.driver.stdout is not None
        while True:
            line = self.driver.stdout.readline()
            if not line:
                raise RuntimeError("the torch.rpc driver exited")
            if line.startswith("@@"):
                return line[2:]

    async def measure(self, case: str, arg: int, n: int, budget: float) -> list[float]:
        """Time `case` on torch.rpc (in a thread, so this process's event loop keeps beating)."""
        return await asyncio.to_thread(self._measure, case, arg, n, budget)

    def _measure(self, case: str, arg: int, n: int, budget: float) -> list[float]:
        assert self.driver.stdin is not None
        self._signal(signal.SIGCONT)
        try:
            self.driver.stdin.write(json.dumps({"case": case, "arg": arg, "n": n, "budget": budget}) + "\n")
            self.driver.stdin.flush()
            samples: list[float] = json.loads(self._read())["samples"]
        finally:
            self._signal(signal.SIGSTOP)
        return samples

    def close(self) -> None:
        self._signal(signal.SIGCONT)
        if self.driver.stdin is not None:
            self.driver.stdin.write(json.dumps({"case": "quit"}) + "\n")
            self.driver.stdin.close()
        stop_processes([self.driver, *self.procs])


async def broker_rate(address: str, messages: int, batch: int) -> float:
    """Messages per second the fedptr broker routes from one client to one sink, alone."""
    from fedptr import wire

    ctx = zmq.Context.instance()
    sink = ctx.socket(zmq.DEALER)
    src = ctx.socket(zmq.DEALER)
    for s, name, role in ((sink, b"sink", envelope.ROLE_WORKER), (src, b"blaster", envelope.ROLE_CLIENT)):
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(address)
        s.send_multipart([envelope.PROTOCOL, envelope.REGISTER, name, b"\0" * 8, role])
        s.recv_multipart()
    body = wire.encode(wire.Get(1))
    one = [envelope.REQUEST, b"sink", b"\1" * 8, *body]
    frames = [envelope.PROTOCOL, *one] if batch == 1 else envelope.pack_batch([one] * batch)
    received = 0
    t0 = time.perf_counter()
    for _ in range(messages // batch):
        src.send_multipart(frames)
        while sink.poll(0):
            got = sink.recv_multipart()
            received += (len(got) - 3) // len(one) if got[1] == envelope.BATCH else 1
    while received < (messages // batch) * batch and sink.poll(5000):
        got = sink.recv_multipart()
        received += (len(got) - 3) // len(one) if got[1] == envelope.BATCH else 1
    rate = received / (time.perf_counter() - t0)
    sink.close(0)
    src.close(0)
    return rate


async def run(args: argparse.Namespace) -> dict[str, Any]:
    s = Samples()
    rounds = 2 if args.quick else 5
    n = 40 if args.quick else 100
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {}
    async with fedptr.local_cluster(WORKERS, log_dir=logs) as cluster:
        client = cluster.client
        bob, alice = client.worker("bob"), client.worker("alice")
        floor = Floor(logs)
        trpc = TorchRpc(logs)
        try:
            x = await bob.send(torch.ones(4))
            chain = []  # chain[d - 1]: a pointer d hops from bob's tensor (bob <- alice <- ... )
            for d in range(1, 6):
                p = await bob.send(torch.ones(4))
                for name in WORKERS[1:d]:
                    p = await p.send(client.worker(name))
                chain.append(p)
            for r in range(rounds):
                print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
                # one small op
                await timed_async(s, "op/fedptr", lambda: x + 1, n * 5, 5)
                s.extend("op/torch.rpc", await trpc.measure("op", 0, n * 5, 5))
                await asyncio.to_thread(timed_sync, s, "op/floor", lambda: floor.round_trips(1), n * 5, 5)

                # send -> op -> get
                async def sog() -> None:
                    p = await bob.send(torch.ones(4))
                    await (p + 1).get()

                async def sog_pipelined() -> None:
                    await (bob.send_nowait(torch.ones(4)) + 1).get()

                await timed_async(s, "send-op-get/fedptr", sog, n * 2, 5)
                await timed_async(s, "send-op-get-pipelined/fedptr", sog_pipelined, n * 2, 5)
                s.extend("send-op-get/torch.rpc", await trpc.measure("send-op-get", 0, n * 2, 5))

                # 100 dependent ops then get
                async def dep() -> None:
                    y = x
                    for _ in range(100):
                        y = y + 1
                    await y.get()

                await timed_async(s, "100-dependent/fedptr", dep, 10, 10)
                s.extend("100-dependent/torch.rpc", await trpc.measure("dependent", 100, 5, 10))

                # throughput in flight (rounds of k concurrent ops; time per round)
                for k in (1, 16, 256):

                    async def burst(k: int = k) -> None:
                        ys = [x + 1 for _ in range(k)]
                        for y in ys:
                            await y

                    await timed_async(s, f"inflight-{k}/fedptr", burst, max(5, 2000 // k), 5)
                    s.extend(f"inflight-{k}/torch.rpc", await trpc.measure("inflight", k, max(5, 2000 // k), 5))
                    await asyncio.to_thread(
                        timed_sync, s, f"inflight-{k}/floor", lambda k=k: floor.round_trips(k), max(5, 2000 // k), 5
                    )

                # bandwidth
                for mib in (1, 16, 64):
                    t = torch.randn(mib * MIB // 4)
                    reps = 3 if mib == 64 else 6
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        p = await bob.send(t)
                        s.add(f"send-{mib}MiB/fedptr", time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        await p.get()
                        s.add(f"get-{mib}MiB/fedptr", time.perf_counter() - t0)
                        s.extend(f"send-{mib}MiB/torch.rpc", await trpc.measure("send", mib, 1, 60))
                        s.extend(f"get-{mib}MiB/torch.rpc", await trpc.measure("get", mib, 1, 60))
                    del t

                # move 64 MiB between two workers
                t = torch.randn(64 * MIB // 4)
                p = await bob.send(t)
                for _ in range(3):
                    t0 = time.perf_counter()
                    p = await p.move(alice if p.location == "bob" else bob)
                    s.add("move-64MiB/fedptr", time.perf_counter() - t0)
                del p, t

                # op at the end of a chain of depth d
                for d in range(1, 6):
                    p = chain[d - 1]
                    await timed_async(s, f"chain-{d}/fedptr", lambda p=p: p + 1, n, 3)
        finally:
            trpc.close()
            floor.close()
        for w in WORKERS:
            await client.worker(w).clear()

        # broker alone
        figures["broker_msgs_per_s_single"] = await broker_rate(cluster.address, 50_000, 1)
        figures["broker_msgs_per_s_batched64"] = await broker_rate(cluster.address, 200_000, 64)

        # memory: 100k small objects on a node; client bytes per live pointer
        import tracemalloc

        before = rss_bytes(cluster.pids["bob"])
        tracemalloc.start()
        base = await bob.send(torch.ones(1))
        ptrs = []
        deadline = time.perf_counter() + 120
        while len(ptrs) < 100_000 and time.perf_counter() < deadline:
            batch = [base + j for j in range(1000)]
            for q in batch:
                await q
            ptrs.extend(batch)
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        figures["node_bytes_per_small_object"] = (rss_bytes(cluster.pids["bob"]) - before) / len(ptrs)
        figures["client_bytes_per_pointer"] = current / len(ptrs)
        figures["objects_stored"] = len(ptrs)
        del ptrs
        await bob.clear()

    for name, xs in s.data.items():
        figures[name] = {"median_s": statistics.median(xs), "p99_s": s.p99(name), "n": len(xs)}
    return figures


def report(f: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of (what, fedptr, baseline, ratio, target)."""

    def med(k: str) -> float:
        return float(f[k]["median_s"])

    def us(k: str) -> str:
        return f"{med(k) * 1e6:,.0f} µs (p99 {f[k]['p99_s'] * 1e6:,.0f})"

    rows = [
        (
            "one small op",
            us("op/fedptr"),
            "torch.rpc " + us("op/torch.rpc"),
            f"{med('op/fedptr') / med('op/torch.rpc'):.2f}×",
            "≤ 1.0× (stretch 0.7×)",
        ),
        (
            "one small op vs transport floor",
            us("op/fedptr"),
            "bare broker echo " + us("op/floor"),
            f"{med('op/fedptr') / med('op/floor'):.2f}×",
            "—",
        ),
        (
            "send → op → get",
            us("send-op-get/fedptr"),
            "torch.rpc " + us("send-op-get/torch.rpc"),
            f"{med('send-op-get/fedptr') / med('send-op-get/torch.rpc'):.2f}×",
            "≤ 0.6×",
        ),
        (
            "send_nowait → op → get",
            us("send-op-get-pipelined/fedptr"),
            "torch.rpc " + us("send-op-get/torch.rpc"),
            f"{med('send-op-get-pipelined/fedptr') / med('send-op-get/torch.rpc'):.2f}×",
            "≤ 0.6×",
        ),
        (
            "100 dependent ops + get",
            us("100-dependent/fedptr"),
            "torch.rpc " + us("100-dependent/torch.rpc"),
            f"{med('100-dependent/fedptr') / med('100-dependent/torch.rpc'):.3f}×",
            "≤ 0.1×",
        ),
    ]
    for k in (1, 16, 256):
        ours = k / med(f"inflight-{k}/fedptr")
        theirs = k / med(f"inflight-{k}/torch.rpc")
        fl = k / med(f"inflight-{k}/floor")
        rows.append(
            (
                f"throughput, {k} in flight",
                f"{ours:,.0f} ops/s",
                f"torch.rpc {theirs:,.0f}/s; floor {fl:,.0f}/s",
                f"{ours / theirs:.2f}×",
                "≥ 3× at 256",
            )
        )
    for mib in (1, 16, 64):
        for way in ("send", "get"):
            ours = mib / 1024 / med(f"{way}-{mib}MiB/fedptr")
            theirs = mib / 1024 / med(f"{way}-{mib}MiB/torch.rpc")
            rows.append(
                (
                    f"{way} {mib} MiB",
                    f"{ours:.2f} GB/s",
                    f"torch.rpc {theirs:.2f} GB/s",
                    f"{ours / theirs:.2f}×",
                    "≥ 1.0× at 64 MiB",
                )
            )
    rows.append(
        (
            "move 64 MiB",
            f"{med('move-64MiB/fedptr') * 1e3:.1f} ms",
            f"one send {med('send-64MiB/fedptr') * 1e3:.1f} ms",
            f"{med('move-64MiB/fedptr') / med('send-64MiB/fedptr'):.2f}×",
            "≤ 1.2×",
        )
    )
    d1 = med("chain-1/fedptr")
    for d in range(2, 6):
        rows.append(
            (
                f"op at chain depth {d}",
                us(f"chain-{d}/fedptr"),
                f"{d} × depth-1 = {d * d1 * 1e6:,.0f} µs",
                f"{med(f'chain-{d}/fedptr') / (d * d1):.2f}×",
                "≤ 1.1×",
            )
        )
    rows.append(
        ("broker alone, single messages", f"{f['broker_msgs_per_s_single']:,.0f} msgs/s", "—", "—", "≥ 100k msgs/s")
    )
    rows.append(
        ("broker alone, batches of 64", f"{f['broker_msgs_per_s_batched64']:,.0f} msgs/s", "—", "—", "≥ 100k msgs/s")
    )
    rows.append(
        (
            "node memory per small object",
            f"{f['node_bytes_per_small_object']:,.0f} B",
            f"{f['objects_stored']:,} objects",
            "—",
            "—",
        )
    )
    rows.append(("client memory per live pointer", f"{f['client_bytes_per_pointer']:,.0f} B", "tracemalloc", "—", "—"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    p.add_argument("--logs", default="/tmp/fedptr-bench-logs")
    args = p.parse_args()
    figures = asyncio.run(run(args))
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.platform()}"
    )
    command = ".venv/bin/python bench/run.py" + (" --quick" if args.quick else "")
    Path(args.out).write_text(json.dumps({"machine": machine, "figures": figures}, indent=1))
    rows = report(figures)
    header = ("what", "fedptr", "baseline (same run)", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.markdown:
        lines = [
            "# Benchmarks",
            "",
            f"Machine: {machine}. Loopback tcp. Command: `{command}`.",
            f"Date: {time.strftime('%Y-%m-%d')}. Medians over all rounds; baselines interleaved in the same run.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * 5,
            *["| " + " | ".join(r) + " |" for r in rows],
        ]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
