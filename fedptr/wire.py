"""The fedptr wire protocol, sans-IO: frame layout, message types, encode and decode.

This module imports no sockets, no asyncio and no torch; tests feed it bytes. The broker imports
it for the envelope constants alone, so it must stay light.

A message on a socket is a list of frames::

    [PROTOCOL, command, name, request_id, header, buffer_0, buffer_1, ...]
     `---------- envelope (broker reads) --' `------- body (broker never reads) -------'

* ``PROTOCOL`` names the protocol and its version (``b"FPTR1"``).
* ``command`` is one byte: register, request, reply, list, broker error, disconnect.
* ``name`` is the destination when a peer sends and the source when the broker delivers: the
  broker swaps it, and nothing else, as it routes.
* ``request_id`` is 8 opaque bytes chosen by the requester and echoed in the reply.
* ``header`` is msgpack: ``[kind, budget_ms, field_0, field_1, ...]``. Fields are appended with
  defaults as the schema grows; a decoder ignores fields it does not know.
* Tensors travel as raw buffers in their own frames, never inside the header. The header holds
  an extension value ``(dtype, shape, frame index)`` for each; decoding checks the dtype against an
  allow-list and ``numel * itemsize == len(buffer)``. Buffers are passed through as memoryviews,
  so a 64 MiB tensor is never copied by the codec.
"""

from __future__ import annotations

import array
import dataclasses
import math
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import msgpack

from fedptr import limits
from fedptr.errors import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # bytes, memoryview, zmq.Frame, numpy arrays

PROTOCOL = b"FPTR1"
"""Protocol name and version, the first frame of every message."""

# --- envelope commands (one byte each) ---------------------------------------------------
REGISTER = b"R"
"""peer -> broker: claim `name`; body ``[role]``. Answered with ACCEPTED or BROKER_ERROR."""
ACCEPTED = b"A"
"""broker -> peer: registration accepted."""
REQUEST = b"Q"
"""A request, relayed by the broker to the peer named in the envelope."""
REPLY = b"P"
"""A reply, relayed like a request; `request_id` is the request's."""
LIST = b"L"
"""peer -> broker: list registered workers; the answer's body is one frame per name."""
BROKER_ERROR = b"E"
"""broker -> peer: the broker could not do what the message asked; body ``[reason, text]``."""
DISCONNECT = b"D"
"""peer -> broker: the peer is leaving; the broker forgets its name."""
HEARTBEAT = b"H"
"""Either way: "I am alive", sent when nothing else was sent for a heartbeat interval. Any
message counts as a beat; a peer silent for `liveness` intervals is taken for dead."""
LOST = b"X"
"""broker -> every peer: the peer `name` is gone; body ``[role, why]``, why one of GONE_*.
Requests waiting on it fail with LostWorkerError; a client whose session ended (it said goodbye
or its connection closed) has its objects reclaimed by the workers."""
GONE_DISCONNECTED = b"disconnected"
GONE_CLOSED = b"closed"
GONE_SILENT = b"silent"
"""Its heartbeats stopped: it may be paused and come back, so its objects are kept."""

BATCH = b"B"
"""Several requests and replies in one multipart: ``[PROTOCOL, BATCH, counts, *messages]``
where each message is ``[command, name, request_id, *body]`` and `counts` holds each one's
frame count (little-endian uint16). The broker splits a batch, routes each message, and
re-batches per destination."""

CHUNK = b"C"
"""A slice of one large buffer frame of the REQUEST or REPLY that follows it:
``[PROTOCOL, CHUNK, name, request_id, info, data]``, info = CHUNK_INFO. The broker routes each
chunk as it arrives, so a large tensor streams through it; the message itself then carries an
empty frame where that buffer goes, and the receiver puts the reassembled buffer there."""

CHUNK_INFO = struct.Struct("<cIQQ")
"""command of the message the chunk belongs to (1 byte), its body frame index (uint32),
the chunk's offset and the buffer's total size in bytes (uint64 each)."""

STATS = b"S"
"""peer -> broker: the broker's counters; the answer's body is ``name=value`` frames
(table sizes, messages routed and dropped), for operators and leak tests."""

COMMANDS = frozenset(
    {REGISTER, ACCEPTED, REQUEST, REPLY, LIST, BROKER_ERROR, DISCONNECT, HEARTBEAT, LOST, BATCH, CHUNK, STATS}
)

ROLE_WORKER = b"worker"
ROLE_CLIENT = b"client"
ROLES = frozenset({ROLE_WORKER, ROLE_CLIENT})

# Reasons in a BROKER_ERROR body.
REASON_UNKNOWN_NAME = b"unknown-name"
REASON_NAME_TAKEN = b"name-taken"
REASON_NOT_REGISTERED = b"not-registered"
REASON_BAD_NAME = b"bad-name"
REASON_FULL = b"full"
REASON_OVERLOADED = b"overloaded"
REASON_FORBIDDEN = b"forbidden"
REASON_LOST = b"lost"

