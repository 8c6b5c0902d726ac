"""A node's objects on disk (``--store DIR``): raw tensor files plus a msgpack record each.

For object 42: ``42.bin`` holds the tensor's raw bytes and ``42.rec`` the msgpack record
``[kind, dtype, shape, location, remote_id, owner, sponsor]`` (the sponsor is the client that
granted the object to its owner; records of older releases have no sponsor). A move that has sent the object on but
not yet heard that the destination holds it leaves ``42.mov``, ``[dest, new_id]``: the
hand-over is in doubt until that is resolved (nodes/handover.py). Each file is written to a
temporary name, fsynced and renamed into place, record last, so a record on disk always has its
data; `sync` fsyncs the directory once for a whole batch of writes and unlinks.

These calls block: the node makes them only on its write-ahead thread (nodes/writeahead.py).
Nothing is ever unpickled: loading validates dtype and size as the wire does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from fedptr.errors import ProtocolError
from fedptr.tensors import from_raw
from fedptr.wire import RawTensor

log = logging.getLogger("fedptr.node.durable")


@dataclass(frozen=True, slots=True)
class Stored:
    """One object as the disk holds it: a tensor, or a pointer's ``(location, remote_id)``;
    `moving` is the ``(dest, new_id)`` of a move in doubt, if any."""

    value: torch.Tensor | tuple[str, int]
    owner: str
    sponsor: str = ""
    moving: tuple[str, int] | None = None
    privacy: dict[str, Any] | None = None
    """A tensor's ``{"origins": {owner: [trusted...]}, "readonly": owner, "released": kind}``;
    None for a record written without one, which the store restores as private (fail closed)."""


def write_atomic(path: Path, data: Any) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class DurableStore:
    """Objects persisted under `directory`, one record (and data file for tensors) each."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.dir, os.O_RDONLY)

    def close(self) -> None:
        """Release the directory handle."""
        os.close(self._dir_fd)

    def write_tensor(
        self,
        obj_id: int,
        data: bytes,
        dtype: str,
        shape: list[int],
        owner: str,
        sponsor: str,
        privacy: dict[str, Any],
    ) -> None:
        """Write a tensor's data and record (fsynced files; the directory needs `sync`)."""
        write_atomic(self.dir / f"{obj_id}.bin", data)
        record = ["tensor", dtype, shape, "", 0, owner, sponsor, privacy]
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record))

    def write_pointer(self, obj_id: int, location: str, remote_id: int, owner: str, sponsor: str = "") -> None:
        """Write a pointer's record (fsynced; the directory needs `sync`)."""
        record = ["pointer", "", [], location, remote_id, owner, sponsor]
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / f"{obj_id}.bin")

    def write_move(self, obj_id: int, dest: str, new_id: int) -> None:
        """Record that object `obj_id` is being moved to `dest` as `new_id` (the directory needs `sync`)."""
        write_atomic(self.dir / f"{obj_id}.mov", msgpack.packb([dest, new_id]))

    def remove_move(self, obj_id: int) -> None:
        """Forget a move's record (the hand-over was resolved)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / f"{obj_id}.mov")

    def remove(self, obj_id: int) -> None:
        """Forget an object: its record first (a record never lacks its data), then its data and
        any move record."""
        for suffix in (".rec", ".bin", ".mov"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{obj_id}{suffix}")

    def sync(self) -> None:
        """Make the renames and unlinks done so far durable (one fsync of the directory)."""
        os.fsync(self._dir_fd)

    def load(self) -> dict[int, Stored]:
        """Every persisted object. Files that do not validate are skipped with a log line; a move
        record without its object is removed."""
        found: dict[int, Stored] = {}
        for rec in self.dir.glob("*.rec"):
            try:
                obj_id = int(rec.stem)
                record = msgpack.unpackb(rec.read_bytes(), max_array_len=64)
                kind, dtype, shape, location, remote_id, owner = record[:6]
                sponsor = str(record[6]) if len(record) > 6 else ""
                privacy = record[7] if len(record) > 7 and type(record[7]) is dict else None
                value: torch.Tensor | tuple[str, int]
                if kind == "pointer":
                    value = (str(location), int(remote_id))
                else:
                    data = (self.dir / f"{obj_id}.bin").read_bytes()
                    value = from_raw(RawTensor(str(dtype), tuple(shape), memoryview(data))).clone()
                found[obj_id] = Stored(value, str(owner), sponsor, self._moving(obj_id), privacy)
            except (ValueError, TypeError, OSError, ProtocolError, msgpack.UnpackException) as e:
                log.warning("skipped unreadable stored object %s: %s", rec.name, e)
        for mov in self.dir.glob("*.mov"):
            if mov.stem.isdigit() and int(mov.stem) not in found:
                mov.unlink(missing_ok=True)
        return found

    def _moving(self, obj_id: int) -> tuple[str, int] | None:
        path = self.dir / f"{obj_id}.mov"
        if not path.exists():
            return None
        dest, new_id = msgpack.unpackb(path.read_bytes(), max_array_len=4)
        return str(dest), int(new_id)
