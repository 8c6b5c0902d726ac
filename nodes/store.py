"""The node's object store: entries that are local tensors or pointers to other workers.

An entry is created the moment its request arrives, before its value exists, so later
requests (pipelined by the client) find it in order. `done` settles when the value is
computed (a tensor), when the next hop confirmed it (a pointer), or with the error that
stopped it; a dependent operation then fails with that same error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from fedptr import limits
from fedptr.tensors import NAME_BY_DTYPE
from fedptr.wire import ObjectRow


@dataclass(eq=False)
class Entry:
    """One stored object. `location` is None for a tensor held here, else the worker a pointer
    points to, with `remote_id` its id there."""

    done: asyncio.Future[torch.Tensor | None]
    location: str | None = None
    remote_id: int = 0

    @property
    def is_pointer(self) -> bool:
        return self.location is not None

    @classmethod
    def tensor(cls, value: torch.Tensor | None = None) -> Entry:
        """A local tensor entry, settled with `value` or pending when it is None."""
        fut: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
        if value is not None:
            fut.set_result(value)
        return cls(fut)

    @classmethod
    def pointer(cls, location: str, remote_id: int, settled: bool) -> Entry:
        """A pointer entry; pending until the hop it points to confirms the object, unless `settled`."""
        fut: asyncio.Future[torch.Tensor | None] = asyncio.get_running_loop().create_future()
        if settled:
            fut.set_result(None)
        fut.add_done_callback(_retrieve)
        return cls(fut, location, remote_id)

    def row(self, obj_id: int) -> ObjectRow:
        """This entry's line in a store listing (it must have settled)."""
        if self.done.exception() is not None:
            return ObjectRow(obj_id, "failed", [], type(self.done.exception()).__name__, None, "", 0)
        if self.location is not None:
            return ObjectRow(obj_id, "pointer", [], "", None, self.location, self.remote_id)
        t = self.done.result()
        assert t is not None
        preview = t.detach().reshape(-1).tolist() if t.numel() <= limits.PREVIEW_NUMEL else None
        if preview is not None and t.dtype in (torch.complex64, torch.complex128):
            preview = None
        return ObjectRow(obj_id, "tensor", list(t.shape), NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), preview, "", 0)


def _retrieve(fut: asyncio.Future[torch.Tensor | None]) -> None:
    # Errors are reported to whoever asked; an entry nobody awaits must not warn at exit.
    if not fut.cancelled():
        fut.exception()


@dataclass
class Store:
    """Objects by id."""

    entries: dict[int, Entry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, obj_id: int, entry: Entry) -> None:
        """Store `entry`; raises KeyError when the id is taken."""
        if obj_id in self.entries:
            raise KeyError(f"object id {obj_id} already exists")
        entry.done.add_done_callback(_retrieve)
        self.entries[obj_id] = entry

    def get(self, obj_id: int) -> Entry:
        """The entry under `obj_id`; raises ObjectNotFound."""
        try:
            return self.entries[obj_id]
        except KeyError:
            raise ObjectNotFound(f"no object {obj_id}") from None

    def pop(self, obj_id: int) -> Entry:
        """Remove and return the entry under `obj_id`; raises ObjectNotFound."""
        try:
            return self.entries.pop(obj_id)
        except KeyError:
            raise ObjectNotFound(f"no object {obj_id}") from None


class ObjectNotFound(LookupError):
    """Raised when a request names an object id the store does not hold (never sent, or
    already consumed by get, move or delete)."""
