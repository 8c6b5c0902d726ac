"""A node's objects on disk (``--store DIR``): raw tensor files plus a msgpack record each.

For object 42: ``42.bin`` holds the tensor's raw bytes and ``42.rec`` the msgpack record
``[kind, dtype, shape, location, remote_id, owner]``. Each file is written to a temporary name,
fsynced, renamed into place and the directory fsynced, record last, so a record on disk always
has its data. Nothing is ever unpickled: loading validates dtype and size as the wire does.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import msgpack
import torch

from fedptr.errors import ProtocolError
from fedptr.tensors import from_raw, to_raw
from fedptr.wire import RawTensor

log = logging.getLogger("fedptr.node.durable")


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
        os.close(self._dir_fd)

    def save_tensor(self, obj_id: int, value: torch.Tensor, owner: str) -> None:
        """Persist a tensor; returns once it is on disk."""
        raw = to_raw(value)
        write_atomic(self.dir / f"{obj_id}.bin", raw.data)
        record = ["tensor", raw.dtype, list(raw.shape), "", 0, owner]
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record))
        os.fsync(self._dir_fd)

    def save_pointer(self, obj_id: int, location: str, remote_id: int, owner: str) -> None:
        """Persist a pointer; returns once it is on disk."""
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(["pointer", "", [], location, remote_id, owner]))
        os.fsync(self._dir_fd)

    def remove(self, obj_id: int) -> None:
        """Forget an object (record first, so a crash never leaves a record without data)."""
        for suffix in (".rec", ".bin"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.dir / f"{obj_id}{suffix}")

    def load(self) -> dict[int, tuple[torch.Tensor | tuple[str, int], str]]:
        """Every persisted object with its owner: a tensor, or (location, remote_id) for a
        pointer. Files that do not validate are skipped with a log line."""
        found: dict[int, tuple[torch.Tensor | tuple[str, int], str]] = {}
        for rec in self.dir.glob("*.rec"):
            try:
                obj_id = int(rec.stem)
                kind, dtype, shape, location, remote_id, owner = msgpack.unpackb(rec.read_bytes(), max_array_len=64)
                if kind == "pointer":
                    found[obj_id] = ((str(location), int(remote_id)), str(owner))
                else:
                    data = (self.dir / f"{obj_id}.bin").read_bytes()
                    value = from_raw(RawTensor(str(dtype), tuple(shape), memoryview(data))).clone()
                    found[obj_id] = (value, str(owner))
            except (ValueError, TypeError, OSError, ProtocolError, msgpack.UnpackException) as e:
                log.warning("skipped unreadable stored object %s: %s", rec.name, e)
        return found
