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


def iso_time(seconds: float) -> str:
    """`seconds` since the epoch as ISO 8601 in UTC with milliseconds: ``2025-01-01T12:00:00.123Z``
    (the time of every log line, text or JSON, and of every audit record)."""
    whole = int(seconds)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(whole))}.{int((seconds - whole) * 1000):03d}Z"


def rid_extra(rid: bytes) -> dict[str, str]:
    """The ``extra`` of a log call about request `rid`: its id in hex."""
    return {"rid": rid.hex()}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, process, logger, message, and rid when given."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": iso_time(record.created),
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
    """``TIME PROCESS LEVEL MESSAGE`` (TIME as `iso_time`), with ``[rid HEX]`` appended when the
    line concerns a request."""

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s {process} %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "rid", None)
        return f"{text} [rid {rid}]" if isinstance(rid, str) else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--log-level`` and ``--log-format`` flags of the broker and the node."""
    parser.add_argument("--log-level", default="INFO", help="DEBUG logs every request with its id")
    parser.add_argument("--log-format", choices=FORMATS, default="text", help="json: one JSON object per line")


ANNOUNCE = "fedptr.announce"
"""The logger of lines a parent process waits for (``fedptr-node bob ready``): after `setup` they
go to stdout in the chosen format (so a JSON log has no plain line), at any `level`."""


def setup(process: str, level: str | int = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send the root logger's records to `stream` (default stderr) as `fmt`, at `level`, naming
    `process` on every line, and `ANNOUNCE`'s to stdout whatever the level; Python warnings are
    logged too. Replaces handlers set before (a command line calls it once)."""
    formatter = JsonFormatter(process) if fmt == "json" else TextFormatter(process)
    for name, out, at in (("", stream or sys.stderr, level), (ANNOUNCE, sys.stdout, logging.INFO)):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.setLevel(at)
    logging.getLogger(ANNOUNCE).propagate = False
    # a Python warning (a library's UserWarning) becomes a record of logger ``py.warnings`` in the
    # same format, rather than a plain line on stderr in the middle of a JSON log
    logging.captureWarnings(True)
