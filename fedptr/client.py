"""The asyncio client: `connect`, `Client`, `Worker` and the store listing type `ObjectInfo`."""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import torch
from torch import nn

from fedptr import envelope, limits, meta, modules, wire
from fedptr.awaiting import awaited, not_awaited
from fedptr.errors import (
    ConsumedPointerError,
    DeadlineExceeded,
    FedptrError,
    InDoubtError,
    InvalidArgumentError,
    LostWorkerError,
    ObjectNotFoundError,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    UnknownWorkerError,
    UnsupportedTypeError,
    UsageError,
    WorkerRefused,
)
from fedptr.link import Link
from fedptr.pointer import ModulePointer, Pointer, in_doubt, raised, short_id
from fedptr.security import CurveKeys
from fedptr.tensors import from_raw, to_raw

if TYPE_CHECKING:
    from fedptr.plans import Recorder


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a worker's store, as `Worker.objects()` reports it.

    `kind` is ``"tensor"`` (with `shape`, `dtype` and, for small tensors, `preview` values),
    ``"module"`` (a model), ``"pointer"`` (with `location` and `id_at_location`) or ``"failed"``
    (an operation's result that failed; `dtype` holds the error type)."""

    owner: str
    obj_id: int
    kind: str
    shape: tuple[int, ...]
    dtype: str
    preview: list[Any] | None
    location: str
    id_at_location: int

    def __repr__(self) -> str:
        if self.kind == "pointer":
            # ids as a Pointer's repr shows them, so that a listing and the client's pointers match
            here, there = short_id(self.obj_id), short_id(self.id_at_location)
            return f"[PointerTensor | {self.owner}:{here} -> {self.location}:{there}]"
        if self.kind == "failed":
            return f"<failed: {self.dtype}>"
        if self.kind == "module":  # a model: no shape or dtype of its own (it printed as tensor(<[] >))
            return "<module>"
        if self.preview is not None:
            values = torch.tensor(self.preview, dtype=_preview_dtype(self.dtype)).reshape(self.shape)
            return repr(values)
        return f"tensor(<{list(self.shape)} {self.dtype}>)"


class Objects(dict[int, ObjectInfo]):
    """A worker's store as `Worker.objects()` lists it: object id -> ObjectInfo. Printed, its
    ids are a Pointer's short ids (``{'4dd5b9': tensor([1, 2, 3, 4])}`` for the pointer
    ``me -> bob:4dd5b9``), so a listing and the client's pointers read alike; its keys are the
    full ids (`Pointer.id_at_location`)."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{short_id(obj_id)!r}: {info!r}" for obj_id, info in self.items()) + "}"


def _described(shape: wire.Value, dtype: str) -> torch.Tensor | None:
    """The meta tensor of a search result described as `shape` and `dtype` (None if malformed)."""
    if not isinstance(shape, list):
        return None
    dims = [d for d in shape if type(d) is int]
    return meta.described(dims, dtype) if len(dims) == len(shape) else None


def _preview_dtype(name: str) -> torch.dtype:
    from fedptr.tensors import DTYPE_BY_NAME

    return DTYPE_BY_NAME.get(name, torch.float64)


class Worker:
    """A named worker, seen from a client. Cheap to create; `client.worker(name)` gives one."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    @property
    def client(self) -> Client:
        """The client this worker handle belongs to."""
        return self._client

    def __repr__(self) -> str:
        return f"<Worker {self.name}>"

    def send(self, x: torch.Tensor | nn.Module | Pointer) -> Pointer:
        """Store `x` on this worker and return a pointer to it at once, like an operation:
        operations on it queue behind the send, and a failed send is raised by awaiting the
        pointer (or anything computed from it), or by the next await on this worker.
        ``await worker.send(x)`` waits until the worker holds it, and returns the pointer.

        A tensor is copied there (``requires_grad`` included). A model built from the allow-list
        of `fedptr.modules` travels as its spec and parameters (copied by this call: changing
        the model afterwards changes nothing sent) and comes back as a `ModulePointer`; any
        other model raises UnsupportedTypeError. A pointer is itself sent (a pointer to a
        pointer): the data does not move, and the pointer passed in is consumed, as its object
        now belongs to this worker's entry (two-phase: see `_send_pointer`; its outcome may be
        in doubt, raised as InDoubtError when awaited)."""
        client = self._client
        new_id = client.new_id()
        if isinstance(x, Pointer):
            x.check_alive()
            if x.client is not client:
                raise InvalidArgumentError("that pointer belongs to another client")
            if x.location == self.name:
                raise InvalidArgumentError(f"{x!r} already points to an object on {self.name!r}")
            x.owned = False  # at once: nothing else may hand it on meanwhile
            sent = Pointer(client, self.name, new_id, meta=x.meta)
            # the pointer returned is the send's candidate if it ends in doubt (held weakly: the
            # caller may drop it, which deletes it as usual while the send is not in doubt)
            sending = client.track(asyncio.ensure_future(self._send_pointer(x, new_id, weakref.ref(sent))))
            sent.made_by(sending, ordered=False)
            return sent
        if isinstance(x, torch.Tensor):
            # the bytes leave after this returns: small tensors are copied now, big ones are sent
            # from their memory (a copy would cost as much as the send) and checked unchanged
            small = x.nbytes <= limits.SEND_COPY_MAX_BYTES
            put = wire.Put(new_id, to_raw(x, copy=small), x.requires_grad)
            done = self._put(put, None if small else (x, x._version))
            return Pointer(client, self.name, new_id, done, meta=meta.of_tensor(x))
        if isinstance(x, nn.Module):
            # copies, as a small tensor's: the session keeps the request for a resend (the broker
            # forgot us), which must not carry a training step taken after this returned
            spec, params = modules.to_wire(x, copy=True)
            model = ModulePointer(client, self.name, new_id, spec, self._put(wire.PutModule(new_id, spec, params)))
            return model if x.training else model.eval()
        expected = "a tensor, an nn.Module or a Pointer"
        raise not_awaited(x, expected) or UnsupportedTypeError(f"can send {expected}, not {type(x).__name__}")

    def _put(
        self, msg: wire.Put | wire.PutModule, sent_from: tuple[torch.Tensor, int] | None = None
    ) -> asyncio.Future[wire.Message]:
        """Send a store request, pipelined; its failure is also raised by the next await here.
        `sent_from` is the tensor whose memory the request is sent from, with its version then:
        if it changed before the worker acknowledged, the bytes may be torn, and the send fails."""
        fut = self._client.request_nowait(self.name, msg)
        if sent_from is not None:
            fut = _unchanged(fut, *sent_from, lambda: self._client.release(self.name, msg.obj_id))
        self._client.track_effect(self.name, fut)
        return fut

    async def _send_pointer(self, x: Pointer, new_id: int, sent: weakref.ref[Pointer]) -> wire.Message:
        """Two-phase: this worker stores a pointer to `x`'s object first, and only then is the
        object granted to it. A definite failure of either step leaves `x` usable (the stored
        pointer, if any, is deleted); a grant whose outcome is unknown is asked again until the
        deadline, and past it raises InDoubtError (see `Client.resolve`) whose candidates are `x` and
        the pointer `sent` returned to the caller (if it still holds it). Returns Ok when done."""
        client = self._client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + client.timeout
        try:
            await x  # the object must exist before another worker refers to it
        except BaseException:
            x.owned = True  # it failed on its own: it stays the caller's
            raise
        try:
            await client.call(self.name, wire.PutPointer(new_id, x.location, x.id_at_location))
        except BaseException as e:
            x.owned = True
            if isinstance(e, (LostWorkerError, DeadlineExceeded)):
                client.release(self.name, new_id)  # it may have been stored: it owns nothing yet
            raise
        attempt = 0
        while True:
            try:
                left = deadline - loop.time()
                if left <= 0:
                    raise DeadlineExceeded(x.location, client.timeout, [x.location])
                await client.call(x.location, wire.Grant(x.id_at_location, self.name), left)
                return wire.Ok()
            except PermissionDenied:
                if attempt:
                    return wire.Ok()  # an earlier grant went through: the object is no longer ours to grant
                x.owned = True
                client.release(self.name, new_id)
                raise
            except (LostWorkerError, DeadlineExceeded, FedptrError) as e:
                # once a grant may be on its way, no later refusal proves it will not arrive
                if not attempt and not isinstance(e, (LostWorkerError, DeadlineExceeded)):
                    x.owned = True
                    client.release(self.name, new_id)
                    raise
                if loop.time() + limits.RESOLVE_RETRY_S >= deadline:
                    x.owned = True
                    candidate = sent()  # not `or`: a pointer's truth value is data-dependent
                    if candidate is None:
                        candidate = Pointer(client, self.name, new_id)
                    raise in_doubt(e, x.location, "send", [x, candidate])  # noqa: B904
            except BaseException:
                x.owned = True
                client.release(self.name, new_id)
                raise
            attempt += 1
            await asyncio.sleep(limits.RESOLVE_RETRY_S)

    @awaited
    async def search(self, tag: str) -> list[Pointer]:
        """Pointers to the data this worker was started with under `tag` (``--data TAG=PATH``),
        one per array in the order of their names. The data stays the worker's: dropping these
        pointers deletes nothing, and its privacy policy decides what may be fetched."""
        reply = await self._client.call(self.name, wire.Search(tag))
        if not isinstance(reply, wire.SearchReply):
            raise ProtocolError(f"expected SearchReply, got {type(reply).__name__}")
        described: list[torch.Tensor | None] = [None] * len(reply.ids)
        if len(reply.shapes) == len(reply.ids) == len(reply.dtypes):
            described = [_described(shape, d) for shape, d in zip(reply.shapes, reply.dtypes, strict=True)]
        return [
            Pointer(self._client, self.name, i, deletes=False, meta=m)
            for i, m in zip(reply.ids, described, strict=True)
        ]

    @awaited
    async def objects(self) -> Objects:
        """This worker's store: object id -> ObjectInfo (printed with a Pointer's short ids), once
        this client's earlier operations settled. On a worker with ``--store``, the listing is what
        a restart would keep: it waits until the changes before it (writes and deletions) are on
        disk.

        Raises OverloadedError when the worker's disk did not catch up in time,
        LostWorkerError, DeadlineExceeded."""
        await self._client._settle()
        reply = await self._client.call(self.name, wire.ListObjects())
        if not isinstance(reply, wire.ObjectsReply):
            raise ProtocolError(f"expected ObjectsReply, got {type(reply).__name__}")
        return Objects(
            (
                r.obj_id,
                ObjectInfo(
                    self.name, r.obj_id, r.kind, tuple(r.shape), r.dtype, r.preview, r.location, r.id_at_location
                ),
            )
            for r in reply.rows
        )

    @awaited
    async def clear(self) -> None:
        """Delete everything this client owns in this worker's store (pointers delete their
        objects down the chain). On a worker with ``--store`` it returns once the deletions are
        on disk, so a restart cannot bring the objects back.

        Raises RemoteError when the worker's disk refused a deletion, LostWorkerError,
        DeadlineExceeded (the deletions go on; only the answer was not awaited)."""
        await self._client._settle()
        await self._client.call(self.name, wire.Clear())


def _then(
    fut: asyncio.Future[wire.Message], check: Callable[[wire.Message], wire.Message]
) -> asyncio.Future[wire.Message]:
    """A future settled as `fut` is: cancelled or failed alike, else with `check(result)`, or
    with the FedptrError `check` raised."""
    out: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()

    def settled(f: asyncio.Future[wire.Message]) -> None:
        if f.cancelled():
            out.cancel()
        elif f.exception() is not None:
            out.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            try:
                out.set_result(check(f.result()))
            except FedptrError as e:
                out.set_exception(e)

    fut.add_done_callback(settled)
    return out


def _unchanged(
    fut: asyncio.Future[wire.Message], tensor: torch.Tensor, version: int, discard: Callable[[], None]
) -> asyncio.Future[wire.Message]:
    """`fut`, failing with UsageError (after `discard` of what was stored) if `tensor` was
    changed in place before `fut` succeeded."""

    def check(reply: wire.Message) -> wire.Message:
        if tensor._version != version:
            discard()
            raise UsageError("the tensor was changed in place while it was being sent: send it again")
        return reply

    return _then(fut, check)


def _nth_result(done: asyncio.Future[wire.Message], k: int) -> asyncio.Future[wire.Message]:
    """Result `k` (from 1)'s share of the reply to an op with several results: an Ok with its
    shape and dtype (the reply's `more`), or the op's error."""

    def check(reply: wire.Message) -> wire.Message:
        described = reply.more[k - 1] if isinstance(reply, wire.Ok) and k <= len(reply.more) else None
        shape, dtype = described if type(described) is list and len(described) == 2 else (None, None)
        if type(shape) is not list or not isinstance(dtype, str):
            raise ProtocolError(f"the reply describes no result {k}: {reply!r:.80}")
        return wire.Ok([d for d in shape if type(d) is int], dtype)

    return _then(done, check)


def _first_error(futures: list[asyncio.Future[wire.Message]]) -> BaseException | None:
    """The error of the first of the settled `futures` that failed (a cancelled one counts as none)."""
    for fut in futures:
        if not fut.cancelled() and (error := fut.exception()) is not None:
            return error
    return None


class Client:
    """A connection to a fedptr broker. Get one from `fedptr.connect` or `local_cluster(...).client`."""

    def __init__(self, link: Link, timeout: float = limits.CALL_TIMEOUT_S) -> None:
        self._link = link
        self.timeout = timeout
        """Deadline, in seconds, of every call this client makes."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._outstanding: set[asyncio.Future[wire.Message]] = set()
        """Client-side steps still running (`track`); requests in flight are the link's."""
        self._effects: dict[asyncio.Future[wire.Message], str] = {}
        self._waiters: dict[asyncio.Future[wire.Message], list[asyncio.Future[None]]] = {}
        """Per future awaited through `settled`: the waiters it wakes."""
        self._deletes: dict[str, list[int]] = defaultdict(list)
        self._unsure: set[str] = set()
        """Workers a request found lost (or past its deadline) that have not answered since."""
        self._owed: dict[str, set[int]] = defaultdict(set)
        """Deletes sent to an unsure worker, sent again once it answers (see `_heard`)."""
        self._flush_scheduled = False
        self._flush_timer: asyncio.TimerHandle | None = None
        """The flush `release` scheduled from the loop's thread, while it is due."""
        self._open = True
        self.connection: AbstractAsyncContextManager[Client] | None = None
        """What `connect` made this client in, kept while it lives (see `Connecting.start`)."""
        self.recording: Recorder | None = None
        """The plan being recorded (`fedptr.plans`): operations go to it instead of the workers."""
        link.on_settled = self._replied

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        in_flight = self._link.in_flight + len(self._outstanding)
        return f"<Client {self.name} at {self._link.address}, {in_flight} in flight, {state}>"

    @property
    def name(self) -> str:
        """This client's registered name."""
        return self._link.name

    @property
    def bytes_received(self) -> int:
        """Bytes this client's socket has received so far (every frame, envelope included)."""
        return self._link.bytes_received

    @property
    def link(self) -> Link:
        """The connection to the broker (its counters show what was sent and received)."""
        return self._link

    def worker(self, name: str) -> Worker:
        """The worker registered as `name` (not checked until it is used)."""
        if not isinstance(name, str) or not name:
            raise UnsupportedTypeError(f"a worker is named by a non-empty string, not {type(name).__name__} {name!r}")
        return Worker(self, name)

    def as_worker(self, worker: Worker | str) -> Worker:
        """`worker` itself, or the worker named `worker`: every call that takes a worker takes
        its name too (``p.send("alice")``). Raises UnsupportedTypeError for anything else, and
        InvalidArgumentError for a `Worker` of another client."""
        if isinstance(worker, str):
            return self.worker(worker)
        if not isinstance(worker, Worker):
            expected = "a Worker (client.worker('alice')) or a worker's name"
            raise not_awaited(worker, expected) or UnsupportedTypeError(
                f"expected {expected}, not {type(worker).__name__} {worker!r}"
            )
        if worker.client is not self:
            raise InvalidArgumentError(f"{worker!r} belongs to another client; pass its name instead")
        return worker

    @awaited
    async def workers(self) -> list[str]:
        """Names of the workers registered with the broker, sorted."""
        return await self._link.list_workers(self.timeout)

    # --- the requests Pointer and Worker make -------------------------------------------
    def new_id(self) -> int:
        """A fresh object id for an object this client is about to create on a worker."""
        return wire.new_object_id()

    @contextmanager
    def recording_into(self, recorder: Recorder) -> Iterator[None]:
        """Record this client's pointer operations into `recorder` (a plan) while in the block."""
        if self.recording is not None:
            raise UsageError("a plan is already being recorded: plans do not nest")
        self.recording = recorder
        try:
            yield
        finally:
            self.recording = None

    def _not_recording(self, what: str) -> None:
        if self.recording is not None:
            raise UsageError(f"a plan records pointer operations only; it cannot {what}")

    async def call(self, dest: str, msg: wire.Message, timeout: float | None = None) -> wire.Message:
        """Send `msg` to worker `dest` and return its reply, within `timeout` seconds (this
        client's deadline by default).

        Raises the typed error of a failure (`FedptrError` subclasses), DeadlineExceeded, and
        ClientClosedError once the client is closed; UsageError while a plan is recorded."""
        self._not_recording(f"wait for a {type(msg).__name__} reply")
        self._flush_deletes()
        return await self._link.request(dest, msg, self.timeout if timeout is None else timeout)

    @awaited
    async def resolve(self, error: InDoubtError, timeout: float | None = None) -> Pointer:
        """The pointer an in-doubt hand-over's object is under, once the workers can tell.

        For a move: the candidate whose worker holds the object (the source puts it back, or
        forgets it once the destination holds it); the source is asked first, and while its own
        settling is under way nobody can tell. For a pointer sent: the grant is asked again
        (it is idempotent: a refusal then means an earlier grant went through). The other
        candidates are dropped without deleting anything. Raises InDoubtError again when it
        cannot tell within `timeout` seconds (this client's deadline by default)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        candidates: list[Pointer] = error.candidates
        while True:
            found = await self._resolve_once(error.hand_over, candidates, max(0.01, deadline - loop.time()))
            if found is not None:
                for p in candidates:
                    p.owned = p is found
                    p.in_doubt = False  # settled: the one found owns (and deletes) the object again
                return found
            if loop.time() + limits.RESOLVE_RETRY_S >= deadline:
                break
            await asyncio.sleep(limits.RESOLVE_RETRY_S)
        try:
            raise error
        finally:  # the error's traceback keeps this frame, which must not refer back to it
            del error

    async def _resolve_once(self, hand_over: str, candidates: list[Pointer], timeout: float) -> Pointer | None:
        if hand_over == "send":
            source, sent = candidates
            try:
                await self.call(source.location, wire.Grant(source.id_at_location, sent.location), timeout)
            except PermissionDenied:
                return sent
            except FedptrError:
                return None
            return sent
        # Only the source can tell: while its move is in doubt (it answers InDoubtError) or it
        # cannot be reached, the destination may hold the object, yet the source may still put
        # it back (its own resolution asks the destination later, and would find nothing if
        # this client had already taken the object from there).
        source, moved = candidates
        try:
            await self.call(source.location, wire.Has(source.id_at_location), timeout)
            return source
        except ObjectNotFoundError:
            pass  # the source let go of it: only once the destination held it durably
        except FedptrError:
            return None
        try:
            await self.call(moved.location, wire.Has(moved.id_at_location), timeout)
        except FedptrError:
            return None
        return moved

    def issue_op(
        self,
        location: str,
        op: str,
        args: list[wire.Value],
        kwargs: dict[str, wire.Value],
        metas: list[torch.Tensor | None],
        after: Sequence[asyncio.Future[wire.Message]] = (),
        operands: Sequence[Pointer] = (),
    ) -> list[Pointer]:
        """Run allow-listed `op` on worker `location` and return its results' pointers at once,
        one per entry of `metas` (each result's inferred meta tensor; None: learnt from the reply).
        `after`: unordered steps its operands wait for (see `Pointer.made_by`); the op is sent
        once they are done (failing with the first one's error), and its results wait likewise.
        `operands` (its pointers) are then held until it is sent: one dropped meanwhile queues
        its delete after the op, not ahead of it."""
        if len(metas) == 1 and not after:  # the common case, kept lean: it is every op's path
            obj_id = wire.new_object_id()
            done = self.request_nowait(location, wire.Op(obj_id, op, args, kwargs))
            return [Pointer(self, location, obj_id, done, meta=metas[0])]
        ids = [self.new_id() for _ in metas]
        msg = wire.Op(ids[0], op, args, kwargs, more_ids=ids[1:])
        if after:
            done = self.track(asyncio.ensure_future(self._request_after(location, msg, after, operands)))
        else:
            done = self.request_nowait(location, msg)
        results = [Pointer(self, location, obj_id, meta=m) for obj_id, m in zip(ids, metas, strict=True)]
        for k, result in enumerate(results):
            result.made_by(done if k == 0 else _nth_result(done, k), ordered=not after)
        return results

    async def _request_after(
        self,
        location: str,
        msg: wire.Message,
        after: Sequence[asyncio.Future[wire.Message]],
        operands: Sequence[Pointer],
    ) -> wire.Message:
        try:
            for step in after:
                await self.wait_step(step)
            sent = self.request_nowait(location, msg)
        finally:
            # only now may a dropped operand's delete be queued (the deletes' timer or a plan
            # run's `hold_turn` sends it at once): it follows the request that reads it. Let go
            # of here, not by the frame: a failure's traceback would keep them all alive.
            del operands
        return await sent

    async def wait_step(self, step: asyncio.Future[wire.Message]) -> None:
        """Wait for an unordered step (see `Pointer.made_by`), not cancelling it if this wait is
        cancelled (others share it), and raise a copy of its error (`fedptr.pointer.raised`), as
        for any error a pointer keeps: `asyncio.shield(step)` would raise the step's own, whose
        traceback would keep the awaiting frames, whose pointers keep the step (a cycle)."""
        await self.settled(step)
        if step.cancelled():
            raise asyncio.CancelledError
        raised(step.exception())

    def request_nowait(self, location: str, msg: wire.Message) -> asyncio.Future[wire.Message]:
        """Send `msg` to worker `location` and return the future of its reply at once (settled
        within this client's deadline). Raises UsageError while a plan is recorded."""
        if self.recording is not None:
            self._not_recording(f"send a {type(msg).__name__}")
        if self._deletes and not self._link.batching:
            # The first request of a loop turn would leave alone at once, and the deletes queued
            # since the last turn in a multipart of their own just after: they go together,
            # ahead of it, so the broker and the worker wake once for both (each op awaited in
            # turn drops the previous result: one wake per op instead of two).
            with self._link.batched():
                self._send_deletes()
                return self._link.request_nowait(location, msg, self.timeout)
        return self._link.request_nowait(location, msg, self.timeout)

    def hold_turn(self) -> None:
        """Keep what is pushed to the end of this loop turn, as one BATCH (`Link.hold_turn`), with
        the deletes queued before it at its head: their timer would fire after the batch left (a
        multipart and a wake more on each side, per awaited plan run that dropped the last
        output). Deletes queued while a batch is open wait for their timer, one multipart per
        turn: sending them with every request made each pipelined op keep a timer handle, its
        Context and a Delete's lists alive until the turn ended (tests/test_cpu_budget.py)."""
        if not self._link.batching:
            self._link.hold_turn()
            self._send_deletes()

    def track(self, fut: asyncio.Future[wire.Message]) -> asyncio.Future[wire.Message]:
        """Count client-side step `fut` (a task) among this client's outstanding work (see
        `Worker.objects`) until it settles; requests are counted by the link."""
        self._outstanding.add(fut)
        fut.add_done_callback(self._op_settled)
        return fut

    # --- effects: queued updates whose errors surface on the next await ------------------
    def track_effect(self, location: str, fut: asyncio.Future[wire.Message]) -> None:
        """Remember the reply of an in-place update on `location` until someone has seen it:
        a success is forgotten when it arrives, a failure is reported once, by `failure` (an
        await of it) or by the next `effects_failure` of that worker."""
        self._effects[fut] = location
        fut.add_done_callback(self._effect_settled)

    def claim(self, fut: asyncio.Future[wire.Message]) -> str | None:
        """Someone awaits `fut` itself: its failure is raised to them, and not to the next await
        on its worker. Returns the worker it was remembered for (None: it was not an effect, or
        is claimed already), for `unclaim`."""
        return self._effects.pop(fut, None)

    def unclaim(self, fut: asyncio.Future[wire.Message], location: str) -> None:
        """The await that claimed `fut` was cancelled: unless it succeeded, the next await on
        `location` reports it again."""
        if not fut.done() or (not fut.cancelled() and fut.exception() is not None):
            self._effects[fut] = location

    def reported(self, fut: asyncio.Future[wire.Message]) -> bool:
        """Whether `fut` settled and an await claimed it: its outcome was reported there."""
        return fut.done() and fut not in self._effects

    @property
    def effects_queued(self) -> bool:
        """Whether any update is remembered for `effects_failure` (False: it has nothing to say)."""
        return bool(self._effects)

    def _effect_settled(self, fut: asyncio.Future[wire.Message]) -> None:
        if fut.cancelled() or fut.exception() is None:
            self._effects.pop(fut, None)

    async def failure(self, futures: list[asyncio.Future[wire.Message]]) -> BaseException | None:
        """Wait for `futures` (without cancelling them if this wait is cancelled) and return the
        first one's error if any failed (None: none did). They are claimed while waited for (see
        `claim`). Returned, not raised: the caller raises it from a frame that holds neither the
        error nor a pointer (`fedptr.pointer.raised`), since the error's traceback keeps every
        frame it passes through, and a frame that refers back to the error or to a pointer that
        keeps it makes a reference cycle: a dropped pointer's delete would wait for the cyclic
        garbage collector."""
        claimed = {fut: location for fut in futures if (location := self.claim(fut)) is not None}
        try:
            for fut in futures:
                if not fut.done():
                    await self.settled(fut)
        except asyncio.CancelledError:
            for fut, location in claimed.items():
                self.unclaim(fut, location)
            raise
        return _first_error(futures)

    async def effects_failure(self, location: str) -> BaseException | None:
        """The error of an update queued on `location` that nobody awaited (waiting for the ones
        still running, and returning only those that nobody claimed by the time they settled),
        returned as `failure` returns its own; checked by every await and get of a pointer
        there, which raise it. Nothing is waited for while a plan is recorded (an await in it
        returns at once)."""
        if not self._effects or self.recording is not None:
            return None
        running = [f for f, loc in self._effects.items() if loc == location]
        if running:
            await asyncio.wait(running)  # not claimed: their own awaiters may still claim them
        # settled with nobody awaiting it: reported here, once
        return _first_error([fut for fut in running if self._effects.pop(fut, None) is not None])

    def settled(self, fut: asyncio.Future[wire.Message]) -> asyncio.Future[None]:
        """A future done (with None) once `fut` is, to await instead of `fut` itself: cancelling
        it leaves `fut` alone (others may share the request). A request the link settles wakes it
        in that same loop turn (`_replied`), so the awaiting task resumes on the next turn;
        through a done callback (as `asyncio.wait` or `asyncio.shield` do) it would take two,
        one callback waking the next. The callback is kept for futures the link does not settle
        (client-side steps, or a request cancelled by its caller)."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        if fut.done():
            waiter.set_result(None)
            return waiter
        self._link.end_turn()  # the caller waits: no loop pass just to close the batch of its request
        waiters = self._waiters.get(fut)
        if waiters is None:
            self._waiters[fut] = [waiter]
            fut.add_done_callback(self._wake)
        else:
            waiters.append(waiter)
        return waiter

    def _wake(self, fut: asyncio.Future[wire.Message]) -> None:
        for waiter in self._waiters.pop(fut, ()):
            if not waiter.done():  # its await was cancelled
                waiter.set_result(None)

    def _op_settled(self, fut: asyncio.Future[wire.Message]) -> None:
        self._outstanding.discard(fut)
        if not fut.cancelled():
            fut.exception()  # reported to whoever awaits the pointer; never "unretrieved"

    async def _settle(self) -> None:
        """Wait until every operation this client issued has settled (ok or failed)."""
        self._flush_deletes()
        outstanding = [*self._outstanding, *self._link.pending()]
        if outstanding:
            await asyncio.wait(outstanding)

    def unwrap(
        self, reply: wire.Message, result_meta: torch.Tensor | None = None
    ) -> torch.Tensor | nn.Module | Pointer:
        """The value a Get's reply hands over: a tensor, a model, or a pointer one hop down
        (whose data is described by `result_meta`, the meta tensor of the pointer fetched)."""
        if isinstance(reply, wire.TensorReply):
            return from_raw(reply.tensor)
        if isinstance(reply, wire.PointerReply):
            return Pointer(self, reply.location, reply.id_at_location, meta=result_meta)
        if isinstance(reply, wire.ModuleReply):
            return modules.from_wire(reply.spec, reply.params)
        raise ProtocolError(f"expected a tensor or a pointer, got {type(reply).__name__}")

    # --- deletes a lost worker may have missed --------------------------------------------
    def _replied(self, location: str, fut: asyncio.Future[wire.Message]) -> None:
        """Every request the link settles (`Link.on_settled`): its error is retrieved here (it
        is raised to whoever awaits the pointer; never "unretrieved"), and it tells whether
        `location` answers."""
        if fut in self._waiters:  # not a call per reply: a chain's last await waits while a hundred settle
            self._wake(fut)
        if fut.cancelled():
            return
        e = fut.exception()
        if e is None:
            if location in self._unsure:  # the common case needs no more than this test
                self._heard(location, None)
        else:
            self._heard(location, e if isinstance(e, FedptrError) else None)

    def _heard(self, location: str, error: FedptrError | None) -> None:
        """A request to `location` settled with `error` (None: ok). A loss (or a deadline, or the
        broker not knowing it) makes it unsure: deletes sent to it from then on may be dropped
        (the broker forgets a lost peer, and a stopped one may still hold the requests that make
        those objects), so they are kept. An answer from it means it is back, past them: they are
        sent again (a delete of an id that is gone does nothing)."""
        if error is None or isinstance(error, (RemoteError, WorkerRefused, PermissionDenied)):
            if location in self._unsure:
                self._unsure.discard(location)
                for obj_id in self._owed.pop(location, ()):
                    self.release(location, obj_id)
        elif isinstance(error, (LostWorkerError, DeadlineExceeded, UnknownWorkerError)):
            self._unsure.add(location)

    def release(self, location: str, obj_id: int) -> None:
        """Queue the deletion of a dropped pointer's object; deletions go out batched, unawaited,
        in the next loop turn (before the requests issued after it: the bytes free up first)."""
        if not self._open:
            return
        self._deletes[location].append(obj_id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if threading.get_ident() == self._thread:
                # A timer due now rather than `call_soon`: most often a request issued in this
                # same turn takes the deletes with it (`request_nowait`) and cancels the timer,
                # and a cancelled timer costs the loop nothing, where a callback made it turn
                # once more (an epoll wait and a pass) for every awaited op that drops a result.
                self._flush_timer = self._loop.call_at(self._loop.time(), self._flush_deletes)
            else:
                self._loop.call_soon_threadsafe(self._flush_deletes)

    def _flush_deletes(self) -> None:
        """Send the deletes queued, now, in one batch."""
        if not self._deletes or not self._open:
            self._unschedule_flush()
            return
        with self._link.batched():
            self._send_deletes()

    def _send_deletes(self) -> None:
        """Push the deletes queued into the link's batch (the caller opened one)."""
        self._unschedule_flush()
        if not self._deletes or not self._open:
            return
        batches, self._deletes = self._deletes, defaultdict(list)
        for location in self._unsure.intersection(batches):
            self._owed[location].update(batches[location])  # sent again once it answers
        for location, ids in batches.items():
            for delete in wire.deletes(ids):
                self._link.notify(location, delete)

    def _unschedule_flush(self) -> None:
        """The deletes queued are being sent: the flush `release` scheduled is not needed."""
        self._flush_scheduled = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None

    async def aclose(self) -> None:
        """Send the deletes still queued, say goodbye to the broker, and close. Calls still
        waiting fail with ClientClosedError."""
        self._flush_deletes()
        self._open = False
        await self._link.aclose()


__all__ = ["Client", "ConsumedPointerError", "ObjectInfo", "Pointer", "Worker", "connect"]

P = ParamSpec("P")
T = TypeVar("T")
W = TypeVar("W")

HOW_TO_CONNECT = (
    "use `async with fedptr.connect(address) as client:`, then `client.worker('bob')`; in a notebook "
    "or REPL: `client = await fedptr.connect(address).start()`, ended by `await client.aclose()`"
)


class Connecting:
    """What `connect` returns: an async context manager whose ``async with`` gives the `Client`.
    Used another way (``client = fedptr.connect(...)`` then ``client.worker``, ``await``, or a
    ``with`` without ``async``), it says how to use it, where Python named only its own type."""

    def __init__(self, connecting: AbstractAsyncContextManager[Client]) -> None:
        self._connecting = connecting
        self._started = False

    async def start(self) -> Client:
        """Connect and return the `Client`, for a notebook or a REPL, where an ``async with``
        cannot span the cells or lines that follow; end it with ``await client.aclose()``.
        Once per `connect` (its generator runs once): a second says so, not the standard
        library's "no attribute 'args'" (a notebook cell run again)."""
        if self._started:
            raise UsageError(
                "this fedptr.connect(...) was started already and gives one client; for another: "
                "`await fedptr.connect(address).start()`"
            )
        self._started = True
        client = await self._connecting.__aenter__()
        # the connection's generator closes the client once collected: it lives as the client does
        client.connection = self._connecting
        return client

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        return await self._connecting.__aexit__(exc_type, exc, tb)

    def __await__(self) -> NoReturn:
        raise UsageError(f"fedptr.connect(...) is not awaited: {HOW_TO_CONNECT}")

    def __enter__(self) -> NoReturn:
        raise UsageError(f"fedptr.connect(...) is an async context manager: {HOW_TO_CONNECT}")

    def __exit__(self, *exc_info: object) -> None:
        """Never reached (`__enter__` raises); Python calls `__enter__` only when both exist."""

    if not TYPE_CHECKING:  # hidden from mypy, which would otherwise accept any attribute name

        def __getattr__(self, name: str) -> NoReturn:
            if hasattr(Client, name):
                raise AttributeError(f"fedptr.connect(...) is not a Client, so it has no {name!r}: {HOW_TO_CONNECT}")
            raise AttributeError(f"'Connecting' object has no attribute {name!r}")


def wrapped_in(
    wrapper: Callable[[AbstractAsyncContextManager[T]], W],
) -> Callable[[Callable[P, AbstractAsyncContextManager[T]]], Callable[P, W]]:
    """A decorator: the factory's async context manager, returned in `wrapper` (`Connecting`,
    `fedptr.cluster.LocalCluster`), which says how to use it when it is misused."""

    def decorate(factory: Callable[P, AbstractAsyncContextManager[T]]) -> Callable[P, W]:
        @functools.wraps(factory)
        def make(*args: P.args, **kwargs: P.kwargs) -> W:
            return wrapper(factory(*args, **kwargs))

        return make

    return decorate


@wrapped_in(Connecting)
@asynccontextmanager
async def connect(
    address: str,
    *,
    timeout: float = limits.CALL_TIMEOUT_S,
    heartbeat_s: float = limits.HEARTBEAT_INTERVAL_S,
    liveness: int = limits.HEARTBEAT_LIVENESS,
    curve: CurveKeys | None = None,
    max_in_flight: int = limits.MAX_IN_FLIGHT,
    progress: bool | None = None,
) -> AsyncIterator[Client]:
    """Connect to the broker at `address` and yield a `Client`.

    `timeout` is every call's deadline (s). The client beats every `heartbeat_s` seconds when
    idle and takes the broker for dead after `liveness` silent intervals: waiting calls then fail
    with LostWorkerError and the client registers again once a broker answers. `curve` (see
    `fedptr.security.CurveKeys.load`) encrypts and authenticates the connection. With
    `max_in_flight` calls unanswered, awaited calls wait for room and new pipelined operations
    raise TooManyInFlightError. `progress` shows bars for transfers of a few MiB or more when
    stderr is a terminal (None: only if ``FEDPTR_PROGRESS=1``; see `fedptr.progress`). Raises
    DeadlineExceeded when the broker does not answer within the connect deadline, `timeout` or
    `limits.CONNECT_TIMEOUT_S` whichever is shorter (a wrong address, or a broker that refuses
    our key, never answers), RegistrationRefused when it refuses the name."""
    link = Link(
        address,
        f"client-{secrets.token_hex(6)}",
        envelope.ROLE_CLIENT,
        heartbeat_s=heartbeat_s,
        liveness=liveness,
        curve=curve,
        max_in_flight=max_in_flight,
        progress=progress,
        connect_timeout=min(timeout, limits.CONNECT_TIMEOUT_S),
    )
    await link.__aenter__()
    client = Client(link, timeout)
    try:
        yield client
    finally:
        await client.aclose()
