"""The envelope: how messages become frames, and the one place that builds and parses them.

A message ``[command, name, request_id, *body]`` travels as::

    [PROTOCOL + record, *extra]
    record = command(1) + request_id(8) + len(name)(u16) + len(extra)(u16) + name
             + (len(part)(u32) + part) for each inlined body frame

Its body frames up to `limits.INLINE_FRAME_BYTES` each, from the first up to the first larger
one, are *inlined* in the head frame; the rest (a tensor's big buffer) follow as `extra` frames,
never copied. A small message (a reply, a 4-element op) is then one frame: libzmq handles, and
with CURVE encrypts, every frame as a message of its own, so frames cost each process more than
the bytes (measured in BENCHMARKS.md, "One awaited op, third pass"). A CHUNK inlines nothing
(the direct path seals and reads its info and data frames in place).

A BATCH is one frame of length-prefixed records, followed by the extra frames of its messages in
order::

    [PROTOCOL + BATCH + (len(record)(u32) + record)..., *extras]

``name`` is the destination when a peer sends and the source when the broker delivers; the
broker swaps it and reads nothing past the records (a FANOUT's command aside): it never decodes
a body, and copies only the inlined (small) parts when it re-makes a head.

In memory a message is ``[command, name, request_id, *body]`` (`message`): what batches,
streams, sessions and routing tables hold. `framed` and `pack_batch` make every multipart and
`parse` reads every one (a BATCH becomes its messages, `unfan` a FANOUT its per-destination
messages), so no other module indexes into frames. Every malformed multipart (a truncated or
overlong length, a record too short, a nested batch, extra frames that do not add up, an
inlined part `_record` would not inline, a fanned chunk not of two frames) raises ProtocolError,
nothing else: so the broker, framing a message again, never sends more frames than it received.
Sans-IO: no sockets, no asyncio, no torch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

from fedptr import limits
from fedptr.errors import ProtocolError

PROTOCOL = b"FPTR3"
"""Protocol name and version, the first bytes of every multipart's head frame (version 3: small
body frames inlined in the head, a BATCH as one frame of records; version 2 sent the body as
frames of their own and a BATCH as a frame per part; version 1 the envelope as 4 frames)."""

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
"""Several requests and replies in one multipart: one frame of length-prefixed records, then
the messages' extra frames (see above). The broker splits a batch, routes each message, and
re-batches per destination."""

CHUNK = b"C"
"""A slice of one large buffer frame of the REQUEST or REPLY that follows it: the message
``[CHUNK, name, request_id, info, data]``, framed as ``[head, info, data]``, info = CHUNK_INFO.
The broker routes each chunk as it arrives, so a large tensor streams through it; the message
itself then carries an empty frame where that buffer goes, and the receiver puts the
reassembled buffer there."""

CHUNK_INFO = struct.Struct("<cIQQ")
"""command of the message the chunk belongs to (1 byte), its body frame index (uint32),
the chunk's offset and the buffer's total size in bytes (uint64 each)."""


def abort(name: bytes, rid: bytes, command: bytes = REQUEST) -> list[Any]:
    """The CHUNK by which a sender gives up the stream of its `command` `rid` to peer `name`: frame
    index 0 (a header, never streamed), no bytes of no buffer. Its receiver drops that stream's
    partial buffers and places none of its later chunks (`streams.Reassembly`). Sent only for a
    request the broker refused undelivered and that will not be sent again: its message never
    comes, so no stream a message still needs is dropped (request ids are never reused)."""
    return [CHUNK, name, rid, CHUNK_INFO.pack(command, 0, 0, 0), b""]


SHM_CHUNK = b"M"
"""Inside a sealed message of a direct path only (fedptr/direct.py; never on the broker's path): a
CHUNK whose data frame is a shared-memory descriptor (`fedptr.shm`), not the bytes."""

FANOUT = b"F"
"""peer -> broker: one REQUEST, or one CHUNK of a streamed one, for several peers:
the message ``[FANOUT, targets, NO_REPLY, command, *body]`` (the targets where the name goes),
targets packed by `pack_targets` as (name, request id) pairs. The broker delivers
``[command, source, rid, *body]`` to each target, exactly as if each had been sent its own
message with its own request id (same checks, same errors, the same body frames never copied),
so the sender uploads the body once and each destination answers its own request id."""

FANOUT_COMMANDS = frozenset({REQUEST, CHUNK})
"""What a FANOUT may carry: requests and their chunks (REQUEST, CHUNK), never replies."""

STATS = b"S"
"""peer -> broker: the broker's counters; the answer's body is ``name=value`` frames
(table sizes, messages routed and dropped), for operators and leak tests."""

STATS_PEER_PREFIX = "peer."
"""STATS frames about one registered peer read ``peer.NAME.FIELD=INT``, FIELD one of ``worker``
(1 or 0), ``heard_ms`` (since the broker last heard from it), ``pending`` (requests delivered to
it and not yet answered), ``refused`` (messages refused: its queue was full), ``delivered``."""

ACKS = b"K"
"""Several successful replies in one record, a node's to one peer: the message ``[ACKS, name,
rid, count, body]`` (count: `ACKS_COUNT`) stands for `count` REPLYs, each with `body`, to
request `rid` and to the `count - 1` its session issued after it (`acked`). A link merges a
REPLY carrying an op's `Ok` into the REPLY or ACKS just before it in its open batch when it goes
to the same peer, answers the id after the last one there and has the same body: so an ACKS
says exactly what those replies said, in their order, in the multipart they would have left in.
The broker relays it as a reply and counts it as `count`."""
ACKS_COUNT = struct.Struct("<I")

COMMANDS = frozenset(
    {
        REGISTER,
        ACCEPTED,
        REQUEST,
        REPLY,
        ACKS,
        LIST,
        BROKER_ERROR,
        DISCONNECT,
        HEARTBEAT,
        LOST,
        BATCH,
        CHUNK,
        FANOUT,
        STATS,
    }
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
"""Index of a message's second body frame (``[command, name, request_id, *body]``): where the
buffers a message may carry after its msgpack frame begin (one more than the fields before it)."""

REQUEST_ID_BYTES = 8

_COMMAND_AT = len(PROTOCOL)
_RID_AT = _COMMAND_AT + 1
_RECORD = struct.Struct("<c8sHH")
"""A record's fixed fields: command, request id, the name's length, the count of extra frames."""
_LEN = struct.Struct("<I")
_RID = struct.Struct("<Q")
RID_PARTS = struct.Struct("<II")
"""A request id as a session makes it: its counter and its incarnation."""
_NOT_INLINED = frozenset({CHUNK, SHM_CHUNK})
"""Commands whose body frames all stay frames of their own (see the module's docstring)."""


def request_id_bytes(n: int) -> bytes:
    """The 8-byte envelope form of request number `n`."""
    return _RID.pack(n)


def acked(rid: bytes, count: bytes) -> list[bytes]:
    """The request ids an ACKS from `rid` with `count` (its first body part) answers, in order:
    `rid`, then the ids its session issued after it (``[counter, incarnation]``, the counter
    modulo 2**32). Raises ProtocolError for a count that is not 1..`limits.ACKS_MAX_REPLIES`."""
    (n,) = ACKS_COUNT.unpack(count) if len(count) == ACKS_COUNT.size else (0,)
    if not 0 < n <= limits.ACKS_MAX_REPLIES or len(rid) != REQUEST_ID_BYTES:
        raise ProtocolError(f"an ACKS of {n} replies from a request id of {len(rid)} bytes")
    counter, incarnation = RID_PARTS.unpack(rid)
    return [RID_PARTS.pack((counter + i) & 0xFFFFFFFF, incarnation) for i in range(n)]


def merged(tail: Sequence[Any], message: Sequence[Any]) -> list[Any] | None:
    """The ACKS that stands for record `tail` (a REPLY with one body part, or an ACKS) and REPLY
    `message` after it, or None when they do not merge: another peer, another body, or
    `message` does not answer the request after the last one `tail` answers."""
    command = tail[0]
    if command == REPLY and len(tail) == ENVELOPE_FRAMES:
        n = 1
    elif command == ACKS:
        (n,) = ACKS_COUNT.unpack(tail[3])
    else:
        return None
    body = message[3]
    if tail[-1] != body or tail[1] != message[1] or n >= limits.ACKS_MAX_REPLIES or len(message) != ENVELOPE_FRAMES:
        return None
    first = tail[2]
    counter, incarnation = RID_PARTS.unpack(first)
    if message[2] != RID_PARTS.pack((counter + n) & 0xFFFFFFFF, incarnation):
        return None
    return [ACKS, tail[1], first, ACKS_COUNT.pack(n + 1), body]


def request_after(a: bytes, b: bytes) -> bool:
    """Whether request id `a` was issued after `b` by one session: a session's ids are
    ``[counter, incarnation]`` (uint32 each, little-endian; fedptr/session.py), the counter
    modulo 2**32. Ids of another incarnation, or not of that form, count as after."""
    if len(a) != 8 or len(b) != 8 or a[4:] != b[4:]:
        return True
    ahead = (int.from_bytes(a[:4], "little") - int.from_bytes(b[:4], "little")) & 0xFFFFFFFF
    return 0 < ahead < 0x80000000


def ascending(rids: Sequence[bytes]) -> bool:
    """Whether each of `rids` was issued after the one before it (`request_after`), checked in
    C, not per id: all of one incarnation, their counters strictly increasing and spanning less
    than half the counter's range (so no step wraps around). False also when unsure."""
    joined = b"".join(rids)
    if not rids or len(joined) != REQUEST_ID_BYTES * len(rids):
        return False
    words = struct.unpack(f"<{2 * len(rids)}I", joined)
    counters, incarnations = list(words[0::2]), words[1::2]
    return (
        incarnations.count(incarnations[0]) == len(rids)
        and counters == sorted(set(counters))
        and counters[-1] - counters[0] < 0x80000000
    )


def request_id_int(b: bytes) -> int:
    """The number of an 8-byte request id; raises ProtocolError when it is not 8 bytes."""
    if len(b) != REQUEST_ID_BYTES:
        raise ProtocolError(f"request id must be {REQUEST_ID_BYTES} bytes, got {len(b)}")
    return int(_RID.unpack(b)[0])


def _record(m: Sequence[Any], extra: list[Any]) -> bytes:
    """Message `m`'s record; its extra frames (not inlined) are appended to `extra`."""
    command, name, n = m[0], m[1], len(m)
    k = 3  # m[3:k] are inlined
    if command not in _NOT_INLINED:
        while k < n and (m[k].nbytes if type(m[k]) is memoryview else len(m[k])) <= limits.INLINE_FRAME_BYTES:
            k += 1
    if len(name) > 0xFFFF or n - k > 0xFFFF:
        raise ProtocolError("a message's name or extra frames exceed the envelope's bounds")
    pieces = [_RECORD.pack(command, m[2], len(name), n - k), name]
    for i in range(3, k):
        f = m[i]
        pieces.append(_LEN.pack(f.nbytes if type(f) is memoryview else len(f)))
        pieces.append(f)
    if k < n:
        extra.extend(m[k:])
    return b"".join(pieces)


def framed(message: Sequence[Any]) -> list[Any]:
    """The frames that carry `message` (``[command, name, rid, *body]``)."""
    extra: list[Any] = []
    head = PROTOCOL + _record(message, extra)
    return [head, *extra] if extra else [head]


def pack_batch(messages: Sequence[Sequence[Any]]) -> list[Any]:
    """The frames of a BATCH holding `messages` (each ``[command, name, request_id, *body]``)."""
    pieces: list[bytes] = [PROTOCOL, BATCH]
    extra: list[Any] = []
    pack = _LEN.pack
    for m in messages:
        record = _record(m, extra)
        pieces.append(pack(len(record)))
        pieces.append(record)
    return [b"".join(pieces), *extra]


_new_tuple = tuple.__new__


def valid_name(name: bytes) -> bool:
    """Whether `name` may be registered: 1..MAX_NAME_BYTES of ASCII letters, digits, ``-_.``."""
    return 0 < len(name) <= limits.MAX_NAME_BYTES and all(
        c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_." for c in name
    )


class Envelope(NamedTuple):
    """One message off the wire: `command`, `name` (the source, as the broker delivers it, or the
    name a broker notice concerns), `rid` and the body frames. A named tuple: one is built for
    every message received, and a frozen dataclass takes twice as long to build."""

    command: bytes
    name: bytes
    rid: bytes
    body: list[Any]


def build(command: bytes, name: bytes, rid: bytes, *body: Any) -> list[Any]:
    """The frames of one message, ready for a socket."""
    return framed([command, name, rid, *body])


def message(command: bytes, name: bytes, rid: bytes, body: Sequence[Any] = ()) -> list[Any]:
    """One message in memory (``[command, name, rid, *body]``): the unit that batches, streams
    and routing tables hold; `framed` turns it into frames."""
    return [command, name, rid, *body]


def command_of(frames: Sequence[Any]) -> bytes:
    """The command of a received multipart (BATCH for a batch), read from its head frame; b""
    when it has no fedptr head."""
    h = frames[0] if frames else b""
    if type(h) is not bytes:
        h = memoryview(h)
    return bytes(h[_COMMAND_AT:_RID_AT]) if len(h) > _COMMAND_AT and h[:_COMMAND_AT] == PROTOCOL else b""


def with_command(frames: Sequence[Any], command: bytes) -> list[Any]:
    """A single message's frames with its command replaced: the head re-made, the body frames
    the same objects (the direct path marks a chunk whose data is a shared-memory descriptor)."""
    h = bytes(frames[0])
    return [h[:_COMMAND_AT] + command + h[_RID_AT:], *frames[1:]]


def count(frames: Sequence[Any]) -> int:
    """How many messages a received multipart holds (a BATCH's records), unchecked: for counters."""
    if command_of(frames) != BATCH:
        return 1
    h = frames[0]
    n, at, end = 0, _RID_AT, len(h)
    while at + 4 <= end:
        at += 4 + _LEN.unpack_from(h, at)[0]
        n += 1
    return n


def parse(frames: Sequence[Any]) -> list[Envelope]:
    """The messages in one received multipart: one, or a BATCH's. Raises ProtocolError for
    anything that is not a well-formed fedptr envelope, and nothing else.

    One loop over the records, each read in place (no call per message: a BATCH holds up to a
    hundred requests, and this runs for each). A single message's record is read as if it had a
    length prefix (the bytes before its command), whose value is not used: it ends where the
    head ends."""
    h = frames[0] if frames else b""
    if type(h) is not bytes:
        h = bytes(h)
    end = len(h)
    if end <= _COMMAND_AT or h[:_COMMAND_AT] != PROTOCOL:
        raise ProtocolError("not a fedptr envelope")
    batch = h[_COMMAND_AT:_RID_AT] == BATCH
    at, fi, n_frames = (_RID_AT if batch else _COMMAND_AT - 4), 1, len(frames)
    record, unpack_len = _RECORD.unpack_from, _LEN.unpack_from
    out: list[Envelope] = []
    while at < end:
        if batch:
            if len(out) == limits.BATCH_MAX_RECEIVED:
                raise ProtocolError(f"a batch of more than {limits.BATCH_MAX_RECEIVED} messages")
            if at + 4 > end:
                raise ProtocolError("a truncated length prefix")
            stop = at + 4 + unpack_len(h, at)[0]
            if stop > end:
                raise ProtocolError("a record's length past the batch's end")
        else:
            stop = end
        # the record h[at + 4 : stop]: its fixed fields, its name, its inlined parts
        fixed = at + 4 + _RECORD.size
        if fixed > stop:
            raise ProtocolError("a record too short for its fields")
        command, rid, name_len, n_extra = record(h, at + 4)
        if command == BATCH:
            raise ProtocolError("a batch inside a batch")
        p = fixed + name_len
        if p > stop:
            raise ProtocolError("a name past its record's end")
        if fi + n_extra > n_frames:
            raise ProtocolError("a record counts more extra frames than the multipart holds")
        # inlined parts are what `_record` inlines, and nothing else: a part over the bound, or any
        # in a chunk, would be framed again by the broker as a frame of its own per destination (a
        # peer's one frame of 5,000 empty parts became 5,000 frames to send, per fan-out target)
        most = 0 if command in _NOT_INLINED else limits.INLINE_FRAME_BYTES
        body: list[Any] = []
        while p < stop:
            q = p + 4
            if q > stop:
                raise ProtocolError("a truncated length prefix")
            (n,) = unpack_len(h, p)
            if n > most:
                raise ProtocolError(f"an inlined part of {n} bytes where at most {most} may be inlined")
            p = q + n
            if p > stop:
                raise ProtocolError("a length past its record's end")
            body.append(h[q:p])
        if n_extra:
            body.extend(frames[fi : fi + n_extra])
            fi += n_extra
        # built with `tuple.__new__`: the named tuple's own `__new__` is a Python call per message
        out.append(_new_tuple(Envelope, (command, h[fixed : fixed + name_len], rid, body)))
        at = stop
    if fi != n_frames:
        raise ProtocolError(
            "a batch of no messages, or its extra frames do not match its records"
            if batch
            else "a message's extra frames do not match its record"
        )
    if not out:
        raise ProtocolError("a batch of no messages, or its extra frames do not match its records")
    return out


class Relayed(NamedTuple):
    """What `relay` gives the broker per destination: the frames to send it, and what its
    tables need to know about them, no message taken apart."""

    name: bytes
    """The destination's name (the records' `name`)."""
    frames: list[Any]
    """The messages for it, each named for the source: one message framed, several a BATCH."""
    requests: list[bytes]
    """The request ids of its REQUESTs, in order."""
    replies: int
    """How many of its messages are REPLYs."""
    messages: int
    """How many messages it holds."""


_RELAYED = frozenset({REQUEST, REPLY, ACKS, CHUNK})
_PREFIXED = struct.Struct("<Ic8sHH")
"""A batch record's length prefix, then its fixed fields (`_RECORD`): how `relay` reads a record
and writes it again."""
_unpack_prefixed, _pack_prefixed, _unpack_len = _PREFIXED.unpack_from, _PREFIXED.pack, _LEN.unpack_from
_NAME_AT = _LEN.size + _RECORD.size
"""Offset of a record's name from its length prefix (17: the command is at 4, the request id
at 5 to 13, the name length and the count of extra frames at 13 to 17)."""


def relay(frames: Sequence[Any], source: bytes) -> list[Relayed] | None:
    """The broker's fast path for what it relays most: a message or BATCH of requests, replies
    and chunks, read and named for `source` in one pass over its head, per destination in the
    order each first appears. Each record is copied with its name replaced, bytes sliced from
    the received head (no message, no body list built); extra frames pass on as the same objects.

    Returns None, having built nothing the caller sees, for anything else: a record of another
    command (a FANOUT, a REGISTER, ...) or any multipart `parse` refuses (the broker then takes
    the general path, which parses it, so a malformed one raises there). Where it returns, what
    it delivers parses to the messages `parse` and `framed`/`pack_batch` would have delivered,
    byte for byte so when the sender framed them with `framed` or `pack_batch`, and never in more
    frames than were received (tests/test_envelope_relay.py holds it to both)."""
    h = frames[0] if frames else b""
    end = len(h)
    if type(h) is not bytes or end <= _COMMAND_AT or h[:_COMMAND_AT] != PROTOCOL:
        return None
    batch = h[_COMMAND_AT:_RID_AT] == BATCH
    # a single message's record is read as if it had a length prefix (the bytes before its
    # command), whose value is not used: it ends where the head ends
    at = _RID_AT if batch else _COMMAND_AT - 4
    unpack, pack, unpack_len, inline = _unpack_prefixed, _pack_prefixed, _unpack_len, limits.INLINE_FRAME_BYTES
    source_len = len(source)
    own = _NAME_AT - 4 + source_len  # a relayed record's length less its inlined parts
    nframes, fi = len(frames), 1
    groups: dict[bytes, list[Any]] = {}  # dest -> pieces, extras, request ids, records that are not replies
    name: bytes | None = None
    pieces: list[bytes] = []
    group: list[Any] = []
    while at < end:
        if at + _NAME_AT > end:
            return None
        length, command, rid, name_len, n_extra = unpack(h, at)
        stop = at + 4 + length if batch else end
        p = at + _NAME_AT + name_len
        if p > stop or stop > end or command not in _RELAYED:
            return None
        most = 0 if command == CHUNK else inline
        q = p
        while q < stop:  # the inlined parts: each within its bound, and ending where the record ends
            if q + 4 > stop:
                return None
            k = unpack_len(h, q)[0]
            if k > most:
                return None
            q += 4 + k
        if q != stop:
            return None
        dest = h[at + _NAME_AT : p]
        if dest != name:
            name = dest
            group = groups.get(dest) or groups.setdefault(dest, [[], [], [], 0])
            pieces = group[0]
        if n_extra:
            if fi + n_extra > nframes:
                return None
            group[1].extend(frames[fi : fi + n_extra])
            fi += n_extra
        pieces += (pack(own + stop - p, command, rid, source_len, n_extra), source, h[p:stop])
        if command == REQUEST:
            group[2].append(rid)
        elif command == CHUNK:
            group[3] += 1
        elif command == ACKS:  # `n` replies in one record: the replies counted below are the records less these
            n = _acks_count(h, p, stop)
            if n is None:
                return None
            group[3] -= n - 1
        at = stop
    if fi != nframes:
        return None
    out: list[Relayed] = []
    total = 0
    for dest, (pieces, extra, requests, chunks) in groups.items():
        count = len(pieces) // 3
        total += count
        # one message is framed alone: its record without the length prefix
        head = PROTOCOL + BATCH + b"".join(pieces) if count > 1 else PROTOCOL + pieces[0][4:] + source + pieces[2]
        out.append(Relayed(dest, [head, *extra], requests, count - len(requests) - chunks, count))
    # counted here, not per record: a batch has no more records than its head has 17-byte
    # fixed parts, and the general path refuses such a batch all the same
    if total == 0 or total > limits.BATCH_MAX_RECEIVED:
        return None
    return out


def _acks_count(h: bytes, p: int, stop: int) -> int | None:
    """The count of the ACKS whose inlined parts are ``h[p:stop]`` (checked: each within the
    record), or None when its first part is not a count of 1..`limits.ACKS_MAX_REPLIES`."""
    if p + 4 + ACKS_COUNT.size > stop or _LEN.unpack_from(h, p)[0] != ACKS_COUNT.size:
        return None
    (n,) = ACKS_COUNT.unpack_from(h, p + 4)
    return n if 0 < n <= limits.ACKS_MAX_REPLIES else None


def replies_in(message: Sequence[Any]) -> int:
    """How many replies `message` (``[command, name, rid, *body]``) stands for: 1 for a REPLY,
    an ACKS's count (1 when it is malformed: its receiver refuses it as one), else 0."""
    command = message[0]
    if command == REPLY:
        return 1
    if command != ACKS:
        return 0
    count = bytes(message[3]) if len(message) > 3 else b""
    (n,) = ACKS_COUNT.unpack(count) if len(count) == ACKS_COUNT.size else (1,)
    return n if 0 < n <= limits.ACKS_MAX_REPLIES else 1


def unframed(frames: Sequence[Any]) -> list[Any]:
    """A single message's frames back in memory form (``[command, name, rid, *body]``), for the
    few places that read a chunk before its session does. Raises like `parse`; a BATCH is
    refused."""
    envs = parse(frames)
    if command_of(frames) == BATCH or len(envs) != 1:
        raise ProtocolError("a batch where one message was expected")
    env = envs[0]
    return message(env.command, env.name, env.rid, env.body)


def pack_targets(targets: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The targets frame of a FANOUT: per (name, request id), the name's length (1 byte), the
    name and the 8-byte request id."""
    return b"".join(bytes((len(name),)) + name + rid for name, rid in targets)


def fanout(targets: bytes, inner: Sequence[Any]) -> list[Any]:
    """The FANOUT that delivers `inner` (``[command, name, rid, *body]``, a REQUEST or a CHUNK
    whose own name and request id are not sent) to each of `targets` (`pack_targets`)."""
    return message(FANOUT, targets, NO_REPLY, [inner[0], *inner[ENVELOPE_FRAMES - 1 :]])


def fanned(fan: Sequence[Any]) -> tuple[bytes, list[Any]]:
    """A FANOUT message built by `fanout`, taken apart: its targets frame, and the message it
    carries with an empty name and NO_REPLY as request id (for `fedptr.streams.split`)."""
    return bytes(fan[1]), message(fan[ENVELOPE_FRAMES - 1], b"", NO_REPLY, fan[ENVELOPE_FRAMES:])


def unfan(env: Envelope, max_width: int = limits.FANOUT_MAX_WIDTH) -> list[Envelope]:
    """The messages a received FANOUT stands for, one per target, named for their destination
    and sharing the body frames. Raises ProtocolError when it carries no REQUEST or CHUNK (or a
    CHUNK not of two frames), or its targets are not 1..`max_width` distinct valid names, each
    with an 8-byte request id."""
    if not env.body or len(env.body[0]) != 1 or bytes(env.body[0]) not in FANOUT_COMMANDS:
        raise ProtocolError("a fan-out carries a request or a chunk")
    command, body = bytes(env.body[0]), env.body[1:]
    if command == CHUNK and len(body) != 2:  # the fan-out's inlined parts would each be a frame of the chunk's
        raise ProtocolError("a chunk has an info frame and a data frame")
    targets, names = env.name, set()
    out: list[Envelope] = []
    i = 0
    while i < len(targets):
        if len(out) == max_width:
            raise ProtocolError(f"a fan-out names more than {max_width} destinations")
        end = i + 1 + targets[i]
        name, rid = targets[i + 1 : end], targets[end : end + REQUEST_ID_BYTES]
        if len(rid) != REQUEST_ID_BYTES or not valid_name(name) or name in names:
            raise ProtocolError("a fan-out's targets are malformed or repeat a name")
        names.add(name)
        out.append(Envelope(command, name, rid, body))
        i = end + REQUEST_ID_BYTES
    if not out:
        raise ProtocolError("a fan-out names no destination")
    return out
