"""A data owner's audit log: an append-only record of everything that left the node.

One JSON object per line in ``audit.jsonl`` in the node's store directory (in memory only for a
node without one): when (ISO 8601, UTC, milliseconds), what (get, move, contribution,
secure-contribution, dp-train, release), which object, who asked, where it went, and the
epsilon spent and left. `fedptr audit STORE_DIR` prints it.

A record is written and fsynced before the release it records leaves: a release whose record
fails (disk full, an I/O error) does not leave, and its caller hears the error. A record is one
line, whole only with its newline: a write that failed or a crash can leave a line torn at the
end of the file, which is no record (its release never left). The next record cuts it off
before it appends, so it is never glued to a line of its own, and `read` skips it. The reverse
can happen: a record whose line was whole but whose fsync failed, or whose node died before its
release was sent, stays (the log may hold a release that did not leave, never miss one that did).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

from fedptr.logs import iso_time

FILE_NAME = "audit.jsonl"

CONTRIBUTION, DP_TRAIN, SECURE_CONTRIBUTION = "contribution", "dp-train", "secure-contribution"
"""The events that follow a charge to the owner's budget (one charge each): `nodes.budget`
counts them to tell a lost budget history from a fresh one."""


class AuditLog:
    """Appends records to `directory`/audit.jsonl (fsynced), or keeps them in memory."""

    def __init__(self, node: str, directory: Path | None) -> None:
        self.node = node
        self.path = directory / FILE_NAME if directory is not None else None
        self.recent: list[dict[str, Any]] = []
        """Records of this run (all of them when there is no store directory)."""

    def record(self, event: str, requester: str, **fields: Any) -> None:
        """Append one record; the file is fsynced before this returns. Raises OSError when the
        disk refuses it (the release must not leave then)."""
        entry = {"time": iso_time(time.time()), "node": self.node, "event": event, "requester": requester, **fields}
        self.recent.append(entry)
        if self.path is None:
            return
        # imported here: nodes/durable.py imports torch, which `fedptr audit` (a reader) must not load
        from .durable import private

        with open(self.path, "a+b", opener=private) as f:
            _cut_torn_tail(f)
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def _cut_torn_tail(f: BinaryIO) -> None:
    """Cut off the end of the log past its last newline: a record torn by a failed write or a crash
    (its release never left)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        pos = max(0, pos - _TAIL_READ_BYTES)
        f.seek(pos)
        cut = f.read(end - pos).rfind(b"\n")
        if cut >= 0:
            if pos + cut + 1 < end:
                f.truncate(pos + cut + 1)
            return
    f.truncate(0)


_TAIL_READ_BYTES = 4096
"""Bytes read at a time looking back for the end of the last whole record (one read, nearly always)."""


def charged(directory: Path) -> int:
    """How many charged releases (`CONTRIBUTION`, `DP_TRAIN`, `SECURE_CONTRIBUTION`) the log in
    `directory` records.
    A line that does not parse (torn by a crash as it was written) is not counted: its charge
    was written before it, so counting fewer never excuses a lost history."""
    path = directory / FILE_NAME
    if not path.exists():
        return 0
    count = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        count += isinstance(record, dict) and record.get("event") in (CONTRIBUTION, DP_TRAIN, SECURE_CONTRIBUTION)
    return count


def read(directory: Path) -> list[dict[str, Any]]:
    """The records in a store directory's audit log, oldest first (none when there is no log)."""
    path = directory / FILE_NAME
    if not path.exists():
        return []
    *whole, _torn = path.read_text(encoding="utf-8").split("\n")  # past the last newline: no record
    return [json.loads(line) for line in whole if line.strip()]
