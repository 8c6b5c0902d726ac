"""The node's object store: entries that are local tensors, models, or pointers to other workers.

An entry is created the moment its request arrives, before its value exists, so later
requests (pipelined by the client) find it in order. `done` settles when the value is
computed (a tensor), when the next hop confirmed it (a pointer), or with the error that
stopped it; a dependent operation then fails with that same error.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedptr import limits
from fedptr.errors import InvalidArgumentError, ObjectNotFoundError, PermissionDenied, StoreFullError
from fedptr.tensors import NAME_BY_DTYPE
from fedptr.wire import ObjectRow, new_object_id

from .durable import DurableStore
from .mechanisms import Contribution
from .policy import Taint


@dataclass(eq=False)
class Entry:
    """One stored object. `location` is None for a tensor (or model) held here, else the worker
    a pointer points to, with `remote_id` its id there."""

    done: asyncio.Future[Any]
    location: str | None = None
    remote_id: int = 0
    owner: str = ""
    """The one peer that may use, get, move, grant or delete it (ANYONE for a worker's own data)."""
    taint: Taint = field(default_factory=Taint)
    """The data owners its value derives from; shared with the entries that alias its storage."""
    released: str = ""
    """``"dp"`` once a DP mechanism made the value releasable (a model trained by DP-SGD only)."""
    readonly: str = ""
    """The data owner whose private data, or DP contribution, this is: nothing may write to it."""
    contribution: Contribution | None = None
    """What makes it a single-use DP contribution, on an aggregator."""

    @property
    def is_pointer(self) -> bool:
        return self.location is not None

    @classmethod
    def tensor(
        cls, value: torch.Tensor | nn.Module | None = None, owner: str = "", taint: Taint | None = None
    ) -> Entry:
        """A local tensor (or model) entry, settled with `value` or pending when it is None."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if value is not None:
            fut.set_result(value)
        return cls(fut, owner=owner, taint=taint or Taint())

    @classmethod
    def pointer(cls, location: str, remote_id: int, settled: bool, owner: str = "") -> Entry:
        """A pointer entry; pending until the hop it points to confirms the object, unless `settled`."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if settled:
            fut.set_result(None)
        fut.add_done_callback(_retrieve)
        return cls(fut, location, remote_id, owner)

    def row(self, obj_id: int) -> ObjectRow:
        """This entry's line in a store listing (it must have settled)."""
        if self.done.exception() is not None:
            return ObjectRow(obj_id, "failed", [], type(self.done.exception()).__name__, None, "", 0)
        if self.location is not None:
            return ObjectRow(obj_id, "pointer", [], "", None, self.location, self.remote_id)
        t = self.done.result()
        if isinstance(t, nn.Module):
            return ObjectRow(obj_id, "module", [], "", None, "", 0)
        # values are shown only for small tensors that derive from no one's private data, and
        # shapes for those and for a dataset as loaded (public metadata), never for what derives
        # from private data
        small = t.numel() <= limits.PREVIEW_NUMEL and t.dtype not in (torch.complex64, torch.complex128)
        preview = t.detach().reshape(-1).tolist() if small and not self.taint else None
        shape = list(t.shape) if not self.taint or self.readonly else []
        return ObjectRow(obj_id, "tensor", shape, NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), preview, "", 0)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Errors are reported to whoever asked; an entry nobody awaits must not warn at exit.
    if not fut.cancelled():
        fut.exception()


