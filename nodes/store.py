"""The node's object store: entries that are local tensors, models, or pointers to other workers.

An entry is created the moment its request arrives, before its value exists, so later
requests (pipelined by the client) find it in order. It settles when the value is computed
(a tensor), when the next hop confirmed it (a pointer), or with the error that stopped it; a
dependent operation then fails with that same error.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from fedptr import limits
from fedptr.errors import (
    InvalidArgumentError,
    ObjectNotFoundError,
    PermissionDenied,
    QuotaExceededError,
    StoreFullError,
)
from fedptr.tensors import NAME_BY_DTYPE
from fedptr.wire import ObjectRow, new_object_id

from .durable import DurableStore
from .mechanisms import Contribution
from .policy import Taint, from_wire, refuse_pinned, to_wire
from .saved import Freed, Recorder
from .writeahead import WriteAhead

E = TypeVar("E", bound=BaseException)


def without_frames(error: E) -> E:
    """`error`, and every exception chained to it (its cause and context, transitively), with no
    traceback: an exception kept past its handler keeps its frames' locals alive with it."""
    todo: list[BaseException | None] = [error]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            e.with_traceback(None)
            todo += (e.__cause__, e.__context__)
    return error


@dataclass(eq=False, slots=True)
class Entry:
    """One stored object. `location` is None for a tensor (or model) held here, else the worker
    a pointer points to, with `remote_id` its id there.

    It is `settled` once its value is computed (a tensor), the next hop confirmed it (a
    pointer), or an error stopped it (`error`); a dependent operation then fails with that same
    error. Most entries settle in the loop turn that made them and are read at once, so the
    value and error are plain slots: an asyncio future is made only for whoever waits on a
    pending entry (`wait`, `on_settled`), one per waiter, so that cancelling one waiter leaves
    the entry and the other waiters alone."""

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
    sponsor: str = ""
    """The peer that granted it to its owner (a client sending a pointer): when that client's
    session ends the object is reclaimed too, even if the owner's pointer to it was lost."""
    settled: bool = False
    value: Any = None
    """The value once settled without an error (None for a pointer)."""
    error: BaseException | None = None
    _waiters: list[asyncio.Future[Any] | Callable[[Entry], None]] | None = field(default=None, repr=False)
    account: Account | None = field(default=None, repr=False)
    """The quota it counts against (the store's; None: a worker's own data, or not stored)."""
    charged: int = 0
    """The tensor bytes the store charged for it."""
    shared: bool = False
    """Its value's storages (a gradient's, a model's parameters') are charged each once, until
    freed (`Store.share`), not in `charged`: a value that tracks gradients (a graph may hold it
    past its entry), a model, or a value a graph saved."""

    @property
    def is_pointer(self) -> bool:
        return self.location is not None

    @property
    def ok(self) -> bool:
        """Settled without an error."""
        return self.settled and self.error is None

    @classmethod
    def tensor(
        cls, value: torch.Tensor | nn.Module | None = None, owner: str = "", taint: Taint | None = None
    ) -> Entry:
        """A local tensor (or model) entry, settled with `value` or pending when it is None. An
        alias passes its target's `taint` and shares that very object, even while it is empty."""
        # `taint or Taint()` would give the alias of a still-public target (an empty, so falsy,
        # Taint) a cell of its own: a write through the alias then left the target public.
        # Positional: keywords cost a third more, and an entry is made for every operation.
        entry = cls(None, 0, owner, Taint({}) if taint is None else taint)
        if value is not None:
            entry.settled = True
            entry.value = value
        return entry

    @classmethod
    def pointer(cls, location: str, remote_id: int, settled: bool, owner: str = "") -> Entry:
        """A pointer entry; pending until the hop it points to confirms the object, unless `settled`."""
        return cls(location, remote_id, owner, Taint({}), settled=settled)

    def result(self) -> Any:
        """The value of a settled entry, or the error it failed with, raised."""
        if self.error is not None:
            raise self.error
        if not self.settled:
            raise asyncio.InvalidStateError("the object is not settled yet")
        return self.value

    def settle(self, value: torch.Tensor | nn.Module | None) -> None:
        """Give a pending entry its value (None: a pointer whose hop confirmed it)."""
        if self.settled:
            raise asyncio.InvalidStateError("the object is settled already")
        self.settled = True
        self.value = value
        if self._waiters is not None:
            self._wake()

    def fail(self, error: BaseException) -> None:
        """Settle a pending entry with the error that stopped it."""
        if self.settled:
            raise asyncio.InvalidStateError("the object is settled already")
        self.settled = True
        # kept without frames: their locals lead back here (the run, its operands' tensors), a
        # cycle only the cyclic GC frees, and rarely on a node (NODE_GC_THRESHOLD); and a refusal
        # raised while handling another error keeps that one as its context, whose frames held
        # the refused step's operands (a plan's intermediates) for as long as this entry lives
        self.error = without_frames(error)
        if self._waiters is not None:
            self._wake()

    def wait(self) -> asyncio.Future[Any]:
        """A future of this waiter's own that settles as the entry does (at once if it has)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.settled:
            _settle(fut, self)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(fut)
        return fut

    def on_settled(self, callback: Callable[[Entry], None]) -> None:
        """Call `callback(self)` once the entry settles, in a later loop turn (as a future's
        done callback would be), or now if it has."""
        if self.settled:
            callback(self)
            return
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(callback)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters or [], None
        loop = asyncio.get_running_loop()
        for w in waiters:
            if isinstance(w, asyncio.Future):
                if not w.done():  # not a waiter that was cancelled
                    _settle(w, self)
            else:
                loop.call_soon(w, self)

    def row(self, obj_id: int) -> ObjectRow:
        """This entry's line in a store listing (it must have settled)."""
        if self.error is not None:
            return ObjectRow(obj_id, "failed", [], type(self.error).__name__, None, "", 0)
        if self.location is not None:
            return ObjectRow(obj_id, "pointer", [], "", None, self.location, self.remote_id)
        t = self.value
        if isinstance(t, nn.Module):
            return ObjectRow(obj_id, "module", [], "", None, "", 0)
        # values are shown only for small tensors that derive from no one's private data, and
        # shapes for those and for a dataset as loaded (public metadata), never for what derives
        # from private data
        small = t.numel() <= limits.PREVIEW_NUMEL and t.dtype not in (torch.complex64, torch.complex128)
        preview = t.detach().reshape(-1).tolist() if small and not self.taint else None
        shape = list(t.shape) if not self.taint or self.readonly else []
        return ObjectRow(obj_id, "tensor", shape, NAME_BY_DTYPE.get(t.dtype, str(t.dtype)), preview, "", 0)


