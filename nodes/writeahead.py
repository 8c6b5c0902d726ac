"""The durable write-ahead queue: a node's disk writes, fsyncs and unlinks, off its event loop.

The write-ahead rule: a node acknowledges a request only once every change the request implies
(a new object, an in-place update, a deletion, a hand-over) is on disk. Each change queued here
returns a future that settles when it is durable; the node replies from that future's callback.

All disk work runs on one thread, in batches, in the order it was queued: within a batch only
the last change to an object's files is carried out (a write then a removal writes nothing),
and the directory is fsynced once for the whole batch. A tensor is copied when it is queued, so
an in-place update that runs meanwhile can never tear what reaches the disk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedptr import limits
from fedptr.errors import RemoteError
from fedptr.tensors import to_raw

from .durable import DurableStore

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
    """Queues changes to `durable` for its thread; `here` names the node in the errors of failed writes."""

    def __init__(self, durable: DurableStore, here: str) -> None:
        self.durable = durable
        self.here = here
        self.batches = 0
        """Batches written so far (each one directory fsync)."""
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[_Change] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"write-ahead-{here}", daemon=True)
        self._thread.start()

    # --- changes (called on the event loop) ------------------------------------------------
    def save_tensor(self, obj_id: int, value: torch.Tensor, owner: str) -> asyncio.Future[None]:
        """Persist a tensor object (a copy of its current value)."""
        raw = to_raw(value)
        data = bytes(raw.data)
        dtype, shape = raw.dtype, list(raw.shape)
        return self._enqueue(("obj", obj_id), lambda d: d.write_tensor(obj_id, data, dtype, shape, owner), len(data))

    def save_pointer(self, obj_id: int, location: str, remote_id: int, owner: str) -> asyncio.Future[None]:
        """Persist a pointer object."""
        return self._enqueue(("obj", obj_id), lambda d: d.write_pointer(obj_id, location, remote_id, owner), 0)

    def save_move(self, obj_id: int, dest: str, new_id: int) -> asyncio.Future[None]:
        """Persist the intent to move `obj_id` to `dest` as `new_id` (before anything is sent)."""
        return self._enqueue(("mov", obj_id), lambda d: d.write_move(obj_id, dest, new_id), 0)

    def remove_move(self, obj_id: int) -> asyncio.Future[None]:
        """Forget the move record of `obj_id` (the move was aborted: the object stays here)."""
        return self._enqueue(("mov", obj_id), lambda d: d.remove_move(obj_id), 0)

    def remove(self, obj_id: int) -> asyncio.Future[None]:
        """Forget object `obj_id` and its move record."""
        return self._enqueue(("obj", obj_id), lambda d: d.remove(obj_id), 0)

    def barrier(self) -> asyncio.Future[None]:
        """A future that settles once everything queued before it is durable."""
        return self._enqueue(("barrier", 0), lambda d: None, 0)

    def _enqueue(self, key: Key, apply: Callable[[DurableStore], None], nbytes: int) -> asyncio.Future[None]:
        done: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            done.set_exception(RemoteError("OSError", "the store is closed", self.here, [self.here]))
            return done
        with self._cond:
            self._queue.append(_Change(key, apply, nbytes, done))
            self._cond.notify()
        return done

    @property
    def pending(self) -> int:
        """Changes queued and not yet durable."""
        return len(self._queue)

    async def aclose(self, timeout: float = limits.WRITE_AHEAD_CLOSE_S) -> None:
        """Write what is queued, then stop the thread (waiting at most `timeout` seconds)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, timeout)
        self.durable.close()

    # --- the thread ----------------------------------------------------------------------
    def _take(self) -> list[_Change] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft()]
            nbytes = batch[0].nbytes
            while self._queue and len(batch) < limits.WRITE_BATCH_CHANGES and nbytes < limits.WRITE_BATCH_BYTES:
                change = self._queue.popleft()
                batch.append(change)
                nbytes += change.nbytes
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
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
