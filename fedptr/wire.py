"""The fedptr wire protocol's bodies, sans-IO: message types, encode and decode.

This module imports no sockets, no asyncio and no torch; tests feed it bytes. The envelope that
precedes every body (protocol, command, name, request id) is `fedptr.envelope`'s.

A body is::

    [header, buffer_0, buffer_1, ...]

* ``header`` is msgpack: ``[kind, budget_ms, field_0, field_1, ...]``. Fields are appended with
  defaults as the schema grows; a decoder ignores fields it does not know.
* Tensors travel as raw buffers in their own frames, never inside the header. The header holds
  an extension value ``(dtype, shape, frame index)`` for each; decoding checks the dtype against an
  allow-list and ``numel * itemsize == len(buffer)``. Buffers are passed through as memoryviews,
  so a 64 MiB tensor is never copied by the codec.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeAlias, TypeVar, cast

import msgpack

from fedptr import limits
from fedptr.errors import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # bytes, memoryview, zmq.Frame, numpy arrays

# --- tensors -----------------------------------------------------------------------------
DTYPE_ITEMSIZE: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
"""The dtypes that may travel, with their item sizes in bytes. Anything else is refused."""


@dataclass(frozen=True, slots=True)
class RawTensor:
    """A tensor as bytes: dtype name, shape and a C-contiguous buffer of exactly the right size."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def __post_init__(self) -> None:
        itemsize = DTYPE_ITEMSIZE.get(self.dtype)
        if itemsize is None:
            raise ProtocolError(f"dtype {self.dtype!r} is not allowed on the wire")
        if len(self.shape) > limits.MAX_NDIM:
            raise ProtocolError(f"tensor has {len(self.shape)} dims, more than {limits.MAX_NDIM}")
        for d in self.shape:
            if type(d) is not int or d < 0:
                raise ProtocolError(f"bad tensor shape {self.shape!r}")
        expected = math.prod(self.shape) * itemsize
        if expected != self.data.nbytes:
            raise ProtocolError(
                f"tensor buffer holds {self.data.nbytes} bytes but {self.dtype}{list(self.shape)} needs {expected}"
            )


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to an object in the receiving worker's store, by id."""

    obj_id: int


_EXT_TENSOR = 1
_EXT_REF = 2
_INT64 = struct.Struct("<q")
_UINT64 = struct.Struct("<Q")

Value: TypeAlias = bool | int | float | str | RawTensor | Ref | list["Value"] | dict[str, "Value"] | None
"""What an operation argument may be: plain scalars, strings, lists, str-keyed maps,
references to stored objects and inline tensors. Tuples encode as lists."""


V = TypeVar("V", bound=Value)


# --- messages ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Message:
    """Base of every body message. Subclasses set KIND and declare their fields in order."""

    KIND: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class Put(Message):
    """Store `tensor` under `obj_id`. Reply: Ok."""

    KIND: ClassVar[int] = 1
    obj_id: int
    tensor: RawTensor
    requires_grad: bool = False
    origins: dict[str, Value] = dataclasses.field(default_factory=dict)
    """Data owners the tensor derives from, each with the workers it trusts (sent between nodes)."""
    owner: str = ""
    """Who may use the object (a node moving data puts it in the requester's name); "" = the sender."""


@dataclass(frozen=True, slots=True)
class PutPointer(Message):
    """Store, under `obj_id`, a pointer to object `id_at_location` on worker `location`. Reply: Ok."""

    KIND: ClassVar[int] = 2
    obj_id: int
    location: str
    id_at_location: int


@dataclass(frozen=True, slots=True)
class Op(Message):
    """Run allow-listed operation `op` on `args`/`kwargs` and store the result as `result_id`
    (and, for an op with several results, the others as `more_ids`).

    When the referenced objects are pointers to another worker, the receiver forwards the
    operation there and stores a pointer to the result. Reply: Ok (with the result's shape and
    dtype where it was computed) or Failure."""

    KIND: ClassVar[int] = 3
    result_id: int
    op: str
    args: list[Value]
    kwargs: dict[str, Value]
    sponsor: str = ""
    """On a forwarded operation, the client it runs for: its result is reclaimed when that
    client's session ends, even if the forwarding pointer's delete was lost."""
    more_ids: list[int] = dataclasses.field(default_factory=list)
    """The ids of its results after the first, for an op that gives several (``max(dim=)``,
    ``topk``, ``split``): each is stored as its own object. At most `limits.MAX_OP_RESULTS` in all."""


@dataclass(frozen=True, slots=True)
class Get(Message):
    """Hand object `obj_id` to the caller. Reply: TensorReply (the entry stays until the caller,
    holding the value, deletes it: a get is two-phase) or PointerReply (a stored pointer is
    handed over, not followed, and removed)."""

    KIND: ClassVar[int] = 4
    obj_id: int


@dataclass(frozen=True, slots=True)
class Move(Message):
    """Move the data behind `obj_id` to worker `dest`, where it is stored as `new_id`.

    The bytes go from the worker that holds them to `dest` directly; a pointer entry forwards the
    move down its chain and is removed. Reply: Ok."""

    KIND: ClassVar[int] = 5
    obj_id: int
    dest: str
    new_id: int
    owner: str = ""
    """Who owns the object at `dest` ("" = the sender); kept as the move travels down a chain."""


