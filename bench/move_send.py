"""A 64 MiB move against one 64 MiB send, paired, with the CPU each process spent on each.

    .venv/bin/python bench/move_send.py --curve on --pairs 30
    .venv/bin/python bench/move_send.py --curve on --pairs 8 --pause 3   # every transfer on a path idle > 2 s

Each pair is one send from the client to bob and one move of a tensor between bob and alice (its
direction alternating, as `bench/run.py`'s move case does), in one two-node `local_cluster`. The
wall time is the awaited call's; the CPU is each process's (client, broker, bob, alice: user +
system, all threads, from /proc/PID/stat: stable on a shared machine where wall time is not).
With ``--pause``, each transfer follows that long an idle: longer than
`limits.DIRECT_SHM_SPARE_S` (1-2 s), every transfer writes fresh tmpfs files rather than files
its path handed back (BENCHMARKS.md, "Bulk bytes, sixth pass").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

import fedptr

MIB = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """Seconds of CPU (user + system, all threads) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _cpus(pids: dict[str, int]) -> dict[str, float]:
    return {name: _cpu(pid) for name, pid in pids.items()}


async def main(curve: bool, pairs: int, mib: int, pause: float) -> None:
    async with fedptr.local_cluster(["bob", "alice"], curve=curve) as cluster:
        bob, alice = cluster.client.worker("bob"), cluster.client.worker("alice")
        pids = {"client": os.getpid(), **cluster.pids}
        big = torch.randn(mib * MIB // 4)
        moving = await bob.send(big)
        for _ in range(3):  # the paths open on first transfers (in the background): both ways, warm
            moving = await (await moving.move(alice)).move(bob)
            await bob.send(big)
        walls: dict[str, list[float]] = {"send": [], "move": []}
        cpu = {kind: dict.fromkeys(pids, 0.0) for kind in walls}
        settle = 0.05  # each process finishes what follows a reply (a delete, the source's free)
        for _ in range(pairs):
            for kind in walls:
                await asyncio.sleep(pause)
                before, t0 = _cpus(pids), time.perf_counter()
                if kind == "send":
                    await bob.send(big)
                else:
                    moving = await moving.move(alice if moving.location == "bob" else bob)
                walls[kind].append(time.perf_counter() - t0)
                await asyncio.sleep(settle)
                after = _cpus(pids)
                for name in pids:
                    cpu[kind][name] += after[name] - before[name]
        ratios = [m / s for s, m in zip(walls["send"], walls["move"], strict=True)]
        mode, load = "on" if curve else "off", os.getloadavg()[0]
        print(f"CURVE {mode}, {mib} MiB, {pairs} pairs, pause {pause:g} s, load {load:.1f}")
        for kind, w in walls.items():
            per = ", ".join(f"{name} {cpu[kind][name] / pairs * 1e3:.1f}" for name in pids)
            wall, idle = statistics.median(w) * 1e3, settle * 1e3
            print(f"  {kind}: wall median {wall:.1f} ms; CPU ms per {kind} (+{idle:.0f} ms idle): {per}")
        print(f"  move / send: paired median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", choices=("on", "off"), default="on")
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds idle before each transfer")
    args = parser.parse_args()
    asyncio.run(main(args.curve == "on", args.pairs, args.mib, args.pause))
