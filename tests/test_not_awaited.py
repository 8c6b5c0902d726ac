"""A forgotten ``await`` on a fedptr call that returns a value (``p.get() + 1``,
``p.item() > 0``, ``p.get().numpy()``, ``len(bob.search(tag))``): a typed NotAwaitedError (an
AttributeError for an attribute) naming the call and saying to await it, no "never awaited"
warning after it, and nothing done remotely, so the pointer is still usable. The call itself
stays a coroutine: awaited, gathered, run as a task, as before. Mixing workers says how to
bring the operands together."""

from __future__ import annotations

import asyncio
import gc
import inspect
import operator
import unittest.mock
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedptr
from tests.conftest import examples

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)

MISUSES: dict[str, Callable[[Any], object]] = {
    "+": lambda c: c + 1,
    "+ (reflected)": lambda c: 1 + c,
    "-": lambda c: c - torch.ones(1),
    "* (a tensor's)": lambda c: torch.ones(1) * c,
    "/": lambda c: c / 2,
    "@": lambda c: c @ torch.ones(1),
    "**": lambda c: c**2,
    "unary -": lambda c: -c,
    "abs()": abs,
    ">": lambda c: c > 0,
    "<=": lambda c: c <= 0,
    "indexing": lambda c: c[0],
    "unpacking": lambda c: operator.getitem(tuple(c), 0),
    "len()": len,
    "bool()": bool,
    "float()": float,
    "int()": int,
    "'in'": lambda c: 1 in c,
    "a format spec": lambda c: f"{c:.4f}",
    "numpy": np.asarray,
    "a torch function": lambda c: torch.add(c, 1),
}
CALLS: dict[str, Callable[[fedptr.Pointer, fedptr.Worker], Any]] = {
    "Pointer.get": lambda p, w: p.get(),
    "Pointer.item": lambda p, w: p.item(),
    "Pointer.tolist": lambda p, w: p.tolist(),
    "Pointer.move": lambda p, w: p.move("alice"),
    "Worker.search": lambda p, w: w.search("digits"),
    "Worker.objects": lambda p, w: w.objects(),
}


@settings(max_examples=examples(30), deadline=None, suppress_health_check=list(HealthCheck))
@given(misuse=st.sampled_from(sorted(MISUSES)), call=st.sampled_from(sorted(CALLS)))
async def test_a_value_call_used_unawaited_says_to_await_it(bob: fedptr.Worker, misuse: str, call: str) -> None:
    p = await bob.send(torch.tensor([3.0]))
    coro = CALLS[call](p, bob)
    with pytest.raises(fedptr.NotAwaitedError, match=rf"{call}\(\) not awaited.*await it first") as raised:
        MISUSES[misuse](coro)
    assert isinstance(raised.value, TypeError)  # what Python raised before: an except TypeError still holds
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        coro.send(None)  # closed unstarted: no "never awaited" warning can follow the error
    assert await p.get() == torch.tensor([3.0])  # nothing ran remotely: the object was not consumed


