"""Launch a broker and named worker nodes in the foreground; Ctrl-C stops them all.

    python deploy/local.py bob alice --bind tcp://127.0.0.1:5555

Prints the broker's address, then waits. Clients connect with ``fedptr.connect(ADDRESS)``.
Each process logs to ``--log-dir`` (default: a temporary directory, printed at start).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
from pathlib import Path

from fedptr import limits
from fedptr.client import connect
from fedptr.cluster import start_broker, start_process, stop_processes, wait_registered


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help="worker names to start")
    p.add_argument("--bind", default="tcp://127.0.0.1:*", help="broker endpoint (use 0.0.0.0 to let other hosts join)")
    p.add_argument("--log-dir", default=None)
    args = p.parse_args()
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="fedptr-deploy-"))
    logs.mkdir(parents=True, exist_ok=True)
    broker, address = await start_broker(args.bind, logs / "broker.log", limits.CLUSTER_START_TIMEOUT_S)
    processes = {"broker": broker}
    try:
        for name in args.names:
            processes[name] = start_process(
                ["-m", "fedptr.nodes", "--name", name, "--broker", address], logs / f"{name}.log"
            )
        async with connect(address) as client:
            await wait_registered(client, args.names, processes, logs, limits.CLUSTER_START_TIMEOUT_S)
        print(f"broker at {address}; workers {', '.join(args.names)} registered; logs in {logs}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        stop_processes(list(reversed(processes.values())))
        print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