@dataclass(frozen=True, slots=True)
class Delete(Message):
    """Delete these objects, following pointers down their chains. Never answered."""

    KIND: ClassVar[int] = 6
    obj_ids: list[int]


@dataclass(frozen=True, slots=True)
class ListObjects(Message):
    """Describe every object in the store once it has settled. Reply: ObjectsReply."""

    KIND: ClassVar[int] = 7


@dataclass(frozen=True, slots=True)
class Clear(Message):
    """Delete every object in the store (pointers down their chains). Reply: Ok."""

    KIND: ClassVar[int] = 8


@dataclass(frozen=True, slots=True)
class PutModule(Message):
    """Build an allow-listed model from `spec`, load `params` into it (in parameters() order)
    and store it under `obj_id`. Reply: Ok."""

    KIND: ClassVar[int] = 9
    obj_id: int
    spec: dict[str, Value]
    params: list[Value]
    origins: dict[str, Value] = dataclasses.field(default_factory=dict)
    owner: str = ""


@dataclass(frozen=True, slots=True)
class Search(Message):
    """Find the data objects a worker was started with under `tag`. Reply: SearchReply."""

    KIND: ClassVar[int] = 10
    tag: str


@dataclass(frozen=True, slots=True)
class Grant(Message):
    """Hand object `obj_id` to peer `to`: from now on only `to` may use it. Only its owner may
    grant it. Reply: Ok."""

    KIND: ClassVar[int] = 11
    obj_id: int
    to: str


@dataclass(frozen=True, slots=True)
class Has(Message):
    """Whether object `obj_id` is held here, durably: Ok, or a Failure saying not found, or in
    doubt while a hand-over of it is being resolved. Settles hand-overs in doubt."""

    KIND: ClassVar[int] = 28
    obj_id: int


@dataclass(frozen=True, slots=True)
class PutPlan(Message):
    """Keep plan `plan_id` of the sender: a graph of allow-listed operations run by RunPlan.

    Slots ``0 .. n_inputs - 1`` are the run's input objects; each operation (``[op, args,
    kwargs]``, where ``Ref(slot)`` names an earlier slot, or ``[op, args, kwargs, n]`` for an op
    giving ``n`` results) fills the next slot (the next ``n``), in order; `outputs` are the slots
    stored as the run's results. Reply: Ok."""

    KIND: ClassVar[int] = 13
    plan_id: int
    n_inputs: int
    ops: list[Value]
    outputs: list[int]


@dataclass(frozen=True, slots=True)
class RunPlan(Message):
    """Run the sender's plan `plan_id` on the objects `inputs` (one per input slot) and store
    its outputs as `result_ids`. Reply: PlanReply."""

    KIND: ClassVar[int] = 14
    plan_id: int
    inputs: list[int]
    result_ids: list[int]


@dataclass(frozen=True, slots=True)
class Ok(Message):
    """Success. For a computed tensor, its shape and dtype."""

    KIND: ClassVar[int] = 20
    shape: list[int] = dataclasses.field(default_factory=list)
    dtype: str = ""
    more: list[Value] = dataclasses.field(default_factory=list)
    """For an op with several results, ``[shape, dtype]`` of each after the first."""


@dataclass(frozen=True, slots=True)
class TensorReply(Message):
    """The tensor a Get asked for."""

    KIND: ClassVar[int] = 21
    tensor: RawTensor
    release: str = ""
    """Why the worker let it go: ``"public"`` (derived from no one's private data) or
    ``"aggregate"`` (a mean over enough data owners, released by the aggregator)."""


@dataclass(frozen=True, slots=True)
class PointerReply(Message):
    """The pointer a Get asked for: where its object lives and under which id."""

    KIND: ClassVar[int] = 22
    location: str
    id_at_location: int


class FailureCode(enum.StrEnum):
    """How a request failed; each code stands for one error type of `fedptr.errors`. The list
    only grows: codes are appended, never renumbered or reused."""

    REMOTE = "remote"
    UNKNOWN_WORKER = "unknown-worker"
    LOST_WORKER = "lost-worker"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    PROTOCOL = "protocol"
    DENIED = "denied"
    STORE_FULL = "store-full"
    NOT_FOUND = "not-found"
    OP_NOT_ALLOWED = "op-not-allowed"
    BUDGET_EXHAUSTED = "budget-exhausted"
    IN_DOUBT = "in-doubt"
    DROPOUT = "dropout"
    QUOTA_EXCEEDED = "quota-exceeded"


FAILURE_CODES = frozenset(c.value for c in FailureCode)


@dataclass(frozen=True, slots=True)
class Failure(Message):
    """A request failed. `code` says how (one of FAILURE_CODES); for ``"remote"`` the exception
    type and message are the worker's; `worker` is where it failed and `path` the hops to it."""

    KIND: ClassVar[int] = 23
    code: str
    remote_type: str
    message: str
    worker: str
    path: list[str]
    owner: str = ""
    """For ``"denied"``: the data owner whose privacy policy refused the request. For
    ``"dropout"``: the owners that dropped out, comma-separated (``remote_type`` is the phase)."""

    def __post_init__(self) -> None:
        if self.code not in FAILURE_CODES:
            raise ProtocolError(f"unknown failure code {self.code[:32]!r}")


