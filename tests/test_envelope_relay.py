"""The broker's fast path (`envelope.relay`) against its general path (`parse`, then each
message named for the source and framed again per destination, as `broker/router.py` did before
the fast path): on any bytes, valid or malformed, both refuse or both deliver the same messages,
and the fast path never sends more frames than it received."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import zmq
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedptr import envelope, limits
from fedptr.errors import ProtocolError
from tests.conftest import examples

from .test_session import _BATCH_HEAD, EXPLODING, MALFORMED_BATCHES, inlined, prefixed, record

_ROUTED = {envelope.REQUEST, envelope.REPLY, envelope.CHUNK}
_SOURCE = st.sampled_from([b"c", b"client-1", b"a-much-longer-client-name"])


def general(frames: list[Any], source: bytes) -> list[tuple[bytes, list[Any], list[bytes], int, int]] | None:
    """What the broker's general path delivers per destination, or None where it refuses the
    multipart or does not route all of it as plain requests, replies and chunks."""
    try:
        envs = envelope.parse(frames)
    except ProtocolError:
        return None
    if any(e.command not in _ROUTED for e in envs):
        return None
    by_dest: dict[bytes, list[list[Any]]] = {}
    for e in envs:
        by_dest.setdefault(e.name, []).append(envelope.message(e.command, source, e.rid, e.body))
    return [
        (
            name,
            envelope.framed(ms[0]) if len(ms) == 1 else envelope.pack_batch(ms),
            [m[2] for m in ms if m[0] == envelope.REQUEST],
            sum(m[0] == envelope.REPLY for m in ms),
            len(ms),
        )
        for name, ms in by_dest.items()
    ]


def messages(frames: list[Any]) -> list[list[bytes]]:
    return [[e.command, e.name, e.rid, *map(bytes, e.body)] for e in envelope.parse(frames)]


def check(frames: list[Any], source: bytes, canonical: bool) -> None:
    want = general(frames, source)
    got = envelope.relay(frames, source)
    if want is None:
        assert got is None
        return
    assert got is not None
    assert [(r.name, r.requests, r.replies, r.messages) for r in got] == [(n, q, p, c) for n, _, q, p, c in want]
    for r, (_, expected, *_rest) in zip(got, want, strict=True):
        assert messages(r.frames) == messages(expected)
        assert len(r.frames) <= len(frames)
        if canonical:  # what a session sends comes out exactly as the general path framed it
            assert [bytes(f) for f in r.frames] == [bytes(f) for f in expected]


_body = st.lists(
    st.one_of(
        st.binary(max_size=24),
        st.sampled_from([limits.INLINE_FRAME_BYTES, limits.INLINE_FRAME_BYTES + 1, 3000]).map(bytes),
    ),
    max_size=4,
)
_message = st.tuples(
    st.sampled_from(
        [envelope.REQUEST] * 4 + [envelope.REPLY] * 3 + [envelope.CHUNK, envelope.FANOUT, envelope.HEARTBEAT]
    ),
    st.sampled_from([b"bob", b"alice", b"", b"w" * 40]),
    st.sampled_from([envelope.NO_REPLY, b"\1\0\0\0\7\0\0\0", b"\2\0\0\0\7\0\0\0", b"\xff" * 8]),
    _body,
)
_messages = st.lists(_message, min_size=1, max_size=10)


def frames_of(ms: list[tuple[bytes, bytes, bytes, list[bytes]]], batched: bool) -> list[Any]:
    built = [envelope.message(c, n, r, b) for c, n, r, b in ms]
    return envelope.pack_batch(built) if batched or len(built) > 1 else envelope.framed(built[0])


@pytest.mark.slow  # a long property run (3-7 s): the full suite only, not the fast loop
@settings(max_examples=examples(1500), deadline=None)
@given(_messages, st.booleans(), _SOURCE)
def test_the_fast_path_relays_valid_multiparts_as_the_general_path_does(
    ms: list[tuple[bytes, bytes, bytes, list[bytes]]], batched: bool, source: bytes
) -> None:
    check(frames_of(ms, batched), source, canonical=True)


@pytest.mark.slow  # a long property run (3-7 s): the full suite only, not the fast loop
@settings(max_examples=examples(3000), deadline=None)
@given(
    _messages,
    st.booleans(),
    _SOURCE,
    st.integers(0, 400),
    st.binary(min_size=1, max_size=3),
    st.integers(0, 3),
    st.lists(st.binary(max_size=1100), max_size=2),
)
def test_the_fast_path_refuses_what_the_general_path_refuses(
    ms: list[tuple[bytes, bytes, bytes, list[bytes]]],
    batched: bool,
    source: bytes,
    at: int,
    noise: bytes,
    how: int,
    frames_added: list[bytes],
) -> None:
    """A valid multipart damaged: bytes overwritten, inserted or cut in its head, or frames
    added or taken away."""
    frames = frames_of(ms, batched)
    h = frames[0]
    at %= len(h) + 1
    if how == 0:
        frames[0] = h[:at] + noise + h[at + len(noise) :]
    elif how == 1:
        frames[0] = h[:at] + noise + h[at:]
    elif how == 2:
        frames[0] = h[:at]
    else:
        frames = frames[: len(frames) - 1] if frames_added == [] else [*frames, *frames_added]
    check(frames, source, canonical=False)


def test_the_fast_path_refuses_a_batch_over_the_bound_of_records() -> None:
    one = envelope.message(envelope.REQUEST, b"bob", b"\1" * 8, [b"x"])
    frames = envelope.pack_batch([one] * (limits.BATCH_MAX_RECEIVED + 1))
    assert envelope.relay(frames, b"c") is None
    [ok] = envelope.relay(envelope.pack_batch([one] * limits.BATCH_MAX_RECEIVED), b"c") or []
    assert ok.messages == limits.BATCH_MAX_RECEIVED


@pytest.mark.parametrize(
    "frames",
    [
        *MALFORMED_BATCHES,
        *([envelope.PROTOCOL + r] for r in EXPLODING.values()),
        *([_BATCH_HEAD + prefixed(r)] for r in EXPLODING.values()),
        # one byte inlined in a chunk, or a part one byte over the bound in a request
        [envelope.PROTOCOL + record(envelope.CHUNK, tail=inlined(b"i"))],
        [envelope.PROTOCOL + record(envelope.REQUEST, tail=inlined(b"h" * (limits.INLINE_FRAME_BYTES + 1)))],
    ],
)
def test_the_fast_path_refuses_each_known_malformed_multipart(frames: list[bytes]) -> None:
    assert envelope.relay(frames, b"c") is None


_counter = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1]))
_rid = st.tuples(_counter, st.sampled_from([7, 8])).map(
    lambda ci: ci[0].to_bytes(4, "little") + ci[1].to_bytes(4, "little")
)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(
        st.lists(_rid, max_size=8),
        st.tuples(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 3), max_size=8)).map(
            # near one another, wrapping around the counter's end: what one session issues
            lambda s: [
                ((s[0] + sum(s[1][: i + 1])) % 2**32).to_bytes(4, "little") + b"\7\0\0\0" for i in range(len(s[1]))
            ]
        ),
    )
)
@example([b"\0\0\0\0\7\0\0\0", b"\5\0\0\x80\7\0\0\0"])  # half the counter's range apart
def test_ascending_holds_only_where_each_id_is_after_the_one_before(rids: list[bytes]) -> None:
    """The broker keeps a batch's last request id as the latest when `ascending` says so."""
    if envelope.ascending(rids):
        assert all(envelope.request_after(b, a) for a, b in itertools.pairwise(rids))


