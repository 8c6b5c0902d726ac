"""`Pointer`: a handle to an object that lives on a worker, which behaves like a tensor.

Operations on a pointer return a new pointer at once: the client picks the result's id and
queues the request, so a chain of dependent operations costs no round trip per step. The
result's shape, dtype and ``requires_grad`` are worked out locally when the operation is issued
(`fedptr.meta`) and checked against the worker's reply. Awaiting a pointer waits until its
operation has finished and raises its error if it failed.

Work that changes something instead of making a result (in-place updates, ``backward``,
``zero_grad``, an optimizer's ``step``) is an *effect*: it is queued at once too, returns the
pointer it changes (or a `Pending` handle), and a failure is raised by the next await or `get` of
any pointer on that worker (and by awaiting the handle). Nothing needs awaiting to happen.

A pointer that is dropped deletes its remote object (down the chain); `get`, `move` and sending
the pointer to another worker hand the object on instead, so nothing is deleted twice. The
candidates of a hand-over in doubt (`InDoubtError`) delete nothing when dropped: the object may be
the only copy, and only `Client.resolve` decides which of them owns it.

Equality keeps Python's identity semantics, so pointers work in lists, sets and dicts
(``p in [q]``, ``ps.index(p)``); element-wise comparison is the method `Pointer.eq`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, SupportsIndex

import torch
from torch import nn

from fedptr import limits, meta, wire
from fedptr.awaiting import awaited, not_awaited
from fedptr.errors import (
    ConsumedPointerError,
    DataDependentError,
    DeadlineExceeded,
    FedptrError,
    InDoubtError,
    InvalidArgumentError,
    LocationMismatchError,
    LostWorkerError,
    ProtocolError,
    UnsupportedTypeError,
    copy_to_raise,
)
from fedptr.opinfo import REGISTRY, VARIES, pointer_attributes
from fedptr.ops import DEVICE_PREFIX, DTYPE_PREFIX, ELLIPSIS_KEY, MUTATING, SLICE_KEY
from fedptr.tensors import dtype_name, to_raw
from fedptr.torchops import dispatched

if TYPE_CHECKING:
    from fedptr.client import Client, Worker
    from fedptr.pointer_methods import PointerMethods
else:  # the methods are installed from the registry below (`_install_methods`): no base at run time
    PointerMethods = object

_TORCH_NAMES: dict[Any, str] = dispatched()
_TORCH_NAMES[torch.Tensor.__getitem__] = "getitem"


_PLAIN = frozenset({bool, int, float, str, type(None)})
"""Argument types that go to torch as they are."""


class _Unknown(Exception):
    """An operand's shape is not known yet, so the result's cannot be inferred."""


def _encode(value: Any, found: list[Pointer]) -> wire.Value:
    if isinstance(value, Pointer):
        found.append(value)
        return wire.Ref(value._id)
    if isinstance(value, torch.Tensor):
        # a copy, immutable: the session keeps the request to send it again if the broker forgot
        # us, and a view would carry what the caller wrote after the op was issued (the link
        # sends immutable bytes without copying them again, so the broker's path costs nothing more)
        return to_raw(value, copy=True)
    if value is None or type(value) in (bool, int, float, str):
        return value  # type: ignore[no-any-return]
    if isinstance(value, torch.dtype):
        return DTYPE_PREFIX + dtype_name(value)
    if isinstance(value, torch.device):
        cpu_only(value)
        return DEVICE_PREFIX + "cpu"
    if isinstance(value, slice):
        return {SLICE_KEY: [_encode(v, found) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {ELLIPSIS_KEY: True}
    if isinstance(value, (list, tuple, torch.Size)):
        return [_encode(v, found) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, found) for k, v in value.items()}
    if (error := not_awaited(value, "an operation's argument")) is not None:
        raise error
    raise UnsupportedTypeError(f"cannot send an argument of type {type(value).__name__} to a remote operation")


def _to_meta(value: Any) -> Any:
    """`value` with pointers and tensors replaced by their meta tensors (models by meta models)."""
    kind = type(value)  # the cheap and common checks first: this runs for every operand of every op
    if kind in _PLAIN:
        return value
    if isinstance(value, Pointer):
        if isinstance(value, ModulePointer):
            return value.meta_model
        if value.meta is None:
            raise _Unknown
        return value.meta
    if isinstance(value, (list, tuple)):
        return type(value)([_to_meta(v) for v in value])
    if kind is dict or isinstance(value, Mapping):
        return {k: _to_meta(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return meta.of_tensor(value)
    if isinstance(value, slice):
        return slice(_to_meta(value.start), _to_meta(value.stop), _to_meta(value.step))
    return value


_INFERRED: dict[tuple[Any, ...], tuple[meta.Inferred, tuple[Any, ...]]] = {}
"""What `_infer` found, by op and operands (its key), each entry holding the meta
operands it was found for so that no key's identity is reused while it lives; emptied when it
holds `limits.INFERRED_BY_OPERANDS` entries."""


def _infer(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> meta.Inferred:
    # The key of `_INFERRED`, built here (a call less on every op): it costs a tuple, the
    # identity of each pointer's meta tensor (decided once per pointer: a result's is the one
    # `meta.infer` keeps for its shape, so a chain's operands repeat), the type and value of
    # each plain argument. None when an argument is anything else, or a pointer's shape is not
    # known (`meta.infer` keys those by structure).
    key: tuple[Any, ...] | None = None
    if not kwargs:
        parts: list[Any] = [op]
        for value in args:
            kind = type(value)
            if kind is Pointer:
                if value._meta is None:
                    break
                parts.append(id(value._meta))
            elif kind in _PLAIN:
                parts.append(kind)  # 1, 1.0 and True are equal as keys, not as arguments
                parts.append(value)
            else:
                break
        else:
            key = tuple(parts)
    if key is not None and (known := _INFERRED.get(key)) is not None:
        return known[0]
    try:
        meta_args, meta_kwargs = _to_meta(args), _to_meta(kwargs)
    except _Unknown:
        return None
    inferred = meta.infer(op, meta_args, meta_kwargs)
    if key is not None:
        if len(_INFERRED) >= limits.INFERRED_BY_OPERANDS:
            _INFERRED.clear()
        _INFERRED[key] = (inferred, meta_args)
    return inferred


def _result_metas(op: str, inferred: meta.Inferred) -> tuple[list[torch.Tensor | None], bool]:
    """The meta tensor of each of `op`'s results (None: learnt from the reply), and whether they
    form a tuple. The number of results comes from the registry, or, where it depends on
    arguments and shapes (`opinfo.VARIES`), from the meta run: never from values."""
    info = REGISTRY.get(op)  # an unknown name travels anyway: the worker refuses it
    outputs = 1 if info is None else info.outputs
    if isinstance(inferred, tuple):
        metas: list[torch.Tensor | None] = list(inferred)
    elif inferred is not None or outputs == 1:
        return [inferred], False
    elif outputs == VARIES:
        raise DataDependentError(
            f"how many results {op} gives depends on shapes not known yet: await its operands first"
        )
    else:
        metas = [None] * outputs
    if len(metas) > limits.MAX_OP_RESULTS:
        raise InvalidArgumentError(f"{op} would give {len(metas)} results; at most {limits.MAX_OP_RESULTS}")
    return metas, True


def remote_call(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> Pointer:
    """Run allow-listed `op`, which gives one result, where the pointers among `args`/`kwargs`
    live; returns its result's pointer (`remote_results` for any op).

    Raises LocationMismatchError when the pointers live on different workers,
    ConsumedPointerError when one of them was handed on already, and UnsupportedTypeError for
    an argument that cannot travel."""
    result = remote_results(op, args, kwargs)
    if not isinstance(result, Pointer):
        raise UnsupportedTypeError(f"{op} with these arguments gives {len(result)} results: use remote_results")
    return result


def remote_results(
    op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None
) -> Pointer | tuple[Pointer, ...]:
    """Run allow-listed `op` where the pointers among `args`/`kwargs` live; returns its result's
    pointer, or a tuple of pointers for an op that gives several (``p.max(dim=0)``, ``split``),
    as torch returns them. Raises like `remote_call`, and DataDependentError when the number of
    results depends on a shape not known yet."""
    found: list[Pointer] = []
    enc_args: list[wire.Value] = []
    for a in args:  # a loop, with pointers (most operands) encoded in place: every op's path
        if type(a) is Pointer:
            found.append(a)
            enc_args.append(wire.Ref(a._id))
        else:
            enc_args.append(_encode(a, found))
    enc_kwargs = {k: _encode(v, found) for k, v in kwargs.items()} if kwargs else {}
    if not found:
        raise UnsupportedTypeError(f"{op} needs at least one Pointer argument")
    # a device named by a string travels as one: refused here, not by the worker's torch (any
    # op's `device=`, ``zeros_like(p, device="cuda")``; `to`'s positional one)
    if kwargs and type(device := kwargs.get("device")) is str:
        cpu_only(device)
    if op == "to":
        for a in args:
            if type(a) is str:
                cpu_only(a)
    first = found[0]
    client, location = first._client, first._location
    after: list[asyncio.Future[wire.Message]] = []
    for p in found:
        if not p.owned:
            p.check_alive()
        if p._location != location or p._client is not client:
            raise LocationMismatchError(
                f"{op} mixes objects on different workers: {location!r} and {p._location!r}; move one to "
                f"the other first, e.g. `y = await y.move({location!r})` (the bytes go worker to worker; "
                f"private data moves only to a worker its owner trusts)"
            )
        if p._unordered is not None and (step := p.after) is not None:
            after.append(step)
    inferred = None if op in MUTATING else _infer(op, args, kwargs or {})
    metas: list[torch.Tensor | None]
    if isinstance(inferred, torch.Tensor):
        metas, several = [inferred], False  # `_result_metas`'s answer for one result, without the call
    else:
        metas, several = _result_metas(op, inferred)
    recorder = client.recording
    recorded = None if recorder is None else recorder.record(op, found, enc_args, enc_kwargs, metas)
    results = recorded or client.issue_op(location, op, enc_args, enc_kwargs, metas, after, found)
    return tuple(results) if several else results[0]


class Pending:
    """Remote work that was queued and changes something in place (an optimizer's step,
    ``backward``, ``zero_grad``, an in-place update). It runs whether or not it is awaited;
    ``await pending`` waits until it is done and raises its error. An error nobody awaited is
    raised by the next await or `get` of a pointer on the same worker."""

    __slots__ = ("_client", "_futures")

    def __init__(self, client: Client | None, futures: list[asyncio.Future[wire.Message]]) -> None:
        self._client = client
        self._futures = futures

    @classmethod
    def gather(cls, pending: list[Pending]) -> Pending:
        """One handle for all of `pending`."""
        client = next((p._client for p in pending if p._client is not None), None)
        return cls(client, [f for p in pending for f in p._futures])

    def done(self) -> bool:
        """Whether all of the work has settled (succeeded or failed)."""
        return all(f.done() for f in self._futures)

    def __await__(self) -> Generator[Any, None, None]:
        """Wait until the work is done; raise the first error if any of it failed."""
        return self._wait().__await__()

    async def _wait(self) -> None:
        failure = None if self._client is None else self._client.failure(self._futures)
        # The error raised is a copy (`raised`), whose traceback keeps this frame: it lets go
        # of this handle, which the caller may drop while keeping the error. The coroutine
        # `failure` holds the futures only until it finishes (its frame is then cleared).
        del self
        if failure is not None:
            raised(await failure)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        n = len(self._futures)
        return f"<Pending: {n} remote update{'' if n == 1 else 's'}, {state}>"


def _quiet_for_pending(hook: Callable[[object], object]) -> Callable[[object], None]:
    """`hook`, the prompt's echo of an expression's value, except for a `Pending`, which it leaves
    unshown as PySyft's ``opt.step()`` (which returned None) was: typed in a loop at the prompt,
    Part 4's ``opt.zero_grad()``, ``loss.backward()`` and ``opt.step()`` echoed a handle each,
    every step (``print`` still shows one; ``await`` waits for it)."""

    def displayhook(value: object) -> None:
        if not isinstance(value, Pending):
            hook(value)

    return displayhook


if hasattr(sys, "ps1"):  # at an interactive prompt (``python``, ``python -m asyncio``), where echoes show
    sys.displayhook = _quiet_for_pending(sys.displayhook)


def expect_pointer(value: object, expected: str) -> None:
    """Refuse `value`, given where `expected` is, unless it is a Pointer: a coroutine (a
    forgotten ``await``) with NotAwaitedError, anything else with UnsupportedTypeError, instead
    of an AttributeError from inside the call."""
    if isinstance(value, Pointer):
        return
    raise not_awaited(value, expected) or UnsupportedTypeError(f"expected {expected}, not {type(value).__name__}")


def effect(op: str, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> Pending:
    """Queue `op`, which changes its first argument in place (see `fedptr.ops.MUTATING`), and
    return its handle at once. Raises like `remote_call`."""
    alias = remote_call(op, args, kwargs)
    fut = alias.pending_future
    if fut is None:
        return Pending(alias.client, [])
    alias.client.track_effect(alias.location, fut)
    if args and isinstance(args[0], Pointer):
        args[0]._updated_by(fut)  # `await target` reports it
    # the result entry is an alias of the target: keep its pointer until the update settled,
    # then let it go (its delete removes the alias, not the target)
    fut.add_done_callback(_Keep(alias))
    return Pending(alias.client, [fut])


class _Keep:
    """A done callback that holds an object until the future settles."""

    __slots__ = ("_kept",)

    def __init__(self, kept: object) -> None:
        self._kept: object = kept

    def __call__(self, fut: asyncio.Future[wire.Message]) -> None:
        self._kept = None


def raised(error: BaseException | None) -> None:
    """Raise a copy of `error` if there is one (see `raise_copy`)."""
    if error is not None:
        raise_copy(error)


def raise_copy(error: BaseException) -> NoReturn:
    """Raise a copy of `error` (`errors.copy_to_raise`: the error a future keeps never gets a
    traceback) from a frame that lets go of it: the copy's traceback keeps this frame, which must
    not refer back to it (a reference cycle)."""
    error = copy_to_raise(error)
    try:
        raise error
    finally:
        del error


def in_doubt(e: FedptrError, worker: str, hand_over: str, candidates: list[Pointer]) -> InDoubtError:
    """`e` as an InDoubtError of a `hand_over` (move or send) whose `candidates` are the
    pointers the object may be found under."""
    if isinstance(e, InDoubtError):
        error = e  # raised as it is: `raise e from e` would make it its own cause, a reference
        # cycle that keeps the candidates (and a dropped pointer's object) until a collection
    else:
        error = InDoubtError(worker, f"the hand-over's outcome is unknown: {e}", getattr(e, "path", [worker]))
        error.__cause__ = e
    for p in candidates:
        p.in_doubt = True  # dropping the error (or a candidate) must not delete what may be the only copy
    error.candidates = candidates
    error.hand_over = hand_over
    return error


def _method(op: str) -> Callable[..., Pointer | tuple[Pointer, ...]]:
    def call(self: Pointer, *args: Any, **kwargs: Any) -> Pointer | tuple[Pointer, ...]:
        return remote_results(op, (self, *args), kwargs)

    call.__name__ = op
    call.__doc__ = f"Remote ``torch.Tensor.{op}``: returns the result's Pointer at once."
    return call


def _in_place(op: str) -> Callable[..., Pointer]:
    def call(self: Pointer, *args: Any, **kwargs: Any) -> Pointer:
        effect(op, (self, *args), kwargs)
        return self

    call.__name__ = op
    call.__doc__ = (
        f"Remote in-place ``torch.Tensor.{op}`` (under no_grad): queued at once, returns this pointer; "
        "a failure is raised by the next await or get on this worker."
    )
    return call


NOT_ALLOWED = "is not an allowed remote operation (the allow-list: docs/ops.md)"
"""Said of a torch function or tensor method a pointer cannot run; each such refusal then says
how to use the value here instead, the newcomer's next step."""


