"""Frees by reference counting, as a property: when a pointer's remote object, a stored tensor's
memory and its charge to the node's store are given back must be a function of the program, not
of when the cyclic garbage collector last ran (which no one controls, and which in a node follows
its allocations, which can follow private data).

Drawn programs (tests/test_held_bytes.py's generator) run on a real in-process cluster
(tests/harness.py: client and node in this process) twice with the collector disabled: once as
they are, once with `gc.collect()` forced before each observation. After each step the node's
store figures (objects, bytes, the client's usage) and the client's listing of the worker's
objects must be the same in both runs: anything that differs was held by a reference cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fedptr.nodes.node import NodeConfig
from hypothesis import HealthCheck, given, settings

import fedptr

from . import harness
from .test_held_bytes import CAP, _plan, _step, programs

EXAMPLES = 30
"""Programs drawn; each runs twice (about 3 s a program)."""


@contextlib.contextmanager
def _collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _observed(program: list[tuple[Any, ...]], collect: bool) -> list[Any]:
    seen: list[Any] = []
    # a Plan keeps what it recorded per worker name, not per client: the first run's would be
    # taken as sent to the second run's node (which never heard of it)
    _plan._recorded.clear()
    async with harness.cluster(["bob"], configs={"bob": NodeConfig(max_store_bytes=CAP)}) as c:
        node, bob = c.node("bob"), c.worker("bob")
        held: list[fedptr.Pointer] = []
        for step in program:
            with contextlib.suppress(fedptr.FedptrError):
                await _step(bob, held, step)
            if collect:
                gc.collect()
            # a round trip after the deletes a collection queued: they have landed
            listing = sorted((o.shape, o.dtype) for o in (await bob.objects()).values())  # ids are random
            figures = node.figures.figures()
            seen.append((step, figures["objects"], figures["store_bytes"], node.store.usage(c.client.name), listing))
    return seen


def _run(program: list[tuple[Any, ...]], collect: bool) -> list[Any]:
    with _collector_off():
        return asyncio.run(_observed(program, collect))


@pytest.mark.timeout(600)
@pytest.mark.slow  # EXAMPLES programs run twice each: about a minute, outside the fast loop (-m "not slow")
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(program=programs)
def test_frees_do_not_wait_for_the_cyclic_collector(program: list[tuple[Any, ...]]) -> None:
    # then every pointer left is dropped, one at a time: one that a cycle keeps (a failed
    # update's error, say, kept by the pointer and keeping the frame that held it) stays listed
    ended = [*program, *[("delete", 0)] * len(program)]  # no more pointers than steps
    assert _run(ended, collect=False) == _run(ended, collect=True)


def test_an_operand_of_a_failed_effect_is_deleted_when_dropped() -> None:
    """The cycle the property found: ``backward`` of a sum of a tensor that tracks no gradient
    fails; its error's traceback kept the caller's frame (holding the operand) in a cycle with
    the effect's handle, so the dropped operand's object stayed on the node until a GC pass."""

    async def failed_backward(x: fedptr.Pointer) -> None:
        await x.sum().backward()

    async def program() -> int:
        async with harness.cluster(["bob"]) as c:
            x = await c.worker("bob").send(torch.ones(4))
            with contextlib.suppress(fedptr.FedptrError):
                await failed_backward(x)
            del x
            return len(await c.worker("bob").objects())  # a round trip behind the delete

    with _collector_off():
        assert asyncio.run(program()) == 0


async def _failed_update_reported_by_another_pointer(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(4))
    x.grad = await bob.send(torch.ones(3))  # the wrong shape: the update fails
    await x.sum()  # raises the update's error, which `x` keeps among its updates


async def _failed_op_awaited_under_its_name(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(4))
    y = x.grad  # it has none: the op fails, and `y` keeps its error (every await of it raises it)
    await y


async def _failed_effect_awaited_by_its_handle(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(4))
    step = x.sum().backward()  # nothing tracks a gradient: it fails
    await step


async def _failed_pointer_send_fetched(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(4))
    sent = x.send("nobody")  # a client-side step (two-phase) that fails: no such worker
    await sent.get()  # waits for the step, and raises its error


async def _op_after_a_failed_pointer_send(bob: fedptr.Worker) -> None:
    x = await bob.send(torch.ones(4))
    y = x.send("nobody").clone()  # queued after the send's step, which fails: so does the op
    await y


@pytest.mark.parametrize(
    "failing",
    [
        _failed_update_reported_by_another_pointer,
        _failed_op_awaited_under_its_name,
        _failed_effect_awaited_by_its_handle,
        _failed_pointer_send_fetched,
        _op_after_a_failed_pointer_send,
    ],
)
def test_a_pointer_the_failing_frame_held_is_deleted_when_it_ends(failing: Any) -> None:
    """The caller's frame holds a pointer (or handle) that keeps the error raised to it (its op's
    or its update's future): the error's traceback keeps that frame, so the error raised must not
    be the one kept, or the frame's pointers wait for a GC pass (error -> traceback -> frame ->
    pointer -> future -> error)."""

    async def program() -> int:
        async with harness.cluster(["bob"]) as c:
            bob = c.worker("bob")
            try:
                await failing(bob)
            except fedptr.FedptrError:
                pass
            else:
                raise AssertionError("it did not fail")
            return len(await bob.objects())  # a round trip behind the deletes of the frame's pointers

    with _collector_off():
        assert asyncio.run(program()) == 0


@pytest.mark.parametrize(
    "error",
    [
        fedptr.RemoteError("RuntimeError", "shapes", "bob", ["bob"]),
        fedptr.StoreFullError("bob", "over the cap"),  # a MemoryError too: its own __new__ refuses
        fedptr.DeadlineExceeded("bob", 2.0),  # a TimeoutError, so an OSError: laid out as one
        fedptr.InvalidArgumentError("a ValueError too"),
        fedptr.BroadcastError({"bob": fedptr.LostWorkerError("bob")}, [None]),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_copy_an_await_raises_is_the_error_without_its_traceback(error: Exception) -> None:
    error.__cause__ = KeyError("why")
    try:
        raise error
    except Exception:
        pass  # it has a traceback now, as an error a client-side step raised has
    copy = fedptr.errors.copy_to_raise(error)
    assert copy is not error and type(copy) is type(error)
    assert (copy.args, str(copy), vars(copy), copy.__cause__) == (error.args, str(error), vars(error), error.__cause__)
    assert copy.__traceback__ is None and error.__traceback__ is not None


@pytest.mark.parametrize(
    "error",
    [
        ExceptionGroup("two failed", [fedptr.LostWorkerError("bob"), ValueError("x")]),  # needs its arguments
        ConnectionResetError(104, "reset by peer"),  # its errno and strerror are set from them
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_copy_keeps_what_an_errors_constructor_made_of_its_arguments(error: Exception) -> None:
    """State a built-in error's constructor keeps outside `args` and `__dict__` (an exception
    group's members, an OSError's errno) is the copy's too; an exception group's copy was a
    TypeError in place of the error."""
    copy = fedptr.errors.copy_to_raise(error)
    assert (type(copy), str(copy), copy.args) == (type(error), str(error), error.args)
    assert getattr(copy, "exceptions", None) == getattr(error, "exceptions", None)
    assert (getattr(copy, "errno", None), getattr(copy, "strerror", None)) == (
        getattr(error, "errno", None),
        getattr(error, "strerror", None),
    )