@dataclass(eq=False, slots=True)
class Account:
    """What one client's objects on this node count against its quota, shared by those entries
    (so that storing or deleting one touches no table keyed by object id)."""

    client: str
    objects: int = 0
    bytes: int = 0


UNKNOWN_ORIGIN = "?"
"""The owner of a stored value whose record has no origins: it is private to no one who can
release it, so it never leaves (fail closed)."""


def _restore_privacy(entry: Entry, privacy: dict[str, Any] | None) -> None:
    """Give a restored tensor its origins, read-only mark and release kind; a record without them,
    or with malformed ones, restores as private."""
    try:
        assert privacy is not None
        entry.taint = Taint(from_wire(privacy["origins"]))
        entry.readonly = str(privacy.get("readonly", ""))
        entry.released = str(privacy.get("released", ""))
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError):
        entry.taint = Taint({UNKNOWN_ORIGIN: frozenset()})


def _settle(fut: asyncio.Future[Any], entry: Entry) -> None:
    if entry.error is None:
        fut.set_result(entry.value)
    else:
        fut.set_exception(entry.error)
        fut.exception()  # whoever waits is told; a waiter that gave up must not warn at exit


class Store:
    """Objects by id, with a byte budget for local tensors and, optionally, a copy on disk.

    `commit` is called once an object's value exists and before it is acknowledged: it charges
    the tensor's bytes against `max_bytes` (raising StoreFullError) and queues its write to the
    durable store. Every change that touches the disk returns the future of its write-ahead
    (nodes/writeahead.py), or None without a durable store: the node acknowledges a request only
    once those futures settled, so every acknowledged change survives a crash of the node.

    A hand-over `take`s an entry out (pipelined requests see it gone) but keeps its bytes and
    files until it is `release`d (the other side holds it) or `put_back` (nothing was handed over).

    Each object counts against the quota of the client that made it (its sponsor, else its
    owner; a worker's own data against no one's): at most `max_client_objects` objects and
    `max_client_bytes` tensor bytes (0: no cap) per client, past which QuotaExceededError."""

    def __init__(
        self,
        node: str,
        max_bytes: int = 0,
        durable: DurableStore | None = None,
        on_disk_failure: Callable[[str], None] | None = None,
        max_client_objects: int = limits.CLIENT_MAX_OBJECTS,
        max_client_bytes: int = limits.CLIENT_MAX_BYTES,
    ) -> None:
        self.node = node
        self.entries: dict[int, Entry] = {}
        self.pinned: set[int] = set()
        """Data the node was started with: never deleted, moved or handed over."""
        self.tags: dict[str, list[int]] = {}
        self.max_bytes = max_bytes
        self.bytes = 0
        self.durable = durable
        self.wal = WriteAhead(durable, node, on_disk_failure) if durable is not None else None
        self.taken: dict[int, Entry] = {}
        """Entries in a hand-over: out of `entries`, still on disk and charged."""
        self._orphans: set[int] = set()
        """Taken entries deleted meanwhile: a put back drops them instead."""
        self.max_client_objects = max_client_objects
        self.max_client_bytes = max_client_bytes
        self.accounts: dict[str, Account] = {}
        """By client, for those holding objects here (entries and taken)."""
        self._freed: Freed = deque()
        """Bytes of autograd graphs' saved tensors and of storages charged once (`share`) that
        were freed, not yet given back: freed on any thread, given back on the loop's
        (`release_graphs`)."""
        self._storages: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        """The storages charged once each (`share`), by the address of their C object: unique
        while the storage lives, which the weak reference tells (an address is reused)."""
        self._gone: deque[int] = deque()
        """Those of `_storages` freed since `release_graphs` last forgot them."""
        self._models: dict[int, tuple[int, Entry]] = {}
        """The models written to the durable store, ``(obj_id, entry)`` by the id of their `Taint`
        object, which the entries of their parameters and buffers (and views of them) share:
        how a write through such an alias finds the model it changed."""
        self._marks: dict[int, tuple[Any, ...]] = {}
        """By model id, what the model's state (`_mark`) was when it was last written."""
        self._dirty: dict[int, tuple[Entry, asyncio.Future[None]]] = {}
        """The models to write at the end of this loop turn (`persist_changed`), by id, with the
        future their write settles."""
        self._aliases: dict[int, set[int]] = {}
        """By model id, the objects whose records name one of its parameters or buffers (`persist`)."""
        self._grads: deque[tuple[Account | None, torch.UntypedStorage]] = deque()
        """Gradients a backward accumulated into a shared leaf (on any thread), each with the
        leaf's account: charged on the loop's (`release_graphs`), also once its entry is gone
        (a graph that still reaches the leaf fills its gradient)."""

    def __len__(self) -> int:
        return len(self.entries)

    def restore(self) -> list[tuple[int, Entry, str, int]]:
        """Load what the durable store holds. Returns the moves in doubt, ``(obj_id, entry,
        dest, new_id)``: those entries are taken, to be released or put back once resolved."""
        if self.durable is None:
            return []
        moving = []
        loaded = self.durable.load()
        # models first: a parameter's or buffer's entry becomes that tensor of its restored model
        # again (sharing its taint, as the `parameter`/`state` op that made it did)
        for obj_id, stored in sorted(loaded.items(), key=lambda item: not isinstance(item[1].value, nn.Module)):
            value = stored.value
            if isinstance(value, tuple):
                entry = Entry.pointer(value[0], value[1], settled=True, owner=stored.owner)
            else:
                model = self._model_for(stored.alias, value)
                if model is not None:
                    value, taint = model
                    entry = Entry.tensor(value, stored.owner, taint)
                    assert stored.alias is not None  # (what `_model_for` found it by)
                    self._aliases.setdefault(stored.alias[0], set()).add(obj_id)
                else:
                    entry = Entry.tensor(value, stored.owner)
                    _restore_privacy(entry, stored.privacy)
            entry.sponsor = stored.sponsor
            self._count(entry)
            if isinstance(value, nn.Module | torch.Tensor) and _tracks(value):
                self._share_value(entry, value, check=False)
            elif isinstance(value, torch.Tensor):
                entry.charged += self._charge(entry.account, _nbytes(value), restoring=True)
            if isinstance(value, nn.Module):
                self._models[id(entry.taint)] = (obj_id, entry)
                self._marks[obj_id] = _mark(value)
            if obj_id in self.pinned:
                self._rekey_data(obj_id)
            if stored.moving is None:
                self.entries[obj_id] = entry
            else:
                self.taken[obj_id] = entry
                moving.append((obj_id, entry, *stored.moving))
        return moving

    def _model_for(
        self, alias: tuple[int, str] | None, value: torch.Tensor | nn.Module
    ) -> tuple[torch.Tensor, Taint] | None:
        """The tensor of a restored model that a restored `alias` names, with the model's taint;
        None when there is no such model (deleted: the alias's own bytes are its value) or it
        does not fit the record."""
        if alias is None or not isinstance(value, torch.Tensor):
            return None
        found = self.entries.get(alias[0]) or self.taken.get(alias[0])
        if found is None or not isinstance(found.value, nn.Module):
            return None
        tensor = found.value.state_dict(keep_vars=True).get(alias[1])
        if tensor is None or tensor.shape != value.shape or tensor.dtype != value.dtype:
            return None
        return tensor, found.taint

    def add(self, obj_id: int, entry: Entry) -> None:
        """Store `entry`; raises InvalidArgumentError when the id is taken."""
        if obj_id in self.entries or obj_id in self.taken:
            raise InvalidArgumentError(f"object id {obj_id} already exists")
        self._count(entry, True)  # (positional: per op)
        self.entries[obj_id] = entry

    def held_bytes(self) -> int:
        """The tensor bytes charged now, the bytes autograd freed given back first: without that a
        figure would say when the store last charged something, not what it holds (a twin-world
        difference, docs/REDTEAM.md)."""
        self._give_back()
        return self.bytes

    def usage(self, client: str) -> tuple[int, int]:
        """The objects and tensor bytes that count against `client`'s quota here."""
        self._give_back()
        account = self.accounts.get(client)
        return (0, 0) if account is None else (account.objects, account.bytes)

    def admit(self, client: str, count: int = 1) -> None:
        """Raise QuotaExceededError unless `client` may hold `count` more objects here."""
        if client != ANYONE and self.usage(client)[0] + count > self.max_client_objects:
            raise QuotaExceededError("", f"{client!r} may hold at most {self.max_client_objects} objects here")

    def _count(self, entry: Entry, admit: bool = False) -> None:
        """Count `entry` against the quota of its client (its sponsor, else its owner), refused
        past it when `admit`."""
        client = entry.sponsor or entry.owner
        if client == ANYONE:
            return
        account = self.accounts.get(client)
        if account is None:
            account = self.accounts[client] = Account(client)
        if admit and account.objects >= self.max_client_objects:
            if not account.objects:
                del self.accounts[client]
            raise QuotaExceededError("", f"{client!r} may hold at most {self.max_client_objects} objects here")
        account.objects += 1
        entry.account = account

    def _uncount(self, entry: Entry, gone: bool = True) -> None:
        """`entry` is gone: it and its bytes no longer count against its client's quota (only
        its bytes when it stays, not `gone`). What a graph may hold past it is `shared`: its
        storages count until freed."""
        charged = entry.charged
        self.bytes -= charged
        account = entry.account
        if account is not None:
            account.bytes -= charged
            if gone:
                account.objects -= 1
                if not account.objects:
                    del self.accounts[account.client]
                entry.account = None
        entry.charged = 0

    def recharge(self, entries: Iterable[Entry]) -> None:
        """Charge what `entries`' values grew by in place: the gradients a backward or `set_grad`
        gave them, the bigger storage `set_data` did; to each entry (and so to its client), past
        the cap or quota if need be: the op has run, the memory exists (a gradient is at most the
        bytes of its value, which were charged)."""
        entries = list(entries)
        # (one that now tracks gradients, `requires_grad_`, is shared from now on)
        self.share(None, [], entries, check=False)
        for entry in entries:
            if entry.shared:
                continue
            nbytes = _held_bytes(entry.value)
            if nbytes > entry.charged:
                more = nbytes - entry.charged
                entry.charged = nbytes
                self._add(entry.account, more)

    def rename(self, obj_id: int, new_id: int) -> None:
        """Store taken `obj_id` as `new_id` (a move to this very node): it counts once, against
        the quota of the client it belongs to now, with its bytes. Raises InvalidArgumentError
        when `new_id` is taken, QuotaExceededError past the quota; then nothing changed."""
        entry = self.taken[obj_id]
        if new_id in self.entries or new_id in self.taken:
            raise InvalidArgumentError(f"object id {new_id} already exists")
        self.admit(entry.sponsor or entry.owner)  # as a new object would be, the old still counted
        charged = entry.charged
        self._uncount(entry)
        self._count(entry)
        entry.charged = charged
        self._add(entry.account, charged)
        del self.taken[obj_id]
        self.entries[new_id] = entry

    def add_data(self, obj_id: int, tag: str, value: torch.Tensor, taint: Taint) -> None:
        """Store a dataset array under `obj_id`: private (`taint`), read-only, pinned, and
        findable by `tag`."""
        entry = Entry.tensor(value, ANYONE, taint)
        entry.readonly = self.node
        self.add(obj_id, entry)
        entry.charged += self._charge(entry.account, _nbytes(value))
        self.pinned.add(obj_id)
        self.tags.setdefault(tag, []).append(obj_id)

    def _rekey_data(self, obj_id: int) -> None:
        """Move the dataset array under `obj_id` to a fresh id: an object restored from the
        store holds that id (acknowledged, it keeps it; pointers to the array name it anew)."""
        fresh = new_object_id()
        self.entries[fresh] = self.entries.pop(obj_id)
        self.pinned.discard(obj_id)
        self.pinned.add(fresh)
        for ids in self.tags.values():
            ids[:] = [fresh if i == obj_id else i for i in ids]
        log.warning("%s: a stored object holds dataset id %d; the dataset is now %d", self.node, obj_id, fresh)

    def check_principal(self, obj_id: int, entry: Entry, principal: str) -> None:
        """A worker holding an object on behalf of a client (granted to it by a pointer send, its
        `sponsor`) acts on it only for that client: a pointer another client placed on that worker
        lends no authority. Raises PermissionDenied otherwise."""
        if entry.sponsor and principal not in (entry.sponsor, entry.owner):
            log.warning("refused %r the object %d, held for %r", principal, obj_id, entry.sponsor)
            raise PermissionDenied(self.node, f"object {obj_id} is held for another client", self.node)

    def hand_over(self, entry: Entry) -> None:
        """Ready `entry` for another peer (a grant, a move to this node for another owner); raises
        InvalidArgumentError, changing nothing, while another entry here shares its memory (an
        in-place op's result, a model's parameter: aliases share their target's taint object).
        Each peer's requests are ordered only among themselves: a write through the alias the
        first owner kept ran while a computation of the new owner, public when it arrived, had
        still to read the value on the offload thread, and bob's data reached a public result.
        A tensor that tracks gradients (a model's parameters) becomes a new leaf on the same
        memory, its gradient copied: a graph the first owner built before still wrote the old
        leaf's gradient (a backward through ``leaf * bob_x``), which the new owner fetched as
        bob's x; and a graph the new owner builds on it no longer reaches the first owner's
        leaves (red17)."""
        taint = entry.taint
        for other in itertools.chain(self.entries.values(), self.taken.values()):
            if other.taint is taint and other is not entry:
                raise InvalidArgumentError(
                    "an object that shares its memory with another (an in-place op's result, a model's "
                    "parameter) is not handed to another peer: hand over a copy"
                )
        value = entry.value
        if isinstance(value, nn.Module):
            for module in value.modules():
                for name, p in module._parameters.items():
                    if p is not None:
                        module._parameters[name] = _leaf(p, nn.Parameter(p.detach(), p.requires_grad))
            self._watch(entry.account, value)
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            entry.value = _leaf(value, value.detach().requires_grad_())
            self._watch(entry.account, entry.value)

    def commit(
        self, obj_id: int, entry: Entry, value: torch.Tensor | nn.Module | None = None, durable: bool = True
    ) -> asyncio.Future[None] | None:
        """Account for and persist an entry whose value (a tensor `value`, or the pointer itself)
        exists, before it is acknowledged. Raises StoreFullError past the byte budget. An entry
        deleted while it was being computed is neither charged nor stored. Not `durable`: it
        lives in memory only (a restart does not bring it back)."""
        if self.entries.get(obj_id) is not entry and not self._holds(obj_id, entry):  # `_holds` only when taken
            return None
        if entry.location is None:
            assert value is not None
            if isinstance(value, nn.Module) or value.requires_grad:
                self._share_value(entry, value)
            else:
                # (the bytes computed inline: a call less per op)
                entry.charged += self._charge(entry.account, value.numel() * value.element_size())
        # `persist` asks again whether a write-ahead is kept: not called without one (per op)
        return self.persist(obj_id, entry, value) if durable and self.wal is not None else None

    def uncommit(self, obj_id: int, entry: Entry) -> asyncio.Future[None] | None:
        """Undo `commit` for a result of an op that failed after it (a later result was refused):
        the entry stays, to be failed, but its bytes no longer count and its write-ahead record
        is removed (a restart would bring back a value its client was told had failed). Returns
        the future of that removal, or None when there is nothing to wait for."""
        if not self._holds(obj_id, entry):
            return None  # deleted meanwhile: `discard` did both
        self._uncount(entry, gone=False)
        return None if self.wal is None else self.wal.remove(obj_id)

    def persist(
        self, obj_id: int, entry: Entry, value: torch.Tensor | nn.Module | None = None
    ) -> asyncio.Future[None] | None:
        """Queue the write of a settled entry (and its owner) held under `obj_id`; returns the
        future of its write-ahead, or None when there is nothing to wait for."""
        if self.wal is None or not self._holds(obj_id, entry):
            return None
        if entry.location is not None:
            return self.wal.save_pointer(obj_id, entry.location, entry.remote_id, entry.owner, entry.sponsor)
        privacy = {"origins": to_wire(entry.taint.origins), "readonly": entry.readonly, "released": entry.released}
        if isinstance(value, torch.Tensor):
            model = self._model_of(entry)
            if model is None:
                return self.wal.save_tensor(obj_id, value, entry.owner, entry.sponsor, privacy)
            # a model's parameter or buffer, or a view of one: what changed it changed the model
            model_id, model_entry = model
            state = model_entry.value.state_dict(keep_vars=True)
            name = next((n for n, t in state.items() if t is value), None)
            alias = None
            if name is not None:
                alias = (model_id, name)
                self._aliases.setdefault(model_id, set()).add(obj_id)
            written = self.wal.save_tensor(obj_id, value, entry.owner, entry.sponsor, privacy, alias)
            return all_written([written, self.persist_changed(model_id, model_entry)])
        if not isinstance(value, nn.Module):
            return None
        self._models[id(entry.taint)] = (obj_id, entry)
        self._marks[obj_id] = _mark(value)
        return self.wal.save_module(obj_id, value, entry.owner, entry.sponsor, privacy)

    def persist_changed(self, obj_id: int, entry: Entry) -> asyncio.Future[None] | None:
        """Have model `entry` written if its state changed since it was last written (a parameter
        or buffer updated in place, its training mode, a requires_grad flag): once, at the end of
        this loop turn, for all the changes the turn made to it (an ``opt.step()`` updates each
        parameter in an op of its own: one snapshot of the model, not one per parameter). Returns
        the future of that write, or None when there is nothing to wait for."""
        if self.wal is None or not isinstance(entry.value, nn.Module) or not self._holds(obj_id, entry):
            return None
        dirty = self._dirty.get(obj_id)
        if dirty is not None and dirty[0] is entry:
            return dirty[1]
        if self._marks.get(obj_id) == _mark(entry.value):
            return None
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._dirty:
            asyncio.get_running_loop().call_soon(self._write_dirty)
        self._dirty[obj_id] = (entry, written)
        return written

    def _write_dirty(self) -> None:
        """Write the models this loop turn changed (`persist_changed`), each settling its future
        once durable (or with the error of its write)."""
        dirty, self._dirty = self._dirty, {}
        for obj_id, (entry, written) in dirty.items():
            try:
                durable = self.persist(obj_id, entry, entry.value)
            except Exception as e:  # (nothing is acknowledged on it)
                written.set_exception(e)
                continue
            if durable is None:  # deleted meanwhile: nothing left to write
                written.set_result(None)
            else:
                durable.add_done_callback(functools.partial(_relay, written))

    def _model_of(self, entry: Entry) -> tuple[int, Entry] | None:
        """The stored model whose parameter or buffer (or a view of one) `entry` holds, if any."""
        found = self._models.get(id(entry.taint)) if self._models else None
        if found is None or found[1] is entry or found[1].taint is not entry.taint or not self._holds(*found):
            return None
        return found

    def _forget_model(self, obj_id: int, entry: Entry) -> None:
        """Model `entry` leaves the store (deleted, moved away): the entries of its parameters and
        buffers still held here are written anew as plain tensors, their records' bytes then
        current (a restart can no longer take them from the model)."""
        if self._models.get(id(entry.taint), (0, None))[1] is not entry:
            return
        del self._models[id(entry.taint)]
        self._marks.pop(obj_id, None)
        for alias_id in self._aliases.pop(obj_id, ()):
            alias = self.entries.get(alias_id)
            if alias is not None and alias.taint is entry.taint and alias.ok:
                self.persist(alias_id, alias, alias.value)

    def _holds(self, obj_id: int, entry: Entry) -> bool:
        """Whether `entry` is still the one under `obj_id` (not deleted meanwhile), in a hand-over or not."""
        return self.entries.get(obj_id) is entry or self.taken.get(obj_id) is entry

    def _charge(self, account: Account | None, nbytes: int, restoring: bool = False) -> int:
        """Count `nbytes` against the store's cap and `account`'s quota (a client's), and return
        them; refused past either (StoreFullError, QuotaExceededError; the quota not for what a
        restart restores: it was acknowledged, it stays)."""
        if self._freed or self._grads:  # `_give_back`, inline: a charge is made for every op
            self.release_graphs()
        if self.max_bytes and self.bytes + nbytes > self.max_bytes:
            raise StoreFullError("", f"storing {nbytes} bytes would exceed the store's cap of {self.max_bytes} bytes")
        quota = self.max_client_bytes
        if account is not None and quota and not restoring and account.bytes + nbytes > quota:
            client = account.client
            raise QuotaExceededError("", f"storing {nbytes} bytes would take {client!r} past its {quota} bytes here")
        self.bytes += nbytes  # `_add`, inline: a charge is made for every op
        if account is not None:
            account.bytes += nbytes
        return nbytes

    def _add(self, account: Account | None, nbytes: int) -> None:
        self.bytes += nbytes
        if account is not None:
            account.bytes += nbytes

    def hold_graph(self, account: Account | None, graph: Recorder, entries: Iterable[Entry]) -> None:
        """Charge what `graph` saved for backward to the cap and `account`'s quota until it is
        freed (nodes/saved.py): each storage once (`share`; `entries`, the run's operands and
        results, may hold some), or raise as `_charge` does (then nothing is charged)."""
        self.share(account, graph.storages.values(), entries, graph.nbytes)
        graph.storages = {}  # (held here, they would live as long as the run)
        for saved in graph.saved:
            saved.account = account
            saved.freed = self._freed

    def share(
        self,
        account: Account | None,
        storages: Iterable[torch.UntypedStorage],
        entries: Iterable[Entry] = (),
        extra: int = 0,
        check: bool = True,
    ) -> None:
        """Charge each of `storages` not charged yet, at its whole size, to `account` until the
        storage is freed, plus `extra` bytes; and make `shared` those of `entries` whose value
        tracks gradients, is a model, or has its storage among `storages`: their bytes move out
        of their `charged` into their storages' charges (to their own account). Raises as
        `_charge` does when `check` (then nothing is charged); else charges past the cap or
        quota (the memory exists)."""
        self._give_back()
        fresh: dict[int, tuple[torch.UntypedStorage, Account | None]] = {}
        self._fresh(fresh, storages, account)
        held = [e for e in {id(e): e for e in entries}.values() if e.location is None and e.value is not None]
        moving = []
        for entry in held:  # what the shared hold now (a gradient, a bigger storage): theirs
            if entry.shared:
                self._fresh(fresh, _storages(entry.value), entry.account)
            elif _tracks(entry.value):
                moving.append(entry)
        moved = {id(e) for e in moving}
        for entry in held:  # the plain values whose storage is charged once from now on
            if entry.shared or id(entry) in moved:
                continue
            storage = entry.value.untyped_storage()
            if storage._cdata in fresh or self._charged(storage):
                moving.append(entry)
        for entry in moving:
            self._fresh(fresh, _storages(entry.value), entry.account)
        deltas = {account: extra}
        for entry in moving:
            deltas[entry.account] = deltas.get(entry.account, 0) - entry.charged
        for storage, owner in fresh.values():
            deltas[owner] = deltas.get(owner, 0) + storage.nbytes()
        if check:
            self._charge(account, deltas.pop(account))
        for owner, nbytes in deltas.items():
            self._add(owner, nbytes)
        for entry in moving:
            entry.shared = True
            entry.charged = 0
            self._watch(entry.account, entry.value)
        for key, (storage, owner) in fresh.items():
            self._register(key, storage, owner)

    def _share_value(self, entry: Entry, value: torch.Tensor | nn.Module, check: bool = True) -> None:
        """Make `entry`, about to hold `value` (a model, or a tensor that tracks gradients), `shared`."""
        self.share(entry.account, _storages(value), check=check)
        entry.shared = True
        self._watch(entry.account, value)

    def _watch(self, account: Account | None, value: torch.Tensor | nn.Module) -> None:
        """Have the gradients a backward accumulates into `value`'s leaves charged to `account`,
        also once its entry is gone (`_grads`)."""
        tensors = value.parameters() if isinstance(value, nn.Module) else [value]
        hook = functools.partial(_accumulated, self._grads, account)
        for leaf in (t for t in tensors if t.is_leaf and t.requires_grad):
            leaf.register_post_accumulate_grad_hook(hook)  # type: ignore[no-untyped-call]

    def _register(self, key: int, storage: torch.UntypedStorage, account: Account | None) -> None:
        """Note `storage` (under `key`) as charged to `account`, its bytes given back once it is freed."""
        self._storages[key] = weakref.ref(storage)
        weakref.finalize(storage, _storage_freed, self._freed, self._gone, key, account, storage.nbytes())

    def _fresh(
        self,
        fresh: dict[int, tuple[torch.UntypedStorage, Account | None]],
        storages: Iterable[torch.UntypedStorage],
        account: Account | None,
    ) -> None:
        """Add to `fresh` those of `storages` not charged yet (not in `_storages`), for `account`."""
        for storage in storages:
            key = storage._cdata
            if key not in fresh and storage.nbytes() and not self._charged(storage):
                fresh[key] = (storage, account)

    def _charged(self, storage: torch.UntypedStorage) -> bool:
        """Whether `storage` is charged once (`share`) already."""
        ref = self._storages.get(storage._cdata)
        return ref is not None and ref() is storage

    def _give_back(self) -> None:
        """Give back what autograd freed since the last look (`release_graphs`), when anything
        was: before a charge is judged against the cap or a quota, and before a figure is read."""
        if self._freed or self._grads:
            self.release_graphs()

    def release_graphs(self) -> None:
        """Give back the bytes of the saved tensors and shared storages freed since the last call."""
        freed = self._freed
        while freed:
            account, nbytes = freed.popleft()
            self.bytes -= nbytes
            if account is not None:
                account.bytes -= nbytes
        grads = self._grads
        while grads:
            account, storage = grads.popleft()
            if storage.nbytes() and not self._charged(storage):
                self._add(account, storage.nbytes())  # past the cap if need be: the backward ran
                self._register(storage._cdata, storage, account)
        gone, ledger = self._gone, self._storages
        while gone:
            key = gone.popleft()
            ref = ledger.get(key)
            if ref is not None and ref() is None:  # (not a storage charged since at the same address)
                del ledger[key]

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

    def take(self, obj_id: int, principal: str | None = None) -> Entry:
        """Take the entry under `obj_id` out for a hand-over, keeping its bytes and files until
        `release` or `put_back`; raises ObjectNotFoundError, or PermissionDenied for pinned data
        or another owner's object."""
        entry = self.get(obj_id, principal)
        if obj_id in self.pinned:
            raise refuse_pinned(self.node)
        del self.entries[obj_id]
        self.taken[obj_id] = entry
        return entry

    def mark_moving(self, obj_id: int, dest: str, new_id: int) -> asyncio.Future[None] | None:
        """Persist that taken object `obj_id` is being moved to `dest` as `new_id` (before it is sent)."""
        return None if self.wal is None else self.wal.save_move(obj_id, dest, new_id)

    def release(self, obj_id: int) -> asyncio.Future[None] | None:
        """A hand-over of taken `obj_id` happened: forget it here (bytes, files, move record)."""
        entry = self.taken.pop(obj_id, None)
        if entry is not None:
            self._uncount(entry)
            if self._models:
                self._forget_model(obj_id, entry)
        self._orphans.discard(obj_id)
        return None if self.wal is None else self.wal.remove(obj_id)

    def put_back(self, obj_id: int, entry: Entry) -> asyncio.Future[None] | None:
        """A hand-over of taken `obj_id` did not happen: the entry is back under its id (its move
        record forgotten), unless it was deleted meanwhile."""
        if obj_id in self._orphans or self.taken.get(obj_id) is not entry:
            return self.release(obj_id)
        del self.taken[obj_id]
        self.entries[obj_id] = entry
        return None if self.wal is None else self.wal.remove_move(obj_id)

    def discard(self, obj_id: int) -> Entry | None:
        """Remove the entry under `obj_id` if there is one (and its bytes, and its copy on disk);
        pinned data is never removed. A taken entry is dropped when its hand-over fails."""
        if obj_id in self.pinned:
            return None
        if obj_id in self.taken:
            self._orphans.add(obj_id)
            return None
        entry = self.entries.pop(obj_id, None)
        if entry is not None:
            self._uncount(entry)
            if self.wal is not None:
                if self._models:  # (its aliases' writes queued before its removal: they land first)
                    self._forget_model(obj_id, entry)
                self.wal.remove(obj_id)
        return entry

    def barrier(self) -> asyncio.Future[None] | None:
        """A future that settles once every change queued so far is durable (None: no store)."""
        return None if self.wal is None else self.wal.barrier()

    async def aclose(self) -> None:
        """Write what is queued and release the durable store."""
        if self.wal is not None:
            await self.wal.aclose()

    def clear(self, principal: str) -> list[Entry]:
        """Remove everything `principal` owns (pinned data never); returns what was removed.
        Its entries in a hand-over are dropped if the hand-over fails."""
        return self.clear_all({principal})

    def clear_all(self, principals: set[str]) -> list[Entry]:
        """`clear` for many principals at once, in one pass over the store; what they sponsored
        (granted to a worker) goes too."""
        ids = [
            i
            for i, e in self.entries.items()
            if (e.owner in principals or e.sponsor in principals) and i not in self.pinned
        ]
        removed = [self.entries[i] for i in ids]
        for obj_id in ids:
            self.discard(obj_id)
        self._orphans.update(i for i, e in self.taken.items() if e.owner in principals)
        return removed


