"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``).

A node that held many tensors of a few hundred KiB, or a broker that relayed many large
frames, frees them into glibc's heaps, not to the OS: past its first frees of such blocks,
glibc raises its mmap threshold (up to 32 MiB) and serves them from its arenas, whose freed
pages stay resident unless they happen to sit at a heap's top. 12 clients x 300 pipelined ops
on 256 KiB tensors left a node ~900 MiB above its start with nothing stored. ``malloc_trim(0)``
releases the free pages of every arena (madvise), so the processes call it once their clients
have left (`limits.HEAP_TRIM_DELAY_S` after a departure, one trim for the departures within
that delay), not on every free: it walks every arena, and what a busy process frees
it soon reuses.

Not glibc (musl, macOS): nothing to call, `trim` says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


def trim() -> bool:
    """Return the free pages of every malloc arena to the OS; False where there is no glibc."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
