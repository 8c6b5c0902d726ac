"""`Pointer`: a handle to an object that lives on a worker.

Operations on a pointer return a new pointer at once: the client picks the result's id and
queues the request, so a chain of dependent operations costs no round trip per step. Awaiting a
pointer waits until its operation has finished and raises its error if it failed. A pointer
that is dropped deletes its remote object (down the chain); `get`, `move` and sending the
pointer to another worker hand the object on instead, so nothing is deleted twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

from fedptr import wire
from fedptr.errors import (
    ConsumedPointerError,
    DeadlineExceeded,
    FedptrError,
    InDoubtError,
    LocationMismatchError,
    LostWorkerError,
    UnsupportedTypeError,
)
from fedptr.ops import ALLOWED, TENSOR_METHODS
from fedptr.tensors import to_raw

if TYPE_CHECKING:
    from fedptr.client import Client, Worker

_TORCH_NAMES: dict[Any, str] = {getattr(torch.Tensor, n): n for n in TENSOR_METHODS}
_TORCH_NAMES.update({getattr(torch, n): n for n in ALLOWED if hasattr(torch, n)})
_TORCH_NAMES.update({functional.cross_entropy: "cross_entropy", functional.mse_loss: "mse_loss"})


def _encode(value: Any, found: list[Pointer]) -> wire.Value:
    if isinstance(value, Pointer):
        found.append(value)
        return wire.Ref(value.id_at_location)
    if isinstance(value, torch.Tensor):
        return to_raw(value)
    if value is None or type(value) in (bool, int, float, str):
        return value  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)):
        return [_encode(v, found) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, found) for k, v in value.items()}
    raise UnsupportedTypeError(f"cannot send an argument of type {type(value).__name__} to a remote operation")


def remote_call(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> Pointer:
    """Run allow-listed `op` where the pointers among `args`/`kwargs` live; returns its result's pointer.

    Raises LocationMismatchError when the pointers live on different workers, and
    ConsumedPointerError when one of them was handed on already."""
    found: list[Pointer] = []
    enc_args = [_encode(a, found) for a in args]
    enc_kwargs = {k: _encode(v, found) for k, v in (kwargs or {}).items()}
    if not found:
        raise UnsupportedTypeError(f"{op} needs at least one Pointer argument")
    first = found[0]
    for p in found:
        p.check_alive()
        if p.location != first.location or p.client is not first.client:
            raise LocationMismatchError(
                f"{op} mixes objects on different workers: {first.location!r} and {p.location!r}"
            )
    return first.client.issue_op(first.location, op, enc_args, enc_kwargs)


def in_doubt(e: FedptrError, worker: str, hand_over: str, candidates: list[Pointer]) -> InDoubtError:
    """`e` as an InDoubtError of a `hand_over` (move or send) whose `candidates` are the
    pointers the object may be found under."""
    if isinstance(e, InDoubtError):
        error = e
    else:
        error = InDoubtError(worker, f"the hand-over's outcome is unknown: {e}", getattr(e, "path", [worker]))
    error.candidates = candidates
    error.hand_over = hand_over
    return error


def _method(op: str) -> Callable[..., Pointer]:
    def call(self: Pointer, *args: Any, **kwargs: Any) -> Pointer:
        return remote_call(op, (self, *args), kwargs)

    call.__name__ = op
    call.__doc__ = f"Remote ``torch.Tensor.{op}``: returns the result's Pointer at once."
    return call


class Pointer:
    """A pointer to object `id_at_location` on worker `location`."""

    __slots__ = ("__weakref__", "_client", "_deletes", "_done", "_id", "_location", "owned")

    def __init__(
        self,
        client: Client,
        location: str,
        id_at_location: int,
        done: asyncio.Future[wire.Message] | None = None,
        *,
        deletes: bool = True,
    ) -> None:
        self._client = client
        self._location = location
        self._id = id_at_location
        self._done = done
        self.owned = True
        """Whether this pointer still owns its object (False once get, move or send handed it on)."""
        self._deletes = deletes
        """Whether dropping this pointer deletes its object (not for a worker's own data)."""

    @property
    def location(self) -> str:
        """Name of the worker holding the object."""
        return self._location

    @property
    def id_at_location(self) -> int:
        """The object's id in that worker's store."""
        return self._id

    @property
    def client(self) -> Client:
        """The client this pointer belongs to."""
        return self._client

    @property
    def worker(self) -> Worker:
        """The `Worker` holding the object."""
        return self._client.worker(self._location)

    def __repr__(self) -> str:
        state = "" if self.owned else " (handed on)"
        return f"[Pointer | me -> {self._location}:{self._id}]{state}"

    # --- completion --------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, Pointer]:
        """Wait until the operation that made this pointer finished; raise its error if it failed."""
        return self._wait().__await__()

    async def _wait(self) -> Pointer:
        if self._done is not None:
            # shielded: cancelling one waiter must not cancel the request other waiters share
            await asyncio.shield(self._done)
            self._done = None
        return self

    def check_alive(self) -> None:
        """Raise ConsumedPointerError when this pointer's object was handed on."""
        if not self.owned:
            raise ConsumedPointerError(f"{self!r} was consumed by get, move or send; it points to nothing now")

    # --- awaited calls -----------------------------------------------------------------
    async def get(self) -> torch.Tensor | nn.Module | Pointer:
        """Bring the object back and remove it from its worker: a tensor, or (for a pointer to a
        pointer) the next pointer down the chain. Raises ConsumedPointerError if already consumed.

        Two-phase: the worker keeps a value until this client holds it, then it is deleted, so a
        get that failed (refused, timed out, its worker lost) can be retried."""
        self.check_alive()
        self.owned = False
        try:
            reply = await self._client.call(self._location, wire.Get(self._id))
        except BaseException:
            self.owned = True
            raise
        if not isinstance(reply, wire.PointerReply):
            self._client.release(self._location, self._id)  # we hold the value: the worker may drop it
        return self._client.unwrap(reply)

    async def send(self, worker: Worker) -> Pointer:
        """Send this pointer to `worker`, making a pointer to a pointer; the data does not move."""
        return await worker.send(self)

    async def move(self, worker: Worker) -> Pointer:
        """Move the data to `worker` directly (the bytes never pass through this client).

        Returns the pointer at the new location; this pointer is consumed. Moving to the current
        location returns this pointer unchanged. A move that failed for sure leaves this pointer
        usable. One whose outcome is unknown (its worker was lost, its deadline passed, or the
        worker said InDoubtError) raises InDoubtError whose `candidates` are this pointer and
        the one at `worker`: `Client.resolve` says which holds the object."""
        if worker.name == self._location:
            return self
        self.check_alive()
        await self
        new_id = self._client.new_id()
        self.owned = False
        try:
            await self._client.call(self._location, wire.Move(self._id, worker.name, new_id))
        except (InDoubtError, LostWorkerError, DeadlineExceeded) as e:
            self.owned = True
            raise in_doubt(e, self._location, "move", [self, self._moved(worker.name, new_id)]) from e
        except BaseException:
            self.owned = True
            raise
        return self._moved(worker.name, new_id)

    def _moved(self, location: str, obj_id: int) -> Pointer:
        return Pointer(self._client, location, obj_id)

    def __del__(self) -> None:
        if self.owned and self._deletes:
            self._client.release(self._location, self._id)

    # --- operations --------------------------------------------------------------------
    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Pointer:
        op = _TORCH_NAMES.get(func)
        if op is None:
            raise UnsupportedTypeError(f"{getattr(func, '__name__', func)} is not an allowed remote operation")
        return remote_call(op, tuple(args), kwargs)

    __hash__ = object.__hash__
    __add__ = _method("add")
    __radd__ = _method("__radd__")
    __sub__ = _method("sub")
    __rsub__ = _method("__rsub__")
    __mul__ = _method("mul")
    __rmul__ = _method("__rmul__")
    __truediv__ = _method("div")
    __rtruediv__ = _method("__rtruediv__")
    __floordiv__ = _method("floor_divide")
    __rfloordiv__ = _method("__rfloordiv__")
    __mod__ = _method("remainder")
    __rmod__ = _method("__rmod__")
    __matmul__ = _method("matmul")
    __rmatmul__ = _method("__rmatmul__")
    __pow__ = _method("pow")
    __rpow__ = _method("__rpow__")
    __neg__ = _method("neg")
    __abs__ = _method("abs")
    __eq__ = _method("eq")  # type: ignore[assignment]
    __ne__ = _method("ne")  # type: ignore[assignment]
    __lt__ = _method("lt")
    __le__ = _method("le")
    __gt__ = _method("gt")
    __ge__ = _method("ge")

    add_ = _method("add_")
    sub_ = _method("sub_")
    mul_ = _method("mul_")
    div_ = _method("div_")
    zero_ = _method("zero_")
    requires_grad_ = _method("requires_grad_")
    zero_grad = _method("zero_grad")

    def backward(self) -> Pointer:
        """Remote ``loss.backward()``: await the returned pointer to wait until gradients are filled."""
        return remote_call("backward", (self,))

    @property
    def grad(self) -> Pointer:
        """A pointer to this tensor's gradient (fails, when awaited, if it has none)."""
        return remote_call("grad", (self,))

    add = _method("add")
    sub = _method("sub")
    mul = _method("mul")
    div = _method("div")
    pow = _method("pow")
    neg = _method("neg")
    abs = _method("abs")
    matmul = _method("matmul")
    mm = _method("mm")
    dot = _method("dot")
    eq = _method("eq")
    ne = _method("ne")
    lt = _method("lt")
    le = _method("le")
    gt = _method("gt")
    ge = _method("ge")
    sum = _method("sum")
    mean = _method("mean")
    prod = _method("prod")
    amax = _method("amax")
    amin = _method("amin")
    argmax = _method("argmax")
    argmin = _method("argmin")
    std = _method("std")
    var = _method("var")
    norm = _method("norm")
    reshape = _method("reshape")
    view = _method("view")
    flatten = _method("flatten")
    squeeze = _method("squeeze")
    unsqueeze = _method("unsqueeze")
    t = _method("t")
    transpose = _method("transpose")
    permute = _method("permute")
    contiguous = _method("contiguous")
    clone = _method("clone")
    exp = _method("exp")
    log = _method("log")
    sqrt = _method("sqrt")
    sin = _method("sin")
    cos = _method("cos")
    tanh = _method("tanh")
    sigmoid = _method("sigmoid")
    relu = _method("relu")
    clamp = _method("clamp")
    softmax = _method("softmax")
    float = _method("float")
    double = _method("double")
    long = _method("long")


class ModulePointer(Pointer):
    """A pointer to a model stored on a worker (see `Worker.send` of an ``nn.Module``)."""

    __slots__ = ("n_parameters",)

    def __init__(self, client: Client, location: str, id_at_location: int, n_parameters: int, done: Any = None) -> None:
        super().__init__(client, location, id_at_location, done)
        self.n_parameters = n_parameters
        """How many parameters the model has."""

    def __repr__(self) -> str:
        return f"[ModulePointer | me -> {self.location}:{self.id_at_location}]"

    def __call__(self, *inputs: Any) -> Pointer:
        """The model's forward pass on `inputs`, run where the model is; returns the output's pointer."""
        return remote_call("forward", (self, *inputs))

    def parameters(self) -> list[Pointer]:
        """Pointers to the model's parameters (the same tensors the model trains), in order."""
        return [remote_call("parameter", (self, i)) for i in range(self.n_parameters)]

    def _moved(self, location: str, obj_id: int) -> Pointer:
        return ModulePointer(self._client, location, obj_id, self.n_parameters)
