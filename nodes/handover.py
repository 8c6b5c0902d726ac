"""Handing objects over: get (to the caller), move (to another worker) and grant (a new owner).

Every hand-over is two-phase: the source commits (forgets the object) only after the other side
holds it durably, and a definite failure leaves the object where it was, under its id.

* **get** of a value answers with the value and keeps the entry: the caller deletes it once it
  holds the value (a get that timed out can be retried). A get of a stored pointer hands the
  object one hop down to the caller (a Grant there), then forgets the pointer.
* **move** takes the entry out (pipelined requests see it gone), persists a move record
  ``[dest, new_id]``, sends the value, and forgets the object (files last) only once the
  destination acknowledged it, which it does once the value is on its disk. A refusal puts it
  back. When the answer is lost (the destination died or stopped, the broker restarted), the
  move is *in doubt*: the caller hears InDoubtError, and this node asks the destination whether
  it holds ``new_id`` (`Has`, which arrives after the value on the same path) until it can tell;
  then it releases or puts back. A restart resumes the moves whose records it finds.
* **grant** changes the owner and answers once that is on disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import torch

from fedptr import envelope, limits, modules, wire
from fedptr.errors import (
    ClientClosedError,
    DeadlineExceeded,
    FedptrError,
    InDoubtError,
    InvalidArgumentError,
    LostWorkerError,
    ObjectNotFoundError,
    PermissionDenied,
)
from fedptr.failures import with_hop
from fedptr.tensors import to_raw

from . import policy
from .audit import AuditLog
from .store import Entry, Store

log = logging.getLogger("fedptr.node")

T = TypeVar("T")

_IN_DOUBT = (LostWorkerError, DeadlineExceeded, ClientClosedError, InDoubtError)
"""Errors after which a request may or may not have been carried out at the next hop."""


class Services(Protocol):
    """What a hand-over needs of its node."""

    name: str
    store: Store
    audit: AuditLog

    def forward(
        self, dest: str, msg: wire.Message, budget: float, resend: bool = True
    ) -> asyncio.Future[wire.Message]: ...

    def reply(self, dest: str, rid: bytes, msg: wire.Message) -> None: ...

    def reply_error(self, dest: str, rid: bytes, e: BaseException) -> None: ...

    def reply_durable(
        self,
        durable: asyncio.Future[None] | None,
        dest: str,
        rid: bytes,
        msg: wire.Message,
        on_failed: Callable[[], None] | None = None,
    ) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None], source: str, rid: bytes) -> None: ...

    def answering(self, source: str, rid: bytes, step: Callable[[T], None]) -> Callable[[T], None]: ...

    def delete_downstream(self, entries: list[Entry]) -> None: ...


async def _durable(future: asyncio.Future[None] | None) -> None:
    if future is not None:
        await future


class Handover:
    """The get, move, grant and has handlers of one node."""

    def __init__(self, node: Services) -> None:
        self.node = node
        self.resolving: set[asyncio.Task[None]] = set()

    def grant(self, source: str, rid: bytes, msg: wire.Grant, budget: float) -> None:
        """Make `msg.to` the owner of an object `source` owns (a pointer sent, a chain's get)."""
        node = self.node
        if not envelope.valid_name(msg.to.encode()):
            raise InvalidArgumentError(f"bad peer name {msg.to!r}")
        entry = node.store.get(msg.obj_id, source)
        if msg.obj_id in node.store.pinned:
            raise PermissionDenied(node.name, "a worker's own data cannot be given away", node.name)
        node.store.check_principal(msg.obj_id, entry, msg.to)
        if entry.location is None and msg.to != entry.owner:
            node.store.hand_over(entry)
        entry.owner = msg.to
        entry.sponsor = source
        durable = None
        if entry.ok:
            durable = node.store.persist(msg.obj_id, entry, entry.value)
        node.reply_durable(durable, source, rid, wire.Ok())

    def has(self, source: str, rid: bytes, msg: wire.Has, budget: float) -> None:
        """Answer whether object `msg.obj_id` is held here durably (Ok), is not (ObjectNotFound),
        or is in a hand-over still in doubt (InDoubtError). Asked by a node settling a move."""
        node = self.node
        if msg.obj_id in node.store.taken:
            raise InDoubtError("", f"a hand-over of object {msg.obj_id} is in doubt")
        node.store.get(msg.obj_id)  # ObjectNotFoundError
        barrier = node.store.barrier()

        def answer(written: asyncio.Future[None] | None = None) -> None:
            if written is not None and written.exception() is not None:
                node.reply_error(source, rid, written.exception())  # type: ignore[arg-type]
            elif msg.obj_id in node.store.entries:
                node.reply(source, rid, wire.Ok())
            else:
                node.reply_error(source, rid, ObjectNotFoundError("", f"no object {msg.obj_id}"))

        if barrier is None:
            answer()
        else:
            barrier.add_done_callback(node.answering(source, rid, answer))

    def get(self, source: str, rid: bytes, msg: wire.Get, budget: float) -> None:
        """Hand the object to the caller: its value (the entry stays until the caller deletes
        it), or, for a pointer, its place in the chain."""
        node = self.node
        entry = node.store.get(msg.obj_id, source)
        if msg.obj_id in node.store.pinned:
            raise policy.refuse_pinned(node.name)
        if entry.location is not None:
            self._get_pointer(source, rid, msg.obj_id, node.store.take(msg.obj_id, source), budget)
            return

        def answer(done: Entry) -> None:
            if done.error is not None:
                node.reply_error(source, rid, done.error)
            else:
                self._release(source, rid, msg.obj_id, entry, done.value)

        # An entry always settles: computations end, and forwards carry the link's deadline.
        # Settled later, the answer runs outside this handler: it answers its own failure (a
        # refused audit record) rather than leave the client to its deadline.
        entry.on_settled(node.answering(source, rid, answer))

    def _get_pointer(self, source: str, rid: bytes, obj_id: int, entry: Entry, budget: float) -> None:
        """The caller takes this pointer's place: the object one hop down becomes theirs."""
        node = self.node

        def handed(granted: asyncio.Future[wire.Message]) -> None:
            error = granted.exception()
            if error is not None:
                node.store.put_back(obj_id, entry)
                node.reply_error(source, rid, with_hop(error, node.name))
            else:
                assert entry.location is not None
                reply = wire.PointerReply(entry.location, entry.remote_id)
                node.reply_durable(node.store.release(obj_id), source, rid, reply)

        def answer(done: Entry) -> None:
            if done.error is not None:
                node.store.put_back(obj_id, entry)
                node.reply_error(source, rid, done.error)
                return
            assert entry.location is not None
            try:
                grant = node.forward(entry.location, wire.Grant(entry.remote_id, source), budget)
            except Exception as e:  # nothing was handed over: the pointer stays
                node.store.put_back(obj_id, entry)
                node.reply_error(source, rid, e)
                return
            grant.add_done_callback(node.answering(source, rid, handed))

        entry.on_settled(node.answering(source, rid, answer))

    def _release(self, source: str, rid: bytes, obj_id: int, entry: Entry, value: Any) -> None:
        node = self.node
        if value is None:
            node.reply_error(source, rid, ObjectNotFoundError("", f"object {obj_id} holds no value"))
            return
        try:
            release = policy.release_kind(entry.taint, entry.released)
        except PermissionDenied as e:
            node.reply_error(source, rid, e)  # nothing was handed over: the entry stays
            return
        if release != "public":
            node.audit.record("get", source, object=obj_id, release=release, owners=entry.taint.owners)
        # views: the link copies what it keeps past the reply call (`fedptr.link`), so a later
        # in-place write (another owner's data added) cannot change what leaves
        if isinstance(value, torch.nn.Module):
            node.reply(source, rid, wire.ModuleReply(*modules.to_wire(value), release))
        else:
            node.reply(source, rid, wire.TensorReply(to_raw(value), release))

    def move(self, source: str, rid: bytes, msg: wire.Move, budget: float) -> None:
        """Send the object's value to worker `msg.dest` as `msg.new_id`; forget it here once the
        destination holds it durably (see the module's description)."""
        node = self.node
        if not envelope.valid_name(msg.dest.encode()):
            raise InvalidArgumentError(f"bad worker name {msg.dest!r}")
        owner = msg.owner or source
        node.store.check_principal(msg.obj_id, node.store.get(msg.obj_id, source), owner)
        entry = node.store.take(msg.obj_id, source)
        if msg.dest == node.name and entry.location is None:
            self._rename(source, rid, msg.obj_id, entry, msg.new_id, owner)
            return

        async def answer() -> None:
            try:
                if entry.location is not None:
                    hop_msg: wire.Message = wire.Move(entry.remote_id, msg.dest, msg.new_id, owner)
                    ask: tuple[str, int, bool] = (entry.location, entry.remote_id, False)
                    resend = True  # it carries no value
                else:
                    value = await entry.wait()
                    policy.check_move(entry.taint, msg.dest)
                    # copies when the move record's write is awaited before the link has the
                    # message; without a record nothing runs in between (`_durable(None)` does not
                    # yield), and the link keeps none of a view's memory past the call. Views are
                    # sent once: a resend (the broker forgot us) would read them later (review11)
                    resend = node.store.wal is not None
                    hop_msg = _transfer(msg.new_id, value, owner, entry.taint, copy=resend)
                    ask = (msg.dest, msg.new_id, True)
                    if entry.taint:
                        node.audit.record("move", source, object=msg.obj_id, to=msg.dest, owners=entry.taint.owners)
                await _durable(node.store.mark_moving(msg.obj_id, msg.dest, msg.new_id))
                hop = node.forward(ask[0], hop_msg, budget, resend)
            except Exception as e:
                # nothing was sent: the object stays here, under its id
                await _durable(node.store.put_back(msg.obj_id, entry))
                node.reply_error(source, rid, e)
                return
            try:
                await hop
            except _IN_DOUBT as e:
                self.resolve(msg.obj_id, entry, *ask)
                err = with_hop(e, node.name)
                path = getattr(err, "path", [node.name])
                node.reply_error(source, rid, InDoubtError(node.name, f"moving to {msg.dest!r}: {err}", path))
                return
            except FedptrError as e:
                await _durable(node.store.put_back(msg.obj_id, entry))
                node.reply_error(source, rid, with_hop(e, node.name))
                return
            node.reply_durable(node.store.release(msg.obj_id), source, rid, wire.Ok())

        node.spawn(answer(), source, rid)

    def _rename(self, source: str, rid: bytes, obj_id: int, entry: Entry, new_id: int, owner: str) -> None:
        """A move to this very node: the object is stored as `new_id`, then forgotten as `obj_id`."""
        node = self.node
        try:
            if owner != entry.owner:
                node.store.hand_over(entry)
            node.store.rename(obj_id, new_id)
        except FedptrError:
            node.store.put_back(obj_id, entry)
            raise
        entry.owner = owner
        durable = None
        if entry.ok:
            durable = node.store.persist(new_id, entry, entry.value)
        # the removal is queued after the write of `new_id`: the answer waits for both
        node.reply_durable(node.store.release(obj_id) if durable is not None else None, source, rid, wire.Ok())

    # --- moves in doubt --------------------------------------------------------------------
    def resume(self, moves: list[tuple[int, Entry, str, int]]) -> None:
        """Settle the moves a restart found in doubt (`Store.restore`)."""
        for obj_id, entry, dest, new_id in moves:
            if entry.location is not None:
                self.resolve(obj_id, entry, entry.location, entry.remote_id, False)
            else:
                self.resolve(obj_id, entry, dest, new_id, True)

    def resolve(self, obj_id: int, entry: Entry, ask: str, ask_id: int, present_means_moved: bool) -> None:
        """Ask worker `ask` whether it holds `ask_id` until it can tell, then release taken object
        `obj_id` (it was handed over) or put it back (it was not)."""
        task = asyncio.ensure_future(self._resolve(obj_id, entry, ask, ask_id, present_means_moved))
        self.resolving.add(task)
        task.add_done_callback(self.resolving.discard)

    async def _resolve(self, obj_id: int, entry: Entry, ask: str, ask_id: int, present_means_moved: bool) -> None:
        node = self.node
        while True:
            try:
                await node.forward(ask, wire.Has(ask_id), limits.RESOLVE_TIMEOUT_S)
                present = True
            except ObjectNotFoundError:
                present = False
            except FedptrError as e:
                log.info("move of %d to %r still in doubt: %s", obj_id, ask, e)
                await asyncio.sleep(limits.RESOLVE_RETRY_S)
                continue
            break
        if present == present_means_moved:
            log.info("move of %d in doubt: %r holds it; forgotten here", obj_id, ask)
            await _durable(node.store.release(obj_id))
        else:
            log.info("move of %d in doubt: it never left; back under its id", obj_id)
            await _durable(node.store.put_back(obj_id, entry))

    async def aclose(self) -> None:
        """Stop settling moves in doubt (their records stay on disk for the next start)."""
        for task in list(self.resolving):
            task.cancel()
        await asyncio.gather(*self.resolving, return_exceptions=True)


def _transfer(
    new_id: int, value: torch.Tensor | torch.nn.Module, owner: str, taint: policy.Taint, copy: bool
) -> wire.Message:
    """The message that stores `value` (with its origins) on another node as `new_id`, for `owner`.
    With `copy`, it carries copies, not views: the entry is taken, but an alias of it (an in-place
    op's result, a model's parameter) stays here, and a write through one handled while the move
    awaits its record's fsync (before the link, which copies what it keeps, has the message)
    changed what left after the origins were read: bob's private data left a public move,
    unaudited (red17). Without a record to await, the message reaches the link in the step that
    read the origins, and views cost nothing: the copy was a fresh 64 MiB (page faults and all)
    per moved 64 MiB tensor, a fifth of a move on this VM."""
    origins = policy.to_wire(taint.origins)
    if isinstance(value, torch.nn.Module):
        return wire.PutModule(new_id, *modules.to_wire(value, copy=copy), origins, owner)
    return wire.Put(new_id, to_raw(value, copy=copy), value.requires_grad, origins, owner)
