"""Progress bars for large transfers: the chunks of a streamed buffer (`fedptr.streams`).

Only buffers over `limits.STREAM_THRESHOLD_BYTES` stream, so only transfers of a few MiB or
more show a bar. A library call never prints unless asked: bars are on only with
``fedptr.connect(progress=True)`` or ``FEDPTR_PROGRESS=1``, and only when stderr is a terminal.

A receive advances as chunks arrive. A send advances as chunks are handed to the socket, which
queues them, so its bar fills at the rate the bytes are queued, not the rate the network
carries them; the call itself returns when the worker has stored the whole buffer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedptr import envelope, limits

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_TRUE = ("1", "true", "yes", "on")


def wanted(enabled: bool | None) -> bool:
    """Whether bars were asked for: `enabled`, or when it is None, ``FEDPTR_PROGRESS``."""
    if enabled is None:
        return os.environ.get(limits.PROGRESS_ENV, "").strip().lower() in _TRUE
    return enabled


def transfers_for(enabled: bool | None) -> Transfers | None:
    """Bars on stderr when they are `wanted` and stderr is a terminal; else None (silent)."""
    if not wanted(enabled) or not sys.stderr.isatty():
        return None
    from rich.console import Console

    return Transfers(Console(stderr=True))


class Transfers:
    """One bar per streamed buffer, keyed by direction, request id and frame; a bar goes when all
    of its buffer's bytes came or went, and the display stops when no bar is left.

    A bar is drawn when it appears and when it is full, not only at the display's refresh rate:
    a buffer over same-host shared memory comes in a few chunks, all between two refreshes. Its
    chunks may come out of order (the first through the broker, the rest over the direct path,
    `fedptr.direct`), so a bar counts the bytes it saw rather than reading the last offset."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self._progress: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=console,
            transient=True,
            refresh_per_second=limits.PROGRESS_REFRESH_PER_S,
        )
        self._bars: dict[tuple[bool, bytes, int], tuple[TaskID, int]] = {}
        """Per buffer being sent or received, its bar and the bytes it has counted."""
        self._running = False

    def chunk(self, peer: bytes, message: Sequence[Any], outgoing: bool) -> None:
        """Account for one chunk message ``[CHUNK, name, rid, info, data]`` sent to `peer`
        (`outgoing`) or received from it. `peer` is given, not read from the message: a chunk that
        came over the direct path names its receiver there, as it was sent."""
        _command, index, _offset, total = envelope.CHUNK_INFO.unpack(bytes(message[3]))
        data = message[4]  # a buffer, or a shared-memory file not read yet (`fedptr.shm.Incoming`)
        nbytes = data.nbytes if hasattr(data, "nbytes") else memoryview(data).nbytes
        if total == 0:  # an abort (`envelope.abort`): the request's streams that way stop
            for gone in [k for k in self._bars if k[:2] == (outgoing, bytes(message[2]))]:
                self._finish(gone)
            return
        key = (outgoing, bytes(message[2]), index)
        bar, done = self._bars.get(key, (None, 0))
        if bar is None:
            if not self._running:
                self._progress.start()
                self._running = True
            name = peer.decode(errors="replace")
            bar = self._progress.add_task(f"send to {name}" if outgoing else f"get from {name}", total=total)
        done += nbytes
        self._progress.update(bar, completed=done)
        if done < total:
            self._bars[key] = (bar, done)
            return
        self._bars[key] = (bar, done)
        self._progress.refresh()  # full, drawn once however fast it filled
        self._finish(key)

    def _finish(self, key: tuple[bool, bytes, int]) -> None:
        """Remove the bar of `key`; stop the display when it was the last."""
        self._progress.remove_task(self._bars.pop(key)[0])
        if not self._bars:
            self._progress.stop()
            self._running = False

    def close(self) -> None:
        """Stop the display (bars of unfinished transfers go with it)."""
        if self._running:
            self._progress.stop()
            self._running = False
        self._bars.clear()