def cpu_only(device: str | torch.device) -> None:
    """Refuse a device other than the CPU, the only one a worker computes on, before anything is sent."""
    try:
        kind = torch.device(device).type
    except RuntimeError as e:  # torch's refusal of a string that names no device
        raise InvalidArgumentError(f"{device!r} is not a device: {e}") from None
    if kind != "cpu":
        raise InvalidArgumentError(f"workers compute on the cpu only, not on {device}: leave the device out")


def _data_dependent(what: str) -> NoReturn:
    raise DataDependentError(
        f"{what} of a Pointer depends on remote data: await the pointer or get() its value first "
        "(or compute remotely, e.g. p.eq(q), p.any())"
    )


def short_id(obj_id: int) -> str:
    """The first 6 hex digits of an object id, for display (ids are random 63-bit numbers)."""
    return f"{obj_id:016x}"[:6]


def _index(key: Any) -> tuple[Any, ...]:
    return key if isinstance(key, tuple) else (key,)


class Pointer(PointerMethods):
    """A pointer to object `id_at_location` on worker `location`.

    It knows its result's `shape`, `dtype`, `device` and `requires_grad` without a round trip,
    supports the operators, indexing and the allow-listed methods of ``torch.Tensor`` (each
    returns a new Pointer at once), and dispatches ``torch.*`` and ``torch.nn.functional.*``
    calls through ``__torch_function__``. ``==`` is identity (use `eq`); ``bool(p)``, ``int(p)``
    and ``iter(p)`` raise DataDependentError."""

    __slots__ = (
        "__weakref__",
        "_client",
        "_deletes",
        "_done",
        "_id",
        "_location",
        "_meta",
        "_unordered",
        "_updates",
        "in_doubt",
        "owned",
    )

    def __init__(
        self,
        client: Client,
        location: str,
        id_at_location: int,
        done: asyncio.Future[wire.Message] | None = None,
        *,
        deletes: bool = True,
        meta: torch.Tensor | None = None,
    ) -> None:
        self._client = client
        self._location = location
        self._id = id_at_location
        self._done = done
        self._meta = meta
        self._unordered: asyncio.Future[wire.Message] | None = None
        """A client-side step this object waits for that is not a request in its worker's order
        (a two-phase send of a pointer): requests naming this object are sent after it."""
        self._updates: list[asyncio.Future[wire.Message]] | None = None
        """In-place updates queued on this object and not yet reported, which every await of this
        pointer waits for (made lazily: most pointers never get one)."""
        self.owned = True
        """Whether this pointer still owns its object (False once get, move or send handed it on)."""
        self._deletes = deletes
        """Whether dropping this pointer deletes its object (not for a worker's own data)."""
        self.in_doubt = False
        """Whether this pointer is a candidate of a hand-over in doubt (`InDoubtError`): until
        `Client.resolve` says it holds the object, dropping it deletes nothing (what is left is
        reclaimed with this client's session)."""

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

    def made_by(self, done: asyncio.Future[wire.Message], *, ordered: bool = True) -> None:
        """Set the reply of the request that makes this object, for a pointer made before it.
        `ordered` is False when `done` is not one request queued on this worker in order (a
        client-side task): later requests naming this object then wait for it (`after`)."""
        self._done = done
        if not ordered:
            self._unordered = done

    @property
    def after(self) -> asyncio.Future[wire.Message] | None:
        """The unordered step (see `made_by`) requests naming this object must wait for, while
        it runs; None once it is done or when there is none."""
        step = self._unordered
        if step is not None and step.done():
            self._unordered = step = None
        return step

    @property
    def pending_future(self) -> asyncio.Future[wire.Message] | None:
        """The reply of the request that makes this object, until it was awaited (else None)."""
        return self._done

    def __repr__(self) -> str:
        state = "" if self.owned else " (handed on)"
        described = ""
        if self._meta is not None:
            dims = ", ".join(str(d) for d in self._meta.shape)
            grad = ", requires_grad" if self._meta.requires_grad else ""
            described = f" | {dtype_name(self._meta.dtype)}[{dims}]{grad}"
        return f"[Pointer | me -> {self._location}:{short_id(self._id)}{described}]{state}"

    # --- what the result looks like (no round trip) -------------------------------------
    @property
    def meta(self) -> torch.Tensor | None:
        """A tensor on torch's meta device with this object's shape, dtype and requires_grad,
        or None while they depend on data not yet computed (await the pointer)."""
        return self._meta

    def _known(self, what: str) -> torch.Tensor:
        if self._meta is None:
            raise DataDependentError(
                f"the {what} of {self!r} depends on its data (or it is not a tensor): await the pointer first"
            )
        return self._meta

    @property
    def shape(self) -> torch.Size:
        """The tensor's shape. Raises DataDependentError when it depends on data not yet
        computed (``x[mask]``, ``nonzero``): await the pointer first."""
        return self._known("shape").shape

    @property
    def dtype(self) -> torch.dtype:
        """The tensor's dtype (DataDependentError as for `shape`)."""
        return self._known("dtype").dtype

    @property
    def device(self) -> torch.device:
        """Where the worker keeps the tensor: always the CPU."""
        return torch.device("cpu")

    @property
    def requires_grad(self) -> bool:
        """Whether the tensor records operations for autograd."""
        return self._meta is not None and self._meta.requires_grad

    @property
    def ndim(self) -> builtins.int:
        """Number of dimensions."""
        return self.shape.__len__()

    def size(self, dim: builtins.int | None = None) -> torch.Size | builtins.int:
        """The shape, or its size along `dim`, as ``torch.Tensor.size``."""
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> builtins.int:
        """Number of dimensions."""
        return self.ndim

    def numel(self) -> builtins.int:
        """Number of elements."""
        return self.shape.numel()

    def is_floating_point(self) -> builtins.bool:
        """Whether the dtype is a floating point type."""
        return self.dtype.is_floating_point

    def __len__(self) -> builtins.int:
        shape = self.shape
        if not shape:
            # torch.tensor(p) walks p as a sequence and ends here, at p[0]...[0]: say what it needs
            raise UnsupportedTypeError("len() of a 0-d tensor (torch.tensor(p) of a Pointer needs get() first)")
        return shape[0]

    def __bool__(self) -> builtins.bool:
        _data_dependent("the truth value")

    def __index__(self) -> builtins.int:
        _data_dependent("the integer value")

    def __int__(self) -> builtins.int:
        _data_dependent("the integer value")

    def __float__(self) -> builtins.float:
        _data_dependent("the float value")

    def __iter__(self) -> Iterator[Pointer]:
        _data_dependent("iterating")

    def __format__(self, spec: str) -> str:
        """``f"{p}"`` is ``str(p)``; a spec (``f"{loss:.4f}"``, a training loop's print) needs the
        value, and is refused saying how to get it (Python's own message named no way out)."""
        if spec:
            raise DataDependentError(
                f"format spec {spec!r} needs a Pointer's value: format await p.item() (a scalar) or await p.get()"
            )
        return str(self)

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        """numpy (``np.asarray(p)``) needs the values: refused saying so, where numpy would
        otherwise say it "could not convert object to sequence"."""
        _data_dependent("a numpy array")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        """Refused, and so are ``copy.copy``, ``copy.deepcopy`` and pickle, which call it: a copy
        would own the same remote object and delete it, once dropped, under this pointer (whose
        next use then failed with ObjectNotFoundError), and a pickled one names an object of this
        client's session in no other."""
        raise UnsupportedTypeError(
            "a Pointer is not copied or pickled: it owns its remote object (a copy, once dropped, "
            "would delete it); share the pointer itself, or p.clone() for a remote copy of the value"
        )

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute name

        def __getattr__(self, name: str) -> NoReturn:
            """Reached only when an attribute is missing: a ``torch.Tensor`` one (``numpy``,
            ``cuda``...) is off the allow-list, and the message says how to use it."""
            if not name.startswith("_") and hasattr(torch.Tensor, name):
                raise AttributeError(
                    f"'Pointer' object has no attribute {name!r}: torch.Tensor.{name} {NOT_ALLOWED}; "
                    f"to use it on the value, get it first: (await p.get()).{name}"
                )
            raise AttributeError(f"'Pointer' object has no attribute {name!r}")

    def __eq__(self, other: object) -> builtins.bool:
        """Identity, as for any Python object (so ``p in [q]`` and ``list.index`` work); the
        element-wise comparison is `eq`."""
        return self is other

    def __ne__(self, other: object) -> builtins.bool:
        """Not identical (see `__eq__`); the element-wise comparison is `ne`."""
        return self is not other

    __hash__ = object.__hash__

    # --- completion --------------------------------------------------------------------
    def __await__(self) -> Generator[Any, None, Pointer]:
        """Wait until the operation that made this pointer finished; raise its error if it failed,
        or the error of an effect queued on this worker that nobody awaited."""
        return self._wait().__await__()

    async def _wait(self) -> Pointer:
        error = await self._failure()
        if error is None:
            return self
        # Raised as a copy (`raise_copy`): the pointer keeps the error (its op's future), and the
        # error's traceback keeps the frames it passes through, the caller's too, which may hold
        # this pointer: a reference cycle, and the pointer, once dropped, would be deleted only
        # when the cyclic garbage collector runs. Nor does this frame hold the pointer: the
        # caller may keep the error (as asyncio's own frames drop `self` and their errors).
        del self
        raise_copy(error)

    async def _failure(self) -> BaseException | None:
        """Wait as an await does; the error it raises (None: none). Nothing is raised through this
        frame, which holds the pointer (see `_wait`)."""
        if self._done is not None:
            done = self._done
            claimed = self._client.claim(done)  # its failure is raised here, to no other await
            try:
                # not cancelled with this wait: other waiters share the request
                await self._client.settled(done)
            except asyncio.CancelledError:
                if claimed is not None:
                    self._client.unclaim(done, claimed)
                raise
            if done.cancelled():
                raise asyncio.CancelledError  # the request was (the client closed)
            if (error := done.exception()) is not None:
                return error
            if self._done is not None:
                self._done = None
                self._check_reply(done.result())
        if self._updates is None and not self._client.effects_queued:
            return None  # nothing else to wait for: no coroutine of `_pending_failure` made
        return await self._pending_failure()

    async def _pending_failure(self) -> BaseException | None:
        """The error of the in-place updates queued on this object (`_updates_failure`), else of
        an effect queued on its worker that nobody awaited; None: none."""
        error = await self._updates_failure()
        return error if error is not None else await self._client.effects_failure(self._location)

    def _updated_by(self, fut: asyncio.Future[wire.Message]) -> None:
        """Remember an in-place update queued on this object (forgetting those that succeeded)."""
        kept = [f for f in self._updates or () if not f.done() or (not f.cancelled() and f.exception())]
        self._updates = [*kept, fut]

    async def _updates_failure(self) -> BaseException | None:
        """Wait for the updates queued on this object, and return the first one's error: they are
        this pointer's awaits' to report, not another task's. The claim is shared: every await
        of this pointer that starts before they settle waits for all of them (and raises the
        same error), so none returns before the updates are acknowledged, hence durable."""
        if not self._updates:
            return None
        # one that settled and was claimed meanwhile (a `Pending` of it was awaited) was reported there
        updates = [f for f in self._updates if not self._client.reported(f)]
        try:
            return await self._client.failure(updates)
        finally:
            # once settled they are reported (to every await sharing them): later awaits neither
            # wait for them nor raise their errors; a cancelled await leaves them to the others
            if self._updates is not None and all(f.done() for f in updates):
                reported = set(updates)
                kept = [f for f in self._updates if f not in reported and not self._client.reported(f)]
                self._updates = kept or None

    def _check_reply(self, reply: wire.Message) -> None:
        """Compare the worker's description of the result with the inferred one."""
        if not isinstance(reply, wire.Ok) or not reply.dtype:
            return
        if self._meta is None:
            self._meta = meta.described(reply.shape, reply.dtype)
            return
        inferred = (list(self._meta.shape), dtype_name(self._meta.dtype))
        if inferred != (reply.shape, reply.dtype):
            raise ProtocolError(
                f"{self!r}: the worker computed {reply.dtype}{reply.shape}, "
                f"the client inferred {inferred[1]}{inferred[0]}"
            )

    def check_alive(self) -> None:
        """Raise ConsumedPointerError when this pointer's object was handed on."""
        if not self.owned:
            raise ConsumedPointerError(
                f"{self!r} was consumed by get, move or send; it points to nothing now: use what that call "
                "returned (the value get gave, the pointer move or send gave)"
            )

    # --- awaited calls -----------------------------------------------------------------
    @awaited
    async def get(self) -> torch.Tensor | nn.Module | Pointer:
        """Bring the object back and remove it from its worker: a tensor (with its
        ``requires_grad``), or (for a pointer to a pointer) the next pointer down the chain.
        Raises ConsumedPointerError if already consumed, and the error of an unawaited effect
        on this worker.

        Two-phase: the worker keeps a value until this client holds it, then it is deleted, so a
        get that failed (refused, timed out, its worker lost) can be retried."""
        self.check_alive()
        if (step := self.after) is not None:
            await self._client.wait_step(step)  # a pointer still being sent: its worker holds nothing yet
        raised(await self._pending_failure())
        self.owned = False
        try:
            reply = await self._client.call(self._location, wire.Get(self._id))
        except BaseException:
            self.owned = True
            raise
        if not isinstance(reply, wire.PointerReply):
            self._client.release(self._location, self._id)  # we hold the value: the worker may drop it
        return self._restored(self._client.unwrap(reply, self._meta))

    def _restored(self, value: torch.Tensor | nn.Module | Pointer) -> torch.Tensor | nn.Module | Pointer:
        if isinstance(value, torch.Tensor) and self.requires_grad and value.is_floating_point():
            value.requires_grad_(True)
        return value

    @awaited
    async def item(self) -> builtins.int | builtins.float | builtins.bool:
        """The value of a one-element tensor, fetched (a copy is made and fetched; this pointer
        keeps its object)."""
        value = await self.detach().clone().get()
        assert isinstance(value, torch.Tensor)
        return value.item()

    @awaited
    async def tolist(self) -> Any:
        """The tensor as nested Python lists, fetched like `item`."""
        value = await self.detach().clone().get()
        assert isinstance(value, torch.Tensor)
        return value.tolist()

    def send(self, worker: Worker | str) -> Pointer:
        """Send this pointer to `worker` (a `Worker` or its name), making a pointer to a pointer;
        the data does not move. Returns the new pointer at once (see `Worker.send`)."""
        return self._client.as_worker(worker).send(self)

    @awaited
    async def move(self, worker: Worker | str) -> Pointer:
        """Move the data to `worker` directly (the bytes never pass through this client).

        Returns the pointer at the new location; this pointer is consumed. Moving to the current
        location returns this pointer unchanged. A move that failed for sure leaves this pointer
        usable. One whose outcome is unknown (its worker was lost, its deadline passed, or the
        worker said InDoubtError) raises InDoubtError whose `candidates` are this pointer and
        the one at `worker`: `Client.resolve` says which holds the object. `worker` is a
        `Worker` or its name."""
        worker = self._client.as_worker(worker)
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
            raise in_doubt(e, self._location, "move", [self, self._moved(worker.name, new_id)])  # noqa: B904
        except BaseException:
            self.owned = True
            raise
        return self._moved(worker.name, new_id)

    def _moved(self, location: str, obj_id: int) -> Pointer:
        return Pointer(self._client, location, obj_id, meta=self._meta)

    def __del__(self) -> None:
        if self.owned and self._deletes and not self.in_doubt:
            self._client.release(self._location, self._id)

    # --- operations --------------------------------------------------------------------
    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Pointer | tuple[Pointer, ...]:
        op = _TORCH_NAMES.get(func)
        if op is None:
            name = getattr(func, "__name__", func)
            raise UnsupportedTypeError(f"{name} {NOT_ALLOWED}; to run it here, get() the value first")
        if op == "getitem":
            return args[0][args[1]]  # type: ignore[no-any-return]
        if op in MUTATING:  # torch.zero_(p): an update, as p.zero_()
            effect(op, tuple(args), kwargs)
            return args[0]  # type: ignore[no-any-return]
        return remote_results(op, tuple(args), kwargs)

    def __getitem__(self, key: Any) -> Pointer:
        """``p[key]`` with ints, slices, ``...``, None, lists of ints, and index or boolean mask
        tensors or pointers, as torch indexes; returns the result's pointer at once."""
        return remote_call("getitem", (self, *_index(key)))

    def __setitem__(self, key: Any, value: Any) -> None:
        """``p[key] = value`` (a number, tensor or pointer), in place on the worker (under no_grad)."""
        effect("setitem", (self, value, *_index(key)))

    def backward(self) -> Pending:
        """Remote ``loss.backward()``: queued at once; await the handle (or anything on this
        worker) to wait until the gradients are filled."""
        return effect("backward", (self,))

    def zero_grad(self) -> Pending:
        """Drop this tensor's gradient (``p.grad = None``), queued at once."""
        return effect("zero_grad", (self,))

    def requires_grad_(self, requires_grad: builtins.bool = True) -> Pointer:
        """Turn gradient tracking on (or off) for this tensor; returns this pointer."""
        effect("requires_grad_", (self, requires_grad))
        if self._meta is not None and self._meta.is_floating_point():
            self._meta = self._meta.detach().requires_grad_(requires_grad)
        return self

    @property
    def grad(self) -> Pointer:
        """A pointer to this tensor's gradient (fails, when awaited, if it has none). Assigning
        a pointer sets the remote gradient; assigning None drops it."""
        return remote_call("grad", (self,))

    @grad.setter
    def grad(self, value: Pointer | None) -> None:
        effect("set_grad", (self, value))

    @property
    def data(self) -> Pointer:
        """The tensor without autograd, sharing its storage: in-place updates of it
        (``p.data -= lr * g``) change this tensor. Assigning a pointer replaces its data."""
        return remote_call("detach", (self,))

    @data.setter
    def data(self, value: Pointer) -> None:
        effect("set_data", (self, value))
        if isinstance(value, Pointer) and value.meta is not None and self._meta is not None:
            self._meta = value.meta.detach().requires_grad_(self._meta.requires_grad)


