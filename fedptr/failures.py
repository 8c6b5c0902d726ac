"""Conversion between wire `Failure` messages and the typed errors of `fedptr.errors`.

A forwarding node prepends its own name to an error's path before it answers, so the caller
learns every hop to the worker where the call failed. Messages are cut in one place (`cut`).
"""

from __future__ import annotations

from fedptr import limits
from fedptr.errors import (
    BudgetExhaustedError,
    DeadlineExceeded,
    DropoutError,
    FedptrError,
    InDoubtError,
    LostWorkerError,
    ObjectNotFoundError,
    OpNotAllowedError,
    OverloadedError,
    PermissionDenied,
    ProtocolError,
    QuotaExceededError,
    RemoteError,
    StoreFullError,
    UnknownWorkerError,
    WorkerRefused,
)
from fedptr.wire import Failure, FailureCode

_REFUSALS: dict[FailureCode, type[WorkerRefused]] = {
    FailureCode.OVERLOADED: OverloadedError,
    FailureCode.STORE_FULL: StoreFullError,
    FailureCode.NOT_FOUND: ObjectNotFoundError,
    FailureCode.OP_NOT_ALLOWED: OpNotAllowedError,
    FailureCode.IN_DOUBT: InDoubtError,
    FailureCode.QUOTA_EXCEEDED: QuotaExceededError,
}
_CODE_OF_REFUSAL = {cls: code for code, cls in _REFUSALS.items()}


def cut(text: str) -> str:
    """`text` short enough for a wire string (error messages from torch can be long)."""
    return text[: limits.MAX_STR_BYTES // 4]


def failure_from_error(e: BaseException, here: str) -> Failure:
    """The Failure that reports `e`, raised at worker `here`, to the caller."""
    if isinstance(e, PermissionDenied):
        code = FailureCode.BUDGET_EXHAUSTED if isinstance(e, BudgetExhaustedError) else FailureCode.DENIED
        return Failure(code.value, "", cut(e.reason), e.worker or here, e.path or [here], e.owner)
    if isinstance(e, DropoutError):
        return Failure(FailureCode.DROPOUT.value, e.phase, cut(e.detail), here, [here], ",".join(e.workers))
    if isinstance(e, WorkerRefused):
        code = _CODE_OF_REFUSAL.get(type(e), FailureCode.OVERLOADED)
        return Failure(code.value, "", cut(e.detail), e.worker or here, e.path or [here])
    if isinstance(e, RemoteError):
        return Failure(FailureCode.REMOTE.value, e.remote_type, cut(e.remote_message), e.worker, e.path)
    if isinstance(e, UnknownWorkerError):
        return Failure(FailureCode.UNKNOWN_WORKER.value, "", "", e.worker, e.path)
    if isinstance(e, LostWorkerError):
        return Failure(FailureCode.LOST_WORKER.value, "", "", e.worker, e.path)
    if isinstance(e, DeadlineExceeded):
        return Failure(FailureCode.TIMEOUT.value, "", f"{e.seconds}", e.worker, e.path)
    if isinstance(e, ProtocolError):
        return Failure(FailureCode.PROTOCOL.value, "", cut(str(e)), here, [here])
    return Failure(FailureCode.REMOTE.value, type(e).__name__, cut(str(e)), here, [here])


def error_from_failure(f: Failure) -> FedptrError:
    """The typed error a Failure stands for."""
    path = f.path or [f.worker]
    code = FailureCode(f.code)
    if code in _REFUSALS:
        return _REFUSALS[code](f.worker, f.message, path)
    if code == FailureCode.DENIED:
        return PermissionDenied(f.owner, f.message, f.worker, path)
    if code == FailureCode.BUDGET_EXHAUSTED:
        return BudgetExhaustedError(f.owner, f.message, f.worker, path)
    if code == FailureCode.DROPOUT:
        return DropoutError(f.owner.split(",") if f.owner else [], f.remote_type, f.message)
    if code == FailureCode.REMOTE:
        return RemoteError(f.remote_type, f.message, f.worker, path)
    if code == FailureCode.UNKNOWN_WORKER:
        return UnknownWorkerError(f.worker, path)
    if code == FailureCode.LOST_WORKER:
        return LostWorkerError(f.worker, path)
    if code == FailureCode.TIMEOUT:
        try:
            seconds = float(f.message)
        except ValueError:
            seconds = 0.0
        return DeadlineExceeded(f.worker, seconds, path)
    return ProtocolError(f"worker {f.worker!r}: {f.message}")


def with_hop(e: BaseException, here: str) -> FedptrError:
    """`e` as seen one hop up the chain: the same error with `here` prepended to its path."""
    f = failure_from_error(e, here)
    return error_from_failure(Failure(f.code, f.remote_type, f.message, f.worker, [here, *f.path], f.owner))
