"""Handing objects over: get (to the caller), move (to another worker) and grant (a new owner).

A hand-over takes the entry out of the store first, so pipelined requests after it see it gone,
and puts it back under its id whenever nothing was handed over (a refusal, a failed hop), so a
definite failure leaves the caller's pointer usable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import torch

from fedptr import envelope, modules, wire
from fedptr.errors import FedptrError, InvalidArgumentError, ObjectNotFoundError, PermissionDenied
from fedptr.failures import with_hop
from fedptr.tensors import to_raw

from . import policy
from .audit import AuditLog
from .store import Entry, Store

log = logging.getLogger("fedptr.node")


class Services(Protocol):
    """What a hand-over needs of its node."""

    name: str
    store: Store
    audit: AuditLog

    def forward(self, dest: str, msg: wire.Message, budget: float) -> asyncio.Future[wire.Message]: ...

    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None: ...

    def reply_error(self, dest: str, rid: bytes, e: BaseException) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], source: str, rid: bytes) -> None: ...

    def delete_downstream(self, entries: list[Entry]) -> None: ...


class Handover:
    """The get, move and grant handlers of one node."""

    def __init__(self, node: Services) -> None:
        self.node = node

    def grant(self, source: str, rid: bytes, msg: wire.Grant, budget: float) -> None:
        """Make `msg.to` the owner of an object `source` owns (a pointer sent, a chain's get)."""
        node = self.node
        if not envelope.valid_name(msg.to.encode()):
            raise InvalidArgumentError(f"bad peer name {msg.to!r}")
        entry = node.store.get(msg.obj_id, source)
        if msg.obj_id in node.store.pinned:
            raise PermissionDenied(node.name, "a worker's own data cannot be given away", node.name)
        entry.owner = msg.to
        if entry.done.done() and entry.done.exception() is None:
            node.store.persist(msg.obj_id, entry, entry.done.result())
        node.reply(source, rid, wire.Ok())

    def get(self, source: str, rid: bytes, msg: wire.Get, budget: float) -> None:
        """Hand the object to the caller: its value, or (a pointer) its place in the chain."""
        node = self.node
        entry = node.store.pop(msg.obj_id, source)

        def handed(granted: asyncio.Future[wire.Message]) -> None:
            error = granted.exception()
            if error is not None:
                node.store.put_back(msg.obj_id, entry)
                node.reply_error(source, rid, with_hop(error, node.name))
            else:
                assert entry.location is not None
                node.reply(source, rid, wire.PointerReply(entry.location, entry.remote_id))

        def answer(done: asyncio.Future[torch.Tensor | None]) -> None:
            error = done.exception()
            if error is not None:
                node.delete_downstream([entry])
                node.reply_error(source, rid, error)
            elif entry.location is not None:
                # the caller takes this pointer's place: the object one hop down becomes theirs
                try:
                    grant = node.forward(entry.location, wire.Grant(entry.remote_id, source), budget)
                except FedptrError as e:
                    node.store.put_back(msg.obj_id, entry)
                    node.reply_error(source, rid, e)
                    return
                grant.add_done_callback(handed)
            else:
                self._release(source, rid, msg.obj_id, entry, done.result())

        # An entry always settles: computations end, and forwards carry the link's deadline.
        if entry.done.done():
            answer(entry.done)
        else:
            entry.done.add_done_callback(answer)

    def _release(self, source: str, rid: bytes, obj_id: int, entry: Entry, value: Any) -> None:
        node = self.node
        if value is None:
            node.reply_error(source, rid, ObjectNotFoundError("", f"object {obj_id} holds no value"))
            return
        try:
            release = policy.release_kind(entry.taint, entry.released)
        except PermissionDenied as e:
            node.store.put_back(obj_id, entry)  # a refused get takes nothing away
            node.reply_error(source, rid, e)
            return
        if release != "public":
            node.audit.record("get", source, object=obj_id, release=release, owners=entry.taint.owners)
        if isinstance(value, torch.nn.Module):
            node.reply(source, rid, wire.ModuleReply(*modules.to_wire(value), release))
        else:
            node.reply(source, rid, wire.TensorReply(to_raw(value), release))

    def move(self, source: str, rid: bytes, msg: wire.Move, budget: float) -> None:
        """Send the object's value to worker `msg.dest` as `msg.new_id`, then drop it here."""
        node = self.node
        entry = node.store.pop(msg.obj_id, source)
        owner = msg.owner or source
        if msg.dest == node.name and entry.location is None:
            entry.owner = owner
            node.store.add(msg.new_id, entry)
            if entry.done.done() and entry.done.exception() is None:
                node.store.commit(msg.new_id, entry, entry.done.result())
            node.reply(source, rid, wire.Ok())
            return

        async def answer() -> None:
            try:
                if entry.location is not None:
                    hop: asyncio.Future[wire.Message] = node.forward(
                        entry.location, wire.Move(entry.remote_id, msg.dest, msg.new_id, owner), budget
                    )
                else:
                    value = await entry.done
                    policy.check_move(entry.taint, msg.dest)
                    hop = node.forward(msg.dest, _transfer(msg.new_id, value, owner, entry.taint), budget)
                    if entry.taint:
                        node.audit.record("move", source, object=msg.obj_id, to=msg.dest, owners=entry.taint.owners)
            except FedptrError as e:
                node.store.put_back(msg.obj_id, entry)
                node.reply_error(source, rid, e)
                return
            try:
                await hop
            except FedptrError as e:
                # Nothing was handed over: the object stays here, under its id.
                node.store.put_back(msg.obj_id, entry)
                node.reply_error(source, rid, with_hop(e, node.name))
                return
            node.reply(source, rid, wire.Ok())

        node.spawn(answer(), source, rid)


def _transfer(new_id: int, value: torch.Tensor | torch.nn.Module, owner: str, taint: policy.Taint) -> wire.Message:
    """The message that stores `value` (with its origins) on another node as `new_id`, for `owner`."""
    origins = policy.to_wire(taint.origins)
    if isinstance(value, torch.nn.Module):
        return wire.PutModule(new_id, *modules.to_wire(value), origins, owner)
    return wire.Put(new_id, to_raw(value), value.requires_grad, origins, owner)
