"""Streaming of large buffer frames as chunks, and their reassembly at the receiver (no sockets).

A message whose body holds a buffer larger than `limits.STREAM_THRESHOLD_BYTES` is sent as
chunk messages (zero-copy slices of the buffer) followed by the message with an empty frame in
the buffer's place. The receiver copies each chunk into one preallocated buffer as it arrives,
so neither the broker nor the receiver ever holds the whole buffer twice, and the broker
forwards chunks while later ones are still arriving.

The bytes of streams in progress are bounded for all peers together and for each peer: a peer
that announces huge buffers exhausts its own budget only, and hears why when its message ends.

A stream's chunks need not travel the path of its message: all but the first may come over the
direct data path (`fedptr.direct`) while the message follows its first chunk through the broker.
Such a chunk may be a `Filler` (a shared-memory file on the same host), placed once the budgets
allow (read into the buffer, never mapped). `waiting` tells the session that
a message's chunks are still under way (it then holds that message, and the sender's later ones,
until they are in: `Session` keeps the broker's order). A sender whose request the broker refused
undelivered, not to be sent again, gives its stream up (`envelope.abort`, over the same direct
path): its chunks there go at once, not after `limits.STREAM_TIMEOUT_S`, and later ones are not
placed.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedptr import envelope, limits
from fedptr.errors import ProtocolError


def split(
    message: list[Any],
    threshold: int = limits.STREAM_THRESHOLD_BYTES,
    chunk: int = limits.STREAM_CHUNK_BYTES,
    first: int = 0,
) -> list[list[Any]]:
    """`message` (``[command, name, rid, *body]``) as the messages to send in order: a CHUNK per
    slice of each large body frame (the first slice `first` bytes when given, the others
    `chunk`), then the message with those frames emptied. A message with no large frame comes
    back alone and unchanged."""
    command, name, rid = message[0], message[1], message[2]
    out: list[list[Any]] = []
    rest = list(message)
    for i in range(4, len(message)):  # body frame 0 is the header, never large
        view = memoryview(message[i])
        total = view.nbytes
        if total <= threshold:
            continue
        view = view.cast("B")
        head = min(first or chunk, total)
        out.append([envelope.CHUNK, name, rid, envelope.CHUNK_INFO.pack(command, i - 3, 0, total), view[:head]])
        if head < total:
            info = envelope.CHUNK_INFO.pack(command, i - 3, head, total)
            out += rechunk([envelope.CHUNK, name, rid, info, view[head:]], chunk)
        rest[i] = b""
    out.append(rest)
    return out


def rechunk(part: list[Any], chunk: int = limits.STREAM_CHUNK_BYTES) -> list[list[Any]]:
    """A CHUNK message ``[CHUNK, name, rid, info, data]`` as CHUNKs of at most `chunk` bytes
    covering the same bytes (itself when it is no larger): a large chunk meant for shared
    memory goes this way when the shared memory refuses it."""
    command, index, offset, total = envelope.CHUNK_INFO.unpack(part[3])
    view = memoryview(part[4]).cast("B")
    return [
        [part[0], part[1], part[2], envelope.CHUNK_INFO.pack(command, index, offset + at, total), view[at : at + chunk]]
        for at in range(0, view.nbytes, chunk)
    ]


def _aligned_empty(nbytes: int) -> np.ndarray[Any, Any]:
    """A buffer of `nbytes` starting at a multiple of `limits.STREAM_BUFFER_ALIGN_BYTES` (numpy's
    start 16 bytes past a page, where the kernel copies a file in ~3x slower on some CPUs). No
    zero-fill: it is handed on only once every byte of it arrived, once."""
    align = limits.STREAM_BUFFER_ALIGN_BYTES
    raw = np.empty(nbytes + align - 1, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + nbytes]


def _same(received: np.ndarray[Any, Any], again: np.ndarray[Any, Any]) -> None:
    """A chunk sent again must carry the bytes it carried: raises ProtocolError if not."""
    if not np.array_equal(received, again):
        raise ProtocolError("a chunk overlaps bytes of its buffer received already, and differs")


@runtime_checkable
class Filler(Protocol):
    """A chunk's bytes not in memory yet (`fedptr.shm.Incoming`: a file in shared memory), of
    `nbytes`: put in place by `place` (which returns the buffer that holds them then, the one
    given or one that replaces it, and raises ProtocolError when they cannot be), and released by
    `close`, whether they were or not."""

    nbytes: int

    def place(self, buf: np.ndarray[Any, Any], offset: int) -> np.ndarray[Any, Any]: ...

    def close(self) -> None: ...


@dataclass
class _Spans:
    """The byte ranges of one buffer received so far: sorted, disjoint, adjacent ones merged
    (chunks in order keep a single range)."""

    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    received: int = 0

    def add(self, start: int, end: int) -> bool:
        """Record [start, end), and whether it is new: all of it, or none (received already: a
        chunk sent again, not counted twice). Raises ProtocolError if part of it was received."""
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] >= end:
            return False
        if (i > 0 and self.ends[i - 1] > start) or (i < len(self.starts) and self.starts[i] < end):
            raise ProtocolError("a chunk overlaps bytes of its buffer received already")
        self.received += end - start
        if i > 0 and self.ends[i - 1] == start:
            self.ends[i - 1] = end
            if i < len(self.starts) and self.starts[i] == end:
                self.ends[i - 1] = self.ends.pop(i)
                self.starts.pop(i)
        elif i < len(self.starts) and self.starts[i] == end:
            self.starts[i] = start
        else:
            self.starts.insert(i, start)
            self.ends.insert(i, end)
        return True


@dataclass
class _Partial:
    buffers: dict[int, np.ndarray[Any, Any]] = field(default_factory=dict)
    spans: dict[int, _Spans] = field(default_factory=dict)
    touched: float = 0.0


class Reassembly:
    """Partly received streams, keyed by (command, source, request id)."""

    def __init__(
        self,
        max_bytes: int = limits.STREAM_MAX_BYTES,
        timeout: float = limits.STREAM_TIMEOUT_S,
        max_peer_bytes: int = limits.STREAM_MAX_BYTES_PER_PEER,
        max_peer_refused: int = limits.STREAM_MAX_REFUSED_PER_PEER,
        max_refused: int = limits.STREAM_MAX_REFUSED,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_peer_bytes = max_peer_bytes
        self.timeout = timeout
        self.max_peer_refused = max_peer_refused
        self.max_refused = max_refused
        self._partials: dict[tuple[bytes, bytes, bytes], _Partial] = {}
        self._bytes = 0
        self._peer_bytes: collections.Counter[bytes] = collections.Counter()
        self._refused: dict[bytes, collections.OrderedDict[tuple[bytes, bytes], tuple[str, float]]] = {}
        """Source -> its refused streams by (command, request id), oldest first: why, and when
        (purged as stale streams are), so that the message that ends one is answered with the
        reason rather than as incomplete. At most `max_peer_refused` per source: a peer that
        starts refused streams without end forgets its own oldest, never another peer's; at most
        `max_refused` in all: the source holding the most forgets its oldest."""
        self._refused_count = 0
        self._purged = -float("inf")
        """When `purge` last looked (`time.monotonic`)."""

    @property
    def pending_bytes(self) -> int:
        """Bytes held for streams not yet complete."""
        return self._bytes

    @property
    def refused(self) -> int:
        """Refused streams remembered (their messages not ended yet)."""
        return self._refused_count

    def __len__(self) -> int:
        return len(self._partials)

    def add(self, source: bytes, rid: bytes, info: bytes, data: Any) -> None:
        """Copy one chunk into place (`data` a buffer, or a `Filler` that places itself once
        the budgets allow, and is closed either way). Raises ProtocolError for a malformed or
        oversized chunk, or one over bytes of its buffer that arrived already (counted twice,
        they let a buffer with a gap pass as complete, its gap uninitialised memory); a Filler
        that fails refuses its stream (its message fails at once, with the reason)."""
        if not isinstance(data, Filler):
            view = memoryview(data).cast("B")
            placed = self._place(source, rid, info, view.nbytes)
            if placed is not None:
                buffers, index, offset, fresh = placed
                if fresh:
                    buffers[index][offset : offset + view.nbytes] = np.frombuffer(view, dtype=np.uint8)
                else:
                    _same(buffers[index][offset : offset + view.nbytes], np.frombuffer(view, dtype=np.uint8))
            return
        try:
            placed = self._place(source, rid, info, data.nbytes)
            if placed is not None:
                buffers, index, offset, fresh = placed
                if fresh:
                    buffers[index] = data.place(buffers[index], offset)
                else:
                    again = data.place(np.empty(data.nbytes, dtype=np.uint8), 0)
                    _same(buffers[index][offset : offset + data.nbytes], again[: data.nbytes])
        except ProtocolError as e:
            if len(info) == envelope.CHUNK_INFO.size:  # its message fails now, not when the stream times out
                self.refuse((envelope.CHUNK_INFO.unpack(info)[0], source, rid), str(e))
            raise
        finally:
            data.close()

    def _place(
        self, source: bytes, rid: bytes, info: bytes, nbytes: int
    ) -> tuple[dict[int, np.ndarray[Any, Any]], int, int, bool] | None:
        """Where a chunk of `nbytes` goes: its stream's buffers, the index of its buffer (made on
        the stream's first chunk, within the budgets) and its offset there, its bytes counted as
        received: each byte of a buffer is placed once; and whether they are new (False: all of
        them came already, the chunk sent again: a request resent after "not registered" whose
        first sending's chunks took the direct path). None for a chunk of a refused stream: its
        message fails anyway, and a later chunk (a lost sender still streaming) held no bytes
        for nothing until the timeout."""
        self.purge()
        if len(info) != envelope.CHUNK_INFO.size:
            raise ProtocolError("bad chunk info")
        command, index, offset, total = envelope.CHUNK_INFO.unpack(info)
        if command not in (envelope.REQUEST, envelope.REPLY) or not 1 <= index < limits.MAX_FRAMES:
            if not (index or offset or total or nbytes) and command in (envelope.REQUEST, envelope.REPLY):
                # `envelope.abort`: the sender gave this stream up (its message never comes); it
                # can name only its own streams, the key being the source the path or broker named
                self.refuse((command, source, rid), "its sender gave it up")
                return None
            raise ProtocolError("chunk for a bad command or frame")
        if total > limits.MAX_MESSAGE_BYTES or offset + nbytes > total or not nbytes:
            raise ProtocolError("chunk empty or outside its buffer")
        key = (command, source, rid)
        partial = self._partials.get(key)
        if partial is None:
            if self._refused and (command, rid) in self._refused.get(source, ()):
                return None
            partial = self._partials[key] = _Partial()
        buf = partial.buffers.get(index)
        if buf is None:
            why = ""
            if self._peer_bytes[source] + total > self.max_peer_bytes:
                peer = source.decode(errors="replace")
                why = f"streams in progress from {peer!r} would exceed its {self.max_peer_bytes} bytes"
            elif self._bytes + total > self.max_bytes:
                why = f"streams in progress would exceed {self.max_bytes} bytes"
            if why:
                self.refuse(key, why)
                raise ProtocolError(why)
            buf = partial.buffers[index] = _aligned_empty(total)
            partial.spans[index] = _Spans()
            self._bytes += total
            self._peer_bytes[source] += total
        elif len(buf) != total:
            raise ProtocolError("chunk disagrees on its buffer's size")
        fresh = partial.spans[index].add(offset, offset + nbytes)
        partial.touched = time.monotonic()
        return partial.buffers, index, offset, fresh

    def waiting(self, command: bytes, source: bytes, rid: bytes) -> bool:
        """Whether a stream of this message started and some of its bytes have not arrived yet."""
        if not self._partials:
            return False
        partial = self._partials.get((command, source, rid))
        if partial is None:
            return False
        return any(partial.spans[i].received != len(b) for i, b in partial.buffers.items())

    def refuse(self, key: tuple[bytes, bytes, bytes], why: str) -> None:
        """Give up on a stream: its message is answered with `why` when it is completed."""
        self.drop(key)
        command, source, rid = key
        mine = self._refused.get(source)
        if mine is None:
            mine = self._refused[source] = collections.OrderedDict()
        if mine.pop((command, rid), None) is None:
            self._refused_count += 1
        mine[(command, rid)] = (why, time.monotonic())  # newest last, for the purge and the bound
        if len(mine) > self.max_peer_refused:
            # its message, if it ever ends, fails still: the frame its buffer left is empty
            mine.popitem(last=False)
            self._refused_count -= 1
        elif self._refused_count > self.max_refused:  # many peers, each within its own bound
            # a batch per look at the peers (one per 64 of them), each from the peer holding the
            # most then: one look per refusal cost every abort a scan of thousands of sources
            self._forget_most(self._refused_count - self.max_refused + len(self._refused) // 64)

    def _forget_most(self, n: int) -> None:
        """Forget `n` refusals, each the oldest of the peer holding the most at that point."""
        most = [(-len(mine), source) for source, mine in self._refused.items()]
        heapq.heapify(most)
        for _ in range(n):
            held, source = heapq.heappop(most)
            mine = self._refused[source]
            mine.popitem(last=False)
            self._refused_count -= 1
            if mine:
                heapq.heappush(most, (held + 1, source))
            else:
                del self._refused[source]

    def complete(self, command: bytes, source: bytes, rid: bytes, body: list[Any]) -> list[Any]:
        """`body` with reassembled buffers in place of their empty frames (unchanged when no
        stream preceded it). Raises ProtocolError when a stream is incomplete."""
        if self._refused:
            refused = self._unrefuse(source, (command, rid))
            if refused is not None:
                self.drop((command, source, rid))  # chunks after the refused one started again
                raise ProtocolError(f"a streamed buffer was refused: {refused[0]}")
        if not self._partials:
            return body
        partial = self._partials.pop((command, source, rid), None)
        if partial is None:
            return body
        self._release(source, partial)
        body = list(body)
        for index, buf in partial.buffers.items():
            if index >= len(body) or partial.spans[index].received != len(buf) or len(body[index]):
                raise ProtocolError("a streamed buffer is incomplete or misplaced")
            body[index] = memoryview(buf)  # type: ignore[arg-type]
        return body

    def _unrefuse(self, source: bytes, key: tuple[bytes, bytes]) -> tuple[str, float] | None:
        """Take back `source`'s refusal of stream `key` (None when not remembered)."""
        mine = self._refused.get(source)
        refused = None if mine is None else mine.pop(key, None)
        if refused is not None:
            self._refused_count -= 1
            if not mine:
                del self._refused[source]
        return refused

    def forget(self, source: bytes) -> None:
        """`source`'s session ended: drop its partial streams (and their bytes) and refusals,
        since no message of it can follow."""
        for key in [k for k in self._partials if k[1] == source]:
            self.drop(key)
        self._refused_count -= len(self._refused.pop(source, ()))

    def drop(self, key: tuple[bytes, bytes, bytes]) -> None:
        partial = self._partials.pop(key, None)
        if partial is not None:
            self._release(key[1], partial)

    def _release(self, source: bytes, partial: _Partial) -> None:
        nbytes = sum(len(b) for b in partial.buffers.values())
        self._bytes -= nbytes
        self._peer_bytes[source] -= nbytes
        if self._peer_bytes[source] <= 0:
            del self._peer_bytes[source]

    def purge(self) -> None:
        """Drop streams that saw no chunk for `timeout` seconds (their sender died mid-way)."""
        if not self._partials and not self._refused:
            return
        now = time.monotonic()
        if now - self._purged < min(limits.STREAM_PURGE_INTERVAL_S, self.timeout):
            return  # looked lately: the look visits every peer holding a refusal
        self._purged = now
        cutoff = now - self.timeout
        for source in list(self._refused):
            mine = self._refused[source]
            while mine and next(iter(mine.values()))[1] < cutoff:  # oldest first: stop at the first fresh one
                mine.popitem(last=False)
                self._refused_count -= 1
            if not mine:
                del self._refused[source]
        for key in [k for k, p in self._partials.items() if p.touched < cutoff]:
            # remembered as refused: a message held for it (or still to come) must fail, never
            # be taken with an empty frame where its buffer was
            self.refuse(key, f"its chunks stopped arriving for {self.timeout:g} s")
