"""Fast multipart send and receive on non-blocking zmq sockets, for the broker's and links' hot paths.

pyzmq's `send_multipart`/`recv_multipart` wrap every frame in enum arithmetic and option
lookups that cost several microseconds per message; these call the Cython backend directly with
plain integer flags. Envelope frames (and, if asked, any small frame) are received as bytes,
the others as zero-copy `zmq.Frame`s, so a tensor's buffer is never copied on receipt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _Backend

_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_send = _Backend.send
_recv = _Backend.recv
_get = _Backend.get
_Frame = zmq.Frame


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send `frames` as one message without blocking; raises zmq.Again when the queue is full
    (only before the first frame: zmq accepts the rest of a message once it took the first).

    zmq keeps nothing the caller may change once this returns: bytes and views of bytes
    (immutable) and zmq Frames (zmq's own) go zero-copy, any other buffer is copied into zmq's
    message here, once. zmq reads a zero-copy frame later, in its I/O thread (over inproc its
    receiver does), and the caller may write into its buffer meanwhile (a node's stored tensor,
    written by the next request it handles: review9); a frame below `zmq.COPY_THRESHOLD` zmq
    copied anyway, and now does without wrapping it in a Frame first."""
    last = len(frames) - 1
    for i in range(last):
        f = frames[i]
        _send(sock, f, _NOBLOCK | _SNDMORE, type(f) is not bytes and mutable(f))
    f = frames[last]
    _send(sock, f, _NOBLOCK, type(f) is not bytes and mutable(f))


def mutable(frame: Any) -> bool:
    """Whether `frame` is memory its caller may change: not bytes, a view of bytes, nor a zmq Frame."""
    return (
        type(frame) is not bytes
        and type(frame) is not _Frame
        and not (type(frame) is memoryview and type(frame.obj) is bytes)
    )


def owned(frames: list[Any]) -> list[Any]:
    """`frames`, each `mutable` one copied into bytes: what is kept past the call that handed it
    over (a link's batch, its outbox) must not change meanwhile."""
    for f in frames:
        if type(f) is not bytes and mutable(f):
            return [bytes(f) if mutable(f) else f for f in frames]
    return frames


def recv_frames(sock: zmq.Socket[Any], copied: int, copy_below: int = 0) -> list[Any]:
    """Receive one message without blocking: its first `copied` frames as bytes, later frames
    shorter than `copy_below` bytes as bytes too, and the rest as zmq.Frame (zero copy). Raises
    zmq.Again when nothing is waiting. (Each frame's `more` flag is read from the frame itself:
    asking the socket for RCVMORE costs an enum per frame; receiving every frame as a Frame and
    copying the small ones costs less than that.)"""
    return recv_with_last(sock, copied, copy_below)[0]


def recv_with_last(sock: zmq.Socket[Any], copied: int, copy_below: int = 0) -> tuple[list[Any], zmq.Frame]:
    """`recv_frames`, and the message's last frame as a zmq.Frame even if it was copied: its
    connection metadata (a CURVE peer's ``User-Id``) can be read when needed, and only then
    (every frame of a message carries the same)."""
    frame = _recv(sock, _NOBLOCK, False)
    frames: list[Any] = [frame.bytes if copied > 0 or len(frame) < copy_below else frame]
    while frame.more:
        frame = _recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes if len(frames) < copied or len(frame) < copy_below else frame)
    return frames, frame


_EVENTS = int(zmq.EVENTS)


def events(sock: zmq.Socket[Any]) -> int:
    """The socket's zmq.EVENTS as a plain int (reading it also re-arms its edge-triggered FD)."""
    return int(_get(sock, _EVENTS))
