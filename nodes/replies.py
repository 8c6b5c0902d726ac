"""The node's at-most-once reply cache: a replayed request id is answered, never run twice.

Keyed by (source, request id); request ids carry their sender's incarnation, so a restarted
peer's new requests never meet its old replies. Bounded in entries and in bytes: a reply whose
tensors are large is not kept (its replay is refused as in doubt), so a fetched model's or
tensor's buffers are never held alive by the cache.

The record of a request running is also what the node's figures time it by (its kind and when it
arrived): one record per request, keyed once, rather than one here and one in nodes/stats.py.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict

from fedptr import limits, wire

Key = tuple[str, bytes]
Started = tuple[str, float]
"""A running request's kind (``Op``, ``Get``...) and when it arrived (`time.monotonic`)."""


class Seen(enum.Enum):
    """What `ReplyCache.begin` found for a request."""

    NEW = enum.auto()
    """Never seen: run it."""
    RUNNING = enum.auto()
    """A replay of a request still running: its one reply answers both."""
    ANSWERED = enum.auto()
    """Answered before: send `ReplyCache.cached(key)` again."""


NEW, RUNNING, ANSWERED = Seen.NEW, Seen.RUNNING, Seen.ANSWERED
"""`Seen`'s members as module constants, read once per request: on Python 3.11 a member read
through its class (``Seen.NEW``) is a descriptor call, ~0.1-0.2 µs, ten times a global's."""


def _size(msg: wire.Message) -> int:
    """Bytes of tensor data a reply holds (what keeping it would keep alive)."""
    if isinstance(msg, wire.TensorReply):
        return msg.tensor.nbytes
    if isinstance(msg, wire.ModuleReply):
        return sum(p.nbytes for p in msg.params if isinstance(p, wire.RawTensor))
    return 0


class ReplyCache:
    """Recent replies by (source, request id), oldest dropped first."""

    def __init__(
        self,
        here: str,
        max_entries: int = limits.REPLY_CACHE_SIZE,
        max_bytes: int = limits.REPLY_CACHE_MAX_BYTES,
        max_reply_bytes: int = limits.REPLY_CACHE_MAX_TENSOR_BYTES,
    ) -> None:
        self.here = here
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_reply_bytes = max_reply_bytes
        self.replayed = 0
        """Replays answered from the cache."""
        self._replies: OrderedDict[Key, wire.Message] = OrderedDict()
        self._sizes: dict[Key, int] = {}
        """The bytes of the cached replies that hold tensor data (most hold none: no entry)."""
        self._running: dict[Key, Started] = {}
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the cached replies hold."""
        return self._bytes

    @property
    def running(self) -> int:
        """Requests begun and not yet answered."""
        return len(self._running)

    def __len__(self) -> int:
        return len(self._replies)

    def begin(self, key: Key, kind: str = "") -> Seen:
        """Note that request `key` (a `kind` request) arrived, and say whether it is new."""
        if key in self._running:
            return RUNNING
        if key in self._replies:
            self.replayed += 1
            return ANSWERED
        self._running[key] = (kind, time.monotonic())
        return NEW

    def cached(self, key: Key) -> wire.Message:
        """The reply given to `key` (after `begin` said ANSWERED)."""
        return self._replies[key]

    def finish(self, key: Key, msg: wire.Message) -> Started | None:
        """Keep `msg` as the answer to `key`; a large one is kept as a refusal of replays. An
        answer to a peer that left meanwhile (`forget_peers`) is not kept: no replay can come.
        Returns the request's record from `begin` (None when it was not running)."""
        started = self._running.pop(key, None)
        if started is None:
            return None
        size = 0 if type(msg) is wire.Ok else _size(msg)  # an op's Ok (most replies) holds no tensor
        if size > self.max_reply_bytes:
            why = "the object was handed over already"
            msg = wire.Failure(wire.FailureCode.REMOTE.value, "ReplayRefused", why, self.here, [self.here])
            size = 0
        # `key` was running, so it holds no answer yet: `begin` let it through as new
        self._replies[key] = msg
        if size:
            self._sizes[key] = size
            self._bytes += size
        while len(self._replies) > self.max_entries or self._bytes > self.max_bytes:
            dropped, _ = self._replies.popitem(last=False)
            if self._sizes:
                self._bytes -= self._sizes.pop(dropped, 0)
        return started

    def forget_peer(self, source: str) -> None:
        """Drop every reply to `source` (its session ended: no replay can come)."""
        self.forget_peers({source})

    def forget_peers(self, sources: set[str]) -> None:
        """Drop every reply to any of `sources`, in one pass however many leave at once."""
        for key in [k for k in self._replies if k[0] in sources]:
            del self._replies[key]
            self._bytes -= self._sizes.pop(key, 0)
        for key in [k for k in self._running if k[0] in sources]:
            del self._running[key]
