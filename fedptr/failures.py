"""Conversion between wire `Failure` messages and the typed errors of `fedptr.errors`.

A forwarding node prepends its own name to an error's path before it answers, so the caller
learns every hop to the worker where the call failed.
"""

from __future__ import annotations

from fedptr import limits
from fedptr.errors import (
    DeadlineExceeded,
    FedptrError,
    LostWorkerError,
    OverloadedError,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    UnknownWorkerError,
)
from fedptr.wire import Failure


def _cut(text: str) -> str:
    return text[: limits.MAX_STR_BYTES // 4]


def failure_from_error(e: BaseException, here: str) -> Failure:
    """The Failure that reports `e`, raised at worker `here`, to the caller."""
    if isinstance(e, PermissionDenied):
        return Failure("denied", "", _cut(e.reason), e.worker or here, e.path or [here], e.owner)
    if isinstance(e, RemoteError):
        return Failure("remote", e.remote_type, _cut(e.remote_message), e.worker, e.path)
    if isinstance(e, UnknownWorkerError):
        return Failure("unknown-worker", "", "", e.worker, e.path)
    if isinstance(e, LostWorkerError):
        return Failure("lost-worker", "", "", e.worker, e.path)
    if isinstance(e, DeadlineExceeded):
        return Failure("timeout", "", f"{e.seconds}", e.worker, e.path)
    if isinstance(e, OverloadedError):
        return Failure("overloaded", "", _cut(e.detail), e.worker, [e.worker])
    if isinstance(e, ProtocolError):
        return Failure("protocol", "", _cut(str(e)), here, [here])
    return Failure("remote", type(e).__name__, _cut(str(e)), here, [here])


def error_from_failure(f: Failure) -> FedptrError:
    """The typed error a Failure stands for."""
    path = f.path or [f.worker]
    if f.code == "denied":
        return PermissionDenied(f.owner, f.message, f.worker, path)
    if f.code == "remote":
        return RemoteError(f.remote_type, f.message, f.worker, path)
    if f.code == "unknown-worker":
        return UnknownWorkerError(f.worker, path)
    if f.code == "lost-worker":
        return LostWorkerError(f.worker, path)
    if f.code == "timeout":
        try:
            seconds = float(f.message)
        except ValueError:
            seconds = 0.0
        return DeadlineExceeded(f.worker, seconds, path)
    if f.code == "overloaded":
        return OverloadedError(f.worker, f.message)
    return ProtocolError(f"worker {f.worker!r}: {f.message}")


def with_hop(e: BaseException, here: str) -> FedptrError:
    """`e` as seen one hop up the chain: the same error with `here` prepended to its path."""
    f = failure_from_error(e, here)
    return error_from_failure(Failure(f.code, f.remote_type, f.message, f.worker, [here, *f.path], f.owner))