def _install_methods() -> None:
    """Give `Pointer` a method for every `Call.METHOD` op of the registry, and its operators."""
    for attr, info in pointer_attributes():
        setattr(Pointer, attr, (_in_place if info.mutating else _method)(info.name))


_install_methods()


class ModuleView:
    """A submodule of a remote model (``model_ptr[0]``, ``model_ptr.fc1``), for reaching its
    parameters by name (``model_ptr[0].weight``, ``model_ptr.fc1.weight``). It is not itself
    callable."""

    def __init__(self, root: ModulePointer, prefix: str) -> None:
        self._root = root
        self._prefix = prefix

    def __getattr__(self, name: str) -> Any:  # a Pointer or a ModuleView, as the model's structure says
        if name.startswith("_"):
            raise AttributeError(name)
        return self._root.member(f"{self._prefix}.{name}")

    def __getitem__(self, index: builtins.int) -> ModuleView:
        return ModuleView(self._root, self._root.child_name(self._prefix, index))

    def named_parameters(self) -> Iterator[tuple[str, Pointer]]:
        """(name, pointer) of this submodule's parameters, names relative to it."""
        start = self._prefix + "."
        for name, p in self._root.named_parameters():
            if name.startswith(start):
                yield name[len(start) :], p

    def parameters(self) -> Iterator[Pointer]:
        """Pointers to this submodule's parameters (the model's own, stable pointers)."""
        return (p for _, p in self.named_parameters())

    def __repr__(self) -> str:
        return f"<ModuleView {self._prefix!r} of {self._root!r}>"


