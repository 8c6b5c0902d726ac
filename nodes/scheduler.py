"""The node's compute scheduler: where a request's slow part runs, and how many at once.

Small computations on inputs that exist run inline (the node's fast path, not here). The rest
goes here: a bounded asyncio-pool task for a computation that waits for its inputs, a thread for
big tensors, and background tasks for requests that wait on another hop. When the pool is full
the node stops reading requests (zmq queues them, then their senders) until it drains.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from asyncio_pool import AioPool

from fedptr import heap, limits
from fedptr.errors import OverloadedError

T = TypeVar("T")


class Scheduler:
    """Runs a node's deferred work within its bounds. `pause` and `resume` stop and restart
    reading requests (the link's `pause_reading` and `resume_reading`)."""

    def __init__(
        self,
        here: str,
        pause: Callable[[], None],
        resume: Callable[[], None],
        pool_size: int = limits.NODE_POOL_SIZE,
        max_waiting: int = limits.NODE_MAX_FORWARDS,
        threads: int = limits.OFFLOAD_THREADS,
    ) -> None:
        self.here = here
        self.pool_size = pool_size
        self.max_waiting = max_waiting
        self._pause = pause
        self._resume = resume
        self._pool = AioPool(size=pool_size)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="torch")
        self._background: set[asyncio.Task[None]] = set()
        self._trimming: asyncio.TimerHandle | None = None
        self._closed = False

    def compute_later(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run `coro` in the bounded pool and return its future; past the pool's size, stop
        reading requests until it drains."""
        done: asyncio.Future[None] = self._pool.spawn_n(coro)
        if len(self._pool) >= self.pool_size:
            self._pause()
        done.add_done_callback(self._computed)
        return done

    def _computed(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()
        if len(self._pool) < self.pool_size:
            self._resume()

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker thread, off the event loop. Raises OverloadedError once the
        node is stopping (its pool takes no new work: torch's RuntimeError would reach the peer
        untyped)."""
        if self._closed:
            raise OverloadedError(self.here, "the node is stopping")
        work = [fn, args]
        del fn, args  # an error raised through this frame keeps its locals: only the emptied list
        return await asyncio.get_running_loop().run_in_executor(self._executor, _run_once, work)

    def spawn(self, coro: Coroutine[Any, Any, None], on_error: Callable[[Exception], None]) -> None:
        """Finish a request in a background task; what it raises goes to `on_error`. Raises
        OverloadedError when `max_waiting` such tasks are already running."""
        if len(self._background) >= self.max_waiting:
            coro.close()
            raise OverloadedError(self.here, f"{len(self._background)} requests already waiting")

        async def guarded() -> None:
            try:
                await coro
            except Exception as e:
                on_error(e)

        task = asyncio.ensure_future(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def trim_heap_soon(self) -> None:
        """Clients left: give the heap's free pages back to the OS a little later
        (`limits.HEAP_TRIM_DELAY_S`), on the torch thread, off the event loop."""
        if self._trimming is None and not self._closed:  # departures within the delay share one trim
            self._trimming = asyncio.get_running_loop().call_later(limits.HEAP_TRIM_DELAY_S, self._trim_now)

    def _trim_now(self) -> None:
        self._trimming = None
        asyncio.get_running_loop().run_in_executor(self._executor, heap.trim)

    async def aclose(self) -> None:
        """Cancel waiting work and stop the thread pool."""
        self._closed = True  # a departure noticed while closing must not schedule onto a stopped pool
        if self._trimming is not None:
            self._trimming.cancel()
            self._trimming = None
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _run_once(work: list[Any]) -> Any:
    """Run ``work`` (``[fn, args]``) and drop it on the thread before the result is handed over.
    The executor keeps its work item until after the loop has the result, and with it whatever
    ``fn`` and ``args`` reference: the store charges a storage until its memory is freed
    (nodes/store.py), so a model a DP-SGD run was given still counted after its delete whenever
    the thread had not run on yet (a twin-world difference in the node's figures)."""
    fn, args = work
    work.clear()
    try:
        return fn(*args)
    except BaseException as e:
        # its frames' locals (what it ran on) go; the frames and line numbers stay, for the log
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        del fn, args  # the traceback keeps this frame too
