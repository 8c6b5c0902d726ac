"""A forgotten ``await``: the error for a coroutine handed where a value, a pointer or a worker
goes (`not_awaited`). Apart from `fedptr.errors`, which the wire protocol and the session import
and which must stay sans-IO (tests/test_imports.py): this asks asyncio for the running tasks."""

from __future__ import annotations

import asyncio
from types import CoroutineType
from typing import Any

from fedptr.errors import NotAwaitedError


def not_awaited(value: object, expected: str) -> NotAwaitedError | None:
    """The error for `value` given where `expected` is, when `value` is a coroutine (of
    ``p.get()``, ``worker.search(tag)``...): a forgotten ``await``. None for anything else. A
    coroutine that never started is closed, so Python's "coroutine ... was never awaited"
    warning does not repeat, later and without a way out, what this error says; unless a task
    was made of it, which runs it (closed, the task failed)."""
    if not isinstance(value, CoroutineType):
        return None
    never_started = value.cr_frame is not None and value.cr_await is None and not value.cr_running
    if never_started and not _a_tasks(value):
        value.close()
    return NotAwaitedError(
        f"expected {expected}, got {value.__qualname__}() not awaited: a fedptr call that returns a value or "
        f"hands an object over (get, move, item, search, objects, workers, dp.*) is awaited "
        f"first, as in `x = await p.get()` or `x, y = await bob.search('digits')`"
    )


def _a_tasks(coro: CoroutineType[Any, Any, Any]) -> bool:
    """Whether a task of the running loop was made of `coro` (before it first ran): the task
    runs it, and it is not ours to close."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running: no task to run it
        return False
    return any(t.get_coro() is coro for t in tasks)
