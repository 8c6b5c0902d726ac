"""How fast a local cluster is up, and what an idle node costs in memory, with and without the
forking launcher (`fedptr.processes`): ``python bench/startup.py``.

* **Imports**: wall and CPU seconds of a fresh ``python -c "import M"`` for torch, the node, the
  node with Opacus (what every node loaded before Opacus became lazy) and ``fedptr --help``;
  the best of `--repeats` runs (the least disturbed by other load).
* **Clusters** of 1, 2, 8 and 16 nodes (CURVE on, one torch thread per node: `local_cluster`'s
  defaults), forked (``fork=True``) and plain (``fork=False``) in turn: seconds from
  ``local_cluster(...).start()`` until every node registered (the client's own ``import torch``
  is not counted: a script that uses pointers has paid it), then each node's idle memory from
  ``/proc/PID/smaps_rollup``: RSS (what ``ps`` shows, shared pages included), PSS (shared pages
  split among their sharers) and USS (pages only this node has). The total is the sum of the
  nodes' PSS, plus the launcher's when forked: what the cluster's nodes really take.

With ``--flower BIN_DIR`` (a venv's bin with ``pip install flwr``): Flower's Deployment Engine
on the same sizes, insecure: seconds from starting a SuperLink (then, once it listens, N
SuperNodes) until every SuperNode logged its registration (``SuperNode ID``), and each
SuperNode's PSS with its children's (its SuperExec). A SuperNode imports no torch until a run
starts its ClientApp: this is Flower ready to accept a run, fedptr ready to compute.

Prints Markdown tables with the ratios plain / forked (and forked / Flower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fedptr

IMPORTS = {
    "torch": "import torch",
    "the node (fedptr.nodes.node)": "import fedptr.nodes.node",
    "the node + Opacus (as before)": "import fedptr.nodes.node, opacus",
    "`fedptr --help`": "import contextlib, io, fedptr.cli as c\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    "    c.main(['--help'])",
    "the node, meta kernels loaded (a plain node's first private op; the launcher's start)": "from fedptr.nodes "
    "import guard\nguard.warm_up()",
}
PEAK = "\nimport sys\nprint([x.split()[1] for x in open('/proc/self/status') if x[:5] == 'VmHWM'][0], file=sys.stderr)"
"""Appended to each import's code: the interpreter's peak RSS (KiB), on stderr. Not ru_maxrss:
a child inherits its parent's through fork and exec, and this parent holds torch."""
MIB = 1 << 20


def import_cost(code: str, repeats: int) -> tuple[float, float, int]:
    """Best wall seconds, best CPU seconds and the peak RSS (bytes) of a fresh interpreter running `code`."""
    walls, cpus, peaks = [], [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code + PEAK], check=True, timeout=300, capture_output=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        peaks.append(int(done.stderr.split()[-1]) * 1024)
    return min(walls), min(cpus), max(peaks)


