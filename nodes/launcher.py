"""The node launcher of local clusters: ``python -m fedptr.nodes.launcher``.

It imports torch and the node code once, SecAgg's included, and loads torch's meta kernels (a
plain node loads those two only on first use), then forks one node per request, so N nodes
start for about the price of one and share those pages copy-on-write. It
runs no thread, no event loop and no zmq context of its own (it checks it has one thread before
each fork), so each child starts as clean as a fresh interpreter that did the same imports.

Requests come on stdin, replies go to stdout, one JSON object a line (never pickle):

* ``{"id": N, "argv": [node command line], "log": PATH}`` -> ``{"id": N, "pid": PID}`` once
  forked (or ``{"id": N, "error": WHY}``); the node runs ``fedptr.nodes.__main__.main(argv)``
  with stdout and stderr appended to PATH, in its own session.
* when a node exits: ``{"exited": PID, "status": S}`` (S as `subprocess.Popen.returncode`:
  the exit code, or minus the signal).

A forked node dies with the launcher (PR_SET_PDEATHSIG), and the launcher with its parent; at
the end of its stdin the launcher SIGKILLs the nodes it still has and exits. Each node reseeds
torch's, numpy's and Python's generators from the OS, so nodes never share random state.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import random
import select
import signal
import sys
import traceback
from typing import Any

import numpy as np
import torch

from . import __main__ as node_main
from . import (
    guard,
    secure,  # noqa: F401  loaded on a plain node's first secure round; here once, shared
)

_PR_SET_PDEATHSIG = 1


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def reseed() -> None:
    """Seed every generator a node uses from the OS: a forked child starts with its parent's state."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    random.seed(os.urandom(32))


def _run_node(argv: list[str], log_path: str, launcher_pid: int, keep_out: list[int]) -> None:
    """In the forked child: become the node, never return to the launcher's loop."""
    code = 1
    try:
        os.setsid()
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher_pid:  # the launcher died before PR_SET_PDEATHSIG took hold
            os._exit(1)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keep_out:
            os.close(fd)
        out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        reseed()
        code = node_main.main(argv)
    except SystemExit as e:  # as the interpreter treats it: a message is printed, status 1
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Launcher:
    """The launcher's loop: requests from stdin, exits of its children, replies to stdout."""

    def __init__(self) -> None:
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes the wakeup fd
        self.pending = b""

    def reply(self, message: dict[str, Any]) -> None:
        os.write(1, (json.dumps(message) + "\n").encode())

    def refuse(self, rid: object, why: str) -> None:
        print(f"fedptr-launcher: {why}", file=sys.stderr, flush=True)  # the launcher's log says why too
        self.reply({"id": rid, "error": why})

    def fork(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            self.refuse(None, f"not a request: {line[:200]!r}")
            return
        rid = request.get("id")
        argv, log_path = request.get("argv"), request.get("log")
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv) and isinstance(log_path, str)):
            self.refuse(rid, "a request needs argv (a list of strings) and log (a path)")
            return
        threads = _threads()
        if threads != 1:  # fork would copy a thread's locks but not the thread
            self.refuse(rid, f"the launcher runs {threads} threads: forking is unsafe")
            return
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:  # out of processes or memory: this node does not start, others may
            self.refuse(rid, f"fork failed: {e}")
            return
        if pid == 0:
            _run_node(argv, log_path, parent, [self.wake_r, self.wake_w])
        self.children.add(pid)
        self.reply({"id": rid, "pid": pid})

    def reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            self.children.discard(pid)
            self.reply({"exited": pid, "status": os.waitstatus_to_exitcode(status)})

    def serve(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([0, self.wake_r], [], [])
            except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
                continue
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            self.reap()
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    return
                self.pending += data
                *lines, self.pending = self.pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.fork(line)

    def close(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            pid, status = os.waitpid(-1, 0)
            self.children.discard(pid)
            self.reply({"exited": pid, "status": os.waitstatus_to_exitcode(status)})


def main() -> int:
    # what a plain node loads on its first private op, loaded once here: forked nodes share it
    guard.warm_up()
    # Objects made so far live until exit: moved out of the collector's generations, a child's
    # collections never write to (and so never copy) the pages they sit on.
    gc.freeze()
    launcher = Launcher()
    try:
        launcher.serve()
    finally:
        with contextlib.suppress(BrokenPipeError):
            launcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