class ModulePointer(Pointer):
    """A pointer to a model stored on a worker (see `Worker.send` of an ``nn.Module``).

    Calling it runs the forward pass remotely. Its parameters are stable pointers (the same
    objects on every call of `parameters`), reachable by name (``mp.weight``, ``mp[0].bias``,
    `named_parameters`, `state_dict`). `train` and `eval` set the remote training mode."""

    __slots__ = ("_named", "_spec", "_state", "meta_model", "n_parameters", "training")

    def __init__(
        self,
        client: Client,
        location: str,
        id_at_location: builtins.int,
        spec: Mapping[str, Any],
        done: Any = None,
        *,
        training: builtins.bool = True,
    ) -> None:
        super().__init__(client, location, id_at_location, done)
        self._spec = dict(spec)
        self.meta_model = meta.model(spec, training)
        """The model on torch's meta device: its structure, shapes and mode, no data."""
        self.training = training
        """Whether the remote model is in training mode (see `train`, `eval`)."""
        self.n_parameters = len(list(self.meta_model.parameters()))
        """How many parameters the model has."""
        self._named: dict[str, Pointer] | None = None
        self._state: dict[str, Pointer] = {}

    def __repr__(self) -> str:
        mode = "" if self.training else " | eval"
        return f"[ModulePointer | me -> {self.location}:{short_id(self.id_at_location)}{mode}]"

    def __call__(self, *inputs: Any) -> Pointer:
        """The model's forward pass on `inputs`, run where the model is; returns the output's pointer."""
        return remote_call("forward", (self, *inputs))

    def named_parameters(self) -> Iterator[tuple[str, Pointer]]:
        """(name, pointer) for each parameter, as ``nn.Module.named_parameters``; the same
        pointers on every call."""
        if self._named is None:
            self._named = {
                name: remote_call("parameter", (self, i))
                for i, (name, _) in enumerate(self.meta_model.named_parameters())
            }
        return iter(self._named.items())

    def parameters(self) -> list[Pointer]:
        """Pointers to the model's parameters (the tensors the model trains), in order; the
        same pointers on every call."""
        return [p for _, p in self.named_parameters()]

    def parameter(self, name: str) -> Pointer:
        """The parameter called `name` (``"0.weight"``); AttributeError if there is none."""
        named = dict(self.named_parameters())
        if name not in named:
            raise AttributeError(f"the model has no parameter {name!r} (it has {', '.join(named)})")
        return named[name]

    def member(self, name: str) -> Pointer | ModuleView:
        """The parameter called `name`, or the submodule (``"fc1"`` of a ``class Net``, whose
        parameters are then ``mp.fc1.weight``); AttributeError naming the parameters if neither."""
        if name not in dict(self.named_parameters()):
            with contextlib.suppress(AttributeError):
                self.meta_model.get_submodule(name)
                return ModuleView(self, name)
        return self.parameter(name)

    def state_dict(self) -> dict[str, Pointer]:
        """Pointers to every parameter and buffer (BatchNorm's running statistics), by name,
        as ``nn.Module.state_dict``; parameters are the pointers of `named_parameters`."""
        named = dict(self.named_parameters())
        out: dict[str, Pointer] = {}
        for name in self.meta_model.state_dict():
            if name in named:
                out[name] = named[name]
            else:
                if name not in self._state:
                    self._state[name] = remote_call("state", (self, name))
                out[name] = self._state[name]
        return out

    def child_name(self, prefix: str, index: builtins.int) -> str:
        """The qualified name of child `index` of submodule `prefix` ("" for the model)."""
        module = self.meta_model.get_submodule(prefix) if prefix else self.meta_model
        children = [name for name, _ in module.named_children()]
        if not -len(children) <= index < len(children):
            raise IndexError(f"{prefix or 'the model'} has {len(children)} children; no index {index}")
        return f"{prefix}.{children[index]}" if prefix else children[index]

    def __getitem__(self, index: Any) -> ModuleView:  # type: ignore[override]
        """Child `index` of a Sequential model, for its parameters: ``mp[0].weight``."""
        return ModuleView(self, self.child_name("", index))

    def __getattr__(self, name: str) -> Any:  # a Pointer or a ModuleView, as the model's structure says
        if name.startswith("_") or name in ModulePointer.__slots__:
            raise AttributeError(name)
        return self.member(name)

    def train(self, mode: builtins.bool = True) -> ModulePointer:
        """Set the remote model's training mode (Dropout active, BatchNorm updating its
        statistics) and return this pointer; queued at once, as ``nn.Module.train``."""
        effect("train", (self, mode))
        self.training = mode
        self.meta_model.train(mode)
        return self

    def eval(self) -> ModulePointer:
        """``train(False)``: the remote model in evaluation mode (Dropout off)."""
        return self.train(False)

    def zero_grad(self) -> Pending:
        """Drop the gradients of all the model's parameters, queued at once."""
        return effect("zero_grad", (self,))

    def _moved(self, location: str, obj_id: builtins.int) -> Pointer:
        return ModulePointer(self._client, location, obj_id, self._spec, training=self.training)
