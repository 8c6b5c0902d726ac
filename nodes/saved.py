"""What autograd graphs keep alive, charged to the store as long as they keep it.

A result that requires grad holds its graph, and the graph holds every tensor an op saved for
backward (``w * x`` saves both operands, ``exp`` its result, a view its base storage), also
after the client deleted the pointers to them: memory the store's per-value charge never saw.
So an op (or a plan run) that may build a graph (an operand tracks gradients, or is a model)
runs under `Recorder`'s `saved_tensors_hooks`: each tensor saved for backward is wrapped in a
`Saved`, which the store charges once the run is stored (`Store.hold_graph`) and which gives
its bytes back when autograd drops it (after a backward that did not retain the graph, or once
the last result holding the graph is gone). Public ops on tensors that track no gradient save
nothing and pay nothing.

A private operation (nodes/guard.py) is charged otherwise: what its real run saves may depend
on the values (a run that fails half-way saved part of a graph the result does not keep; a
stand-in result's graph saves other tensors than the real one's), so it packs its saved tensors
uncharged (`Held`) and charges the bytes its meta run's graph saved, a function of shapes,
dtypes and public arguments only.

A saved tensor is charged at its whole storage's bytes (what it keeps alive), once per run;
across runs, and when it is also a stored value, it is charged again: an overcharge (the
client's quota counts a graph's saved operands twice while both live), never an undercharge.
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
    """A tensor saved for backward, as the graph holds it; gives its bytes back to `freed` when
    the graph drops it (possibly on the offload thread, or in a backward: only a deque append)."""

    __slots__ = ("account", "freed", "nbytes", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, nbytes: int) -> None:
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
        saved = Saved(tensor, 0)
        self.saved.append(saved)
        return saved

    def drop(self) -> None:
        self.saved = []

    def charge(self, nbytes: int) -> None:
        """Charge `nbytes` with the run's recorder, held by the first tensor saved: given back
        when autograd frees it (the graph's tensors are freed together, by a backward or with
        the last result holding them)."""
        recorder = current()
        if recorder is not None and self.saved:
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
    """The tensors one run saved for backward, each storage counted once; a context manager
    that records while entered (on the thread that computes)."""

    __slots__ = ("_hooks", "_outer", "_seen", "active", "saved")

    def __init__(self) -> None:
        self.saved: list[Saved] = []
        self._seen: set[int] = set()
        self.active = False
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._outer: Recorder | None = None

    def _pack(self, tensor: torch.Tensor) -> Saved:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        nbytes = 0
        if ptr not in self._seen and not tensor.is_meta:
            self._seen.add(ptr)
            nbytes = storage.nbytes()
        saved = Saved(tensor, nbytes)
        self.saved.append(saved)
        return saved

    @property
    def nbytes(self) -> int:
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
