"""Plans: a function of pointer operations recorded once, kept by a worker, run by one message.

``@fedptr.plan`` wraps a function of pointers (PySyft's Plans, tutorial Part 8). The first call
on a worker with inputs of a given shape records the function: the operations it issues are not
sent but become a small graph of allow-listed operations, with the shape of each result worked
out locally (`fedptr.meta`). The graph goes to the worker once (`wire.PutPlan`), where it is
checked against the allow-list and kept; every call then costs one message (`wire.RunPlan`: the
plan's id and its input pointers) and returns the output pointers at once, like an operation.
The worker runs the graph exactly as it runs the same operations sent one by one, its privacy
policy included; intermediate results are never stored.

Pointers the function uses without taking them as arguments (a model, its parameters, an
optimizer's buffers) are *captured*: each run passes their current objects as extra inputs. A
training step (forward, loss, backward, ``opt.step()``, ``opt.zero_grad()``) is one message per
batch::

    model_ptr = await bob.send(model)
    opt = fedptr.optim.SGD(model_ptr.parameters(), lr=0.1)

    @fedptr.plan
    def train_step(x, y):
        loss = F.cross_entropy(model_ptr(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    for x, y in batches:  # pointers on bob
        loss = train_step(x, y)
    print(await loss.get())

What the recorded function may do: pointer operations and effects on pointers of one worker,
and ``await`` of pointers (which returns at once while recording). It may not fetch (`get`),
send, move or read values (they raise UsageError), and Python control flow runs once, at
recording: a branch on a shape is fixed for that shape (a new shape records again), a branch on
a value is impossible (DataDependentError). Optimizers with client-side state (Adam's step count,
a momentum buffer not yet made) cannot be recorded: take SGD, or one step outside the plan
first for momentum.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedptr import wire
from fedptr.errors import InvalidArgumentError, LocationMismatchError, ProtocolError, UsageError
from fedptr.pointer import Pending, Pointer
from fedptr.tensors import dtype_name

if TYPE_CHECKING:
    from fedptr.client import Client

Signature = tuple[str, tuple[tuple[tuple[int, ...], str, bool] | None, ...]]
"""A plan's key: the worker, and each input's shape, dtype and requires_grad (None: unknown)."""


@dataclass
class _Recorded:
    """A recorded graph as one worker keeps it."""

    client: Client
    """Whose worker holds it: another client's worker of the same name never got it."""
    plan_id: int
    message: wire.PutPlan
    captured: list[Pointer]
    """Pointers the function used without taking them as arguments, passed to every run."""
    captured_ids: list[int]
    """Their objects' ids, listed once (a pointer's id never changes)."""
    output_metas: list[torch.Tensor | None]
    shape: str
    """How the function's result is shaped: ``"one"``, ``"tuple"`` or ``"none"``."""
    sent: asyncio.Future[wire.Message] | None = None


