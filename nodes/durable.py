"""A node's objects on disk (``--store DIR``): raw tensor files plus a msgpack record each.

For object 42: ``42.rec`` holds the msgpack record ``[kind, dtype, shape, location, remote_id,
owner, sponsor, privacy, nbytes, extra]`` and, right after it, a tensor's ``nbytes`` raw bytes (the
sponsor is the client that granted the object to its owner). A model's (kind ``"module"``) data is
its description, msgpack of ``{"spec", "params": [[dtype, shape, nbytes]...], "training", "grad"}``
(`extra` bytes long: the allow-listed spec of fedptr/modules.py, its parameters' and buffers'
layout in state_dict order, each submodule's training mode and each parameter's requires_grad),
then those parameters' and buffers' raw bytes; it is rebuilt with `modules.from_wire`, as a model
sent over the wire is. A tensor that is a model's parameter or buffer (the result of
``parameter``/``state``) has `extra` ``[model_id, name]``: a restart makes it that very tensor of
the restored model again (its own bytes are used only if the model is gone). Record and data are
one file, so one rename replaces both: a rewrite that changes the shape (``x.data = y``) or the
privacy (an in-place op on private data) can never land half, new data under the old record (a
store that would not load, or data derived from private data under a public record). Records of
older releases have no sponsor, privacy or ``nbytes``, their data in ``42.bin``; they still load,
and a rewrite replaces them (``42.bin`` is removed once the new record's rename is durable). A move
that has sent the object on but not yet heard that the destination holds it leaves ``42.mov``,
``[dest, new_id]``: the hand-over is in doubt until that is resolved (nodes/handover.py). Each file
is written to a temporary name, fsynced and renamed into place; `sync` fsyncs the directory once
for a whole batch of writes and unlinks (and once more inside the removal of an object with a
second file, whose record's unlink must be durable before that file goes: `remove`).

These calls block: the node makes them only on its write-ahead thread (nodes/writeahead.py).
Nothing is ever unpickled: loading validates dtype and size as the wire does.

A damaged store fails closed: a record that does not parse, a tensor file torn or missing, a
move record that does not parse make `load` raise `DamagedStoreError` naming every such file,
and the node refuses to start (each was an acknowledged object: skipping it would lose it
silently). `recover` (``fedptr store recover DIR``) moves the damaged objects' files aside into
``DIR/damaged/`` and says what was lost. What an interrupted write or removal leaves behind in
the normal course (a ``.tmp`` file, data without its record, a move record without its object)
is not damage: `load` removes it.
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
from torch import nn

from fedptr import limits, modules
from fedptr.errors import DamagedStoreError, ProtocolError
from fedptr.tensors import from_raw
from fedptr.wire import RawTensor

log = logging.getLogger("fedptr.node.durable")


@dataclass(frozen=True, slots=True)
class Stored:
    """One object as the disk holds it: a tensor, a model, or a pointer's ``(location,
    remote_id)``; `moving` is the ``(dest, new_id)`` of a move in doubt, if any."""

    value: torch.Tensor | nn.Module | tuple[str, int]
    owner: str
    sponsor: str = ""
    moving: tuple[str, int] | None = None
    privacy: dict[str, Any] | None = None
    """A tensor's ``{"origins": {owner: [trusted...]}, "readonly": owner, "released": kind}``;
    None for a record written without one, which the store restores as private (fail closed)."""
    alias: tuple[int, str] | None = None
    """A tensor that is the parameter or buffer `name` of model `model_id`: ``(model_id, name)``."""


DATA_KEY_FILE = "data-ids.key"
DATA_KEY_BYTES = 32


def private(path: str, flags: int) -> int:
    """`open`'s opener for a store's files: readable by this uid alone (they hold values computed
    from private data, the key of the datasets' ids, the budget), whatever the umask."""
    return os.open(path, flags, 0o600)


def write_atomic(path: Path, *parts: Any) -> None:
    """Write `parts`, one after the other, to `path` so that a crash leaves the old file or the
    new one, never a mix."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb", opener=private) as f:
        for data in parts:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_durable(path: Path, data: Any) -> None:
    """`write_atomic`, then an fsync of the directory: once this returns, the new file survives a
    power cut too (a rename is only durable once its directory is synced). For a lone file
    (the privacy budget); the store syncs its directory once per batch instead (`sync`)."""
    write_atomic(path, data)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    """Remove `path` if it is there (a crash may have removed it already, or never made it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class DurableStore:
    """Objects persisted under `directory`, one record (and data file for tensors) each."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # (`private`)
        self._dir_fd = os.open(self.dir, os.O_RDONLY)

    def close(self) -> None:
        """Release the directory handle."""
        os.close(self._dir_fd)

    def data_key(self) -> bytes:
        """This store's secret key for its datasets' object ids (nodes/node.py `data_id`), made
        (random, durable) the first time: with it a restarted node gives each dataset the id it
        had, and no client can tell a dataset's id before `search` shows it."""
        path = self.dir / DATA_KEY_FILE
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = b""
        if len(key) != DATA_KEY_BYTES:  # a new key: pointers to the datasets from before then
            # name nothing (refused, never misread)
            if key:  # written atomically: damaged outside the node, every dataset's id changes
                log.warning("%s held %d bytes, not %d: a new key, new dataset ids", path, len(key), DATA_KEY_BYTES)
            key = os.urandom(DATA_KEY_BYTES)
            write_durable(path, key)
        return key

    def write_tensor(
        self,
        obj_id: int,
        data: bytes,
        dtype: str,
        shape: list[int],
        owner: str,
        sponsor: str,
        privacy: dict[str, Any],
        alias: tuple[int, str] | None = None,
    ) -> None:
        """Write a tensor's record and data as one file (fsynced; the directory needs `sync`);
        `alias`: it is that model's parameter or buffer."""
        record = ["tensor", dtype, shape, "", 0, owner, sponsor, privacy, memoryview(data).nbytes]
        if alias is not None:
            record.append(list(alias))
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record), data)
        self._drop_older_data(obj_id)

    def write_module(
        self, obj_id: int, meta: bytes, data: list[memoryview], owner: str, sponsor: str, privacy: dict[str, Any]
    ) -> None:
        """Write a model's record, description (`meta`) and parameters' bytes (`data`) as one file
        (fsynced; the directory needs `sync`)."""
        nbytes = len(meta) + sum(d.nbytes for d in data)
        record = ["module", "", [], "", 0, owner, sponsor, privacy, nbytes, len(meta)]
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record), meta, *data)
        self._drop_older_data(obj_id)

    def write_pointer(self, obj_id: int, location: str, remote_id: int, owner: str, sponsor: str = "") -> None:
        """Write a pointer's record (fsynced; the directory needs `sync`)."""
        record = ["pointer", "", [], location, remote_id, owner, sponsor]
        write_atomic(self.dir / f"{obj_id}.rec", msgpack.packb(record))
        self._drop_older_data(obj_id)

    def _drop_older_data(self, obj_id: int) -> None:
        """Remove an older release's data file of `obj_id`, whose record was just replaced: only
        once the rename is durable (a directory fsync; once per such object), as a power cut
        could undo the rename yet keep the unlink, leaving the old record without its data."""
        older = self.dir / f"{obj_id}.bin"
        if older.exists():
            self.sync()
            _unlink(older)

    def write_move(self, obj_id: int, dest: str, new_id: int) -> None:
        """Record that object `obj_id` is being moved to `dest` as `new_id` (the directory needs `sync`)."""
        write_atomic(self.dir / f"{obj_id}.mov", msgpack.packb([dest, new_id]))

    def remove_move(self, obj_id: int) -> None:
        """Forget a move's record (the hand-over was resolved)."""
        _unlink(self.dir / f"{obj_id}.mov")

    def remove(self, obj_id: int) -> None:
        """Forget an object: its record first, then an older release's data file and any move
        record, only once the record's unlink is durable (a directory fsync, for such objects
        alone): unsynced unlinks persist in no promised order, and a power cut that kept a later
        one but lost the record's left an older record without its data (a store that would not
        load) or a moved object's record without its move record (a second owning copy, beside
        the destination's)."""
        _unlink(self.dir / f"{obj_id}.rec")
        others = [p for p in (self.dir / f"{obj_id}.bin", self.dir / f"{obj_id}.mov") if p.exists()]
        if others:
            self.sync()
        for path in others:
            _unlink(path)

    def sync(self) -> None:
        """Make the renames and unlinks done so far durable (one fsync of the directory)."""
        os.fsync(self._dir_fd)

    def load(self) -> dict[int, Stored]:
        """Every persisted object. Raises DamagedStoreError naming each object whose files do not
        validate; removes the leftovers of interrupted writes and removals."""
        found, damaged = self._scan()
        if damaged:
            listed = "; ".join(f"{d.files[0]}: {d.reason}" for d in damaged)
            raise DamagedStoreError(
                f"the store {self.dir} is damaged ({len(damaged)} objects): {listed}. "
                f"`fedptr store recover {self.dir}` moves them aside into {self.dir / DAMAGED_DIR} (they are lost)",
                [str(self.dir / f) for d in damaged for f in d.files],
            )
        for leftover in self.dir.glob("*.tmp"):  # a write that never reached its rename
            _unlink(leftover)
        # what a removal interrupted after the record left; the record's unlink may not be
        # durable yet (the removal crashed before its fsync): made so first, as `remove` does,
        # or a power cut could keep a move record's unlink and lose the record's, bringing the
        # moved object back here without its move record, beside the destination's copy
        leftovers = [
            path
            for suffix in (".mov", ".bin")
            for path in self.dir.glob(f"*{suffix}")
            if path.stem.isdigit() and int(path.stem) not in found
        ]
        if leftovers:
            self.sync()
        for path in leftovers:
            _unlink(path)
        return found

    def _scan(self) -> tuple[dict[int, Stored], list[Damage]]:
        found: dict[int, Stored] = {}
        damaged: list[Damage] = []
        for rec in sorted(self.dir.glob("*.rec")):
            if not rec.stem.isdigit():
                damaged.append(Damage(0, [rec.name], "not an object's record"))
                continue
            obj_id = int(rec.stem)
            try:
                found[obj_id] = self._read(obj_id, rec)
            except (ValueError, TypeError, KeyError, IndexError, OSError, ProtocolError, msgpack.UnpackException) as e:
                files = [p.name for p in (rec, rec.with_suffix(".bin"), rec.with_suffix(".mov")) if p.exists()]
                damaged.append(Damage(obj_id, files, str(e) or type(e).__name__))
        return found, damaged

    def _read(self, obj_id: int, rec: Path) -> Stored:
        with open(rec, "rb") as f:
            header = msgpack.Unpacker(f, max_array_len=64, max_buffer_size=_MAX_RECORD_BYTES)
            record = header.unpack()
            f.seek(header.tell())
            inline = f.read()
        if type(record) is not list or len(record) < 6:
            raise ValueError("not a record")
        if len(record) < 9 and inline:
            raise ValueError(f"{len(inline)} bytes after the record")
        kind, dtype, shape, location, remote_id, owner = record[:6]
        sponsor = str(record[6]) if len(record) > 6 else ""
        privacy = record[7] if len(record) > 7 and type(record[7]) is dict else None
        value: torch.Tensor | nn.Module | tuple[str, int]
        alias = None
        if kind == "pointer":
            value = (str(location), int(remote_id))
        elif kind == "tensor":
            if len(record) < 9:  # an older release's: the data in a file of its own
                inline = (self.dir / f"{obj_id}.bin").read_bytes()
            elif len(inline) != record[8]:
                raise ValueError(f"the record says {record[8]} bytes of data, the file holds {len(inline)}")
            value = from_raw(RawTensor(str(dtype), tuple(shape), memoryview(inline))).clone()
            if len(record) > 9:
                model_id, name = record[9]
                alias = (int(model_id), str(name))
        elif kind == "module":
            if len(inline) != record[8]:
                raise ValueError(f"the record says {record[8]} bytes of data, the file holds {len(inline)}")
            value = _module(memoryview(inline), int(record[9]))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        return Stored(value, str(owner), sponsor, self._moving(obj_id), privacy, alias)

    def _moving(self, obj_id: int) -> tuple[str, int] | None:
        path = self.dir / f"{obj_id}.mov"
        if not path.exists():
            return None
        dest, new_id = msgpack.unpackb(path.read_bytes(), max_array_len=4)
        return str(dest), int(new_id)


