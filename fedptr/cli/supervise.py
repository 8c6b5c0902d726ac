"""Running a cluster file: start the broker and the nodes, supervise them, stop them all.

The foreground ``fedptr up`` process is the supervisor: it starts the broker, and the nodes
through `fedptr.processes.NodeStarter` (forked by one warm launcher on Linux), and everything dies
with it (``PR_SET_PDEATHSIG``), so nothing outlives it, even a SIGKILL.
``--detach`` starts that same supervisor in a new session and returns once it wrote the state
file; ``fedptr down`` signals the supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedptr import limits
from fedptr.cli.clusterfile import ClusterSpec
from fedptr.cli.state import ClusterState, is_fedptr_process, running, state_path
from fedptr.errors import DeadlineExceeded, FedptrError
from fedptr.processes import NodeStarter, Process, start_broker, stop_processes, wait_registered
from fedptr.security import CurveKeys

WATCH_INTERVAL_S = 0.5
"""How often the supervisor checks that its processes still run."""


class AlreadyRunning(FedptrError):
    """Raised when a cluster of the same name already runs (its state file names a live supervisor)."""


async def _start(spec: ClusterSpec, log_dir: Path, starter: NodeStarter, processes: dict[str, Process]) -> str:
    """Start the broker then the nodes into `processes`; return the broker's address once all registered."""
    from fedptr.client import connect  # imports torch: only when a cluster really starts

    broker = spec.broker
    processes["broker"], address = await start_broker(
        broker.bind, log_dir / "broker.log", spec.start_timeout, broker.argv()
    )
    for node in spec.nodes.values():
        if node.store is not None:
            node.store.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: see nodes/durable.py
        processes[node.name] = await starter.start(
            ["--name", node.name, "--broker", address, *node.argv(broker)],
            log_dir / f"{node.name}.log",
            spec.start_timeout,
        )
    keys = None
    if broker.client_secret is not None and broker.broker_key is not None:
        keys = CurveKeys.load(broker.client_secret, broker.broker_key)
    async with connect(
        address,
        timeout=spec.start_timeout,
        heartbeat_s=broker.heartbeat_ms / 1000,
        liveness=broker.liveness,
        curve=keys,
    ) as client:
        await wait_registered(client, list(spec.nodes), processes, log_dir, spec.start_timeout)
    return address


async def _watch(processes: dict[str, Process], report: Callable[[str, int], None]) -> None:
    """Report each process that exits while the cluster runs, once."""
    reported: set[str] = set()
    while True:
        for name, proc in processes.items():
            code = proc.poll()
            if code is not None and name not in reported:
                reported.add(name)
                report(name, code)
        await asyncio.sleep(WATCH_INTERVAL_S)


def check_not_running(run_dir: Path, name: str) -> None:
    """Raise `AlreadyRunning` if cluster `name` has a state file whose supervisor still runs."""
    path = state_path(run_dir, name)
    if path.exists():
        state = ClusterState.read(path)
        if running(state.supervisor_pid) and is_fedptr_process(state.supervisor_pid):
            raise AlreadyRunning(
                f"cluster {name!r} already runs (supervisor pid {state.supervisor_pid}, state {path}); "
                f"stop it with: fedptr down {name}"
            )


async def run_foreground(
    spec: ClusterSpec,
    run_dir: Path,
    log_dir: Path,
    on_ready: Callable[[ClusterState], None],
    on_exit: Callable[[str, int], None],
) -> bool:
    """Start the cluster, write its state file, call `on_ready`, and serve until SIGINT or SIGTERM;
    then stop every process and remove the state file. Returns False if a signal came before
    the cluster was up. Raises (after stopping what started) if a process failed to start."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starter = NodeStarter(log_dir, fork=True)  # the launcher imports torch while the broker starts
    processes: dict[str, Process] = {}
    path = state_path(run_dir, spec.name)
    written = False
    try:
        starting = asyncio.create_task(_start(spec, log_dir, starter, processes))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return False
        stopping.cancel()
        address = starting.result()
        state = ClusterState(
            name=spec.name,
            cluster_file=str(spec.path),
            address=address,
            supervisor_pid=os.getpid(),
            # the launcher too, when the nodes were forked: `fedptr down` ends whatever is left
            pids={n: p.pid for n, p in processes.items()}
            | ({"launcher": starter.launcher.process.pid} if starter.launcher else {}),
            log_dir=str(log_dir),
        )
        state.write(run_dir)
        written = True
        on_ready(state)
        watcher = asyncio.create_task(_watch(processes, on_exit))
        try:
            await stop.wait()
        finally:
            watcher.cancel()
        return True
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(stop_processes, list(reversed(processes.values())))
        await asyncio.to_thread(starter.close)
        if written:
            path.unlink(missing_ok=True)


def detach(cluster_file: Path, run_dir: Path, log_dir: Path, timeout: float) -> ClusterState:
    """Start ``fedptr up CLUSTER_FILE`` in a new session (its output to ``LOG_DIR/up.log``) and
    return its state once it wrote the state file. Raises FedptrError with the log's tail if it
    exits first, DeadlineExceeded (after stopping it) if it is not up within `timeout` seconds."""
    log_dir.mkdir(parents=True, exist_ok=True)
    up_log = log_dir / "up.log"
    with open(up_log, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedptr.cli",
                "up",
                str(cluster_file),
                "--run-dir",
                str(run_dir),
                "--log-dir",
                str(log_dir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "COLUMNS": "120"},
        )
    deadline = time.monotonic() + timeout
    while True:
        for path in run_dir.glob("*.json"):
            state = ClusterState.read(path)
            if state.supervisor_pid == proc.pid:
                return state
        code = proc.poll()
        if code is not None:
            raise FedptrError(f"fedptr up exited with status {code}:\n{up_log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            stop_processes([proc])
            raise DeadlineExceeded("fedptr up", timeout, ["fedptr up"])
        time.sleep(limits.POLL_INTERVAL_S)  # a synchronous CLI poll: no event loop runs here


def stop_detached(state: ClusterState, run_dir: Path, grace: float) -> list[str]:
    """SIGTERM the cluster's supervisor and wait up to `grace` seconds for it and its processes
    to exit; SIGKILL whatever is left; remove the state file. Returns the names killed."""
    pids = {"fedptr up": state.supervisor_pid, **state.pids}
    if running(state.supervisor_pid) and is_fedptr_process(state.supervisor_pid):
        os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(running(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(limits.POLL_INTERVAL_S)  # a synchronous CLI poll: no event loop runs here
    killed = []
    for name, pid in pids.items():
        if running(pid) and is_fedptr_process(pid):
            os.kill(pid, signal.SIGKILL)
            killed.append(name)
    state_path(run_dir, state.name).unlink(missing_ok=True)
    return killed


DOWN_GRACE_S = 3 * limits.CLUSTER_STOP_GRACE_S
"""How long ``fedptr down`` waits after SIGTERM before it sends SIGKILL."""
