"""The store requests: put (tensors, models, pointers), search, list, delete and clear, and
reclaiming what a departed client owned."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

from fedptr import envelope, limits, modules, wire
from fedptr.errors import InvalidArgumentError, OverloadedError
from fedptr.tensors import dtype_name, from_raw

from . import policy
from .store import Entry

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("fedptr.node")


class Objects:
    """The store handlers of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.store = node.store
        self.plans = node.plans
        self.replies = node.replies
        self._departed: set[str] = set()

    def put(self, source: str, rid: bytes, msg: wire.Put, budget: float) -> None:
        tensor = from_raw(msg.tensor)
        if msg.requires_grad:
            tensor.requires_grad_(True)
        # a peer's stated origins can only add restrictions: they are kept, never trusted to lift one
        taint = policy.Taint(policy.from_wire(msg.origins))
        ok = wire.Ok(list(tensor.shape), msg.tensor.dtype)
        self.store_new(source, rid, msg.obj_id, Entry.tensor(tensor, msg.owner or source, taint), ok)

    def put_module(self, source: str, rid: bytes, msg: wire.PutModule, budget: float) -> None:
        model = modules.from_wire(msg.spec, msg.params)
        taint = policy.Taint(policy.from_wire(msg.origins))
        self.store_new(source, rid, msg.obj_id, Entry.tensor(model, msg.owner or source, taint), wire.Ok())

    def store_new(self, source: str, rid: bytes, obj_id: int, entry: Entry, ok: wire.Message) -> None:
        """Store and commit a received value (`entry`, settled), and answer `ok` once it is
        durable; nothing is kept when the commit or its write fails."""
        value = entry.value
        self.store.add(obj_id, entry)
        try:
            durable = self.store.commit(obj_id, entry, value)
        except Exception:
            self.store.discard(obj_id)
            raise
        self.node.reply_durable(durable, source, rid, ok, lambda: self._drop_if(obj_id, entry))

    def _drop_if(self, obj_id: int, entry: Entry) -> None:
        if self.store.entries.get(obj_id) is entry:
            self.store.discard(obj_id)

    def search(self, source: str, rid: bytes, msg: wire.Search, budget: float) -> None:
        ids = list(self.store.tags.get(msg.tag, []))
        values = [self.store.entries[i].value for i in ids]
        shapes: list[wire.Value] = [list(v.shape) for v in values]
        self.node.reply(source, rid, wire.SearchReply(ids, shapes, [dtype_name(v.dtype) for v in values]))

    def put_pointer(self, source: str, rid: bytes, msg: wire.PutPointer, budget: float) -> None:
        if not envelope.valid_name(msg.location.encode()):
            raise InvalidArgumentError(f"bad worker name {msg.location!r}")
        entry = Entry.pointer(msg.location, msg.id_at_location, settled=True, owner=source)
        self.store.add(msg.obj_id, entry)
        durable = self.store.commit(msg.obj_id, entry)
        self.node.reply_durable(durable, source, rid, wire.Ok(), lambda: self._drop_if(msg.obj_id, entry))

    def delete(self, source: str, rid: bytes, msg: wire.Delete, budget: float) -> None:
        popped = []
        for obj_id in msg.obj_ids:
            entry = self.store.entries.get(obj_id)
            if entry is None:
                continue
            if entry.owner != source:
                log.warning("refused %r the deletion of object %d, which it does not own", source, obj_id)
                continue
            self.store.discard(obj_id)
            popped.append(entry)
        self.node.delete_downstream(popped)

    def reclaim(self, client: str) -> None:
        """Delete what a client whose session ended owned (the Link's on_session_ended). Clients
        that leave in the same loop turn are reclaimed together, in one pass over the store."""
        if not self._departed:
            asyncio.get_running_loop().call_soon(self._reclaim_departed)
        self._departed.add(client)

    def _reclaim_departed(self) -> None:
        departed, self._departed = self._departed, set()
        self.replies.forget_peers(departed)
        self.plans.forget(departed)
        removed = self.store.clear_all(departed)
        if removed:
            log.info("reclaimed %d objects of %d clients that left", len(removed), len(departed))
            self.node.delete_downstream(removed)
        self.node.scheduler.trim_heap_soon()  # what they held is freed to malloc, not yet to the OS

    def clear(self, source: str, rid: bytes, msg: wire.Clear, budget: float) -> None:
        self.node.delete_downstream(self.store.clear(source))
        self.node.reply_durable(self.store.barrier(), source, rid, wire.Ok())  # the removals are on disk

    def list_objects(self, source: str, rid: bytes, msg: wire.ListObjects, budget: float) -> None:
        snapshot = dict(self.store.entries)
        barrier = self.store.barrier()  # a listing promises only what a restart keeps

        async def answer() -> None:
            pending = [e.wait() for e in snapshot.values() if not e.settled]
            if barrier is not None:
                pending.append(barrier)
            if pending:
                await asyncio.wait(pending, timeout=self.node.hop_budget(budget))
            if barrier is not None:  # a listing promises only what is durable
                if not barrier.done():
                    raise OverloadedError(self.name, "its disk did not catch up with the listing in time")
                if barrier.exception() is not None:
                    raise barrier.exception()  # type: ignore[misc]
            rows = [
                dataclasses.replace(e.row(i), owner=e.owner) for i, e in snapshot.items() if e.settled or e.is_pointer
            ]
            if len(rows) > limits.MAX_LISTED_OBJECTS:
                raise OverloadedError(self.name, f"{len(rows)} objects are too many to list at once")
            self.node.reply(source, rid, wire.ObjectsReply(rows))

        self.node.spawn(answer(), source, rid)