def module_meta(model: nn.Module, spec: dict[str, Any], data: list[memoryview], dtypes: list[str]) -> bytes:
    """The description `write_module` stores before a model's bytes: its `spec`, the layout of its
    parameters and buffers (their `data`, of `dtypes`), training modes and requires_grad flags."""
    state = model.state_dict(keep_vars=True).values()
    packed: bytes = msgpack.packb(
        {
            "spec": spec,
            "params": [[d, list(t.shape), b.nbytes] for d, t, b in zip(dtypes, state, data, strict=True)],
            "training": [m.training for m in model.modules()],
            "grad": [t.requires_grad for t in state],
        }
    )
    return packed


def _module(data: memoryview, meta_bytes: int) -> nn.Module:
    """The model a record's data describes (`module_meta`, then its bytes), built from the
    allow-list and checked as a model received over the wire is (never unpickled)."""
    meta = msgpack.unpackb(
        data[:meta_bytes],
        raw=False,
        max_str_len=limits.MAX_STR_BYTES,
        max_bin_len=0,
        max_array_len=limits.MAX_CONTAINER_LEN,
        max_map_len=limits.MAX_CONTAINER_LEN,
    )
    params = []
    offset = meta_bytes
    for dtype, shape, nbytes in meta["params"]:
        params.append(RawTensor(str(dtype), tuple(shape), data[offset : offset + int(nbytes)]))
        offset += int(nbytes)
    if offset != len(data):
        raise ValueError(
            f"the model's parameters take {offset - meta_bytes} bytes, the file holds {len(data) - meta_bytes}"
        )
    model = modules.from_wire(meta["spec"], list(params))
    state = list(model.state_dict(keep_vars=True).values())
    flags, training = meta["grad"], meta["training"]
    submodules = list(model.modules())
    if len(flags) != len(state) or len(training) != len(submodules):
        raise ValueError("the model's flags do not match its layers")
    for t, grad in zip(state, flags, strict=True):
        if t.is_floating_point() or t.is_complex():
            t.requires_grad_(bool(grad))
    for m, mode in zip(submodules, training, strict=True):
        m.training = bool(mode)
    return model


_MAX_RECORD_BYTES = 1 << 16
"""A record's own bytes at most (the data after it is not counted): what reading one buffers."""

DAMAGED_DIR = "damaged"
"""Where `recover` moves the files of damaged objects, inside the store's directory."""


@dataclass(frozen=True, slots=True)
class Damage:
    """A stored object whose files do not validate: its id, its files (record first) and why."""

    obj_id: int
    files: list[str]
    reason: str


def recover(directory: str | os.PathLike[str]) -> list[Damage]:
    """Move the files of every damaged object in the store at `directory` aside into its
    ``damaged/`` subdirectory, so that the node starts with the rest; returns what was lost."""
    store = DurableStore(directory)
    try:
        _, damaged = store._scan()
        aside = store.dir / DAMAGED_DIR
        for d in damaged:
            aside.mkdir(mode=0o700, exist_ok=True)
            for name in d.files:
                os.replace(store.dir / name, aside / name)
        if damaged:
            store.sync()
        return damaged
    finally:
        store.close()