@dataclass(frozen=True, slots=True)
class ObjectRow:
    """One object of a store listing. `kind` is ``"tensor"``, ``"module"``, ``"pointer"`` or ``"failed"``."""

    obj_id: int
    kind: str
    shape: list[int]
    dtype: str
    preview: list[Any] | None
    location: str
    id_at_location: int
    owner: str = ""
    """The peer that may use the object (``"*"``: a worker's own data, anyone); appended field."""


@dataclass(frozen=True, slots=True)
class ObjectsReply(Message):
    """A store listing, one row per object."""

    KIND: ClassVar[int] = 24
    rows: list[ObjectRow]


@dataclass(frozen=True, slots=True)
class ModuleReply(Message):
    """The model a Get asked for: its spec and parameters."""

    KIND: ClassVar[int] = 25
    spec: dict[str, Value]
    params: list[Value]
    release: str = ""
    """How the model may leave: ``"public"``, ``"exact"`` or ``"dp"`` (trained by DP-SGD only)."""


@dataclass(frozen=True, slots=True)
class SearchReply(Message):
    """Ids of the data objects under a tag, in the order they were loaded, with their shapes and dtypes."""

    KIND: ClassVar[int] = 26
    ids: list[int]
    shapes: list[Value] = dataclasses.field(default_factory=list)
    """The shape of each object, in the order of `ids` (empty from an older node)."""
    dtypes: list[str] = dataclasses.field(default_factory=list)
    """The wire dtype of each object, likewise."""


@dataclass(frozen=True, slots=True)
class PlanReply(Message):
    """A plan ran: the shape and dtype of each of its outputs, in order."""

    KIND: ClassVar[int] = 29
    shapes: list[Value]
    dtypes: list[str]


# --- differential privacy (kinds 40+) ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Contribute(Message):
    """client -> data owner: turn object `obj_id` (derived from this owner's data alone) into a
    DP contribution stored on `aggregator` as `new_id`. The owner clips it to its own L2 bound,
    charges its budget for the aggregator's noise, and sends it. Reply: BudgetReply."""

    KIND: ClassVar[int] = 40
    obj_id: int
    aggregator: str
    new_id: int


@dataclass(frozen=True, slots=True)
class PutContribution(Message):
    """data owner -> aggregator: a clipped contribution of the sending owner, single-use, for
    `owner` (the client who asked). The aggregator adds Gaussian noise of standard deviation at
    least `noise_multiplier * clip` to the sum it releases. Reply: Ok."""

    KIND: ClassVar[int] = 41
    obj_id: int
    tensor: RawTensor
    clip: float
    noise_multiplier: float
    owner: str


@dataclass(frozen=True, slots=True)
class DPTrain(Message):
    """client -> data owner: train model `model_id` with DP-SGD on this owner's private data
    `x_id`, `y_id` for `steps` steps: the node samples each batch itself (Poisson, rate
    `sample_rate`), clips per-sample gradients of the per-sample `loss` to `max_grad_norm`, adds
    Gaussian noise (`noise_multiplier * max_grad_norm`) and takes an SGD step of `lr`. Every
    step is charged to the owner's budget first. Reply: BudgetReply."""

    KIND: ClassVar[int] = 42
    model_id: int
    x_id: int
    y_id: int
    loss: str
    lr: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class BudgetReply(Message):
    """A release was charged: the owner's (epsilon) spent so far and left, at its delta."""

    KIND: ClassVar[int] = 43
    owner: str
    epsilon_spent: float
    epsilon_left: float


@dataclass(frozen=True, slots=True)
class Budget(Message):
    """Ask a data owner for its privacy budget. Reply: BudgetReply."""

    KIND: ClassVar[int] = 44


# --- secure aggregation (kinds 45+; nodes/secure.py, the protocol in nodes/secagg.py) --------
@dataclass(frozen=True, slots=True)
class SecureMean(Message):
    """client -> aggregator: release the mean of the values `owners` joined round `round_id`
    with (SecAggJoin), by secure aggregation, as `result_id`; each value has `shape`.
    `colluders` is the collusion bound the client told the owners (SecAggJoin); `threshold` the
    shares that unmask (0: the least that resists the colluders). Reply: SecureMeanReply."""

    KIND: ClassVar[int] = 45
    result_id: int
    round_id: bytes
    owners: list[str]
    shape: list[int]
    colluders: int
    threshold: int = 0


@dataclass(frozen=True, slots=True)
class SecureMeanReply(Message):
    """The secure mean was released: the owners in it, each one's epsilon spent and left, and
    why each other owner dropped out."""

    KIND: ClassVar[int] = 46
    shape: list[int]
    dtype: str
    epsilon_spent: dict[str, int | float]
    epsilon_left: dict[str, int | float]
    dropped: dict[str, Value]


@dataclass(frozen=True, slots=True)
class SecAggJoin(Message):
    """client -> data owner: let aggregator `aggregator` run secure aggregation round
    `round_id` over object `obj_id` (derived from this owner's data alone), among `owners`
    (the client's: the aggregator may name no other), resisting up to `colluders` owners
    colluding with the aggregator (the owner refuses a round config with fewer). Reply: Ok."""

    KIND: ClassVar[int] = 47
    round_id: bytes
    obj_id: int
    aggregator: str
    owners: list[str]
    colluders: int


@dataclass(frozen=True, slots=True)
class SecAggAdvertise(Message):
    """aggregator -> owner, phase 1: this round's public keys. Reply: SecAggKeys."""

    KIND: ClassVar[int] = 48
    round_id: bytes