ANYONE = "*"
"""Owner of a worker's own data: any peer may compute on it (its privacy policy still applies)."""

log = logging.getLogger("fedptr.node.store")


def _nbytes(value: torch.Tensor) -> int:
    return value.numel() * value.element_size()


def _tracks(value: Any) -> bool:
    """Whether `value` is a model or a tensor that tracks gradients: what a graph may hold past its entry."""
    return isinstance(value, nn.Module) or (isinstance(value, torch.Tensor) and value.requires_grad)


def _storages(value: Any) -> list[torch.UntypedStorage]:
    """The storages `value` keeps alive: a tensor's and its gradient's; a model's parameters',
    buffers' and their gradients'."""
    tensors = [*value.parameters(), *value.buffers()] if isinstance(value, nn.Module) else [value]
    found = []
    for t in tensors:
        found.append(t.untyped_storage())
        grad = t.grad if t.is_leaf or t.retains_grad else None  # (no warning for a non-leaf)
        if grad is not None:
            found.append(grad.untyped_storage())
    return found


def _accumulated(
    grads: deque[tuple[Account | None, torch.UntypedStorage]], account: Account | None, leaf: torch.Tensor
) -> None:
    """A backward accumulated `leaf`'s gradient (on any thread): its storage, to charge on the loop's."""
    assert leaf.grad is not None
    grads.append((account, leaf.grad.untyped_storage()))