class Store:
    """Objects by id, with a byte budget for local tensors and, optionally, a copy on disk.

    `commit` is called once an object's value exists and before it is acknowledged: it charges
    the tensor's bytes against `max_bytes` (raising StoreFullError) and writes it to the durable
    store, so every acknowledged object survives a crash of the node."""

    def __init__(self, node: str, max_bytes: int = 0, durable: DurableStore | None = None) -> None:
        self.node = node
        self.entries: dict[int, Entry] = {}
        self.pinned: set[int] = set()
        """Data the node was started with: never deleted, moved or handed over."""
        self.tags: dict[str, list[int]] = {}
        self.max_bytes = max_bytes
        self.bytes = 0
        self.durable = durable
        self._charged: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def restore(self) -> int:
        """Load what the durable store holds; returns how many objects came back."""
        if self.durable is None:
            return 0
        for obj_id, (value, owner) in self.durable.load().items():
            if isinstance(value, tuple):
                self.entries[obj_id] = Entry.pointer(value[0], value[1], settled=True, owner=owner)
            else:
                self.entries[obj_id] = Entry.tensor(value, owner)
                self._charge(obj_id, value)
        return len(self.entries)

    def add(self, obj_id: int, entry: Entry) -> None:
        """Store `entry`; raises InvalidArgumentError when the id is taken."""
        if obj_id in self.entries:
            raise InvalidArgumentError(f"object id {obj_id} already exists")
        entry.done.add_done_callback(_retrieve)
        self.entries[obj_id] = entry

    def add_data(self, tag: str, value: torch.Tensor, taint: Taint) -> int:
        """Store a dataset array under a new id: private (`taint`), read-only, pinned, and
        findable by `tag`."""
        obj_id = new_object_id()
        entry = Entry.tensor(value, ANYONE, taint)
        entry.readonly = self.node
        self.add(obj_id, entry)
        self._charge(obj_id, value)
        self.pinned.add(obj_id)
        self.tags.setdefault(tag, []).append(obj_id)
        return obj_id

    def commit(self, obj_id: int, entry: Entry, value: torch.Tensor | nn.Module | None = None) -> None:
        """Account for and persist an entry whose value (a tensor `value`, or the pointer itself)
        exists, before it is acknowledged. Raises StoreFullError past the byte budget."""
        if entry.location is None:
            assert value is not None
            params = list(value.parameters()) if isinstance(value, nn.Module) else [value]
            for p in params:
                self._charge(obj_id, p)
        self.persist(obj_id, entry, value)

    def persist(self, obj_id: int, entry: Entry, value: torch.Tensor | nn.Module | None = None) -> None:
        """Write a settled entry (and its owner) to the durable store, if there is one."""
        if self.durable is None:
            return
        if entry.location is not None:
            self.durable.save_pointer(obj_id, entry.location, entry.remote_id, entry.owner)
        elif isinstance(value, torch.Tensor):
            self.durable.save_tensor(obj_id, value, entry.owner)
        # models live in memory only (see the README's limitations)

    def _charge(self, obj_id: int, value: torch.Tensor) -> None:
        nbytes = value.numel() * value.element_size()
        if self.max_bytes and self.bytes + nbytes > self.max_bytes:
            raise StoreFullError("", f"storing {nbytes} bytes would exceed the store's cap of {self.max_bytes} bytes")
        self.bytes += nbytes
        self._charged[obj_id] = self._charged.get(obj_id, 0) + nbytes

    def get(self, obj_id: int, principal: str | None = None) -> Entry:
        """The entry under `obj_id`; raises ObjectNotFoundError, or PermissionDenied when `principal`
        is given and is not the entry's owner."""
        try:
            entry = self.entries[obj_id]
        except KeyError:
            raise ObjectNotFoundError("", f"no object {obj_id}") from None
        if principal is not None and entry.owner not in (principal, ANYONE):
            log.warning("refused %r the object %d of %r", principal, obj_id, entry.owner)
            raise PermissionDenied(self.node, f"object {obj_id} belongs to another peer", self.node)
        return entry

    def pop(self, obj_id: int, principal: str | None = None) -> Entry:
        """Remove and return the entry under `obj_id`; raises ObjectNotFoundError, or PermissionDenied
        for pinned data or another owner's object."""
        self.get(obj_id, principal)
        if obj_id in self.pinned:
            raise PermissionDenied(self.node, "data a worker was started with stays there", self.node)
        entry = self.discard(obj_id)
        if entry is None:
            raise ObjectNotFoundError("", f"no object {obj_id}")
        return entry

    def discard(self, obj_id: int) -> Entry | None:
        """Remove the entry under `obj_id` if there is one (and its bytes, and its copy on disk);
        pinned data is never removed."""
        if obj_id in self.pinned:
            return None
        entry = self.entries.pop(obj_id, None)
        if entry is not None:
            self.bytes -= self._charged.pop(obj_id, 0)
            if self.durable is not None:
                self.durable.remove(obj_id)
        return entry

    def put_back(self, obj_id: int, entry: Entry) -> None:
        """Return a popped entry under its id (a hand-over failed), unless the id was reused."""
        if obj_id not in self.entries:
            self.entries[obj_id] = entry
            if entry.done.done() and entry.done.exception() is None:
                self.commit(obj_id, entry, entry.done.result())

    def close(self) -> None:
        """Release the durable store's directory handle."""
        if self.durable is not None:
            self.durable.close()

    def clear(self, principal: str) -> list[Entry]:
        """Remove everything `principal` owns (pinned data never); returns what was removed."""
        ids = [i for i, e in self.entries.items() if e.owner == principal and i not in self.pinned]
        removed = [self.entries[i] for i in ids]
        for obj_id in ids:
            self.discard(obj_id)
        return removed


ANYONE = "*"
"""Owner of a worker's own data: any peer may compute on it (its privacy policy still applies)."""

log = logging.getLogger("fedptr.node.store")
