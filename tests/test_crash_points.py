"""Every crash point of the write-ahead, enumerated (in the manner of ALICE and CrashMonkey).

A fault-injecting storage layer stands under nodes/durable.py: it counts the storage calls the
write-ahead thread makes (each data write, fsync, rename and unlink) and "crashes" at call i:
that call fails (a data write lands torn, half of it) and so does every later one, as if the
process died there. For every i, a fixed workload runs through the real `WriteAhead` and
`DurableStore`; then the store is loaded from what the disk holds, with the real file system,
and checked against a model: every object is in the state of its last acknowledged change, or
of a change queued after it that was not acknowledged (it may or may not have landed); none
is lost, none invented, and no crash leaves what loading takes for damage. In-process, no node.
The model is a process crash (what reached the kernel stays); it does not drop unsynced data.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fedptr.nodes import durable
from fedptr.nodes.durable import DurableStore
from fedptr.nodes.writeahead import WriteAhead

State = tuple[Any, Any] | None
"""An object as loading finds it: None (absent), or (value, move record)."""


class Crashed(OSError):
    """The process died at this storage call."""


class CrashingDisk:
    """Counts storage calls; call `at` and every later one raise Crashed (0: never)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.crashed = False

    def step(self, what: str) -> bool:
        """Count a call; False when it is the crash point (the caller tears it), raise after it."""
        if self.crashed:
            raise Crashed(f"dead before {what}")
        self.calls += 1
        if self.calls == self.at:
            self.crashed = True
            return False
        return True


class _OS:
    """`os` for nodes/durable.py, with fsync, replace and unlink going through the disk."""

    def __init__(self, disk: CrashingDisk) -> None:
        self._disk = disk

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        if not self._disk.step("fsync"):
            raise Crashed("at fsync")
        os.fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        if not self._disk.step("rename"):
            raise Crashed("at rename")
        os.replace(src, dst)

    def unlink(self, path: Any) -> None:
        if not self._disk.step("unlink"):
            raise Crashed("at unlink")
        os.unlink(path)


class _File:
    """A file opened for writing whose write lands torn (its first half) at the crash point."""

    def __init__(self, f: Any, disk: CrashingDisk) -> None:
        self._f = f
        self._disk = disk

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def write(self, data: Any) -> int:
        if not self._disk.step("write"):
            self._f.write(bytes(memoryview(data).cast("B"))[: len(memoryview(data).cast("B")) // 2])
            self._f.flush()
            raise Crashed("torn write")
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _crashing(monkeypatch: pytest.MonkeyPatch, disk: CrashingDisk) -> None:
    def opened(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller's with)
        return _File(f, disk) if "w" in mode else f

    monkeypatch.setattr(durable, "os", _OS(disk))
    monkeypatch.setattr(durable, "open", opened, raising=False)


Change = tuple[int, Callable[[State], State], "asyncio.Future[None]"]


def _set(value: Any) -> Callable[[State], State]:
    return lambda s: (value, None if s is None else s[1])


def _moving(move: Any) -> Callable[[State], State]:
    return lambda s: None if s is None else (s[0], move)


def _removed(s: State) -> State:
    return None


async def _workload(wal: WriteAhead) -> list[Change]:
    """Rounds of changes, each round awaited (so a round's changes land after the last's)."""
    changes: list[Change] = []

    def tensor(i: int, v: float) -> None:
        changes.append((i, _set(("t", v)), wal.save_tensor(i, torch.full((4,), v), "c", "", {})))

    rounds: list[Callable[[], None]] = [
        lambda: (
            tensor(1, 0.0),
            tensor(2, 2.0),
            changes.append((3, _set(("p", "alice", 9)), wal.save_pointer(3, "alice", 9, "c"))),
        ),
        lambda: (
            tensor(1, 1.0),  # an in-place update
            changes.append((2, _moving(("alice", 77)), wal.save_move(2, "alice", 77))),
            changes.append((3, _removed, wal.remove(3))),
        ),
        lambda: (
            changes.append((2, _moving(None), wal.remove_move(2))),  # the move was put back
            tensor(4, 4.0),
            tensor(1, 5.0),
        ),
        lambda: (
            changes.append((1, _removed, wal.remove(1))),
            changes.append((4, _moving(("bob", 5)), wal.save_move(4, "bob", 5))),
        ),
    ]
    for start in rounds:
        before = len(changes)
        start()
        await asyncio.wait([f for _, _, f in changes[before:]], timeout=10)
    return changes


def _allowed(changes: list[Change], obj_id: int) -> set[State]:
    """The states loading may find `obj_id` in: after its last acknowledged change, or after
    any later change of it (not acknowledged: it may have landed)."""
    mine = [(apply, f) for i, apply, f in changes if i == obj_id]
    acked = [k for k, (_, f) in enumerate(mine) if f.done() and not f.cancelled() and f.exception() is None]
    first = acked[-1] + 1 if acked else 0
    state: State = None
    allowed: set[State] = set()
    for k, (apply, _) in enumerate(mine):
        if k >= first:  # the state after the last acknowledged change, or after a later one
            allowed.add(state)
        state = apply(state)
    allowed.add(state)
    return allowed


def _found(stored: durable.Stored) -> State:
    value: Any = stored.value
    seen = ("p", *value) if isinstance(value, tuple) else ("t", float(value[0]))
    return seen, stored.moving


async def _run(tmp: Path, monkeypatch: pytest.MonkeyPatch, at: int) -> tuple[int, list[Change]]:
    disk = CrashingDisk(at)
    with monkeypatch.context() as patched:
        _crashing(patched, disk)
        wal = WriteAhead(DurableStore(tmp), "bob")
        changes = await _workload(wal)
        await wal.aclose()
    return disk.calls, changes


@pytest.mark.asyncio
async def test_every_crash_point_of_the_write_ahead_recovers_what_was_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, changes = await _run(tmp_path / "clean", monkeypatch, 0)
    assert all(f.exception() is None for _, _, f in changes)
    assert calls > 30  # the workload's writes, fsyncs, renames and unlinks
    for at in range(1, calls + 1):
        directory = tmp_path / f"crash-{at}"
        _, changes = await _run(directory, monkeypatch, at)
        loaded = DurableStore(directory).load()  # the real file system; DamagedStoreError fails
        for obj_id in {i for i, _, _ in changes} | set(loaded):
            found = _found(loaded[obj_id]) if obj_id in loaded else None
            allowed = _allowed(changes, obj_id)
            assert found in allowed, f"crash at storage call {at}: object {obj_id} is {found}, not one of {allowed}"
