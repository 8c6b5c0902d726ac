"""A data owner's audit log: an append-only record of everything that left the node.

One JSON object per line in ``audit.jsonl`` in the node's store directory (in memory only for a
node without one): when (ISO 8601, UTC, milliseconds), what (get, move, contribution,
secure-contribution, dp-train, release), which object, who asked, where it went, and the
epsilon spent and left. `fedptr audit STORE_DIR` prints it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

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
        """Append one record; the file is fsynced before this returns."""
        entry = {"time": iso_time(time.time()), "node": self.node, "event": event, "requester": requester, **fields}
        self.recent.append(entry)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


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
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
