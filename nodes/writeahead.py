"""The durable write-ahead queue: a node's disk writes, fsyncs and unlinks, off its event loop.

The write-ahead rule: a node acknowledges a request only once every change the request implies
(a new object, an in-place update, a deletion, a hand-over) is on disk. Each change queued here
returns a future that settles when it is durable; the node replies from that future's callback.

All disk work runs on one thread, in batches: within a batch only the last change to an
object's files is carried out (a write then a removal writes nothing), and the directory is
fsynced once for the whole batch. Writes go in the order they were queued; removals (unlinks
cost about 5 ms/MiB) take a slower lane, a few per batch, so a client that leaves holding
hundreds of objects never holds up the writes other clients' acknowledgements wait for. Each
object's own changes keep their order. A tensor (a model's parameters and buffers) is copied
when it is queued, so an in-place update that runs meanwhile can never tear what reaches the disk.

A change that fails (disk full, an I/O error) has already taken effect in memory, where later
requests may read it, and a definite error would invite a retry that applies it twice. A node
therefore passes `on_failure`, which ends the process from this thread before any future of the
batch settles (fail-stop): nothing of the batch is acknowledged, and a restart finds exactly what
the disk holds. Without it (the unit tests) the changes' futures fail with the error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedptr import limits, modules
from fedptr.errors import RemoteError
from fedptr.tensors import to_raw
from fedptr.wire import RawTensor

from .durable import DurableStore, module_meta

log = logging.getLogger("fedptr.node.writeahead")

Key = tuple[str, int]
"""Which files a change rewrites: ``("obj", id)`` (record and data) or ``("mov", id)`` (a move record)."""


@dataclass(slots=True)
class _Change:
    key: Key
    apply: Callable[[DurableStore], None]
    nbytes: int
    done: asyncio.Future[None]


class WriteAhead:
    """Queues changes to `durable` for its thread; `here` names the node in the errors of failed
    writes. `on_failure(why)`, if given, is called on the thread when a change or a sync fails,
    before anything of its batch settles (a node's ends the process)."""

    def __init__(self, durable: DurableStore, here: str, on_failure: Callable[[str], None] | None = None) -> None:
        self.durable = durable
        self.here = here
        self._on_failure = on_failure
        self.batches = 0
        """Batches written so far (each one directory fsync)."""
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[_Change] = collections.deque()
        self._removals: collections.deque[_Change] = collections.deque()
        """Objects to forget: a slower lane, so that unlinking many files never holds up the
        writes that acknowledgements wait for."""
        self._write_keys: collections.Counter[Key] = collections.Counter()
        self._removal_keys: collections.Counter[Key] = collections.Counter()
        self._unsettled: set[asyncio.Future[None]] = set()
        """The futures of the changes queued and not yet settled, for `barrier`."""
        self._cond = threading.Condition()
        self._closed = False
        self._dropped = False
        """Whether a change came after `aclose` (`_refused` says so once)."""
        self._thread = threading.Thread(target=self._run, name=f"write-ahead-{here}", daemon=True)
        self._thread.start()

    # --- changes (called on the event loop) ------------------------------------------------
    def save_tensor(
        self,
        obj_id: int,
        value: torch.Tensor,
        owner: str,
        sponsor: str,
        privacy: dict[str, Any],
        alias: tuple[int, str] | None = None,
    ) -> asyncio.Future[None]:
        """Persist a tensor object (a copy of its current value) with its `privacy` record
        (origins, read-only, release: see nodes/durable.py); `alias`: it is that model's
        parameter or buffer."""
        raw = to_raw(value)
        data = bytes(raw.data)
        dtype, shape = raw.dtype, list(raw.shape)
        return self._enqueue(
            ("obj", obj_id),
            lambda d: d.write_tensor(obj_id, data, dtype, shape, owner, sponsor, privacy, alias),
            len(data),
        )

    def save_module(
        self, obj_id: int, model: nn.Module, owner: str, sponsor: str, privacy: dict[str, Any]
    ) -> asyncio.Future[None]:
        """Persist a model (its spec, a copy of its parameters and buffers, its training modes)
        with its `privacy` record. Raises UnsupportedTypeError for a model that cannot be described
        (none that a node holds: each arrived as, or was built from, such a description)."""
        spec, values = modules.to_wire(model, copy=True)
        raws = [r for r in values if isinstance(r, RawTensor)]  # (all are: `to_wire` makes them)
        data = [r.data for r in raws]  # (copies already: `to_wire(copy=True)`)
        meta = module_meta(model, spec, data, [r.dtype for r in raws])
        return self._enqueue(
            ("obj", obj_id),
            lambda d: d.write_module(obj_id, meta, data, owner, sponsor, privacy),
            len(meta) + sum(b.nbytes for b in data),
        )

    def save_pointer(
        self, obj_id: int, location: str, remote_id: int, owner: str, sponsor: str = ""
    ) -> asyncio.Future[None]:
        """Persist a pointer object."""
        return self._enqueue(("obj", obj_id), lambda d: d.write_pointer(obj_id, location, remote_id, owner, sponsor), 0)

    def save_move(self, obj_id: int, dest: str, new_id: int) -> asyncio.Future[None]:
        """Persist the intent to move `obj_id` to `dest` as `new_id` (before anything is sent)."""
        return self._enqueue(("mov", obj_id), lambda d: d.write_move(obj_id, dest, new_id), 0)

    def remove_move(self, obj_id: int) -> asyncio.Future[None]:
        """Forget the move record of `obj_id` (the move was aborted: the object stays here)."""
        return self._enqueue(("mov", obj_id), lambda d: d.remove_move(obj_id), 0)

    def remove(self, obj_id: int) -> asyncio.Future[None]:
        """Forget object `obj_id` and its move record."""
        return self._enqueue(("obj", obj_id), lambda d: d.remove(obj_id), 0, removal=True)

    def barrier(self) -> asyncio.Future[None]:
        """A future that settles once every change queued before it, in both lanes, has settled:
        with None when all are durable, else with the error of the first that failed. Cancelling
        it cancels none of those changes."""
        done: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            done.set_exception(RemoteError("OSError", "the store is closed", self.here, [self.here]))
            return done
        waiting = list(self._unsettled)
        remaining = len(waiting)
        failure: BaseException | None = None

        def settled(change: asyncio.Future[None]) -> None:
            nonlocal remaining, failure
            remaining -= 1
            if failure is None and not change.cancelled():
                failure = change.exception()
            if remaining or done.done():
                return
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)

        if not waiting:
            done.set_result(None)
        for change in waiting:
            change.add_done_callback(settled)
        return done

    def _enqueue(
        self, key: Key, apply: Callable[[DurableStore], None], nbytes: int, removal: bool = False
    ) -> asyncio.Future[None]:
        if self._closed:
            return self._refused()
        done: asyncio.Future[None] = self._loop.create_future()
        change = _Change(key, apply, nbytes, done)
        self._unsettled.add(done)
        done.add_done_callback(self._unsettled.discard)
        with self._cond:
            if removal:
                self._removals.append(change)
                self._removal_keys[key] += 1
            else:
                if self._removal_keys[key]:  # an earlier removal of the same object goes first
                    self._promote(key)
                self._queue.append(change)
                self._write_keys[key] += 1
            self._cond.notify()
        return done

    def _refused(self) -> asyncio.Future[None]:
        """The failed future of a change queued after `aclose`: not written, so a restart finds
        the store as it was at the close, as after a crash there (a removal's object is back, a
        move record stays in doubt). Whoever awaits it (an acknowledgement) fails; a change no one
        awaits (the reclaim of a client that left while the node closed) is dropped, said once
        here, not left for the garbage collector's "exception was never retrieved"."""
        done: asyncio.Future[None] = self._loop.create_future()
        done.set_exception(RemoteError("OSError", "the store is closed", self.here, [self.here]))
        done.exception()  # retrieved: an awaiting caller still gets it
        if not self._dropped:
            log.warning("%s: a change after the store closed is not written (a restart finds it as then)", self.here)
            self._dropped = True
        return done

    def _promote(self, key: Key) -> None:
        keep: collections.deque[_Change] = collections.deque()
        for change in self._removals:
            if change.key == key:
                self._queue.append(change)
                self._write_keys[key] += 1
            else:
                keep.append(change)
        self._removals = keep
        del self._removal_keys[key]

    @property
    def pending(self) -> int:
        """Changes queued and not yet durable."""
        return len(self._queue) + len(self._removals)

    async def aclose(self, timeout: float = limits.WRITE_AHEAD_CLOSE_S) -> None:
        """Write what is queued, then stop the thread (waiting at most `timeout` seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout)
        self.durable.close()

    # --- the thread ----------------------------------------------------------------------
    def _take(self) -> tuple[list[_Change], list[_Change]] | None:
        """The next writes (all queued, within the batch bounds), then a few removals of objects
        no queued write touches (so each object's changes keep their order)."""
        with self._cond:
            while not self._queue and not self._removals and not self._closed:
                self._cond.wait()
            if not self._queue and not self._removals:
                return None
            writes: list[_Change] = []
            nbytes = 0
            while self._queue and len(writes) < limits.WRITE_BATCH_CHANGES and nbytes < limits.WRITE_BATCH_BYTES:
                change = self._queue.popleft()
                writes.append(change)
                nbytes += change.nbytes
                self._write_keys[change.key] -= 1
                if not self._write_keys[change.key]:
                    del self._write_keys[change.key]
            removals: list[_Change] = []
            skipped: list[_Change] = []
            while self._removals and len(removals) < limits.REMOVE_BATCH_CHANGES:
                change = self._removals.popleft()
                if change.key in self._write_keys:
                    skipped.append(change)
                    continue
                removals.append(change)
                self._removal_keys[change.key] -= 1
                if not self._removal_keys[change.key]:
                    del self._removal_keys[change.key]
            self._removals.extendleft(reversed(skipped))
            return writes, removals

    def _run(self) -> None:
        while (lanes := self._take()) is not None:
            for batch in lanes:
                if batch:
                    self._write(batch)

    def _write(self, batch: list[_Change]) -> None:
        last = {c.key: i for i, c in enumerate(batch)}
        errors: dict[Key, str] = {}
        for i, change in enumerate(batch):
            if last[change.key] == i:
                try:
                    change.apply(self.durable)
                except OSError as e:
                    errors[change.key] = str(e)
        try:
            self.durable.sync()
        except OSError as e:
            errors = {c.key: str(e) for c in batch}
        self.batches += 1
        if errors and self._on_failure is not None:
            self._on_failure("; ".join(sorted(set(errors.values()))))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle, batch, errors)

    def _settle(self, batch: list[_Change], errors: dict[Key, str]) -> None:
        for change in batch:
            if change.done.done():
                continue
            why = errors.get(change.key)
            if why is None:
                change.done.set_result(None)
            else:
                log.error("%s: a write to the store failed: %s", self.here, why)
                change.done.set_exception(RemoteError("OSError", why, self.here, [self.here]))
                change.done.exception()  # logged above; a removal nobody awaits must not warn again
