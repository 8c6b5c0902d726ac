"""Faults for the in-process harness (tests only): a fault-injecting storage layer under
nodes/durable.py, and a node that dies (kill -9) or stops (SIGSTOP) without leaving the loop.

The storage layer counts the storage calls a node makes (each data write, fsync, rename and
unlink, on its write-ahead thread or in a charge of its privacy budget) on a `CrashingDisk`: at
call `at` the process "crashes" (that call fails, a data write lands torn, half of it, and so
does every later call), or, given an errno, the disk refuses that one call (disk full, an I/O
error) as a real one would, the write torn as well. The model is a process crash: what reached
the kernel stays; unsynced data is not dropped. A power cut after the crash
(`CrashingDisk.power_cut`) also undoes each rename whose directory was not fsynced since, and
any chosen subset of the unlinks not made durable so (POSIX orders no unsynced directory
operations: a later unlink may persist while an earlier one is lost).

A `Death` watches one running node: it counts the requests and replies the node sends, and the
chunks of its large buffers (through the broker or over a direct data path, as shared-memory
files on one host), and can cut it off (it sends nothing more, its disk fails every call, and it
says no goodbye: a kill -9) or freeze it (it reads and sends nothing, and its session's clock
stands still, until thawed: a SIGSTOP then a SIGCONT). tests/test_crash_points.py enumerates crash points with these;
tests/test_model.py draws them as rules of its state machine.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import errno
import functools
import os
import stat
import threading
import weakref
from collections.abc import Callable, Collection, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fedptr.nodes import audit, durable
from fedptr.nodes.node import Node

import fedptr
from fedptr import envelope, limits

if TYPE_CHECKING:
    from .harness import InprocCluster

MAX_REVIVABLE = 8
"""The most unsynced unlinks `CrashingDisk.power_cuts` draws every subset of (2**8 cuts)."""


def _files(directory: str) -> dict[str, bytes]:
    """The regular files of `directory`, by path, with their contents."""
    found = {}
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                found[entry.path] = f.read()
    return found


class Crashed(OSError):
    """The process died at this storage call."""


class CrashingDisk:
    """Counts storage calls. Call `at` (0: never) fails: with `refuse` (an errno) it is refused
    and later calls go on, as a full or failing disk does; without, the process crashed there,
    and every later call raises Crashed."""

    def __init__(self, at: int = 0, refuse: int | None = None, only: str = "") -> None:
        self.at = at
        self.refuse = refuse
        self.only = only
        """When given ("charge", "audit"), `at` counts only the calls made for that (`step`'s
        `making`): the fault strikes the at-th of them, whatever the node wrote before."""
        self.counted = 0
        """The calls `at` counts: all of them, or those `only` names."""
        self.calls = 0
        self.crashed = False
        self.refused = False
        self.in_charges: list[int] = []
        """The numbers of the calls a charge of the node's privacy budget made (`Disks.give`)."""
        self.in_audit: list[int] = []
        """The numbers of the calls a write to the node's audit log made (`Disks.give`)."""
        self._unsynced: dict[str, dict[str, bytes | None]] = {}
        """Per directory, what each file renamed over since the directory's last fsync held
        before (None: it did not exist): what a power cut brings back."""
        self._unlinked: dict[str, dict[str, bytes]] = {}
        """Per directory, what each file unlinked since the directory's last fsync held: what a
        power cut may bring back (`power_cut`'s `revived`)."""

    def renaming(self, dst: Any) -> None:
        """`dst` is about to be replaced: remember what it held, unless a rename since its
        directory's last fsync already did."""
        path = os.path.abspath(dst)
        held = self._unsynced.setdefault(os.path.dirname(path), {})
        if path not in held:
            held[path] = open(path, "rb").read() if os.path.exists(path) else None  # noqa: SIM115

    def unlinking(self, path: Any) -> None:
        """`path` is about to be unlinked: remember what it held (a power cut may undo that)."""
        path = os.path.abspath(path)
        if os.path.exists(path):
            self._unlinked.setdefault(os.path.dirname(path), {})[path] = open(path, "rb").read()  # noqa: SIM115

    @property
    def unsynced_unlinks(self) -> list[str]:
        """The files unlinked since their directory's last fsync (what `power_cut` may revive)."""
        return [path for held in self._unlinked.values() for path in held]

    def synced(self, fd: int) -> None:
        """`fd` was fsynced: a directory's renames and unlinks are durable now."""
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            directory = os.readlink(f"/proc/self/fd/{fd}")
            self._unsynced.pop(directory, None)
            self._unlinked.pop(directory, None)

    def unsynced_from(self, before: CrashingDisk) -> None:
        """This disk follows `before` on the same directories (a node's next phase, or its
        restart): the renames `before` left unsynced are this one's to undo in a power cut too."""
        for directory, held in before._unsynced.items():
            mine = self._unsynced.setdefault(directory, {})
            for path, data in held.items():
                mine.setdefault(path, data)
        for directory, gone in before._unlinked.items():
            for path, was in gone.items():
                self._unlinked.setdefault(directory, {}).setdefault(path, was)

    def power_cut(self, revived: Collection[str] = ()) -> None:
        """The power fails (after the process died): every rename not made durable by an fsync
        of its directory is undone (the file holds what it held before, or is gone), and so is
        the unlink of each file in `revived` (of `unsynced_unlinks`; the others stay unlinked).
        What was written and fsynced stays; the contents of unsynced files are not modelled."""
        assert self.crashed, "a power cut strikes a dead node's disk"
        for gone in self._unlinked.values():
            for path, was in gone.items():
                if path in revived and not os.path.exists(path):
                    with open(path, "wb") as f:
                        f.write(was)
        self._unlinked.clear()
        for held in self._unsynced.values():
            for path, data in held.items():
                if data is None:
                    with contextlib.suppress(FileNotFoundError):  # (unlinked since: unlinks are not modelled)
                        os.unlink(path)
                else:
                    with open(path, "wb") as f:
                        f.write(data)
        self._unsynced.clear()

    def power_cuts(self) -> Iterator[list[str]]:
        """Every power cut this crash allows, one after another on the same directories: each
        starts from what the crash left (the directories' files put back as they were) and
        revives one subset of `unsynced_unlinks`, yielded once the cut is made."""
        assert self.crashed, "a power cut strikes a dead node's disk"
        left = {d: _files(d) for d in {*self._unsynced, *self._unlinked}}
        unsynced, unlinked = copy.deepcopy(self._unsynced), copy.deepcopy(self._unlinked)
        unlinks = self.unsynced_unlinks
        assert len(unlinks) <= MAX_REVIVABLE, f"{len(unlinks)} unsynced unlinks: too many subsets to draw"
        for subset in range(1 << len(unlinks)):
            for directory, files in left.items():
                for path in set(_files(directory)) - set(files):
                    os.unlink(path)
                for path, data in files.items():
                    with open(path, "wb") as f:
                        f.write(data)
            self._unsynced, self._unlinked = copy.deepcopy(unsynced), copy.deepcopy(unlinked)
            revived = [path for i, path in enumerate(unlinks) if subset >> i & 1]
            self.power_cut(revived)
            yield revived

    def step(self, what: str, making: str = "") -> bool:
        """Count a call (`making`: "charge" for one of a budget charge's, "audit" for one of an
        audit record's); False when it is the fault point (the caller tears it and raises
        `failure`), raise after a crash."""
        if self.crashed:
            raise Crashed(f"dead before {what}")
        self.calls += 1
        if making:
            (self.in_charges if making == "charge" else self.in_audit).append(self.calls)
        if not self.only or making == self.only:
            self.counted += 1
        else:
            return True
        if self.counted != self.at:
            return True
        if self.refuse is None:
            self.crashed = True
        else:
            self.refused = True
        return False

    def disarm(self) -> bool:
        """No later call is the fault point (a crash stays one); returns whether a call was
        refused. Final once returned: no call is being counted meanwhile."""
        with _COUNTING:
            self.at = 0
            return self.refused

    def failure(self, what: str) -> OSError:
        """The error of the call at the fault point."""
        if self.refuse is None:
            return Crashed(f"at {what}")
        return OSError(self.refuse, f"{os.strerror(self.refuse)} (injected at {what})")