@dataclass(frozen=True, slots=True)
class SecAggKeys(Message):
    """An owner's public keys of a round (raw X25519), and the clip bound and noise multiplier
    its policy asks of the round."""

    KIND: ClassVar[int] = 49
    cipher: bytes
    mask: bytes
    clip: float
    noise_multiplier: float


@dataclass(frozen=True, slots=True)
class SecAggPeerKeys(Message):
    """owner -> owner: your public keys of round `round_id`, to check the ones the aggregator
    relayed (the broker authenticates who answers). Reply: SecAggKeys."""

    KIND: ClassVar[int] = 56
    round_id: bytes


@dataclass(frozen=True, slots=True)
class SecAggShare(Message):
    """aggregator -> owner, phase 2: the round's config and every advertised owner's keys
    (name -> [cipher, mask]). The owner computes the unmask quorum from the owners and
    `colluders` itself. Reply: SecAggShares."""

    KIND: ClassVar[int] = 50
    round_id: bytes
    owners: list[str]
    dim: int
    threshold: int
    min_survivors: int
    degree: int
    ring_bits: int
    clip: float
    noise_multiplier: float
    keys: dict[str, list[bytes]]
    colluders: int


@dataclass(frozen=True, slots=True)
class SecAggShares(Message):
    """An owner's encrypted shares, by the neighbour each is for."""

    KIND: ClassVar[int] = 51
    shares: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class SecAggMask(Message):
    """aggregator -> owner, phase 3: the shares its neighbours sent it, by sender. The owner
    charges its budget, then answers its masked input. Reply: SecAggMasked."""

    KIND: ClassVar[int] = 52
    round_id: bytes
    shares: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class SecAggMasked(Message):
    """An owner's masked input (ring elements), and its budget after the charge."""

    KIND: ClassVar[int] = 53
    tensor: RawTensor
    epsilon_spent: float
    epsilon_left: float


@dataclass(frozen=True, slots=True)
class SecAggUnmask(Message):
    """aggregator -> owner, phase 4: who survived and who dropped. Reply: SecAggUnmasked."""

    KIND: ClassVar[int] = 54
    round_id: bytes
    survivors: list[str]
    dropped: list[str]


@dataclass(frozen=True, slots=True)
class SecAggUnmasked(Message):
    """An owner's shares for the unmasking: of the survivors' self-mask seeds and of the
    dropped owners' mask keys, by owner (never both for one owner)."""

    KIND: ClassVar[int] = 55
    seed_shares: dict[str, bytes]
    key_shares: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class SecAggConfirm(Message):
    """owner -> owner: which unmask request were you told in round `round_id`? An owner reveals
    shares only when a quorum of the round's owners (more than half of owners plus colluders)
    say they were told the very same one
    (the broker authenticates who answers). Reply: SecAggUnmask, as told."""

    KIND: ClassVar[int] = 57
    round_id: bytes


@dataclass(frozen=True, slots=True)
class NodeStats(Message):
    """Ask a node for its operating figures (objects, bytes, memory, traffic, uptime). Reply:
    NodeStatsReply. Answered to any peer: it holds counts, never values."""

    KIND: ClassVar[int] = 12


