"""The processes of a cluster on this machine: starting, watching and stopping them.

Nodes start in one of two ways (`NodeStarter`):

* **forked** (Linux): one launcher process (``python -m fedptr.nodes.launcher``) imports torch
  and the node code once, then forks each node from that warm image, so N nodes start for
  about the price of one and share their read-only pages copy-on-write. The library talks to
  the launcher over its stdin and stdout in JSON lines (never pickle) and never imports the
  node code itself; the launcher reports each node's pid and, when it exits, its status.
* **plain**: ``python -m fedptr.nodes`` per node, where fork is unsafe or the launcher could
  not start.

Either way a node dies with whoever started it (Linux PR_SET_PDEATHSIG: a node with its
launcher, the launcher and the broker with this process), so even a crashed or killed client
leaves nothing running. This module imports no torch: ``fedptr --help`` loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fedptr import limits
from fedptr.errors import DeadlineExceeded, FedptrError

if TYPE_CHECKING:
    from fedptr.client import Client

_PR_SET_PDEATHSIG = 1
log = logging.getLogger("fedptr.processes")


class Process(Protocol):
    """What a cluster needs of a process: `subprocess.Popen` and `ForkedNode` both are one."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_process(
    args: Sequence[str],
    log_path: Path,
    stdout: int | IO[bytes] | None = None,
    prefix: Sequence[str] = (),
    stdin: int = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python args...` (after `prefix`, e.g. ``ip netns exec NS``) with stderr (and stdout
    unless given) appended to `log_path`, in `env` (default: ours). It dies with the thread that
    calls this (Linux)."""
    with open(log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=stdout if stdout is not None else log_file,
            stderr=log_file,
            stdin=stdin,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            start_new_session=True,
        )


def stop_processes(processes: Sequence[Process], grace: float = limits.CLUSTER_STOP_GRACE_S) -> None:
    """SIGTERM each running process, wait up to `grace` seconds in all, then SIGKILL the rest."""
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(grace)


async def start_broker(
    bind: str, log_path: Path, timeout: float, extra: Sequence[str] = (), prefix: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a broker bound to `bind` and return it with the endpoint it bound (a ``*`` port resolved)."""
    proc = start_process(
        ["-m", "fedptr.broker", "--bind", bind, *extra], log_path, stdout=subprocess.PIPE, prefix=prefix
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    except TimeoutError:
        stop_processes([proc])
        raise DeadlineExceeded("broker", timeout, ["broker"]) from None
    text = line.decode().strip()
    if not text.startswith("fedptr-broker listening on "):
        stop_processes([proc])
        raise FedptrError(f"broker did not start: {text!r}; see {log_path}")
    return proc, text.rsplit(" ", 1)[1]


async def wait_registered(
    client: Client,
    names: Sequence[str],
    processes: Mapping[str, Process],
    log_dir: Path,
    timeout: float,
) -> None:
    """Return once every name is registered; raise if a process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        registered = set(await client.workers())
        missing = [n for n in names if n not in registered]
        if not missing:
            return
        for name, proc in processes.items():
            if proc.poll() is not None:
                text = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise FedptrError(f"process {name!r} exited with status {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            raise DeadlineExceeded(missing[0], timeout, missing)
        await asyncio.sleep(limits.POLL_INTERVAL_S)


class LauncherUnavailable(FedptrError):
    """The launcher exited or refused to fork (the reason is in its log); nodes start as plain processes."""


class ForkedNode:
    """A node the launcher forked: a `Process` whose exit status the launcher reports. Signals go
    straight to its pid (the launcher reaps it only once it exited, so the pid is not reused
    before this handle knows it exited)."""

    def __init__(self, pid: int, launcher: Launcher) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._launcher = launcher

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status, once the launcher reported it; raises subprocess.TimeoutExpired after `timeout` s."""
        with self._launcher.changed:
            if not self._launcher.changed.wait_for(lambda: self.returncode is not None, timeout):
                raise subprocess.TimeoutExpired(f"node pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited; the launcher's report is on its way
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Launcher:
    """The client's side of a ``python -m fedptr.nodes.launcher`` process: `fork` asks it for a
    node; a reader thread takes its replies (pids, exit statuses)."""

    def __init__(self, log_path: Path) -> None:
        # numpy's OpenBLAS starts a thread pool when it loads, and the launcher forks only while it
        # runs one thread; nodes compute with torch (whose threads are --threads), not numpy's BLAS
        env = {"OPENBLAS_NUM_THREADS": "1", **os.environ}
        self.process = start_process(
            ["-m", "fedptr.nodes.launcher"], log_path, stdout=subprocess.PIPE, stdin=subprocess.PIPE, env=env
        )
        self.log_path = log_path
        self.changed = threading.Condition()
        """Notified whenever a reply arrives (a pid, an exit status, the launcher's end)."""
        self._nodes: dict[int, ForkedNode] = {}
        self._replies: dict[int, ForkedNode | str] = {}
        """Request id -> the node forked, or why not."""
        self._next_id = 0
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="fedptr-launcher-reader", daemon=True)
        self._reader.start()

    def fork(self, argv: Sequence[str], log_path: Path, timeout: float) -> ForkedNode:
        """A node forked with node command line `argv` (``--name ...``), stdout and stderr appended
        to `log_path`. Blocks until the launcher has forked it (the first call waits for the
        launcher's imports): call it off the event loop. Raises LauncherUnavailable when the
        launcher is gone or refused, DeadlineExceeded after `timeout` seconds."""
        with self.changed:
            self._next_id += 1
            request = self._next_id
            line = json.dumps({"id": request, "argv": list(argv), "log": str(log_path)}) + "\n"
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(line.encode())
                self.process.stdin.flush()
            except (BrokenPipeError, ValueError):  # ValueError: the pipe was closed by `close`
                self._gone = True
            if not self.changed.wait_for(lambda: request in self._replies or self._gone, timeout):
                raise DeadlineExceeded("launcher", timeout, ["launcher"])
            reply = self._replies.pop(request, None)
            if not isinstance(reply, ForkedNode):
                reason = reply or self.log_path.read_text(errors="replace")[-2000:]
                raise LauncherUnavailable(f"the node launcher could not fork: {reason}")
            return reply

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                reply = json.loads(raw)
            except ValueError:
                reply = None
            if not isinstance(reply, dict):
                log.warning("launcher: not a reply: %r", raw[:200])
                continue
            with self.changed:
                if "exited" in reply:
                    node = self._nodes.pop(int(reply["exited"]), None)
                    if node is not None:
                        node.returncode = int(reply["status"])
                elif "pid" in reply:  # made here, not in `fork`: its exit may be the very next line
                    node = ForkedNode(int(reply["pid"]), self)
                    self._nodes[node.pid] = node
                    self._replies[int(reply["id"])] = node
                elif isinstance(reply.get("id"), int):
                    self._replies[reply["id"]] = str(reply.get("error"))
                self.changed.notify_all()
        with self.changed:  # the launcher is gone: its nodes died with it (PR_SET_PDEATHSIG)
            self._gone = True
            for node in self._nodes.values():
                node.returncode = -signal.SIGKILL
            self._nodes.clear()
            self.changed.notify_all()

    def close(self, grace: float = limits.CLUSTER_STOP_GRACE_S) -> None:
        """End the launcher: closing its stdin makes it kill the nodes it still has and exit."""
        if self.process.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.process.stdin.close()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(grace)


class NodeStarter:
    """Starts the nodes of a cluster on this machine: forked by one warm launcher when `fork` is
    true and this is Linux, else (or once the launcher failed) as plain processes. `close` ends
    the launcher; stop the nodes first."""

    def __init__(self, log_dir: Path, fork: bool) -> None:
        self.launcher = Launcher(log_dir / "launcher.log") if fork and sys.platform == "linux" else None

    async def start(self, argv: Sequence[str], log_path: Path, timeout: float) -> Process:
        """Start a node with command line `argv` (``--name NAME --broker ADDRESS ...``), its output
        appended to `log_path`; returns once it runs (not once it registered)."""
        launcher = self.launcher
        if launcher is not None:
            try:
                return await asyncio.to_thread(launcher.fork, argv, log_path, timeout)
            except LauncherUnavailable as e:
                if self.launcher is launcher:  # the first of concurrent starts to find out
                    log.warning("starting nodes as plain processes: %s", e)
                    self.launcher = None
                    await asyncio.to_thread(launcher.close)
        # the node dies with the thread that starts it (PR_SET_PDEATHSIG): this one, not a pool's
        return start_process(["-m", "fedptr.nodes", *argv], log_path)

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.close()
