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

CPU per op depends on the machine as much as on the code: the same commit spent 23 µs per op in
the node on one 2-core VM and 43-77 µs on another (AMD EPYC, 2026-12-07), whose speed moved by
half within minutes. So each repetition also measures the CPU time of a fixed reference workload
(`calibrate`: the interpreter, msgpack and a small torch op, what a node's op is made of), measured
before each repetition: the guard scales the stored figures by the reference measured now
against the one stored with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

import fedptr

BASELINE = Path(__file__).with_name("cpu_baseline.json")
TICK_HZ = os.sysconf("SC_CLK_TCK")
OPS = 3000
"""Ops per repetition: at 25 µs of node CPU per op, 75 ms, 7 clock ticks and more."""
REPETITIONS = 5
"""Repetitions per measure, the least kept: a run at 50 µs per op on a 2-core VM had single
repetitions of 47 to 87."""
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
    """CPU µs per op of each process (`PROCESSES`), one figure per repetition, and under
    ``"reference"`` the reference workload's CPU µs per loop measured just before each (`calibrate`)."""
    runs: dict[str, list[float]] = {p: [] for p in (*PROCESSES, "reference")}
    async with fedptr.local_cluster(["bob"], curve=False) as cluster:
        a = await cluster.client.worker("bob").send(torch.ones(4))
        await _chains(a, WARM_UP_OPS)  # the first ops load torch's kernels and grow the caches
        pids = {"node": cluster.pids["bob"], "broker": cluster.pids["broker"], "client": os.getpid()}
        for _ in range(repetitions):
            runs["reference"].append(calibrate())
            before = {p: cpu_seconds(pid) for p, pid in pids.items()}
            await _chains(a, ops)
            for p, pid in pids.items():
                runs[p].append((cpu_seconds(pid) - before[p]) / ops * 1e6)
    return runs


CALIBRATION_LOOPS = 5_000
"""Iterations of the reference workload per repetition (~20-45 ms of CPU)."""


def _reference_work(loops: int) -> None:
    """A fixed mix of what a node's small op costs: Python calls and dict work, a msgpack round
    trip of a request-sized message, and a 4-element torch op."""
    a, b = torch.ones(4), torch.ones(4)
    packb, unpackb = msgpack.packb, msgpack.unpackb
    kept: dict[int, object] = {}
    for i in range(loops):
        message = unpackb(packb([b"op", i, "add", [i, i + 1], {"alpha": 1.0}]))
        kept[i & 1023] = (torch.add(a, b), message)


def calibrate(repetitions: int = 3) -> float:
    """CPU µs per loop of the reference workload in this process: the least over `repetitions`
    (high-resolution `time.process_time`; noise only ever adds)."""
    _reference_work(CALIBRATION_LOOPS // 10)  # warm: torch's kernels, msgpack's buffers
    best = float("inf")
    for _ in range(repetitions):
        start = time.process_time()
        _reference_work(CALIBRATION_LOOPS)
        best = min(best, (time.process_time() - start) / CALIBRATION_LOOPS * 1e6)
    return best


def per_op(runs: dict[str, list[float]]) -> dict[str, float]:
    """Each process's figure: its least CPU per op over the repetitions."""
    return {p: round(min(runs[p]), 1) for p in PROCESSES}


def reference(runs: dict[str, list[float]]) -> float:
    """The machine's speed during a measure: the reference workload's least CPU µs per loop over
    its repetitions (each the least of its own: noise only ever adds). The figures are compared
    in its units: a VM's speed moved by half within minutes (its host's other tenants)."""
    return round(min(runs["reference"]), 3)


def load_baseline() -> dict[str, Any]:
    """The stored record: ``cpu_us_per_op`` by process and the ``reference`` (`reference`) they
    were measured at, each the median over the runs."""
    record: dict[str, Any] = json.loads(BASELINE.read_text())
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", type=int, default=5, help="measurements, each on a fresh cluster (the baseline: their median)"
    )
    ap.add_argument("--write", action="store_true", help=f"store the median in {BASELINE.name}")
    args = ap.parse_args()
    figures, references = [], []
    for i in range(args.runs):
        runs = asyncio.run(measure())
        figures.append(per_op(runs))
        references.append(reference(runs))
        print(
            f"run {i + 1}: " + ", ".join(f"{p} {v:.1f}" for p, v in figures[-1].items()) + " CPU µs/op; "
            f"reference {references[-1]:.2f} CPU µs/loop"
        )
    median = {p: sorted(f[p] for f in figures)[len(figures) // 2] for p in PROCESSES}
    spread = {p: [min(f[p] for f in figures), max(f[p] for f in figures)] for p in PROCESSES}
    speed = sorted(references)[len(references) // 2]
    print("median: " + ", ".join(f"{p} {v:.1f}" for p, v in median.items()) + f" CPU µs/op; reference {speed:.2f}")
    if args.write:
        record = {
            "cpu_us_per_op": median,
            "spread": spread,
            "reference": speed,
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
