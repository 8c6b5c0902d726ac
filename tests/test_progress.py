"""A large transfer's progress bar is drawn, named for its peer, filled and gone, whatever path
its chunks take: the broker's (`limits.STREAM_CHUNK_BYTES` each, in order), the direct path's (a
small first chunk through the broker, the rest direct), same-host shared memory
(`limits.DIRECT_SHM_FILE_BYTES` a chunk: a few chunks, all between two of the display's
refreshes), or one chunk; at any terminal width.

CI once lost the bar "get from alice" of a 12 MiB get (tests/test_operations.py's cluster test).
The get had come over shared memory with its broker chunk last: the bar was named after the
first chunk to arrive, a direct one, whose name field is its receiver's ("get from
client-3d38..."), and, counted by the offset of the chunk just seen, it was full before its
first chunk came, which then left a bar at 4 KiB that never finished."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedptr import envelope, limits, progress
from fedptr.streams import split

MIB = 1 << 20
SHOW_CURSOR, HIDE_CURSOR = "\x1b[?25h", "\x1b[?25l"  # rich hides the cursor while a display runs

PATHS = {
    "broker": (0, limits.STREAM_CHUNK_BYTES),
    "direct": (limits.DIRECT_FIRST_CHUNK_BYTES, limits.STREAM_CHUNK_BYTES),
    "shared memory": (limits.DIRECT_FIRST_CHUNK_BYTES, limits.DIRECT_SHM_FILE_BYTES),
    "one chunk": (0, 64 * MIB),
}


@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from(sorted(PATHS)),
    mib=st.integers(5, 40),
    width=st.sampled_from([60, 80, 100, 200]),
    outgoing=st.booleans(),
    data=st.data(),
)
def test_every_path_of_a_large_transfer_draws_its_bar_named_for_its_peer_full_then_gone(
    path: str, mib: int, width: int, outgoing: bool, data: st.DataObject
) -> None:
    first, chunk = PATHS[path]
    command = envelope.REQUEST if outgoing else envelope.REPLY
    # a sent chunk names its destination; a received one its source when the broker relayed it,
    # its receiver when it came over the direct path (as the sender wrote it)
    name = b"alice" if outgoing or not first else b"client-3d386686bcbb"
    message = [command, name, b"rid-1", b"header", np.zeros(mib * MIB, np.uint8)]
    chunks = split(message, limits.STREAM_THRESHOLD_BYTES, chunk, first)[:-1]  # the emptied message after them aside
    if first and not outgoing:  # the broker's first chunk may come before, among or after the direct ones
        head, rest = chunks[0], chunks[1:]
        at = data.draw(st.integers(0, len(rest)), label="the broker's chunk comes at")
        chunks = [*rest[:at], [head[0], b"alice", *head[2:]], *rest[at:]]
    screen = io.StringIO()
    transfers = progress.Transfers(Console(file=screen, force_terminal=True, width=width))
    for part in chunks:
        transfers.chunk(b"alice", part, outgoing)
    shown = screen.getvalue()
    assert ("send to alice" if outgoing else "get from alice") in shown, shown
    assert "client-" not in shown, shown
    assert f"{mib:.1f}/{mib:.1f} MiB" in shown, shown  # drawn full before it went
    assert shown.count(HIDE_CURSOR) == shown.count(SHOW_CURSOR) >= 1, shown  # and the display stopped


def test_an_abort_takes_its_requests_bars_away() -> None:
    """A stream given up (`envelope.abort`, a chunk of no bytes) leaves no bar behind."""
    screen = io.StringIO()
    transfers = progress.Transfers(Console(file=screen, force_terminal=True, width=100))
    parts = split([envelope.REPLY, b"alice", b"rid-1", b"header", np.zeros(8 * MIB, np.uint8)])
    transfers.chunk(b"alice", parts[0], outgoing=False)
    transfers.chunk(b"alice", envelope.abort(b"alice", b"rid-1"), outgoing=False)
    shown = screen.getvalue()
    assert "get from alice" in shown and shown.count(HIDE_CURSOR) == shown.count(SHOW_CURSOR) == 1, shown