def memory(pid: int) -> dict[str, int]:
    """RSS, PSS and USS of process `pid`, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "uss": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    nodes: int
    forked: bool
    ready_s: float
    cpu_s: float
    """CPU seconds the nodes (and the launcher) used until ready: the work a start costs, whatever
    else runs on the machine."""
    rss: float
    """Mean per node, bytes; so are `pss` and `uss`."""
    pss: float
    uss: float
    launcher_pss: int
    total_pss: int


async def measure(n: int, fork: bool) -> Run:
    names = [f"owner{i}" for i in range(n)]
    start = time.perf_counter()
    cluster = await fedptr.local_cluster(names, fork=fork, start_timeout=900.0).start()
    ready = time.perf_counter() - start
    launcher = cluster.starter.launcher
    helpers = [launcher.process.pid] if launcher is not None else []
    cpu = sum(cpu_seconds(pid) for pid in [*(cluster.pids[name] for name in names), *helpers])
    try:
        for name in names:  # each node has served a request: idle, not still starting
            await cluster.client.worker(name).objects()
        nodes = [memory(cluster.pids[name]) for name in names]
        assert fork == (launcher is not None), "the launcher fell back to plain processes: see launcher.log"
        launcher_pss = memory(launcher.process.pid)["pss"] if launcher is not None else 0
    finally:
        await cluster.stop()
    return Run(
        n,
        fork,
        ready,
        cpu,
        statistics.mean(m["rss"] for m in nodes),
        statistics.mean(m["pss"] for m in nodes),
        statistics.mean(m["uss"] for m in nodes),
        launcher_pss,
        sum(m["pss"] for m in nodes) + launcher_pss,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree_pss(pid: int) -> int:
    """PSS of `pid` and its descendants, in bytes."""
    total = memory(pid)["pss"]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        total += tree_pss(int(child))
    return total


def flower_start(bin_dir: Path, n: int, timeout: float = 900.0) -> tuple[float, float]:
    """Seconds until a SuperLink and `n` SuperNodes are up and registered; mean PSS per SuperNode."""
    logs = Path(tempfile.mkdtemp(prefix="flower-start-"))
    port = free_port()  # Flower 1.42's SuperLink serves all its APIs over HTTP on one port
    procs: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}  # they start flower-superexec

    def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env))
        return procs[-1]

    start = time.perf_counter()
    try:
        spawn(
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                f"--port={port}",
                f"--database={logs / 'state.db'}",
            ],
            logs / "superlink.log",
        )
        deadline = time.monotonic() + timeout
        # as fedptr's nodes start once the broker listens: SuperNodes that find no SuperLink back off
        while "Uvicorn running on" not in (logs / "superlink.log").read_text(errors="replace"):
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not start; logs in {logs}")
            time.sleep(0.02)  # a synchronous poll of the log: no event loop runs here
        nodes = [
            spawn(
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    f"--superlink=127.0.0.1:{port}",
                    f"--port={free_port()}",
                    f"--node-config=partition-id={i}",
                ],
                logs / f"supernode{i}.log",
            )
            for i in range(n)
        ]
        while not all("SuperNode ID" in (logs / f"supernode{i}.log").read_text(errors="replace") for i in range(n)):
            dead = [p.args for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Flower did not start ({dead or 'deadline'}); logs in {logs}")
            time.sleep(0.02)  # a synchronous poll of the logs: no event loop runs here
        ready = time.perf_counter() - start
        return ready, statistics.mean(tree_pss(p.pid) for p in nodes)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 8, 16], help="cluster sizes (none: imports only)")
    p.add_argument("--repeats", type=int, default=3, help="runs per import (the best is kept)")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument("--flower", type=Path, default=None, help="bin directory of a venv with flwr: compare its start")
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}; load average {load:.1f} at the start.\n"
    )
    print("| import | wall s | CPU s | peak RSS MiB |\n|---|---|---|---|")
    imports = {}
    for what, code in IMPORTS.items():
        wall, cpu, peak = import_cost(code, args.repeats)
        imports[what] = {"wall_s": wall, "cpu_s": cpu, "peak_rss": peak}
        print(f"| {what} | {wall:.2f} | {cpu:.2f} | {mib(peak)} |", flush=True)

    runs: list[Run] = []
    for i, n in enumerate(args.nodes):
        # the order alternates with the size, so that neither mode always runs first
        for fork in (True, False) if i % 2 == 0 else (False, True):
            runs.append(await measure(n, fork))
            print(f"<!-- {asdict(runs[-1])} -->", flush=True)
    print(
        "\n| nodes | ready s: plain / forked (ratio) | CPU s to ready: plain / forked (ratio) "
        "| per node RSS MiB: plain / forked | PSS | USS "
        "| total PSS MiB, launcher included: plain / forked (ratio) |\n|---|---|---|---|---|---|---|"
    )
    for n in args.nodes:
        plain = next(r for r in runs if r.nodes == n and not r.forked)
        forked = next(r for r in runs if r.nodes == n and r.forked)
        print(
            f"| {n} | {plain.ready_s:.1f} / {forked.ready_s:.1f} ({plain.ready_s / forked.ready_s:.1f}×) "
            f"| {plain.cpu_s:.1f} / {forked.cpu_s:.1f} ({plain.cpu_s / forked.cpu_s:.1f}×) "
            f"| {mib(plain.rss)} / {mib(forked.rss)} | {mib(plain.pss)} / {mib(forked.pss)} "
            f"| {mib(plain.uss)} / {mib(forked.uss)} "
            f"| {mib(plain.total_pss)} / {mib(forked.total_pss)} ({plain.total_pss / forked.total_pss:.1f}×) |"
        )
    flower: dict[int, tuple[float, float]] = {}
    if args.flower is not None:
        print("\n| nodes | ready s: Flower / fedptr forked (ratio fedptr/Flower) | per node PSS MiB: Flower / fedptr |")
        print("|---|---|---|")
        for n in args.nodes:
            flower[n] = flower_start(args.flower, n)
            forked = next(r for r in runs if r.nodes == n and r.forked)
            print(
                f"| {n} | {flower[n][0]:.1f} / {forked.ready_s:.1f} ({forked.ready_s / flower[n][0]:.2f}×) "
                f"| {mib(flower[n][1])} / {mib(forked.pss)} |",
                flush=True,
            )
    print(f"\nLoad average {os.getloadavg()[0]:.1f} at the end.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"imports": imports, "clusters": [asdict(r) for r in runs], "flower": flower}, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