NO_REPLY = b"\0" * 8
"""Request id of messages that expect no answer (Delete notices, heartbeats, broker notices)."""

ENVELOPE_FRAMES = 4
"""Frames before the body: protocol, command, name, request id."""

REQUEST_ID_BYTES = 8

_RID = struct.Struct("<Q")


def request_id_bytes(n: int) -> bytes:
    """The 8-byte envelope form of request number `n`."""
    return _RID.pack(n)


def request_id_int(b: bytes) -> int:
    """The number of an 8-byte request id; raises ProtocolError when it is not 8 bytes."""
    if len(b) != REQUEST_ID_BYTES:
        raise ProtocolError(f"request id must be {REQUEST_ID_BYTES} bytes, got {len(b)}")
    return int(_RID.unpack(b)[0])


def pack_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """The frames of a BATCH holding `messages` (each ``[command, name, request_id, *body]``)."""
    counts = array.array("H", [len(m) for m in messages])
    if sys.byteorder != "little":
        counts.byteswap()
    frames: list[Any] = [PROTOCOL, BATCH, counts.tobytes()]
    for m in messages:
        frames.extend(m)
    return frames


def unpack_batch(counts: bytes, frames: Sequence[Any]) -> list[list[Any]]:
    """Split the frames after a BATCH's counts frame into messages; raises ProtocolError when the
    counts do not describe the frames exactly or a message has fewer than 3 frames."""
    if len(counts) % 2:
        raise ProtocolError("batch counts must be uint16s")
    sizes = array.array("H")
    sizes.frombytes(counts)
    if sys.byteorder != "little":
        sizes.byteswap()
    if sum(sizes) != len(frames) or any(n < ENVELOPE_FRAMES - 1 for n in sizes):
        raise ProtocolError("batch counts do not match its frames")
    out: list[list[Any]] = []
    i = 0
    for n in sizes:
        out.append(list(frames[i : i + n]))
        i += n
    return out


def valid_name(name: bytes) -> bool:
    """Whether `name` may be registered: 1..MAX_NAME_BYTES of ASCII letters, digits, ``-_.``."""
    return 0 < len(name) <= limits.MAX_NAME_BYTES and all(
        c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_." for c in name
    )


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

Value: TypeAlias = bool | int | float | str | RawTensor | Ref | list["Value"] | dict[str, "Value"] | None
"""What an operation argument may be: plain scalars, strings, lists, str-keyed maps,
references to stored objects and inline tensors. Tuples encode as lists."""


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
    """Run allow-listed operation `op` on `args`/`kwargs` and store the result as `result_id`.

    When the referenced objects are pointers to another worker, the receiver forwards the
    operation there and stores a pointer to the result. Reply: Ok (with the result's shape and
    dtype where it was computed) or Failure."""

    KIND: ClassVar[int] = 3
    result_id: int
    op: str
    args: list[Value]
    kwargs: dict[str, Value]


@dataclass(frozen=True, slots=True)
class Get(Message):
    """Hand object `obj_id` to the caller and remove it from the store. Reply: TensorReply or
    PointerReply (a stored pointer is handed over, not followed)."""

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
class Ok(Message):
    """Success. For a computed tensor, its shape and dtype."""

    KIND: ClassVar[int] = 20
    shape: list[int] = dataclasses.field(default_factory=list)
    dtype: str = ""


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


FAILURE_CODES = frozenset({"remote", "unknown-worker", "lost-worker", "timeout", "overloaded", "protocol", "denied"})


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
    """For ``"denied"``: the data owner whose privacy policy refused the request."""


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


@dataclass(frozen=True, slots=True)
class SearchReply(Message):
    """Ids of the data objects under a tag, in the order they were loaded."""

    KIND: ClassVar[int] = 26
    ids: list[int]


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
)
_BY_KIND: dict[int, type[Message]] = {t.KIND: t for t in MESSAGE_TYPES}
assert len(_BY_KIND) == len(MESSAGE_TYPES), "message kinds must be unique"


# --- field checks ------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return type(v) is int


def _check_value(v: Any, depth: int = 0) -> bool:
    if depth > 16:
        return False
    if v is None or type(v) in (bool, int, float, str, RawTensor, Ref):
        return True
    if type(v) is list:
        return all(_check_value(x, depth + 1) for x in v)
    if type(v) is dict:
        return all(type(k) is str and _check_value(x, depth + 1) for k, x in v.items())
    return False


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
    )


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "int": _is_int,
    "bool": lambda v: type(v) is bool,
    "str": lambda v: type(v) is str,
    "RawTensor": lambda v: type(v) is RawTensor,
    "list[int]": lambda v: type(v) is list and all(_is_int(x) for x in v),
    "list[str]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "list[Value]": lambda v: type(v) is list and _check_value(v),
    "dict[str, Value]": lambda v: type(v) is dict and _check_value(v),
    "list[ObjectRow]": lambda v: type(v) is list and all(_check_row(r) for r in v),
}