@dataclass
class Recorder:
    """Collects the operations a function issues while it is being recorded (see `Client.recording`)."""

    client: Client
    location: str
    keys: dict[int, int] = field(default_factory=dict)
    """Object id (a placeholder's, a captured pointer's or a result's) -> its provisional key."""
    inputs: list[int] = field(default_factory=list)
    captured: list[Pointer] = field(default_factory=list)
    ops: list[tuple[str, list[wire.Value], dict[str, wire.Value], list[int]]] = field(default_factory=list)
    metas: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def placeholder(self, p: Pointer) -> Pointer:
        """A stand-in for input `p` while recording."""
        stand_in = Pointer(self.client, self.location, wire.new_object_id(), deletes=False, meta=p.meta)
        self.keys[stand_in.id_at_location] = len(self.keys)
        self.inputs.append(stand_in.id_at_location)
        return stand_in

    def record(
        self,
        op: str,
        operands: list[Pointer],
        args: list[wire.Value],
        kwargs: dict[str, wire.Value],
        metas: list[torch.Tensor | None],
    ) -> list[Pointer] | None:
        """Record `op` and return its results' stand-ins (one per entry of `metas`); None when it
        is not recorded but sent (a model's parameter and state pointers, which the model keeps
        for good)."""
        if any(p.location != self.location for p in operands):
            raise LocationMismatchError(f"a plan recorded for {self.location!r} uses a pointer on another worker")
        if op in ("parameter", "state") and operands[0].id_at_location not in self.keys:
            return None
        for p in operands:
            if p.id_at_location not in self.keys:
                self.keys[p.id_at_location] = len(self.keys)
                self.captured.append(p)
        results = [Pointer(self.client, self.location, wire.new_object_id(), deletes=False, meta=m) for m in metas]
        for result, m in zip(results, metas, strict=True):
            self.keys[result.id_at_location] = len(self.keys)
            self.metas[result.id_at_location] = m
        self.ops.append((op, args, kwargs, [r.id_at_location for r in results]))
        return results

    def graph(self, plan_id: int, outputs: list[Pointer]) -> wire.PutPlan:
        """The recorded graph with slots numbered as the worker expects: the inputs, then the
        captured pointers, then one slot per operation."""
        results = {rid for *_, rids in self.ops for rid in rids}
        slot: dict[int, int] = {}
        for obj_id in self.inputs + [p.id_at_location for p in self.captured]:
            slot[obj_id] = len(slot)
        for *_, rids in self.ops:
            for rid in rids:
                slot[rid] = len(slot)
        for p in outputs:
            if p.id_at_location not in results:
                raise UsageError("a plan returns results of operations it records, not its inputs (clone them)")
        # an op with several results fills as many slots, which its item counts
        ops: list[wire.Value] = [
            [
                op,
                wire.rewrite_refs(args, slot),
                wire.rewrite_refs(kwargs, slot),
                *([len(rids)] if len(rids) > 1 else []),
            ]
            for op, args, kwargs, rids in self.ops
        ]
        return wire.PutPlan(
            plan_id, len(self.inputs) + len(self.captured), ops, [slot[p.id_at_location] for p in outputs]
        )


def _signature(location: str, inputs: tuple[Pointer, ...]) -> Signature:
    described = tuple(
        None if p.meta is None else (tuple(p.meta.shape), dtype_name(p.meta.dtype), p.meta.requires_grad)
        for p in inputs
    )
    return location, described


def _outputs(result: Any) -> tuple[list[Pointer], str]:
    if result is None:
        return [], "none"
    if isinstance(result, Pointer):
        return [result], "one"
    if isinstance(result, (tuple, list)) and all(isinstance(r, Pointer) for r in result):
        return list(result), "tuple"
    raise UsageError(f"a plan returns a Pointer, a tuple of Pointers or None, not {type(result).__name__}")


def _run_to_end(result: Any) -> Any:
    """The value of the plan function's call; a coroutine is run here, where awaiting a pointer
    returns at once (anything else that waits cannot be recorded)."""
    if not inspect.iscoroutine(result):
        return result
    try:
        result.send(None)
    except StopIteration as stop:
        return stop.value
    result.close()
    raise UsageError("a plan's function may await pointers only, not other work (sleep, I/O, get)")


