"""What autograd graphs keep alive, charged to the store as long as they keep it.

A result that requires grad holds its graph, and the graph holds every tensor an op saved for
backward (``w * x`` saves both operands, ``exp`` its result, a view its base storage), also
after the client deleted the pointers to them: memory the store's per-value charge never saw.
So an op (or a plan run) that may build a graph (an operand tracks gradients, or is a model)
runs under `Recorder`'s `saved_tensors_hooks`, which notes the storage of each tensor saved for
backward. Once the run is stored, `Store.hold_graph` charges each of those storages that is not
charged yet, at its whole size (what it keeps alive, a view's base included), until the storage
itself is freed: a storage is charged once however many stored values and graphs hold it (a
saved operand that is also a stored value is not counted twice), and its charge stays while
either still holds it. Public ops on tensors that track no gradient save nothing and pay nothing.

A private operation (nodes/guard.py) is charged otherwise: what its real run saves may depend
on the values (a run that fails half-way saved part of a graph the result does not keep; a
stand-in result's graph saves other tensors than the real one's), so it packs its saved tensors
uncharged (`Held`) and charges the bytes its meta run's graph saved, a function of shapes,
dtypes and public arguments only, except for the operands the meta run says it saves: those are
real stored tensors, charged per storage as above (a storage's size, and which values share
it, follow from shapes and the ops that made them, never from values). Those bytes are given
back when autograd frees the graph (`Saved`).
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .store import Account

Freed = deque[tuple["Account | None", int]]
"""Bytes given back (with the account they counted against), drained by the store on its loop."""


class Saved:
    """A tensor saved for backward, as the graph holds it; gives the bytes a private operation
    charged with it (`Held`) back to `freed` when the graph drops it (possibly on the offload
    thread, or in a backward: only a deque append)."""

    __slots__ = ("account", "freed", "nbytes", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, nbytes: int = 0) -> None:
        self.tensor = tensor
        self.version = tensor._version
        self.nbytes = nbytes
        self.freed: Freed | None = None
        """Set once the store charged it."""
        self.account: Account | None = None

    def __del__(self) -> None:
        if self.freed is not None and self.nbytes:
            self.freed.append((self.account, self.nbytes))


def _unpack(saved: Saved) -> torch.Tensor:
    # with hooks torch no longer checks the saved tensor's version: an in-place write to it after
    # it was saved must still fail the backward instead of computing a wrong gradient
    if saved.tensor._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation"
        )
    return saved.tensor


_current = threading.local()
"""The `Recorder` entered on this thread (`current`)."""


def current() -> Recorder | None:
    """The `Recorder` recording on this thread, if any."""
    recorder: Recorder | None = getattr(_current, "recorder", None)
    return recorder


class Held:
    """What one private operation saves for backward, packed uncharged while entered (inside the
    run's `Recorder`, whose hooks it shadows); `charge` then adds it to that recorder at a
    given number of bytes, or `drop` forgets a graph the operation does not keep."""

    __slots__ = ("_hooks", "saved")

    def __init__(self) -> None:
        self.saved: list[Saved] = []
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, tensor: torch.Tensor) -> Saved:
        saved = Saved(tensor)
        self.saved.append(saved)
        return saved

    def drop(self) -> None:
        self.saved = []

    def charge(self, nbytes: int, operands: list[torch.Tensor]) -> None:
        """Charge `nbytes`, what the meta run saved, with the run's recorder: the saved
        `operands` (real tensors the op read) per storage, the rest held by the first tensor
        saved, given back when autograd frees it (the graph's tensors are freed together, by a
        backward or with the last result holding them)."""
        recorder = current()
        if recorder is not None and self.saved:
            for t in operands:
                nbytes -= t.numel() * t.element_size()  # its meta stand-in's storage: as big as it
                recorder.note(t)
            self.saved[0].nbytes = nbytes
            recorder.saved.extend(self.saved)
        # a custom autograd Function's node keeps the hooks (so this object) as long as it
        # lives, past the backward that frees its saved tensors: it must not keep them too
        self.saved = []

    def __enter__(self) -> Held:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(kind, error, tb)
        self._hooks = None  # (its hooks are bound to this object: a cycle, which would keep `saved` alive)


class Recorder:
    """The storages one run saved for backward (`storages`, by identity), and what its private
    operations charge otherwise (`saved`); a context manager that records while entered (on the
    thread that computes)."""

    __slots__ = ("_hooks", "_outer", "active", "saved", "storages")

    def __init__(self) -> None:
        self.saved: list[Saved] = []
        self.storages: dict[int, torch.UntypedStorage] = {}
        """By the address of their C object (unique while they live: they are held here)."""
        self.active = False
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: Recorder | None = None

    def note(self, tensor: torch.Tensor) -> None:
        """Record the storage `tensor` keeps alive."""
        if not tensor.is_meta:
            storage = tensor.untyped_storage()
            self.storages[storage._cdata] = storage

    def _pack(self, tensor: torch.Tensor) -> Saved:
        self.note(tensor)
        return Saved(tensor)

    @property
    def nbytes(self) -> int:
        """The bytes its private operations charge at their meta runs' figures."""
        return sum(s.nbytes for s in self.saved)

    def __enter__(self) -> Recorder:
        self.active = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        self._outer, _current.recorder = current(), self
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        assert self._hooks is not None
        _current.recorder = self._outer
        self._hooks.__exit__(kind, error, tb)
        self._hooks = None
        self.active = False
