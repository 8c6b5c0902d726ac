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


def send_frames(sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
    """Send `frames` as one message without blocking; raises zmq.Again when the queue is full
    (only before the first frame: zmq accepts the rest of a message once it took the first)."""
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], _NOBLOCK | _SNDMORE, False)
    _send(sock, frames[last], _NOBLOCK, False)


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
