"""Does memory come back when clients leave? ``python bench/memory.py`` (issue 19, cause 6).

Two workloads on a real broker and one real node process, their resident memory (VmRSS) read
from /proc:

* **pipelined clients**: `--clients` clients at once, each sends one tensor of `--numel`
  float32 and pipelines `--ops` operations on it (every result a new tensor of that size, held
  until the client awaits them all), then leaves;
* **departures**: `--departures` clients, `--parallel` at a time, each sends a tensor of
  `--departure-numel` float32 (streamed through the broker past 4 MiB), pipelines 20 operations
  on it, awaits the send and leaves without awaiting the operations.

After each, it waits until the node holds no object and the processes' RSS is back within
`--margin-mib` of where it started (at most `--settle-s`), and prints the figures. The full
run is the issue's: 12 clients x 300 ops of 256 KiB tensors, then 5,000 departures.
`tests/test_memory.py` runs both at CI size.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import torch

import fedptr
from fedptr import limits

MIB = 1 << 20
WORKER = "bob"
DEPARTURE_OPS = 20
POLL_S = 0.05
TRIM_RUN_S = 1.0
"""How long (s) a heap trim may take to run once due (`limits.HEAP_TRIM_DELAY_S` after a departure)."""


def rss(pid: int) -> int:
    """Resident memory of process `pid` (bytes), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} reports no VmRSS")


@dataclass
class Figures:
    """RSS (bytes) of the broker and the node: at the start, at the workload's peak (sampled
    after it), and once settled (or `settle_s` after the clients left); seconds taken."""

    broker_start: int
    node_start: int
    node_peak: int = 0
    broker_peak: int = 0
    broker_end: int = 0
    node_end: int = 0
    seconds: float = 0.0
    settled_s: float = 0.0

    def line(self, what: str) -> str:
        return (
            f"{what}: {self.seconds:.1f} s; node RSS MiB start {self.node_start // MIB}, peak "
            f"{self.node_peak // MIB}, after {self.node_end // MIB} (+{(self.node_end - self.node_start) // MIB}); "
            f"broker RSS MiB start {self.broker_start // MIB}, peak {self.broker_peak // MIB}, after "
            f"{self.broker_end // MIB} (+{(self.broker_end - self.broker_start) // MIB}); "
            f"settled {self.settled_s:.1f} s after the last client left"
        )


async def _pipelined_client(cluster: fedptr.Cluster, ops: int, numel: int) -> int:
    async with cluster.connect() as client:
        x = client.worker(WORKER).send(torch.ones(numel))
        results = [x * float(i) for i in range(ops)]
        await asyncio.gather(*results)
        return rss(cluster.pids[WORKER])


async def _departing_client(cluster: fedptr.Cluster, numel: int) -> None:
    async with cluster.connect() as client:
        x = client.worker(WORKER).send(torch.ones(numel))
        pending = [x + float(i) for i in range(DEPARTURE_OPS)]
        await x
        del pending  # dropped unawaited: the session's end reclaims what they made


async def _settle(cluster: fedptr.Cluster, figures: Figures, margin: int, settle_s: float, left: float) -> None:
    """Wait until the node holds nothing, its last heap trim had time to run, and both processes
    are within `margin` of their start (or `settle_s` passes); record where they ended. A reading
    taken before the trim was due counts freed memory as kept (3,000 departures on a node: +81
    MiB read 0.1 s after the last client left, within the 100 MiB margin; +10 MiB once trimmed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    trimmed = loop.time() + limits.HEAP_TRIM_DELAY_S + TRIM_RUN_S
    broker, node = cluster.pids["broker"], cluster.pids[WORKER]
    while True:
        figures.broker_end, figures.node_end = rss(broker), rss(node)
        empty = await cluster.client.worker(WORKER).objects() == {}
        back = figures.node_end - figures.node_start <= margin and figures.broker_end - figures.broker_start <= margin
        if (empty and back and loop.time() > trimmed) or loop.time() > deadline:
            break
        await asyncio.sleep(POLL_S)
    figures.settled_s = time.monotonic() - left


async def pipelined(
    cluster: fedptr.Cluster, clients: int, ops: int, numel: int, margin: int, settle_s: float
) -> Figures:
    """`clients` clients pipeline `ops` ops each on `numel`-element tensors, all at once, and leave."""
    figures = Figures(rss(cluster.pids["broker"]), rss(cluster.pids[WORKER]))
    started = time.monotonic()
    peaks = await asyncio.gather(*(_pipelined_client(cluster, ops, numel) for _ in range(clients)))
    figures.node_peak, figures.broker_peak = max(peaks), rss(cluster.pids["broker"])
    figures.seconds = time.monotonic() - started
    await _settle(cluster, figures, margin, settle_s, time.monotonic())
    return figures


async def departures(
    cluster: fedptr.Cluster, count: int, parallel: int, numel: int, margin: int, settle_s: float
) -> Figures:
    """`count` clients, `parallel` at a time, each send, pipeline and leave."""
    figures = Figures(rss(cluster.pids["broker"]), rss(cluster.pids[WORKER]))
    started = time.monotonic()
    for done in range(0, count, parallel):
        await asyncio.gather(*(_departing_client(cluster, numel) for _ in range(min(parallel, count - done))))
        figures.node_peak = max(figures.node_peak, rss(cluster.pids[WORKER]))
        figures.broker_peak = max(figures.broker_peak, rss(cluster.pids["broker"]))
    figures.seconds = time.monotonic() - started
    await _settle(cluster, figures, margin, settle_s, time.monotonic())
    return figures


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--ops", type=int, default=300)
    p.add_argument("--numel", type=int, default=1 << 16, help="float32 elements per tensor (256 KiB)")
    p.add_argument("--departures", type=int, default=5000)
    p.add_argument("--parallel", type=int, default=10)
    p.add_argument("--departure-numel", type=int, default=300_000, help="float32 elements each departing client sends")
    p.add_argument("--margin-mib", type=int, default=100, help="how close to its start RSS must come back")
    p.add_argument("--settle-s", type=float, default=10.0, help="longest wait for RSS to come back")
    args = p.parse_args()
    margin = args.margin_mib * MIB
    async with fedptr.local_cluster([WORKER], call_timeout=120.0, heartbeat_s=1.0, liveness=10) as cluster:
        f = await pipelined(cluster, args.clients, args.ops, args.numel, margin, args.settle_s)
        print(f.line(f"{args.clients} clients x {args.ops} pipelined ops of {args.numel * 4 // 1024} KiB"), flush=True)
        f = await departures(cluster, args.departures, args.parallel, args.departure_numel, margin, args.settle_s)
        print(f.line(f"{args.departures} departures, {args.parallel} at a time"), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
