"""CPU time per small pipelined op, in each process of a one-node local cluster.

The measure behind tests/test_cpu_budget.py, and the tool that writes its baseline:

    .venv/bin/python -m tests.cpuclock            # print the figures of a few runs
    .venv/bin/python -m tests.cpuclock --write    # measure and store them in tests/cpu_baseline.json

CPU time (user + system, every thread, from /proc/PID/stat) rather than wall time: on a shared
machine other processes take turns on the cores, which stretches wall time but not the CPU a
process spends on its own work. The clock ticks at SC_CLK_TCK (100 Hz: 10 ms), so a figure needs
a few thousand ops to be finer than a few µs per op; each repetition's figure is the CPU spent
over its ops, and a process's figure is the minimum over the repetitions (noise only ever adds
CPU: a cold cache, a page fault, a heartbeat).

The op is the one the issue measures: `x + a` on 4-element tensors, 100 dependent ops issued
at once and awaited at the end (pipelined), on a cluster without CURVE (the node's own work,
not zmq's encryption).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

import torch

import fedptr

BASELINE = Path(__file__).with_name("cpu_baseline.json")
TICK_HZ = os.sysconf("SC_CLK_TCK")
OPS = 3000
"""Ops per repetition: at 25 µs of node CPU per op, 75 ms, 7 clock ticks and more."""
REPETITIONS = 3
CHAIN = 100
"""Dependent ops issued before the client waits (the pipeline depth)."""
WARM_UP_OPS = 300
PROCESSES = ("node", "broker", "client")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads, dead ones included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICK_HZ


async def _chains(a: fedptr.Pointer, ops: int) -> None:
    x = a
    for _ in range(ops // CHAIN):
        x = a
        for _ in range(CHAIN):
            x = x + a
    await x


async def measure(ops: int = OPS, repetitions: int = REPETITIONS) -> dict[str, list[float]]:
    """CPU µs per op of each process (`PROCESSES`), one figure per repetition."""
    runs: dict[str, list[float]] = {p: [] for p in PROCESSES}
    async with fedptr.local_cluster(["bob"], curve=False) as cluster:
        a = await cluster.client.worker("bob").send(torch.ones(4))
        await _chains(a, WARM_UP_OPS)  # the first ops load torch's kernels and grow the caches
        pids = {"node": cluster.pids["bob"], "broker": cluster.pids["broker"], "client": os.getpid()}
        for _ in range(repetitions):
            before = {p: cpu_seconds(pid) for p, pid in pids.items()}
            await _chains(a, ops)
            for p, pid in pids.items():
                runs[p].append((cpu_seconds(pid) - before[p]) / ops * 1e6)
    return runs


def per_op(runs: dict[str, list[float]]) -> dict[str, float]:
    """Each process's figure: its least CPU per op over the repetitions."""
    return {p: round(min(v), 1) for p, v in runs.items()}


def load_baseline() -> dict[str, float]:
    """The stored CPU µs per op, by process."""
    stored: dict[str, float] = json.loads(BASELINE.read_text())["cpu_us_per_op"]
    return stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", type=int, default=5, help="measurements, each on a fresh cluster (the baseline: their median)"
    )
    ap.add_argument("--write", action="store_true", help=f"store the median in {BASELINE.name}")
    args = ap.parse_args()
    figures = []
    for i in range(args.runs):
        figures.append(per_op(asyncio.run(measure())))
        print(f"run {i + 1}: " + ", ".join(f"{p} {v:.1f}" for p, v in figures[-1].items()) + " CPU µs/op")
    median = {p: sorted(f[p] for f in figures)[len(figures) // 2] for p in PROCESSES}
    spread = {p: [min(f[p] for f in figures), max(f[p] for f in figures)] for p in PROCESSES}
    print("median: " + ", ".join(f"{p} {v:.1f}" for p, v in median.items()) + " CPU µs/op")
    if args.write:
        record = {
            "cpu_us_per_op": median,
            "spread": spread,
            "runs": args.runs,
            "ops": OPS,
            "repetitions": REPETITIONS,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "command": "python -m tests.cpuclock --write",
        }
        BASELINE.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {BASELINE}")


if __name__ == "__main__":
    main()
