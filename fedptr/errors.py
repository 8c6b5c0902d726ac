"""The typed errors of fedptr. Every failure a caller can see is a `FedptrError` subclass.

Names say who caused the failure (trio's style):

* a worker failed or refused: `RemoteError`, `PermissionDenied`, and the `WorkerRefused` family
  (`OverloadedError`, `StoreFullError`, `QuotaExceededError`, `ObjectNotFoundError`,
  `OpNotAllowedError`); these
  travel on the wire as a `wire.Failure` with a `wire.FailureCode` and keep their type;
* the network or a peer went away: `UnknownWorkerError`, `LostWorkerError`, `DeadlineExceeded`,
  `ProtocolError`, `RegistrationRefused`;
* this process: `ClientClosedError`, `TooManyInFlightError`, `ConsumedPointerError`;
* some of several destinations, each for its own reason: `BroadcastError` holds each one's error;
* the caller misused the API: `UsageError` subclasses, which are also the builtin they stand
  for (`InvalidArgumentError` is a ValueError, `UnsupportedTypeError` a TypeError).
"""

from __future__ import annotations

from typing import Any, TypeVar

_E = TypeVar("_E", bound=BaseException)


def copy_to_raise(error: _E) -> _E:
    """A copy of `error` (its type, message, attributes, cause and context) with no traceback.

    An error a future keeps (a pointer's op, an update, a `Pending` handle) is raised to each
    await as such a copy, never itself: a raised error's traceback keeps every frame it passes
    through, among them the caller's, which may hold the pointer that keeps the future, which
    keeps the error. That reference cycle would keep the pointer, once dropped, and its remote
    object until the cyclic garbage collector runs. The kept error is never raised to an await,
    so it keeps no frame of an awaiting caller."""
    # `__new__` without `__init__` (each subclass takes its own arguments), the one the class
    # inherits its constructor's from (along `__base__`, as CPython does: its own lookup would
    # find MemoryError's for StoreFullError, which refuses a class laid out as WorkerRefused),
    # given `args`: an exception group's needs them (its members), an OSError's sets its errno
    base: Any = type(error)
    while "__new__" not in vars(base):
        base = base.__base__
    copy: _E = base.__new__(type(error), *error.args)
    copy.args = error.args
    copy.__dict__.update(error.__dict__)  # `worker`, `path`, `candidates`, notes, ...
    copy.__cause__ = error.__cause__
    copy.__context__ = error.__context__
    copy.__suppress_context__ = error.__suppress_context__
    return copy


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
        super().__init__(
            f"unknown worker {worker!r} (path {' -> '.join(self.path)}): no worker of that name is registered "
            "with the broker; `await client.workers()` lists those that are (a node registers when it starts, "
            "`fedptr status` shows which are up)"
        )


class LostWorkerError(FedptrError):
    """Raised when the worker holding a call went away (it unregistered or vanished) before answering.

    The call's outcome is unknown, not failed: a worker declared lost may be alive and run it
    later (it is not aborted there). A pointer it was to make is deleted when dropped, after the
    call if that ever runs (docs/REDTEAM.md, "Durability by property, round nine")."""

    def __init__(self, worker: str, path: list[str] | None = None) -> None:
        self.worker = worker
        self.path = list(path or [worker])
        super().__init__(
            f"lost worker {worker!r} (path {' -> '.join(self.path)}): it went away (its node stopped or lost "
            "the broker) before answering, so whether the call ran there is unknown; `fedptr status` shows "
            "whether it is back; a restarted node holds its --data datasets and what its --store kept, nothing else"
        )


class DeadlineExceeded(FedptrError, TimeoutError):
    """Raised when a call's deadline passed before an answer came. `worker` is the worker that
    did not answer in time and `path` the workers the request went through to reach it.

    The call's outcome is unknown, not failed: the request is not aborted at the worker, which
    may still run it (a late answer is dropped). A pointer it was to make is deleted when
    dropped, after the call if that ever runs; a hand-over in doubt raises InDoubtError."""

    def __init__(self, worker: str, seconds: float, path: list[str] | None = None) -> None:
        self.worker = worker
        self.seconds = seconds
        self.path = list(path or [worker])
        super().__init__(f"no answer from worker {worker!r} within {seconds:.3g} s (path {' -> '.join(self.path)})")