_FIELDS: dict[type[Message], tuple[tuple[str, Callable[[Any], bool], bool], ...]] = {
    t: tuple(
        (f.name, _CHECKS[str(f.type)], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(t)
    )
    for t in MESSAGE_TYPES
}


# --- encode ------------------------------------------------------------------------------
def _to_plain(v: Any) -> Any:
    if type(v) is ObjectRow:
        return [v.obj_id, v.kind, v.shape, v.dtype, v.preview, v.location, v.id_at_location]
    if type(v) is list and v and type(v[0]) is ObjectRow:
        return [_to_plain(r) for r in v]
    return v


def encode(msg: Message, budget_ms: int = 0) -> list[bytes | memoryview]:
    """Encode `msg` as body frames: the msgpack header, then one frame per tensor.

    `budget_ms` is the time the receiver has to answer (0 for replies and no deadline). Tensor
    buffers are returned as they are (no copy)."""
    buffers: list[memoryview] = []

    def default(obj: Any) -> Any:
        if type(obj) is RawTensor:
            buffers.append(obj.data)
            meta = msgpack.packb([obj.dtype, list(obj.shape), len(buffers)])
            return msgpack.ExtType(_EXT_TENSOR, meta)
        if type(obj) is Ref:
            return msgpack.ExtType(_EXT_REF, _INT64.pack(obj.obj_id))
        if type(obj) is tuple:
            return list(obj)
        raise ProtocolError(f"cannot encode a value of type {type(obj).__name__}")

    values = [msg.KIND, budget_ms]
    values.extend(_to_plain(getattr(msg, name)) for name, _, _ in _FIELDS[type(msg)])
    try:
        header = msgpack.packb(values, default=default, strict_types=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from e
    if len(header) > limits.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {limits.MAX_HEADER_BYTES}")
    return [header, *buffers]


# --- decode ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded body: the message and the deadline budget its sender gave (ms, 0 = none)."""

    message: Message
    budget_ms: int


def decode(frames: Sequence[Buffer]) -> Decoded:
    """Decode body frames (header then buffers) into a message.

    Raises ProtocolError on anything malformed: bad msgpack, limits exceeded, unknown kind,
    missing or mistyped fields, a dtype off the allow-list, a buffer whose size does not match
    its dtype and shape, or a buffer frame that is missing, reused or left over."""
    if not frames:
        raise ProtocolError("empty body")
    if len(frames) > limits.MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames exceed the limit of {limits.MAX_FRAMES}")
    header = memoryview(frames[0])
    if header.nbytes > limits.MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header.nbytes} bytes exceeds {limits.MAX_HEADER_BYTES}")
    used: set[int] = set()

    def ext_hook(code: int, data: bytes) -> Any:
        if code == _EXT_REF:
            if len(data) != 8:
                raise ProtocolError("bad object reference")
            return Ref(int(_INT64.unpack(data)[0]))
        if code == _EXT_TENSOR:
            meta = msgpack.unpackb(data, raw=False, max_array_len=limits.MAX_NDIM + 3)
            if not (type(meta) is list and len(meta) == 3 and type(meta[0]) is str and type(meta[1]) is list):
                raise ProtocolError("bad tensor descriptor")
            index = meta[2]
            if type(index) is not int or not 1 <= index < len(frames) or index in used:
                raise ProtocolError(f"tensor refers to missing or reused frame {index!r}")
            used.add(index)
            return RawTensor(meta[0], tuple(meta[1]), memoryview(frames[index]))
        raise ProtocolError(f"unknown extension type {code}")

    try:
        values = msgpack.unpackb(
            header,
            raw=False,
            ext_hook=ext_hook,
            strict_map_key=True,
            max_str_len=limits.MAX_STR_BYTES,
            max_bin_len=limits.MAX_STR_BYTES,
            max_array_len=limits.MAX_CONTAINER_LEN,
            max_map_len=limits.MAX_CONTAINER_LEN,
            max_ext_len=4096,
        )
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, FormatError, ...)
        raise ProtocolError(f"undecodable header: {type(e).__name__}: {e}") from e
    if type(values) is not list or len(values) < 2 or not _is_int(values[0]) or not _is_int(values[1]):
        raise ProtocolError("header must be [kind, budget_ms, fields...]")
    cls = _BY_KIND.get(values[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind {values[0]}")
    if values[1] < 0:
        raise ProtocolError("negative deadline budget")
    if len(used) != len(frames) - 1:
        raise ProtocolError(f"{len(frames) - 1 - len(used)} buffer frames are not referenced by the header")
    kwargs: dict[str, Any] = {}
    for i, (name, check, required) in enumerate(_FIELDS[cls]):
        if 2 + i >= len(values):
            if required:
                raise ProtocolError(f"{cls.__name__} lacks field {name!r}")
            break
        v = values[2 + i]
        if not check(v):
            raise ProtocolError(f"{cls.__name__}.{name} has a bad value of type {type(v).__name__}")
        kwargs[name] = v
    if cls is ObjectsReply:
        kwargs["rows"] = [ObjectRow(*r[:7]) for r in kwargs["rows"]]
    return Decoded(cls(**kwargs), values[1])
