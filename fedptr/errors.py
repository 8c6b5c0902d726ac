"""The typed errors of fedptr. Every failure a caller can see is a `FedptrError` subclass."""

from __future__ import annotations


class FedptrError(Exception):
    """Base class of every error fedptr raises."""


class RemoteError(FedptrError):
    """Raised when an operation failed on a worker.

    `remote_type` and `remote_message` are the worker's exception type name and message (for
    example ``"RuntimeError"`` and torch's shape-mismatch text); `worker` is the worker where it
    failed and `path` the chain of workers the request went through, ending at `worker`.
    A later operation that depends on a failed one fails with the same remote type and message.
    """

    def __init__(self, remote_type: str, remote_message: str, worker: str, path: list[str]) -> None:
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.worker = worker
        self.path = list(path)
        hops = " -> ".join(self.path)
        super().__init__(f"{remote_type} on worker {worker!r} (path {hops}): {remote_message}")


class UnknownWorkerError(FedptrError):
    """Raised when a request names a worker the broker has no registration for.

    `worker` is that name; `path` the workers the request went through before it failed.
    """

    def __init__(self, worker: str, path: list[str] | None = None) -> None:
        self.worker = worker
        self.path = list(path or [worker])
        super().__init__(f"unknown worker {worker!r} (path {' -> '.join(self.path)})")


class LostWorkerError(FedptrError):
    """Raised when the worker holding a call went away (it unregistered or vanished) before answering."""

    def __init__(self, worker: str, path: list[str] | None = None) -> None:
        self.worker = worker
        self.path = list(path or [worker])
        super().__init__(f"lost worker {worker!r} (path {' -> '.join(self.path)})")


class DeadlineExceeded(FedptrError, TimeoutError):
    """Raised when a call's deadline passed before an answer came. `worker` is the worker that
    did not answer in time and `path` the workers the request went through to reach it."""

    def __init__(self, worker: str, seconds: float, path: list[str] | None = None) -> None:
        self.worker = worker
        self.seconds = seconds
        self.path = list(path or [worker])
        super().__init__(f"no answer from worker {worker!r} within {seconds:.3g} s (path {' -> '.join(self.path)})")


class ProtocolError(FedptrError):
    """Raised when bytes do not form a valid fedptr message: wrong protocol name or version,
    unknown kind, bad field types, a tensor buffer whose size does not match its dtype and shape,
    or a limit of `fedptr.limits` exceeded."""


class RegistrationRefused(FedptrError):
    """Raised when the broker refuses a registration, for example because the name is taken."""


class OverloadedError(FedptrError):
    """Raised when a worker refused a request because its bounded queues are full."""

    def __init__(self, worker: str, detail: str) -> None:
        self.worker = worker
        self.detail = detail
        super().__init__(f"worker {worker!r} is overloaded: {detail}")


class ConsumedPointerError(FedptrError):
    """Raised when a pointer is used after `get`, `move` or `send` handed its object on."""


class LocationMismatchError(FedptrError, ValueError):
    """Raised when an operation mixes pointers on different workers; both names are in the message."""


class PermissionDenied(FedptrError):
    """Raised when a worker's privacy policy refuses a request: a get of anything derived from
    a data owner's private data (that is not a released aggregate), a move to a worker the owner
    does not trust, or an aggregate that does not meet the policy. `owner` names the data owner
    whose policy applied; `worker` is where it was refused."""

    def __init__(self, owner: str, reason: str, worker: str = "", path: list[str] | None = None) -> None:
        self.owner = owner
        self.reason = reason
        self.worker = worker
        self.path = list(path or ([worker] if worker else []))
        where = f" at worker {worker!r}" if worker else ""
        super().__init__(f"denied by the privacy policy of {owner!r}{where}: {reason}")