@dataclass(frozen=True, slots=True)
class NodeStatsReply(Message):
    """A node's operating figures. `figures` maps a name to a number (``objects``,
    ``store_bytes``, ``rss_bytes``, ``messages_in``, ``bytes_out``, ``uptime_s``...; the set
    grows, readers ignore names they do not know); `role` is ``"owner"``, ``"aggregator"``,
    ``"owner+aggregator"`` or ``"plain"``; `budget` is the privacy budget left, by name (empty:
    the node reports none)."""

    KIND: ClassVar[int] = 27
    figures: dict[str, int | float]
    role: str
    budget: dict[str, int | float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DirectOffer(Message):
    """peer -> worker, through the broker: open a direct data path to me; I connect with the
    CURVE public key `key` (z85). The worker's link answers it (never its node): DirectTicket."""

    KIND: ClassVar[int] = 58
    key: bytes


@dataclass(frozen=True, slots=True)
class DirectTicket(Message):
    """Where the worker's direct data socket listens and its CURVE public key (z85); both empty
    when it has none (the peer's chunks then go through the broker)."""

    KIND: ClassVar[int] = 59
    endpoint: str
    key: bytes


MESSAGE_TYPES: tuple[type[Message], ...] = (
    Put,
    PutPointer,
    Op,
    Get,
    Move,
    Delete,
    ListObjects,
    Clear,
    Ok,
    TensorReply,
    PointerReply,
    Failure,
    ObjectsReply,
    PutModule,
    Search,
    ModuleReply,
    SearchReply,
    Grant,
    Contribute,
    PutContribution,
    DPTrain,
    BudgetReply,
    Budget,
    NodeStats,
    NodeStatsReply,
    Has,
    PutPlan,
    RunPlan,
    PlanReply,
    SecureMean,
    SecureMeanReply,
    SecAggJoin,
    SecAggAdvertise,
    SecAggKeys,
    SecAggPeerKeys,
    SecAggShare,
    SecAggShares,
    SecAggMask,
    SecAggMasked,
    SecAggUnmask,
    SecAggUnmasked,
    SecAggConfirm,
    DirectOffer,
    DirectTicket,
)
_BY_KIND: dict[int, type[Message]] = {t.KIND: t for t in MESSAGE_TYPES}
assert len(_BY_KIND) == len(MESSAGE_TYPES), "message kinds must be unique"


_DEFAULTED = object()
"""What a field with a default factory is given when the caller gives it nothing."""


def _fast_init(cls: type) -> Callable[..., None]:
    """An ``__init__`` for the frozen slotted dataclass `cls` that sets each field through its
    slot's descriptor: the one `dataclass(frozen=True)` writes calls ``object.__setattr__`` by
    name per field, a third of a microsecond each (an `Op` took 1.0 µs to build, 0.37 µs so;
    every message received and most sent are built). Same signature (names, order, defaults,
    default factories), same `__post_init__` check, and the instances stay frozen: assigning
    to a field still raises."""
    env: dict[str, Any] = {"_DEFAULTED": _DEFAULTED}
    params: list[str] = []
    body: list[str] = []
    for f in dataclasses.fields(cls):
        n = f.name
        env[f"_set_{n}"] = cls.__dict__[n].__set__
        if f.default is not dataclasses.MISSING:
            env[f"_d_{n}"] = f.default
            params.append(f"{n}=_d_{n}")
        elif f.default_factory is not dataclasses.MISSING:
            env[f"_f_{n}"] = f.default_factory
            params.append(f"{n}=_DEFAULTED")
            body.append(f"if {n} is _DEFAULTED: {n} = _f_{n}()")
        else:
            params.append(n)
        body.append(f"_set_{n}(self, {n})")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    # generated as `dataclasses` generates its own: a loop over the fields would cost what it saves
    exec(f"def __init__(self, {', '.join(params)}):\n    " + "\n    ".join(body or ["pass"]), env)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


for _cls in (*MESSAGE_TYPES, Ref, RawTensor, ObjectRow):
    setattr(_cls, "__init__", _fast_init(_cls))  # noqa: B010 (mypy refuses assigning a method)


# --- field checks ------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return type(v) is int


_SCALARS = frozenset({bool, int, float, str, RawTensor, Ref, type(None)})
"""Exact types of the leaves of a value (a set: a tuple is searched by equality, one type at a time)."""


def _check_value(v: Any, depth: int = 0) -> bool:
    # loops, not all() over generators: this runs on every argument of every operation; a
    # scalar element is checked in place (it is valid unless it lies deeper than the limit)
    if depth > limits.MAX_VALUE_DEPTH:
        return False
    t = type(v)
    if t in _SCALARS:
        return True
    if t is list:
        if v and depth == limits.MAX_VALUE_DEPTH:
            return False
        for x in v:  # noqa: SIM110 (all() over a generator is what this avoids)
            if type(x) not in _SCALARS and not _check_value(x, depth + 1):
                return False
        return True
    if t is dict:
        if v and depth == limits.MAX_VALUE_DEPTH:
            return False
        for k, x in v.items():
            if type(k) is not str or (type(x) not in _SCALARS and not _check_value(x, depth + 1)):
                return False
        return True
    return False


def _int_list(v: Any) -> bool:
    # a loop, not all() over a generator (resumed once per element): a Delete lists its ids
    if type(v) is not list:
        return False
    for x in v:  # noqa: SIM110
        if type(x) is not int:
            return False
    return True


def _check_row(v: Any) -> bool:
    return (
        type(v) is list
        and len(v) >= 7
        and _is_int(v[0])
        and v[1] in ("tensor", "module", "pointer", "failed")
        and type(v[2]) is list
        and all(_is_int(d) for d in v[2])
        and type(v[3]) is str
        and (v[4] is None or (type(v[4]) is list and all(type(x) in (bool, int, float) for x in v[4])))
        and type(v[5]) is str
        and _is_int(v[6])
        and (len(v) < 8 or type(v[7]) is str)
    )


def _check_numbers(v: Any) -> bool:
    return type(v) is dict and all(type(k) is str and type(x) in (int, float) for k, x in v.items())


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "float": lambda v: type(v) in (int, float) and math.isfinite(v),
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
    "RawTensor": lambda v: type(v) is RawTensor,
    "list[int]": _int_list,
    "list[str]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "list[Value]": lambda v: type(v) is list and _check_value(v),
    "dict[str, Value]": lambda v: type(v) is dict and _check_value(v),
    "list[ObjectRow]": lambda v: type(v) is list and all(_check_row(r) for r in v),
    "dict[str, int | float]": _check_numbers,
    "bytes": lambda v: type(v) is bytes,
    "dict[str, bytes]": lambda v: type(v) is dict and all(type(k) is str and type(x) is bytes for k, x in v.items()),
    "dict[str, list[bytes]]": lambda v: (
        type(v) is dict
        and all(type(k) is str and type(x) is list and all(type(b) is bytes for b in x) for k, x in v.items())
    ),
}

