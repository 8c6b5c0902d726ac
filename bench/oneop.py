"""Awaited one op and 100 dependent ops + get on a one-worker local cluster: wall time, and CPU
time per op in each process (user + system, all threads, from /proc: steadier than wall time on
a shared machine). For A/B runs against another checkout: run each one's own venv in turns.

    .venv/bin/python bench/oneop.py [--ops 4000] [--dep 40] [--curve] [--pause 3]

`--pause` prints the process ids and waits before measuring (to attach strace or py-spy).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

import fedptr

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds of process `pid`, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for c in f.read().split():
                    out += [int(c), *children(int(c))]
        except OSError:
            pass
    return out


def role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode()
    return "broker" if "broker" in cmd else "node"  # the launcher and its forked node alike: the launcher reads ~0


def per_process(kids: list[int], before: dict[int, float], n: int, scale: float, digits: int) -> str:
    return " ".join(f"{role(p)} {(cpu_s(p) - before[p]) / n * scale:.{digits}f}" for p in kids)


async def main(ops: int, dep: int, curve: bool, pause: float) -> None:
    async with fedptr.local_cluster(["bob"], curve=curve) as cluster:
        x = await cluster.client.worker("bob").send(torch.ones(4))
        for _ in range(300):
            await (x + x)
        kids = [p for p in children(os.getpid()) if cpu_s(p) > 0]  # the launcher idles
        if pause:
            print("PIDS", os.getpid(), *kids, flush=True)
            await asyncio.sleep(pause)
        me, before, times = cpu_s(os.getpid()), {p: cpu_s(p) for p in kids}, []
        for _ in range(ops):
            t = time.perf_counter()
            await (x + x)
            times.append(time.perf_counter() - t)
        print(
            f"one op, curve={curve}: median {statistics.median(times) * 1e6:.0f} us; CPU us/op "
            f"client {(cpu_s(os.getpid()) - me) / ops * 1e6:.0f} {per_process(kids, before, ops, 1e6, 0)}"
        )
        if not dep:
            return
        me, before, times = cpu_s(os.getpid()), {p: cpu_s(p) for p in kids}, []
        for _ in range(dep):
            t = time.perf_counter()
            y = x
            for _ in range(100):
                y = y + x
            await y.get()
            times.append(time.perf_counter() - t)
        print(
            f"100 dependent + get, curve={curve}: median {statistics.median(times) * 1e3:.2f} ms; CPU ms/chain "
            f"client {(cpu_s(os.getpid()) - me) / dep * 1e3:.2f} {per_process(kids, before, dep, 1e3, 2)}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=4000)
    ap.add_argument("--dep", type=int, default=40, help="chains of 100 dependent ops + get (0: none)")
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--pause", type=float, default=0.0)
    a = ap.parse_args()
    asyncio.run(main(a.ops, a.dep, a.curve, a.pause))