class BrokerUnreachable(DeadlineExceeded):
    """Raised when the broker at `address` did not answer a registration within `seconds` (it
    is down, unreachable, or refuses this peer's CURVE key, which it never answers)."""

    def __init__(self, address: str, seconds: float) -> None:
        super().__init__("broker", seconds, [f"broker at {address}"])
        self.address = address
        # a CURVE broker never answers a peer without a key it accepts: the newcomer's usual case
        self.args = (
            f"no answer from the broker at {address} within {seconds:.3g} s: it is down or elsewhere, or it runs "
            "CURVE and does not accept this peer's key (give it: connect(address, curve=fedptr.security."
            "CurveKeys.load(secret_file, broker_key_file)); on the command line --curve-secret and --broker-key)",
        )


class ProtocolError(FedptrError):
    """Raised when bytes do not form a valid fedptr message: wrong protocol name or version,
    unknown kind, bad field types, a tensor buffer whose size does not match its dtype and shape,
    or a limit of `fedptr.limits` exceeded."""


class RegistrationRefused(FedptrError):
    """Raised when the broker refuses a registration, for example because the name is taken."""


class WorkerRefused(FedptrError):
    """Base of the refusals a worker answers with, each for a reason its subclass names.

    `worker` is the worker that refused (empty while the error is still inside that worker),
    `detail` says why, and `path` is the chain of workers the request went through."""

    what = "refused the request"

    def __init__(self, worker: str, detail: str, path: list[str] | None = None) -> None:
        self.worker = worker
        self.detail = detail
        self.path = list(path or ([worker] if worker else []))
        super().__init__(f"worker {worker!r} {self.what}: {detail}")


class OverloadedError(WorkerRefused):
    """Raised when a worker refused a request because its bounded queues are full (its pool
    of computations, its forwards waiting, or the broker's queue to it), because a listing
    would be too large, or because its disk did not catch up in time with the changes a listing
    must reflect. Retry later, or with fewer requests at once."""

    what = "is overloaded"


class StoreFullError(WorkerRefused, MemoryError):
    """Raised when storing a result would take a worker's store past its byte cap
    (``fedptr-node --max-store-bytes``). Delete objects on that worker first."""

    what = "has no room in its store"


class QuotaExceededError(WorkerRefused):
    """Raised when a request would take one client past its share of a worker: the objects it
    holds there (``fedptr-node --max-client-objects``), their tensor bytes
    (``--max-client-bytes``), or its requests queued behind its computations
    (`limits.CLIENT_MAX_QUEUED_REQUESTS`). Other clients are not affected. Delete objects on
    that worker, or await before sending more."""

    what = "refused it: over the client's quota"


class ObjectNotFoundError(WorkerRefused, LookupError):
    """Raised when a request names an object id the worker does not hold (it was deleted,
    handed on, or never existed)."""

    what = "holds no such object"


class OpNotAllowedError(WorkerRefused):
    """Raised when a request names an operation, or a message kind, that is not on the worker's
    allow-list (`fedptr.ops`). The client refuses most such calls before sending them."""

    what = "does not allow the operation"


class InDoubtError(WorkerRefused):
    """Raised when a hand-over (a move, a pointer sent) may or may not have happened: a worker
    on the way died or stopped answering after the data left. The workers settle it by
    themselves from their records, once both can talk again; `candidates` are the pointers the
    object may be found under (exactly one will hold it), and `Client.resolve` waits for it."""

    what = "cannot tell yet whether the hand-over happened"

    def __init__(self, worker: str, detail: str, path: list[str] | None = None) -> None:
        super().__init__(worker, detail, path)
        self.candidates: list[Any] = []
        self.hand_over = ""
        """``"move"`` or ``"send"`` (a pointer sent) when the client knows what was in doubt."""


class DamagedStoreError(FedptrError):
    """A node's ``--store`` directory holds files that do not validate (a torn tensor file, a
    record that does not parse): the node refuses to start rather than lose those objects
    silently. `files` are their paths; ``fedptr store recover DIR`` moves them aside."""

    def __init__(self, message: str, files: list[str]) -> None:
        self.files = files
        super().__init__(message)