_FIELDS: dict[type[Message], tuple[tuple[str, Callable[[Any], bool], bool], ...]] = {
    t: tuple(
        (f.name, _CHECKS[str(f.type)], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(t)
    )
    for t in MESSAGE_TYPES
}
_ROWS = [name for name, _, _ in _FIELDS[ObjectsReply]].index("rows")
"""Where an `ObjectsReply`'s rows are among its fields (decoded as lists, stored as `ObjectRow`)."""

_INLINE: dict[str, str] = {
    "int": "type({v}) is int",
    "bool": "type({v}) is bool",
    "str": "type({v}) is str",
    "bytes": "type({v}) is bytes",
    "RawTensor": "type({v}) is RawTensor",
    "list[int]": "type({v}) is list and (not {v} or {check}({v}))",
    # a flat list of scalars (most ops' arguments) checked in C: `_check_value` of a list at
    # depth 0 accepts exactly that, and is called only for nested ones (a call less per op)
    "list[Value]": "type({v}) is list and (set(map(type, {v})) <= _SCALARS or _check_value({v}))",
    "dict[str, Value]": "type({v}) is dict and (not {v} or _check_value({v}))",  # most ops: no keywords
}
"""`_CHECKS` written out as expressions (the same verdicts), for `_all_valid`; a type not here
is checked by calling its `_CHECKS` function."""


def _all_valid(cls: type[Message]) -> Callable[..., bool]:
    """One function taking every field of `cls` that says whether all are valid, as `_CHECKS`
    says: one call per message received instead of one per field (an `Op`'s six checks were
    ~0.9 µs of its decode). `decode` falls back to the checks one by one to name a bad field."""
    env: dict[str, Any] = {"RawTensor": RawTensor, "_check_value": _check_value, "_SCALARS": _SCALARS}
    terms = []
    for i, f in enumerate(dataclasses.fields(cls)):
        env[f"_c{i}"] = _CHECKS[str(f.type)]
        terms.append("(" + _INLINE.get(str(f.type), "{check}({v})").format(v=f"v{i}", check=f"_c{i}") + ")")
    params = ", ".join(f"v{i}" for i in range(len(terms)))
    exec(f"def valid({params}):\n    return {' and '.join(terms) or 'True'}", env)  # as `_fast_init`
    valid: Callable[..., bool] = env["valid"]
    return valid


_VALID: dict[type[Message], Callable[..., bool]] = {t: _all_valid(t) for t in MESSAGE_TYPES}
_Field = tuple[str, Callable[[Any], bool], bool]
_DECODING: dict[int, tuple[type[Message], tuple[_Field, ...], int, Callable[..., bool]]] = {
    t.KIND: (t, _FIELDS[t], len(_FIELDS[t]), _VALID[t]) for t in MESSAGE_TYPES
}
"""What decoding a message of each kind reads: its class, its fields' checks, their count and
their check in one call, in one lookup per message."""

_SMALL_HEADER = min(limits.MAX_STR_BYTES, limits.MAX_CONTAINER_LEN, limits.MAX_EXT_BYTES)
"""A header of at most this many bytes cannot hold a string, bytes, container or extension
past the limits (each element takes a byte at least, msgpack checks every length against
what is left): it is decoded without them, which unpackb parses on every call."""


def refs(value: Value, found: set[int]) -> None:
    """Add to `found` the id of every reference in `value` (nested in lists and maps)."""
    if type(value) is Ref:
        found.add(value.obj_id)
    elif type(value) is list:
        for v in value:  # references inline: most arguments are flat lists of them
            if type(v) is Ref:
                found.add(v.obj_id)
            else:
                refs(v, found)
    elif type(value) is dict:
        for v in value.values():
            refs(v, found)


def rewrite_refs(value: V, ids: dict[int, int]) -> V:
    """`value` with each reference to id ``i`` replaced by a reference to ``ids[i]`` (a list
    stays a list, a map a map)."""
    return cast(V, _rewrite(value, ids))


def _rewrite(value: Any, ids: dict[int, int]) -> Any:
    if type(value) is Ref:
        return Ref(ids[value.obj_id])
    if type(value) is list:
        return [_rewrite(v, ids) for v in value]
    if type(value) is dict:
        return {k: _rewrite(v, ids) for k, v in value.items()}
    return value


_ID_POOL: list[int] = []
"""Object ids drawn ahead from the OS's random source, 512 at a time: a draw per id was a
`getrandom` call and 1.1 µs on every op a client issues (0.2 µs from the pool)."""
os.register_at_fork(after_in_child=_ID_POOL.clear)  # a forked node must not reuse its parent's ids


def new_object_id() -> int:
    """A fresh object id: random (63 bits from `os.urandom`), so that ids chosen by different
    peers never collide."""
    if not _ID_POOL:
        # a list, not a generator: no Python frame resumed per id
        _ID_POOL.extend([v >> 1 for (v,) in _UINT64.iter_unpack(os.urandom(8 * 512))])
    return _ID_POOL.pop()


def deletes(ids: Sequence[int]) -> list[Delete]:
    """Delete messages for `ids`, each within the wire's container limit."""
    step = limits.MAX_CONTAINER_LEN
    return [Delete(list(ids[i : i + step])) for i in range(0, len(ids), step)]


# --- encode ------------------------------------------------------------------------------
def _to_plain(v: Any) -> Any:
    if type(v) is ObjectRow:
        return [v.obj_id, v.kind, v.shape, v.dtype, v.preview, v.location, v.id_at_location, v.owner]
    if type(v) is list and v and type(v[0]) is ObjectRow:
        return [_to_plain(r) for r in v]
    return v


_OK_HEADERS: dict[tuple[tuple[int, ...], str], bytes] = {}
"""Encoded `Ok` replies of one result by (shape, dtype): nearly every op is answered with one of a few."""


def encode(msg: Message, budget_ms: int = 0) -> list[bytes | memoryview]:
    """Encode `msg` as body frames: the msgpack header, then one frame per tensor.

    `budget_ms` is the time the receiver has to answer (0 for replies and no deadline). Tensor
    buffers are returned as they are (no copy)."""
    if type(msg) is Ok and not msg.more and not budget_ms:
        known = _OK_HEADERS.get((tuple(msg.shape), msg.dtype))  # the table read here: once per op
        return [known if known is not None else _ok_header(msg)]
    return _encode(msg, budget_ms)


def _ok_header(msg: Ok) -> bytes:
    """`msg` encoded, from `_OK_HEADERS` when it was met before (up to `limits.OK_HEADER_TABLE_SIZE`)."""
    key = (tuple(msg.shape), msg.dtype)
    known = _OK_HEADERS.get(key)
    if known is not None:
        return known
    [frame] = _encode(msg, 0)  # an Ok holds no tensor: its header is all of it
    header = bytes(frame)
    # only int shapes are kept: a shape of bools or floats (which no node sends, and no peer
    # accepts) equal to an int one (True == 1 == 1.0) then at worst finds that one's encoding
    if len(_OK_HEADERS) < limits.OK_HEADER_TABLE_SIZE and all(type(d) is int for d in key[0]):
        _OK_HEADERS[key] = header
    return header


def _field_values(cls: type[Message]) -> Callable[[Message, int], list[Any]]:
    """One function that lists a `cls` message's header values, ``[kind, budget_ms, field_0,
    ...]``, decided once per type: a generator of ``getattr`` per field was a third of an `Op`'s
    encode. `ObjectsReply`'s rows go as plain lists (`_to_plain`)."""
    env: dict[str, Any] = {"_to_plain": _to_plain}
    values = [str(cls.KIND), "budget_ms"]
    for name, check, _ in _FIELDS[cls]:
        values.append(f"_to_plain(msg.{name})" if check is _CHECKS["list[ObjectRow]"] else f"msg.{name}")
    exec(f"def values(msg, budget_ms):\n    return [{', '.join(values)}]", env)  # as `_fast_init`
    function: Callable[[Message, int], list[Any]] = env["values"]
    return function


_VALUES: dict[type[Message], Callable[[Message, int], list[Any]]] = {t: _field_values(t) for t in MESSAGE_TYPES}


class _Packer(threading.local):
    """This thread's msgpack packer, made once: building one per message (what `msgpack.packb`
    does) was about a microsecond of every encode. Per thread because its `default` collects
    the message's tensor buffers, and a packer is not safe to share while `default` runs Python."""

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self.pack = msgpack.Packer(default=self.default, strict_types=True).pack

    def default(self, obj: Any) -> Any:
        if type(obj) is Ref:
            # `ExtType`'s own constructor checks its arguments in Python; these are valid by construction
            return tuple.__new__(msgpack.ExtType, (_EXT_REF, _INT64.pack(obj.obj_id)))
        if type(obj) is RawTensor:
            self.buffers.append(obj.data)
            meta = msgpack.packb([obj.dtype, list(obj.shape), len(self.buffers)])
            return msgpack.ExtType(_EXT_TENSOR, meta)
        if type(obj) is tuple:
            return list(obj)
        raise ProtocolError(f"cannot encode a value of type {type(obj).__name__}")


_PACKER = _Packer()


def _encode(msg: Message, budget_ms: int) -> list[bytes | memoryview]:
    packer = _PACKER
    try:
        header: bytes = packer.pack(_VALUES[type(msg)](msg, budget_ms))
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from e
    finally:
        buffers = packer.buffers
        if buffers:  # most messages carry none: no list made for them
            packer.buffers = []
    if len(header) > limits.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {limits.MAX_HEADER_BYTES}")
    return [header, *buffers]


# --- decode ------------------------------------------------------------------------------
class Decoded(NamedTuple):
    """A decoded body: the message and the deadline budget its sender gave (ms, 0 = none). A
    named tuple, like `envelope.Envelope`: one is built for every message received."""

    message: Message
    budget_ms: int


_new_tuple = tuple.__new__

_OKS_DECODED: dict[bytes, Decoded] = {}
"""Decoded `Ok` replies of one result by their header bytes: nearly every op is answered with
one of a few (`_OK_HEADERS` on the sending side). Filled only from headers `decode` checked."""


def decode(frames: Sequence[Buffer]) -> Decoded:
    """Decode body frames (header then buffers) into a message.

    Raises ProtocolError on anything malformed: bad msgpack, limits exceeded, unknown kind,
    missing or mistyped fields, a dtype off the allow-list, a buffer whose size does not match
    its dtype and shape, or a buffer frame that is missing, reused or left over.

    A decoded `Ok` of one result may be the same object as an earlier one with the same header:
    like every message, it is read, never changed."""
    if len(frames) == 1 and type(frames[0]) is bytes:  # small frames are received as bytes
        known = _OKS_DECODED.get(frames[0])
        if known is not None:
            return known
        decoded = decode_request(frames)
        ok = decoded.message
        if (
            type(ok) is Ok
            and not ok.more
            # a tensor's description, so a few hundred bytes at most: a peer's 1 MiB shape is not kept
            and len(ok.shape) <= limits.MAX_NDIM
            and (not ok.dtype or ok.dtype in DTYPE_ITEMSIZE)
            and len(_OKS_DECODED) < limits.OK_HEADER_TABLE_SIZE
        ):
            _OKS_DECODED[frames[0]] = decoded
        return decoded
    return decode_request(frames)


def _ref(data: bytes) -> Ref:
    if len(data) != 8:
        raise ProtocolError("bad object reference")
    return Ref(_INT64.unpack(data)[0])


def _tensor_meta(data: bytes) -> tuple[str, list[int], Any]:
    """A tensor extension's [dtype, shape, frame index], checked but for the index."""
    meta = msgpack.unpackb(data, raw=False, max_array_len=limits.MAX_NDIM + 3)
    if not (type(meta) is list and len(meta) == 3 and type(meta[0]) is str and type(meta[1]) is list):
        raise ProtocolError("bad tensor descriptor")
    return meta[0], meta[1], meta[2]


_new_ref = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass's __init__ sets its fields


def _ext_alone(code: int, data: bytes) -> Any:
    """The extension hook of a body of one frame (nearly every request): a reference, or a tensor
    that can only refer to a frame that is not there. A module function, not a closure over the
    body's frames and their used set, which every message would otherwise make."""
    if code == _EXT_REF and len(data) == 8:  # inline, not `_ref`: two references per op, most often
        # made without `Ref.__init__`'s frame (what it does: set the one field), two per op
        ref = _new_ref(Ref)
        _set_field(ref, "obj_id", _INT64.unpack(data)[0])
        return ref
    if code == _EXT_REF:
        raise ProtocolError("bad object reference")
    if code == _EXT_TENSOR:
        _, _, index = _tensor_meta(data)
        raise ProtocolError(f"tensor refers to missing or reused frame {index!r}")
    raise ProtocolError(f"unknown extension type {code}")


def decode_request(frames: Sequence[Buffer]) -> Decoded:
    """`decode` for a request's body: the same checks and errors, without looking it up in (or
    adding it to) the table of decoded `Ok` replies, which no request is found in."""
    n = len(frames)
    if not n:
        raise ProtocolError("empty body")
    if n > limits.MAX_FRAMES:
        raise ProtocolError(f"{n} frames exceed the limit of {limits.MAX_FRAMES}")
    first = frames[0]
    header: bytes | memoryview
    if type(first) is bytes:  # small frames arrive as bytes
        header = first
        size = len(first)
    else:
        header = memoryview(first)
        size = header.nbytes
    if size > limits.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {size} bytes exceeds {limits.MAX_HEADER_BYTES}")
    used: set[int] = set()
    ext_hook: Callable[[int, bytes], Any] = _ext_alone
    if n > 1:

        def ext_hook(code: int, data: bytes) -> Any:
            if code == _EXT_REF:
                return _ref(data)
            if code == _EXT_TENSOR:
                dtype, shape, index = _tensor_meta(data)
                if type(index) is not int or not 1 <= index < n or index in used:
                    raise ProtocolError(f"tensor refers to missing or reused frame {index!r}")
                used.add(index)
                return RawTensor(dtype, tuple(shape), memoryview(frames[index]))
            raise ProtocolError(f"unknown extension type {code}")

    try:
        if size <= _SMALL_HEADER:
            # msgpack bounds every length by the header's own size: as strict as the limits
            # below here, and each keyword unpackb parses costs ~0.1 µs (per request)
            values = msgpack.unpackb(header, raw=False, ext_hook=ext_hook)
        else:
            values = msgpack.unpackb(
                header,
                raw=False,
                ext_hook=ext_hook,
                strict_map_key=True,
                max_str_len=limits.MAX_STR_BYTES,
                max_bin_len=limits.MAX_STR_BYTES,
                max_array_len=limits.MAX_CONTAINER_LEN,
                max_map_len=limits.MAX_CONTAINER_LEN,
                max_ext_len=limits.MAX_EXT_BYTES,
            )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise ProtocolError(f"undecodable header: {type(e).__name__}: {e}") from e
    if type(values) is not list or len(values) < 2 or type(values[0]) is not int or type(values[1]) is not int:
        raise ProtocolError("header must be [kind, budget_ms, fields...]")
    kind = _DECODING.get(values[0])
    if kind is None:
        raise ProtocolError(f"unknown message kind {values[0]}")
    if values[1] < 0:
        raise ProtocolError("negative deadline budget")
    if n > 1 and len(used) != n - 1:  # a body of one frame has no buffer to leave unreferenced
        raise ProtocolError(f"{n - 1 - len(used)} buffer frames are not referenced by the header")
    cls, fields, count, valid = kind
    given = values[2 : 2 + count]  # values past the known fields are ignored
    if len(given) != count or not valid(*given):
        # one by one, to name the bad field; a short `given` leaves the rest to their defaults
        for (name, check, _), v in zip(fields, given, strict=False):
            if not check(v):
                raise ProtocolError(f"{cls.__name__}.{name} has a bad value of type {type(v).__name__}")
        if len(given) < count and fields[len(given)][2]:  # no required field follows an optional one
            raise ProtocolError(f"{cls.__name__} lacks field {fields[len(given)][0]!r}")
    if cls is ObjectsReply:
        given[_ROWS] = [ObjectRow(*r[:8]) for r in given[_ROWS]]
    # tuple.__new__ directly: a named tuple's own __new__ is a Python function (a call per request)
    return _new_tuple(Decoded, (cls(*given), values[1]))