class Plan:
    """A function of pointers recorded once per worker and input shapes (and recorded again for
    another client: a new cluster's worker of the same name), and run there by one message per
    call. Make one with `fedptr.plan`."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self._recorded: dict[Signature, _Recorded] = {}

    def __repr__(self) -> str:
        return f"<Plan {getattr(self.fn, '__qualname__', self.fn)!r}, recorded for {len(self._recorded)} signatures>"

    def __call__(self, *inputs: Pointer) -> Any:
        """Run the plan where `inputs` (pointers on one worker) are; returns what the function
        returns (a Pointer, a tuple of Pointers, or a `Pending` when it returns None) at once.

        The first call for a worker and input shapes records the function and sends its graph
        (pipelined before the run). A failed run (an error in an operation, or the worker forgot
        the plan in a restart) surfaces when an output is awaited (for a plan without outputs,
        as an effect's failure does), and the next call sends the plan again. Raises UsageError
        when the function does what cannot be recorded, LocationMismatchError for pointers on
        different workers, OpNotAllowedError (when awaited) for an operation the worker refuses."""
        if not inputs or not isinstance(inputs[0], Pointer):
            raise InvalidArgumentError("a plan runs on Pointers: pass at least one")
        client = inputs[0].client
        location = inputs[0].location
        ids = []
        for p in inputs:  # one pass: this runs per call
            if not isinstance(p, Pointer):
                raise InvalidArgumentError("a plan runs on Pointers: pass at least one")
            p.check_alive()
            if p.location != location or p.client is not client:
                raise LocationMismatchError("a plan's inputs live on one worker, of one client")
            ids.append(p.id_at_location)
        key = _signature(location, inputs)
        recorded = self._recorded.get(key)
        if recorded is None or recorded.client is not client:
            recorded = self._recorded[key] = self._record(client, location, inputs)
        if recorded.sent is None:
            recorded.sent = client.request_nowait(location, recorded.message)
        for p in recorded.captured:
            p.check_alive()
        result_ids = [client.new_id() for _ in recorded.output_metas]
        ids += recorded.captured_ids
        run = wire.RunPlan(recorded.plan_id, ids, result_ids)
        client.hold_turn()  # the get of an output, if it follows at once, goes with the run
        ran = client.request_nowait(location, run)
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[wire.Message]] = [loop.create_future() for _ in result_ids]
        # one callback shares the reply out (each a loop turn's handle: this runs per call)
        ran.add_done_callback(functools.partial(self._ran, key, recorded, recorded.sent, replies))
        outputs = [
            Pointer(client, location, obj_id, reply, meta=m)
            for obj_id, reply, m in zip(result_ids, replies, recorded.output_metas, strict=True)
        ]
        if recorded.shape == "none":
            client.track_effect(location, ran)  # nothing else reports its failure: an effect's rule
            return Pending(client, [ran])
        return outputs[0] if recorded.shape == "one" else tuple(outputs)

    def _record(self, client: Client, location: str, inputs: tuple[Pointer, ...]) -> _Recorded:
        recorder = Recorder(client, location)
        stand_ins = [recorder.placeholder(p) for p in inputs]
        with client.recording_into(recorder):
            outputs, shape = _outputs(_run_to_end(self.fn(*stand_ins)))
        plan_id = wire.new_object_id()
        message = recorder.graph(plan_id, outputs)
        metas = [recorder.metas.get(p.id_at_location) for p in outputs]
        captured_ids = [p.id_at_location for p in recorder.captured]
        return _Recorded(client, plan_id, message, recorder.captured, captured_ids, metas, shape)

    def _ran(
        self,
        key: Signature,
        recorded: _Recorded,
        sent: asyncio.Future[wire.Message],
        replies: list[asyncio.Future[wire.Message]],
        ran: asyncio.Future[wire.Message],
    ) -> None:
        """Share a run's reply out to its outputs' `replies`: each an Ok with its shape and dtype,
        or the run's error (the plan's own, when `sent`, sending the plan, failed). After a
        failure the plan is sent again with the next run: the worker may have lost it."""
        if ran.cancelled():
            for out in replies:
                out.cancel()
        elif (error := ran.exception()) is not None:
            refused = sent.exception() if sent.done() and not sent.cancelled() else None
            for out in replies:
                out.set_exception(refused or error)
        else:
            reply = ran.result()
            if not (isinstance(reply, wire.PlanReply) and len(replies) <= len(reply.shapes) == len(reply.dtypes)):
                error = ProtocolError(f"expected a PlanReply, got {type(reply).__name__}")
                for out in replies:
                    out.set_exception(error)
                return
            for out, shape, dtype in zip(replies, reply.shapes, reply.dtypes, strict=False):
                dims = [d for d in shape if type(d) is int] if isinstance(shape, list) else []
                out.set_result(wire.Ok(dims, dtype))
            return
        if self._recorded.get(key) is recorded:
            recorded.sent = None


def plan(fn: Callable[..., Any]) -> Plan:
    """Make `fn`, a function of pointers, a `Plan` (usable as a decorator): recorded once per
    worker and input shapes, sent once, run by one message per call."""
    return Plan(fn)