def _storage_freed(freed: Freed, gone: deque[int], key: int, account: Account | None, nbytes: int) -> None:
    """A storage charged once was freed (on any thread): its bytes and key, to give back on the loop's."""
    freed.append((account, nbytes))
    gone.append(key)


_Leaf = TypeVar("_Leaf", bound=torch.Tensor)


def _leaf(old: torch.Tensor, new: _Leaf) -> _Leaf:
    """`new`, a leaf on `old`'s memory, given a copy of `old`'s gradient (`Store.hand_over`)."""
    if old.is_leaf and old.grad is not None:  # (a result's gradient is not kept unless retained)
        new.grad = old.grad.detach().clone()
    return new


def _relay(to: asyncio.Future[None], done: asyncio.Future[None]) -> None:
    """Settle `to` as `done` settled (a write's future, for those waiting on a model's write)."""
    if done.cancelled():
        to.cancel()
    elif (error := done.exception()) is not None:
        to.set_exception(error)
    else:
        to.set_result(None)


def _mark(model: nn.Module) -> tuple[Any, ...]:
    """What tells that `model`'s stored state changed: each parameter's and buffer's version
    counter (an in-place update bumps it, also through a view) and requires_grad flag, and each
    submodule's training mode."""
    state = model.state_dict(keep_vars=True).values()
    return (*((t._version, t.requires_grad) for t in state), *(m.training for m in model.modules()))


def _held_bytes(value: Any) -> int:
    """The bytes a tensor holds with its gradient (0: a pointer; a model is `shared`)."""
    if isinstance(value, torch.Tensor):
        grad = value.grad if value.is_leaf or value.retains_grad else None  # (no warning for a non-leaf)
        return _nbytes(value) + (0 if grad is None else _nbytes(grad))
    return 0


def all_written(durable: list[asyncio.Future[None] | None]) -> asyncio.Future[Any] | None:
    """One future for the writes in `durable` that there are (None: nothing to wait for)."""
    if not any(durable):  # the common case without a durable store: nothing was queued
        return None
    futures = [f for f in durable if f is not None]
    if len(futures) == 1:
        return futures[0]
    return asyncio.gather(*futures)