DiskFor = Callable[[], CrashingDisk | None]
"""The disk of the storage call being made (None: the real one, uncounted)."""

FULL, EIO = errno.ENOSPC, errno.EIO
"""The refusals a disk makes."""


_COUNTING = threading.Lock()
"""Held while a storage call is counted and while a disk is disarmed (`CrashingDisk.disarm`)."""


def _making(disk_for: DiskFor) -> str:
    return disk_for.making() if isinstance(disk_for, Disks) else ""


def _step(disk_for: DiskFor, what: str) -> None:
    with _COUNTING:
        disk = disk_for()
        ok = disk is None or disk.step(what, _making(disk_for))
    if not ok:
        assert disk is not None
        raise disk.failure(what)


class _OS:
    """`os` for nodes/durable.py, with fsync, replace and unlink going through the disk."""

    def __init__(self, disk_for: DiskFor) -> None:
        self._disk_for = disk_for

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        _step(self._disk_for, "fsync")
        os.fsync(fd)
        disk = self._disk_for()
        if disk is not None:
            disk.synced(fd)

    def replace(self, src: Any, dst: Any) -> None:
        _step(self._disk_for, "rename")
        disk = self._disk_for()
        if disk is not None:
            disk.renaming(dst)
        os.replace(src, dst)

    def unlink(self, path: Any) -> None:
        _step(self._disk_for, "unlink")
        disk = self._disk_for()
        if disk is not None:
            disk.unlinking(path)
        os.unlink(path)


