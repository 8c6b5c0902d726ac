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
    """One bar per streamed buffer, keyed by request id and frame; a bar goes when its buffer is
    complete, and the display stops when no bar is left."""

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
        self._bars: dict[tuple[bytes, int], TaskID] = {}
        self._running = False

    def chunk(self, message: Sequence[Any], outgoing: bool) -> None:
        """Account for one chunk message ``[CHUNK, name, rid, info, data]`` sent (`outgoing`) or received."""
        _command, index, offset, total = envelope.CHUNK_INFO.unpack(bytes(message[3]))
        data = message[4]  # a buffer, or a shared-memory file not read yet (`fedptr.shm.Incoming`)
        done = offset + (data.nbytes if hasattr(data, "nbytes") else memoryview(data).nbytes)
        peer = bytes(message[1]).decode(errors="replace")
        key = (bytes(message[2]), index)
        bar = self._bars.get(key)
        if bar is None:
            if not self._running:
                self._progress.start()
                self._running = True
            label = f"send to {peer}" if outgoing else f"get from {peer}"
            bar = self._bars[key] = self._progress.add_task(label, total=total)
        self._progress.update(bar, completed=done)
        if done >= total:
            self._progress.remove_task(self._bars.pop(key))
            if not self._bars:
                self._progress.stop()
                self._running = False

    def close(self) -> None:
        """Stop the display (bars of unfinished transfers go with it)."""
        if self._running:
            self._progress.stop()
            self._running = False
        self._bars.clear()