def test_ascending_holds_for_a_sessions_consecutive_ids() -> None:
    assert envelope.ascending([(n).to_bytes(4, "little") + b"\3\0\0\0" for n in range(5, 69)])


# What the strategies above cannot make: records no `_record` would write (small body parts as
# frames of their own, inlined parts after none, a chunk's part inlined), extra frames that
# differ from one another (above, every big part of a size is the same bytes, so a frame
# delivered with another record would go unseen), frames that are not bytes, a destination
# that is the source itself or a prefix of another name, many records, ids repeated, and a
# multipart whose extra frames are one more or one fewer than its records count.
_NAMES = [b"bob", b"bo", b"c", b"client-1", b"w" * 40]
_handmade = st.tuples(
    st.sampled_from([envelope.REQUEST] * 3 + [envelope.REPLY] * 2 + [envelope.CHUNK]),
    st.sampled_from(_NAMES),
    st.one_of(st.sampled_from([envelope.NO_REPLY, b"\1\0\0\0\7\0\0\0"]), st.binary(min_size=8, max_size=8)),
    st.lists(st.sampled_from([b"", b"i", b"j" * limits.INLINE_FRAME_BYTES]), max_size=3),
    st.integers(0, 3),
)


def _extra_frame(n: int, kind: int) -> Any:
    """The n-th extra frame, of distinct bytes (a small one or one over the inlining bound), as
    bytes, a memoryview or a zmq.Frame (what the broker's socket hands over)."""
    data = b"%d-" % n + (b"x" * (limits.INLINE_FRAME_BYTES + 1) if n % 3 == 0 else b"")
    return [data, memoryview(data), zmq.Frame(data)][kind % 3]


@pytest.mark.slow  # a long property run (3-7 s): the full suite only, not the fast loop
@settings(max_examples=2000, deadline=None)
@given(st.lists(_handmade, min_size=1, max_size=30), st.booleans(), _SOURCE, st.integers(-1, 1), st.integers(0, 2))
def test_the_fast_path_relays_hand_made_records_as_the_general_path_does(
    records: list[tuple[bytes, bytes, bytes, list[bytes], int]], batched: bool, source: bytes, off: int, kind: int
) -> None:
    heads = [
        command + rid + len(name).to_bytes(2, "little") + n_extra.to_bytes(2, "little") + name + inlined(*parts)
        for command, name, rid, parts, n_extra in records
    ]
    if batched or len(heads) > 1:
        head = envelope.PROTOCOL + envelope.BATCH + b"".join(len(h).to_bytes(4, "little") + h for h in heads)
    else:
        head = envelope.PROTOCOL + heads[0]
    n_frames = max(0, sum(r[4] for r in records) + off)
    frames = [head, *(_extra_frame(n, kind + n) for n in range(n_frames))]
    check(frames, source, canonical=False)
    relayed = envelope.relay(frames, source) or []
    # the extra frames pass on as the same objects, each exactly once, none invented
    passed = [id(f) for r in relayed for f in r.frames[1:]]
    assert sorted(passed) == sorted(id(f) for f in frames[1:]) or not relayed