class _File:
    """A file opened for writing whose write lands torn (its first half) at the fault point."""

    def __init__(self, f: Any, disk: CrashingDisk, making: str) -> None:
        self._f = f
        self._disk = disk
        self._making = making

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def write(self, data: Any) -> int:
        with _COUNTING:
            ok = self._disk.step("write", self._making)
        if not ok:
            whole = data if isinstance(data, str) else bytes(memoryview(data).cast("B"))  # a text file's too
            self._f.write(whole[: len(whole) // 2])
            self._f.flush()
            raise self._disk.failure("a torn write")
        return int(self._f.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def install(monkeypatch: pytest.MonkeyPatch, disk_for: DiskFor) -> None:
    """Put the fault-injecting layer under nodes/durable.py and nodes/audit.py: each storage call
    made goes through `disk_for()`'s disk."""

    def opened(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller's with)
        disk = disk_for()
        writes = "w" in mode or "a" in mode
        return _File(f, disk, _making(disk_for)) if writes and disk is not None else f

    for module in (durable, audit):
        monkeypatch.setattr(module, "os", _OS(disk_for))
        monkeypatch.setattr(module, "open", opened, raising=False)


class Disks:
    """A disk per node (a restarted node's a new one). The write-ahead thread's calls are found
    by their thread, and a dead node's thread keeps its crashed disk, so nothing it still had
    queued lands after its death. The privacy budget writes its history from whichever worker
    thread charges (nodes/budget.py, off the write-ahead): the node's charge is wrapped so that
    its calls, on that thread, for as long as it runs, go through the node's disk too (a charge
    of a dead node still running fails at its next call, as the write-ahead's do). So is the
    node's audit record (nodes/audit.py, on the loop's thread)."""

    def __init__(self) -> None:
        self.of: dict[threading.Thread, CrashingDisk] = {}
        self._making = threading.local()

    def __call__(self) -> CrashingDisk | None:
        disk: CrashingDisk | None = getattr(self._making, "disk", None)
        return disk if disk is not None else self.of.get(threading.current_thread())

    def making(self) -> str:
        """What the calling thread is in: "charge" (of a node's budget), "audit" (a record of
        its audit log) or "" (neither)."""
        return str(getattr(self._making, "what", "")) if getattr(self._making, "disk", None) is not None else ""

    @contextlib.contextmanager
    def restoring(self, disk: CrashingDisk) -> Iterator[None]:
        """The storage calls made on this thread while the block runs go through `disk`: a node
        restores its store (removing what interrupted writes left) in its constructor, on the
        loop's thread, before it has a write-ahead thread to be found by. No other node's call
        is made on that thread meanwhile (theirs are on their write-ahead and charging threads)."""
        thread = threading.current_thread()
        self.of[thread] = disk
        try:
            yield
        finally:
            del self.of[thread]

    def give(self, node: Node, disk: CrashingDisk) -> None:
        """`node`'s storage calls go through `disk` from now on."""
        assert node.store.wal is not None, f"{node.name} has no store"
        self.of[node.store.wal._thread] = disk
        budget, log = node.budget, node.audit
        budget.charge = self._through(disk, "charge", functools.partial(type(budget).charge, budget))  # type: ignore[method-assign]
        log.record = self._through(disk, "audit", functools.partial(type(log).record, log))  # type: ignore[method-assign]

    def _through(self, disk: CrashingDisk, what: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call`, its storage calls (on whichever thread it runs) going through `disk`."""
        local = self._making

        def through(*args: Any, **kwargs: Any) -> Any:
            local.disk, local.what = disk, what
            try:
                return call(*args, **kwargs)
            finally:
                local.disk = None

        return through


_MESSAGES = (envelope.REQUEST, envelope.REPLY, envelope.ACKS, envelope.BATCH)
"""What a node sends that a protocol counts on (heartbeats come whenever the clock says)."""


class Death:
    """What becomes of a node: it dies at its storage call `at` (the disk crashes there: see
    CrashingDisk), or just before it sends its request or reply number `message` it dies, or
    freezes if `freeze` (0: never), or just before it sends chunk number `chunk` of a large
    buffer, or takes chunk number `take` off a direct data path, it dies. `disk` may be given
    instead of `at` (a refusing one)."""

    def __init__(
        self,
        at: int = 0,
        message: int = 0,
        freeze: bool = False,
        disk: CrashingDisk | None = None,
        chunk: int = 0,
        take: int = 0,
    ) -> None:
        self.disk = disk or CrashingDisk(at)
        self.message = message
        self.freeze_at_message = freeze
        self.chunk = chunk
        self.messages = 0
        self.chunks = 0
        """Chunks sent, by either path."""
        self.take = take
        self.taken = 0
        """Chunks taken off direct data paths (a buffer's first comes through the broker)."""
        self._on_chunk: Callable[[bytes, list[Any]], None] | None = None
        self.frozen = False
        self._held: list[list[Any]] = []
        self._node: Node | None = None

    @property
    def dead(self) -> bool:
        """Whether the node died (it sends nothing and its disk fails every call)."""
        return self.disk.crashed

    def watch(self, node: Node) -> None:
        """Count and cut what `node` sends: its replies, forwards and heartbeats all leave
        through its link's `_sent`, the one call that writes to its socket (`forget` puts that
        back). Not `_push_frames`: the replies that follow the first in one loop turn leave as
        a BATCH from `_sent_batch`, which a hook there missed, so a node killed by its fail-stop
        still acknowledged the writes of the batch that failed (model2's search, seeds 3-5).
        The chunks a direct data path takes leave through `DirectPaths.send` instead: a dead or
        frozen node's are refused there, so the link sends them through `_sent`, which drops or
        holds them (a real dead process writes no shared-memory file either)."""
        self._node = node
        send = node.link._sent

        def sent(frames: list[Any]) -> int:
            if not self.frozen and not self.disk.crashed:
                self._leaving(envelope.command_of(frames))
            if self.frozen:
                self._held.append(frames)
            elif not self.disk.crashed:
                return send(frames)
            return 0  # no socket events read: nothing was sent

        node.link._sent = sent  # type: ignore[method-assign]
        direct = node.link.direct
        if direct is not None:
            send_direct = direct.send

            def sent_direct(peer: bytes, command: bytes, frames: list[Any]) -> bool:
                if self.frozen or self.disk.crashed:
                    return False
                if self.chunks + 1 == self.chunk:
                    self._leaving(envelope.CHUNK)  # dies before it
                    return False
                if not send_direct(peer, command, frames):
                    return False  # through the broker, counted in `_sent`
                self.chunks += 1
                return True

            direct.send = sent_direct  # type: ignore[method-assign]
            on_chunk = self._on_chunk = direct.on_chunk

            def taken(peer: bytes, frames: list[Any]) -> None:
                if not self.disk.crashed:
                    self.taken += 1
                    if self.taken == self.take:
                        self.disk.crashed = True  # dies before it: a dead process reads nothing
                if not self.disk.crashed:
                    on_chunk(peer, frames)

            direct.on_chunk = taken
        _WATCHED[node.link] = self

    def _leaving(self, command: bytes) -> None:
        """A message or chunk is about to leave: counted, and the node dies (or freezes) before
        the one it was told to."""
        if command in _MESSAGES:
            self.messages += 1
            if self.messages == self.message:
                if self.freeze_at_message:
                    self.freeze()
                else:
                    self.disk.crashed = True  # storage calls from now on fail
        elif command == envelope.CHUNK:
            self.chunks += 1
            if self.chunks == self.chunk:
                self.disk.crashed = True

    def kill(self) -> None:
        """Die now, as kill -9 (or a fail-stop's exit) does: the disk fails every call from here,
        nothing more is sent, and the harness's stop of the node sends no goodbye either (a death
        at a storage call or message does send one when the node is stopped, unless killed too:
        tests/test_crash_points.py lets peers learn of it at once)."""
        self.disk.crashed = True
        if self._node is not None:
            session = self._node.link.session

            def silent() -> list[Any]:  # what the link's close sends instead: a beat, never heard again
                session.closed = True
                return envelope.message(envelope.HEARTBEAT, b"", envelope.NO_REPLY)

            session.goodbye = silent  # type: ignore[method-assign]

    def freeze(self) -> None:
        """Stop as SIGSTOP does: read nothing (zmq queues it), send nothing (held in order), and
        let no heartbeat or request deadline of the node's own pass (its clock stands still).
        Its computations and disk writes already under way still finish."""
        assert self._node is not None
        link = self._node.link
        self.frozen = True
        link.pause_reading()
        link.session.tick = lambda now: []  # type: ignore[method-assign]
        link.session.next_deadline = lambda: None  # type: ignore[method-assign]

    def thaw(self) -> None:
        """Go on as SIGCONT does: what it held is sent, in order, and it reads again."""
        assert self._node is not None and self.frozen
        link = self._node.link
        del link.session.tick, link.session.next_deadline
        self.frozen = False
        held, self._held = self._held, []
        for frames in held:
            link._push_frames(frames)  # through `_sent`, now passing them on
        link.resume_reading()
        link._arm()

    @staticmethod
    def forget(node: Node) -> None:
        """`node` sends as it did before it was watched (if it was), unless it is dead: then its
        send stays cut. A kill -9 loses what the node had not written to its socket yet: the
        replies its fail-stopped write-ahead batch pushed in one turn wait in its link's open
        BATCH, which stopping the node flushes. Put back, the link's own send delivered them
        (a chain's last op acknowledged after the fail-stop, an earlier result lost)."""
        death = _WATCHED.pop(node.link, None)
        if death is not None and death.dead:
            return
        node.link.__dict__.pop("_sent", None)
        if node.link.direct is not None and death is not None and death._on_chunk is not None:
            node.link.direct.__dict__.pop("send", None)
            node.link.direct.on_chunk = death._on_chunk


_WATCHED: weakref.WeakKeyDictionary[Any, Death] = weakref.WeakKeyDictionary()
"""The `Death` watching each link (`Death.forget` asks whether its node died)."""


async def raised(action: Coroutine[Any, Any, Any]) -> BaseException | None:
    """What `action` raised (None if it returned), run as a task of its own: the error's
    traceback then holds the task's frames, not the caller's (which would refer back to the error)."""
    task = asyncio.ensure_future(action)
    await asyncio.wait([task])
    return task.exception()


async def awaited(p: fedptr.Pointer) -> None:
    """``await p`` as a coroutine (for `raised`)."""
    await p


async def crashed_at(
    cluster: InprocCluster, name: str, death: Death, waits: list[asyncio.Future[Any]], cut: bool, timeout: float
) -> Node:
    """Worker `name` killed at `death`'s crash point (once it died, or once every request in
    `waits` settled first), its disk power cut if `cut` (what no fsync made durable is lost as
    well), and started again on what its disk holds: the restarted `Node`, every wait settled."""
    async with asyncio.timeout(timeout):
        while not all(w.done() for w in waits) and not death.dead:
            await asyncio.sleep(limits.POLL_INTERVAL_S)
    death.kill()
    Death.forget(cluster.node(name))
    await cluster.stop_node(name)
    if cut:
        death.disk.power_cut()
    restarted = await cluster.start_node(name)
    async with asyncio.timeout(timeout):
        await asyncio.wait(waits)
    return restarted