class BroadcastError(FedptrError):
    """Raised by `fedptr.broadcast` when some destinations failed; the others hold their copy.

    `errors` maps the name of each worker that failed to that destination's own typed error
    (UnknownWorkerError, LostWorkerError, DeadlineExceeded, a worker's refusal such as
    StoreFullError, ...); `pointers` holds one entry per worker asked, in order: the pointer to
    its copy, or None where it failed. Dropping those pointers deletes the copies as usual."""

    def __init__(self, errors: dict[str, FedptrError], pointers: list[Any]) -> None:
        self.errors = dict(errors)
        self.pointers = list(pointers)
        failed = "; ".join(f"{name!r}: {e}" for name, e in self.errors.items())
        super().__init__(f"broadcast failed on {len(self.errors)} of {len(self.pointers)} workers: {failed}")


class ClientClosedError(FedptrError):
    """Raised when a call is made on a client (or a node's link) that has been closed, and by
    every call still pending when it closes. `name` is the closed peer, `dest` the call's target."""

    def __init__(self, name: str, dest: str) -> None:
        self.name = name
        self.dest = dest
        super().__init__(f"{name!r} is closed; the call to {dest!r} was not completed")


class TooManyInFlightError(FedptrError):
    """Raised by a pipelined call (an operation, `Worker.send`) when this client already has
    `max_in_flight` requests unanswered. Await some results first; awaited calls wait for room
    instead of raising."""


class ConsumedPointerError(FedptrError):
    """Raised when a pointer is used after `get`, `move` or `send` handed its object on."""


class UsageError(FedptrError):
    """Base of the errors raised when the API is called wrongly (the caller's mistake)."""


class InvalidArgumentError(UsageError, ValueError):
    """Raised when an argument has the right type but a value the call cannot take."""


class UnsupportedTypeError(UsageError, TypeError):
    """Raised when a value of a type fedptr cannot send or run remotely is passed."""


class NotAwaitedError(UnsupportedTypeError):
    """Raised when a call's result was expected and its coroutine came instead: an ``await``
    forgotten (``p.get()`` for ``await p.get()``), whether the coroutine is passed to a fedptr
    call (``x + y.move(bob)``) or used as the value itself (``p.get() + 1``, ``p.item() > 0``,
    ``len(bob.search(tag))``, ``float(loss.item())``, ``torch.add(p.get(), 1)``; an attribute,
    ``p.get().numpy()``, is an AttributeError saying the same). The message names the call and
    where to add the ``await``; no "never awaited" warning follows it."""


class DataDependentError(UsageError, TypeError):
    """Raised when Python needs a value a pointer cannot know without a round trip: `bool(p)`
    (``if p > 0:``), `int(p)`/`operator.index(p)`, `iter(p)`, or `len(p)` and `p.shape` while
    the shape depends on the data (``x[mask]`` before it was awaited). Await the pointer (its
    shape is then known) or `get` the value first, or use a remote op (``p.eq(q)``, ``p.any()``).
    """


class LocationMismatchError(InvalidArgumentError):
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


class BudgetExhaustedError(PermissionDenied):
    """Raised when a release would take data owner `owner` past its privacy budget (its
    ``--epsilon`` at its ``--delta``), or when that owner has no budget and so releases nothing.
    The message says how much epsilon is left; nothing was released or charged."""


class DropoutError(FedptrError):
    """Raised when a secure aggregation round cannot finish because owners dropped out: fewer
    than its threshold survived a phase, or too few of an owner's neighbours answered to remove
    its masks. `workers` names the owners concerned, `phase` the step that failed."""

    def __init__(self, workers: list[str], phase: str, detail: str) -> None:
        self.workers = list(workers)
        self.phase = phase
        self.detail = detail
        super().__init__(
            f"secure aggregation failed at {phase} ({', '.join(map(repr, workers))}): {detail}; nothing was "
            "released: start the owners that dropped again (`fedptr status` shows which are down) or ask "
            "fewer, then run a new round; an owner that sent its masked input was charged all the same "
            "(`await fedptr.dp.budget(worker)` shows what it has left)"
        )
