"""A data owner's audit log: an append-only record of everything that left the node.

One JSON object per line in ``audit.jsonl`` in the node's store directory (in memory only for a
node without one): when, what (get, move, contribution, secure-contribution, dp-train, release), which object, who
asked, where it went, and the epsilon spent and left. `fedptr audit STORE_DIR` prints it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

FILE_NAME = "audit.jsonl"


class AuditLog:
    """Appends records to `directory`/audit.jsonl (fsynced), or keeps them in memory."""

    def __init__(self, node: str, directory: Path | None) -> None:
        self.node = node
        self.path = directory / FILE_NAME if directory is not None else None
        self.recent: list[dict[str, Any]] = []
        """Records of this run (all of them when there is no store directory)."""

    def record(self, event: str, requester: str, **fields: Any) -> None:
        """Append one record; the file is fsynced before this returns."""
        entry = {"time": round(time.time(), 3), "node": self.node, "event": event, "requester": requester, **fields}
        self.recent.append(entry)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read(directory: Path) -> list[dict[str, Any]]:
    """The records in a store directory's audit log, oldest first (none when there is no log)."""
    path = directory / FILE_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
