"""Log set-up for the broker, the nodes and clients: plain text, or one JSON object per line.

A JSON line holds ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``process`` (``broker``,
``node bob``, a client's name), ``logger``, ``message`` and, when the line concerns one request,
``rid``: the request id in hex, the same at the client, the broker and the node, so one call can
be followed across all three::

    {"time": "2025-01-01T12:00:00.000Z", "level": "DEBUG", "process": "node bob",
     "logger": "fedptr.node", "message": "request Op from 'client-3f2a'", "rid": "0100000071a2c3e5"}

Lines about one request pass it with `rid_extra` (``log.debug(..., extra=rid_extra(rid))``).
The library itself configures nothing: `setup` is for command lines and for clients that want it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")


def rid_extra(rid: bytes) -> dict[str, str]:
    """The ``extra`` of a log call about request `rid`: its id in hex."""
    return {"rid": rid.hex()}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, process, logger, message, and rid when given."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, str] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "rid", None)
        if isinstance(rid, str):
            line["rid"] = rid
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME PROCESS LEVEL MESSAGE``, with ``[rid HEX]`` appended when the line concerns a request."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s {process} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "rid", None)
        return f"{text} [rid {rid}]" if isinstance(rid, str) else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` and ``--log-format`` flags of the broker and the node."""
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every request with its id")
    parser.add_argument("--log-format", choices=FORMATS, default="text", help="json: one JSON object per line")


def setup(process: str, level: str | int = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records to `stream` (default stderr) as `fmt`, at `level`, naming
    `process` on every line. Replaces handlers set before (a command line calls it once)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