async def test_an_attribute_of_an_unawaited_call_says_to_await_it(bob: fedptr.Worker) -> None:
    p = await bob.send(torch.ones(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AttributeError, match=r"'Pointer.get\(\)' is a coroutine not awaited.*\(await x.get\("):
            p.get().numpy()  # type: ignore[attr-defined]
        chained = await p.send("alice")
        with pytest.raises(AttributeError, match=r"await it first, as in `\(await x.get\(...\)\).get`"):
            await chained.get().get()  # type: ignore[attr-defined]  # PySyft's y.get().get(), awaited once
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert not hasattr(chained.get(), "shape")  # hasattr still answers False: an AttributeError, as before
    probed = chained.get()
    assert not hasattr(probed, "_repr_html_")  # a display's probe: no error, and the call still runs
    assert torch.equal(await (await probed).get(), torch.ones(2))


async def test_value_calls_are_still_coroutines(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    p, q = await bob.send(torch.ones(2)), await bob.send(torch.zeros(2))
    assert asyncio.iscoroutine(call := p.tolist())
    assert await call == [1.0, 1.0]
    got = await asyncio.gather(p.get(), asyncio.create_task(q.get()))
    assert [t.tolist() for t in got] == [[1.0, 1.0], [0.0, 0.0]]  # type: ignore[union-attr]
    r = await bob.send(torch.ones(1))
    moved = await asyncio.wait_for(r.move(alice), 20)
    assert moved.location == "alice" and await moved.item() == 1.0
    shown = moved.get()
    assert "await it for its value" in repr(shown)  # what print() shows: no error, and a word of what it is
    shown.close()


PROBES: dict[str, Callable[[Any], object]] = {
    "inspect.getcoroutinestate": inspect.getcoroutinestate,
    "inspect.getcoroutinelocals": inspect.getcoroutinelocals,
    "inspect.isawaitable": inspect.isawaitable,
    "repr": repr,
    "dir": dir,
}


@settings(max_examples=examples(20), deadline=None, suppress_health_check=list(HealthCheck))
@given(
    probes=st.lists(
        st.one_of(
            st.sampled_from(sorted(PROBES)),
            st.from_regex(r"\A(cr_(running|suspended|frame|await|code|origin)|[a-z][a-z_]{0,11})\Z"),
        ),
        max_size=4,
    )
)
async def test_reading_an_unawaited_calls_attributes_leaves_it_to_await(bob: fedptr.Worker, probes: list[str]) -> None:
    """What looks at a call before it is awaited (inspect, a debugger, a display's ``hasattr``,
    ``p.get().numpy()`` caught) leaves it runnable: the later ``await`` returns the value. (Failed
    on main: any public attribute closed the call, so ``inspect.getcoroutinestate(c)`` raised an
    AttributeError and the ``await c`` after it "cannot reuse already awaited coroutine".)"""
    p = await bob.send(torch.ones(2))
    call = p.get()
    for probe in probes:
        if probe in PROBES:
            PROBES[probe](call)
        elif probe.startswith("cr_"):
            assert getattr(call, probe) == getattr(call._coro, probe)
        else:
            with pytest.raises(AttributeError, match="await it first"):
                getattr(call, probe)
    assert inspect.getcoroutinestate(call) == inspect.CORO_CREATED
    assert torch.equal(await call, torch.ones(2))
    assert inspect.getcoroutinestate(call) == inspect.CORO_CLOSED


def test_a_call_is_a_coroutine_to_asyncio_and_an_awaitable_to_inspect() -> None:
    """``inspect.iscoroutine(p.get())`` is False (it asks for Python's own coroutine type, which no
    class can extend, and the forgotten-await errors need a class of their own);
    ``asyncio.iscoroutine`` and ``inspect.isawaitable`` say True, as docs/concepts.md says."""

    async def value() -> int:
        return 1

    call = fedptr.awaiting.Call(value())
    assert asyncio.iscoroutine(call) and inspect.isawaitable(call) and not inspect.iscoroutine(call)
    assert asyncio.run(call) == 1
    concepts = (Path(__file__).parents[1] / "docs" / "concepts.md").read_text()
    assert "`inspect.iscoroutine(p.get())` is False" in concepts and "inspect.isawaitable" in concepts


AWAITED_FUNCTIONS = [
    fedptr.Worker.search,
    fedptr.Worker.objects,
    fedptr.Worker.clear,
    fedptr.Client.workers,
    fedptr.Client.resolve,
    fedptr.Pointer.get,
    fedptr.Pointer.item,
    fedptr.Pointer.tolist,
    fedptr.Pointer.move,
    fedptr.dp.contribute,
    fedptr.dp.secure_mean,
    fedptr.dp.train,
    fedptr.dp.budget,
]


def test_value_calls_are_still_coroutine_functions() -> None:
    """What tells a coroutine function from a plain one still does: asyncio's test (which
    `unittest.mock` uses, so that an autospec of a Worker awaits ``search``) and, where Python
    can mark a function as one (3.12), inspect's. (Failed on main: every @awaited function was
    a plain function to both, and ``create_autospec(Worker).search`` a MagicMock, not awaitable.)"""
    for fn in AWAITED_FUNCTIONS:
        assert asyncio.iscoroutinefunction(fn), fn.__qualname__
        if hasattr(inspect, "markcoroutinefunction"):
            assert inspect.iscoroutinefunction(fn), fn.__qualname__
    worker = unittest.mock.create_autospec(fedptr.Worker, instance=True)
    assert isinstance(worker.search, unittest.mock.AsyncMock)


async def test_a_call_dropped_unawaited_still_warns_once(bob: fedptr.Worker) -> None:
    p = await bob.send(torch.ones(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.get()
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == [
        "coroutine 'Pointer.get' was never awaited"
    ]
    assert torch.equal(await p.get(), torch.ones(1))


async def test_operands_on_two_workers_say_how_to_bring_them_together(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    x, y = await bob.send(torch.ones(2)), await alice.send(torch.ones(2))
    with pytest.raises(fedptr.LocationMismatchError, match=r"'bob' and 'alice'.*await \w+\.move\('bob'\)"):
        x + y
