"""The pure wire protocol: round trips of every message type, validation, zero copy, garbage."""

from __future__ import annotations

import contextlib
import functools
import os

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedptr import envelope, limits, wire
from fedptr.errors import DropoutError, ProtocolError
from fedptr.failures import error_from_failure, failure_from_error
from fedptr.tensors import from_raw, to_raw
from tests.conftest import examples


def raw(t: torch.Tensor) -> wire.RawTensor:
    return to_raw(t)


SAMPLES: list[wire.Message] = [
    wire.Put(1, raw(torch.arange(6.0).reshape(2, 3))),
    wire.PutPointer(2, "bob", 3),
    wire.Op(
        4,
        "add",
        [wire.Ref(1), 2.5, None, True, "x", [1, [2, 3]], raw(torch.ones(2))],
        {"dim": 0, "keep": {"a": wire.Ref(9)}},
    ),
    wire.Get(5),
    wire.Move(6, "alice", 7),
    wire.Delete([1, 2, 3]),
    wire.ListObjects(),
    wire.Clear(),
    wire.Ok([2, 3], "float32"),
    wire.Ok(),
    wire.TensorReply(raw(torch.tensor([True, False]))),
    wire.PointerReply("bob", 8),
    wire.Failure("remote", "RuntimeError", "shapes", "bob", ["alice", "bob"]),
    wire.PutModule(5, {"type": "Linear", "in_features": 2, "out_features": 1, "bias": True}, [raw(torch.ones(1, 2))]),
    wire.Search("digits"),
    wire.Grant(7, "alice"),
    wire.Has(7),
    wire.Move(6, "alice", 7, "client-1"),
    wire.ModuleReply({"type": "ReLU"}, []),
    wire.SearchReply([1, 2]),
    wire.Put(6, raw(torch.ones(2)), True, {"bob": ["secure_worker"]}),
    wire.TensorReply(raw(torch.ones(1)), "dp"),
    wire.ModuleReply({"type": "ReLU"}, [], "dp"),
    wire.Contribute(3, "secure_worker", 4),
    wire.PutContribution(4, raw(torch.ones(3)), 1.0, 1.5, "client-1"),
    wire.DPTrain(5, 6, 7, "cross_entropy", 0.5, 0.1, 10, 1.0, 1.1),
    wire.BudgetReply("bob", 1.25, 6.75),
    wire.Budget(),
    wire.Failure("budget-exhausted", "", "no budget", "bob", ["bob"], "bob"),
    wire.Failure("denied", "", "private", "bob", ["bob"], "bob"),
    wire.ObjectsReply(
        [wire.ObjectRow(1, "tensor", [2], "int64", [1, 2], "", 0), wire.ObjectRow(2, "pointer", [], "", None, "bob", 1)]
    ),
    wire.ObjectsReply([wire.ObjectRow(3, "tensor", [4, 2], "float32", None, "", 0, "*")]),
    wire.NodeStats(),
    wire.NodeStatsReply({"objects": 3, "rss_bytes": 1 << 28, "uptime_s": 1.5}, "owner+aggregator"),
    wire.NodeStatsReply({}, "plain", {"epsilon": 2.5}),
    wire.PutPlan(9, 2, [["add", [wire.Ref(0), wire.Ref(1)], {"alpha": 2.0}], ["sum", [wire.Ref(2)], {}]], [3]),
    wire.RunPlan(9, [11, 12], [13]),
    wire.PlanReply([[2, 3], []], ["float32", "int64"]),
    wire.SecureMean(14, bytes(16), ["bob", "alice"], [3, 2], 1, 2),
    wire.SecureMeanReply([3, 2], "float32", {"bob": 0.5}, {"bob": 2.5}, {"alice": "advertise: lost"}),
    wire.SecAggJoin(bytes(16), 15, "agg", ["alice", "bob"], 1),
    wire.SecAggAdvertise(bytes(16)),
    wire.SecAggPeerKeys(bytes(16)),
    wire.SecAggKeys(bytes(32), b"\1" * 32, 1.0, 1.1),
    wire.SecAggShare(bytes(16), ["alice", "bob"], 6, 1, 2, 1, 32, 1.0, 1.1, {"bob": [b"c", b"m"]}, 0),
    wire.SecAggShares({"alice": b"ciphertext"}),
    wire.SecAggMask(bytes(16), {"bob": b"ciphertext"}),
    wire.SecAggMasked(raw(torch.arange(6, dtype=torch.int32)), 0.5, 2.5),
    wire.SecAggUnmask(bytes(16), ["alice", "bob"], ["carol"]),
    wire.SecAggUnmasked({"alice": bytes(66)}, {"carol": bytes(66)}),
    wire.SecAggConfirm(bytes(16)),
    wire.DirectOffer(b"k" * 40),
    wire.DirectTicket("tcp://127.0.0.1:5556", b"k" * 40),
    wire.Failure("dropout", "unmask", "too few answered", "agg", ["agg"], "bob,carol"),
]


def same(a: object, b: object) -> bool:
    if isinstance(a, wire.RawTensor) and isinstance(b, wire.RawTensor):
        return (a.dtype, a.shape, bytes(a.data)) == (b.dtype, b.shape, bytes(b.data))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, wire.Message) and type(a) is type(b):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_every_message_type_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(wire.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    frames = wire.encode(msg, budget_ms=1234)
    decoded = wire.decode([bytes(f) for f in frames])
    assert decoded.budget_ms == 1234
    assert same(decoded.message, msg)


def test_header_carries_kind_and_budget_first() -> None:
    header = msgpack.unpackb(wire.encode(wire.Get(5), budget_ms=7)[0])
    assert header == [wire.Get.KIND, 7, 5]


def test_unknown_trailing_fields_are_ignored() -> None:
    header = msgpack.packb([wire.Get.KIND, 0, 5, "a field from a newer peer"])
    assert wire.decode([header]).message == wire.Get(5)


def test_missing_fields_take_defaults_or_fail() -> None:
    assert wire.decode([msgpack.packb([wire.Ok.KIND, 0])]).message == wire.Ok()
    with pytest.raises(ProtocolError, match="lacks field"):
        wire.decode([msgpack.packb([wire.Move.KIND, 0, 1])])


@pytest.mark.parametrize("reply", [wire.Ok(), wire.Ok([4], "float32"), wire.Ok([2, 0, 3], "int64")], ids=repr)
def test_an_ok_reply_encodes_the_same_from_the_table(reply: wire.Ok) -> None:
    """Replies are encoded once per shape and dtype (`wire._OK_HEADERS`): the stored encoding is
    the message's own, every time, and decodes to it."""
    first, again = wire.encode(reply), wire.encode(wire.Ok(list(reply.shape), reply.dtype))
    assert first == again == [msgpack.packb([wire.Ok.KIND, 0, reply.shape, reply.dtype, []])]
    assert wire.decode(again).message == reply
    assert wire.encode(wire.Ok([4], "float64")) != wire.encode(wire.Ok([4], "float32"))
    several = wire.Ok(list(reply.shape), reply.dtype, [[[3], "int64"]])  # never from the table
    assert wire.decode(wire.encode(several)).message == several


def test_the_ok_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_OK_HEADERS", {})
    monkeypatch.setattr(limits, "OK_HEADER_TABLE_SIZE", 2)
    for n in range(5):
        assert wire.decode(wire.encode(wire.Ok([n], "float32"))).message == wire.Ok([n], "float32")
    assert len(wire._OK_HEADERS) == 2


def test_decoded_ok_replies_are_remembered_by_their_bytes_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-result Ok met again is not decoded again (`wire._OKS_DECODED`): the same header
    gives the same message, a different one (even equal as numbers: 1 and True) its own, a
    malformed or other header never enters the table, nor one that describes no tensor (a
    peer's huge shape or dtype), and it stops growing at its bound."""
    monkeypatch.setattr(wire, "_OKS_DECODED", {})
    monkeypatch.setattr(limits, "OK_HEADER_TABLE_SIZE", 3)
    header = msgpack.packb([wire.Ok.KIND, 0, [4], "float32", []])
    first = wire.decode([header])
    assert wire.decode([bytes(header)]) is first and first.message == wire.Ok([4], "float32")
    as_bools = msgpack.packb([wire.Ok.KIND, 0, [True], "float32", []])
    with pytest.raises(ProtocolError):
        wire.decode([as_bools])
    with pytest.raises(ProtocolError):
        wire.decode([as_bools])  # refused again: a refused header was not kept
    several = msgpack.packb([wire.Ok.KIND, 0, [1], "int64", [[[3], "int64"]]])
    assert wire.decode([several]).message == wire.Ok([1], "int64", [[[3], "int64"]])
    wire.decode([wire.encode(wire.Get(5))[0]])
    long_shape = msgpack.packb([wire.Ok.KIND, 0, [1] * (limits.MAX_NDIM + 1), "float32", []])
    odd_dtype = msgpack.packb([wire.Ok.KIND, 0, [1], "x" * 1000, []])
    assert wire.decode([long_shape]).message.shape == [1] * (limits.MAX_NDIM + 1)  # type: ignore[attr-defined]
    assert wire.decode([odd_dtype]).message.dtype == "x" * 1000  # type: ignore[attr-defined]
    assert list(wire._OKS_DECODED) == [header]  # no entry of a few hundred bytes or more
    for n in range(5):
        assert wire.decode([msgpack.packb([wire.Ok.KIND, 0, [n], "int8", []])]).message == wire.Ok([n], "int8")
    assert len(wire._OKS_DECODED) == 3


def test_a_failed_encode_leaves_no_tensor_buffer_to_the_next() -> None:
    """The packer is kept per thread: the buffers of a message it could not encode must not
    be sent with the next message."""
    tensor = wire.RawTensor("float32", (2,), memoryview(bytes(8)))
    with pytest.raises(ProtocolError):
        wire.encode(wire.Op(1, "add", [tensor, object()], {}))  # type: ignore[list-item]
    assert wire.encode(wire.Get(5)) == [msgpack.packb([wire.Get.KIND, 0, 5])]
    assert len(wire.encode(wire.Put(2, tensor))) == 2


def test_an_empty_view_with_a_wide_stride_travels() -> None:
    """x[:0, 0] of a 2x2 tensor is empty with stride 2: its bytes could not be viewed as uint8
    (found by test_indexing_matches_torch on the in-process harness)."""
    t = torch.arange(4).reshape(2, 2)[:0, 0]
    back = from_raw(to_raw(t))
    assert back.shape == t.shape and back.dtype == t.dtype


def _nested(levels: int, leaf: wire.Value, in_dicts: bool) -> wire.Value:
    for _ in range(levels):
        leaf = {"k": leaf} if in_dicts else [leaf]
    return leaf


@pytest.mark.parametrize("in_dicts", [False, True])
def test_values_nest_down_to_the_depth_limit_and_no_deeper(in_dicts: bool) -> None:
    levels = limits.MAX_VALUE_DEPTH - 1  # inside an operation's argument list (depth 0)
    for leaf in (1, None, wire.Ref(3), [], {}):
        op = wire.Op(1, "add", [_nested(levels, leaf, in_dicts)], {})
        assert wire.decode(wire.encode(op)).message == op
    for leaf in (1, wire.Ref(3), [], [1], {"k": 1}):
        too_deep = wire.Op(1, "add", [_nested(levels + 1, leaf, in_dicts)], {})
        with pytest.raises(ProtocolError, match=r"Op\.args"):
            wire.decode(wire.encode(too_deep))


def test_64_mib_tensor_is_not_copied() -> None:
    t = torch.randn(16 << 20)
    frames = wire.encode(wire.Put(1, to_raw(t)))
    buf = frames[1]
    assert isinstance(buf, memoryview) and buf.nbytes == 64 << 20
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data == t.data_ptr()  # same memory as the tensor
    decoded = wire.decode(frames).message
    assert isinstance(decoded, wire.Put)
    back = from_raw(decoded.tensor)
    assert back.data_ptr() == t.data_ptr()  # the received tensor wraps the frame's memory


def test_a_copied_raw_tensor_owns_its_bytes() -> None:
    """What a pipelined small send puts on the wire: the tensor's bytes, copied (a transposed
    one made contiguous first), so a later in-place change does not reach them."""
    t = torch.arange(12.0).reshape(3, 4).t()
    raw = to_raw(t, copy=True)
    t.add_(100)
    assert torch.equal(from_raw(raw), torch.arange(12.0).reshape(3, 4).t())
    flat = torch.arange(4.0)
    assert np.frombuffer(to_raw(flat, copy=True).data, dtype=np.uint8).ctypes.data != flat.data_ptr()


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "match"),
    [
        ("float32", [3], 11, "needs 12"),
        ("object", [1], 8, "not allowed"),
        ("float32", [-1], 0, "bad tensor shape"),
        ("float32", [1] * (limits.MAX_NDIM + 1), 4, "dims"),
    ],
)
def test_tensor_validation(dtype: str, shape: list[int], nbytes: int, match: str) -> None:
    meta = msgpack.packb([dtype, shape, 1])
    header = msgpack.packb([wire.Put.KIND, 0, 1, msgpack.ExtType(1, meta)])
    with pytest.raises(ProtocolError, match=match):
        wire.decode([header, b"\0" * nbytes])


def test_buffer_frames_must_match_the_header() -> None:
    frames = wire.encode(SAMPLES[0])
    with pytest.raises(ProtocolError, match="not referenced"):
        wire.decode([*frames, b"extra"])
    with pytest.raises(ProtocolError, match="missing or reused"):
        wire.decode(frames[:1])


@pytest.mark.parametrize(
    "header",
    [
        msgpack.packb([999, 0]),
        msgpack.packb([wire.Get.KIND, 0, "not an int"]),
        msgpack.packb([wire.Get.KIND, -5, 1]),
        msgpack.packb({"kind": 1}),
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [{"k": object.__class__.__name__}], {1: 2}], strict_types=False),
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [msgpack.ExtType(9, b"")], {}]),
        msgpack.packb([wire.Get.KIND, 0, 1]) + b"trailing",
        b"\xc1",
        b"",
        msgpack.packb("x" * (limits.MAX_STR_BYTES + 1)),
    ],
)
def test_bad_headers_raise_protocol_error(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode([header])


@pytest.mark.parametrize("declared", [b"\xdd\xff\xff\xff\xff", b"\xdf\x00\x10\x00\x00"], ids=["array", "map"])
def test_a_small_header_declaring_a_huge_container_is_refused_before_it_is_built(declared: bytes) -> None:
    # a header this small is decoded without the explicit limits (wire._SMALL_HEADER): msgpack
    # must still refuse a declared length past the header's own size, not allocate it first
    header = msgpack.packb([wire.Op.KIND, 0, 1, "add"])[:-4] + declared + b"\x00" * 8
    assert len(header) <= wire._SMALL_HEADER
    with pytest.raises(ProtocolError, match="exceeds max_"):
        wire.decode_request([header])
    assert min(limits.MAX_STR_BYTES, limits.MAX_CONTAINER_LEN, limits.MAX_EXT_BYTES) >= wire._SMALL_HEADER


def test_deep_nesting_is_refused() -> None:
    nested: list[object] = [1]
    for _ in range(40):
        nested = [nested]
    with pytest.raises(ProtocolError):
        wire.decode([msgpack.packb([wire.Op.KIND, 0, 1, "add", nested, {}])])


def test_oversized_header_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        wire.decode([b"\x90" * (limits.MAX_HEADER_BYTES + 1)])


def test_request_ids() -> None:
    assert envelope.request_id_int(envelope.request_id_bytes(42)) == 42
    with pytest.raises(ProtocolError):
        envelope.request_id_int(b"short")


def test_names() -> None:
    assert envelope.valid_name(b"bob-1.a_b")
    assert not envelope.valid_name(b"")
    assert not envelope.valid_name(b"bob smith")
    assert not envelope.valid_name(b"x" * (limits.MAX_NAME_BYTES + 1))


def test_wire_module_imports_no_sockets_asyncio_or_torch() -> None:
    import subprocess
    import sys

    code = "import sys, fedptr.wire; bad = {'zmq', 'asyncio', 'torch'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=examples(500), deadline=None)
@given(st.lists(st.binary(max_size=256), min_size=1, max_size=5))
def test_garbage_frames_raise_only_protocol_error(frames: list[bytes]) -> None:
    with contextlib.suppress(ProtocolError):
        wire.decode(frames)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=examples(500), deadline=None)
@given(st.integers(0, 30), st.lists(json_like, max_size=6))
def test_structured_garbage_raises_only_protocol_error(kind: int, fields: list[object]) -> None:
    header = msgpack.packb([kind, 0, *fields])
    with contextlib.suppress(ProtocolError):
        wire.decode([header])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 8))
def test_mutated_messages_raise_only_protocol_error(noise: bytes, which: int) -> None:
    frames = [bytes(f) for f in wire.encode(SAMPLES[which % len(SAMPLES)])]
    frames[0] = frames[0][: len(noise)] + noise
    with contextlib.suppress(ProtocolError):
        wire.decode(frames)


def test_a_dropout_error_crosses_the_wire_with_its_owners_and_phase() -> None:
    failure = failure_from_error(DropoutError(["bob", "carol"], "unmask", "too few answered"), "agg")
    decoded = wire.decode([bytes(f) for f in wire.encode(failure)]).message
    assert isinstance(decoded, wire.Failure)
    error = error_from_failure(decoded)
    assert isinstance(error, DropoutError)
    assert (error.workers, error.phase, error.detail) == (["bob", "carol"], "unmask", "too few answered")


def test_object_ids_drawn_in_a_forked_child_are_not_its_parents() -> None:
    # ids come from a pool drawn ahead; a node forked by the launcher must not inherit it
    wire.new_object_id()  # the pool is filled in this (the parent) process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first ids, then out without pytest's teardown
        os.write(write, b" ".join(str(wire.new_object_id()).encode() for _ in range(8)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as f:
        child = {int(v) for v in f.read().split()}
    parent = {wire.new_object_id() for _ in range(8)}
    assert len(child) == 8 and not child & parent
    assert all(0 <= i < 2**63 for i in child | parent)


_CANDIDATES: list[object] = [
    *(0, -1, 2**63 - 1, True, False, 1.5, float("nan"), float("inf"), "s", "", b"b", None),
    *([], [1], [True], [1.5], ["a"], [b"x"], [wire.Ref(1)], [[1]], [None]),
    *({}, {"a": 1}, {"a": 1.5}, {"a": b"x"}, {"a": [b"x"]}, {"a": "s"}, {"a": wire.Ref(2)}, {1: 1}),
    *([[1, "tensor", [2], "float32", None, "", 0]], [[1, "nope", [], "", None, "", 0]]),
    wire.Ref(3),
    raw(torch.ones(2)),
    # an Op's flat arguments are checked by their set of types (red13): mixed scalars, one bad
    # leaf among them, a message where a value goes, a list nested one level past the limit
    [wire.Ref(1), 1, 1.5, "s", None, True, raw(torch.ones(1))],
    [wire.Ref(1), 2, b"x"],
    [wire.Ref(1), wire.Ok()],
    functools.reduce(lambda v, _: [v], range(limits.MAX_VALUE_DEPTH + 1), [1]),
]


@pytest.mark.parametrize("cls", wire.MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_the_all_at_once_field_check_agrees_with_the_checks_one_by_one(cls: type[wire.Message]) -> None:
    """`decode` checks every field of a message in one generated call (`wire._VALID`), and one by
    one only to name a bad field: the two must never differ, or a bad field would pass."""
    fields = wire._FIELDS[cls]
    good = [next((c for c in _CANDIDATES if check(c)), None) for _, check, _ in fields]
    assert wire._VALID[cls](*good) == all(check(v) for (_, check, _), v in zip(fields, good, strict=True))
    for i in range(len(fields)):
        for candidate in _CANDIDATES:
            values = [*good[:i], candidate, *good[i + 1 :]]
            expected = all(c(v) for (_, c, _), v in zip(fields, values, strict=True))
            assert bool(wire._VALID[cls](*values)) == expected, (cls.__name__, i, candidate)


def test_messages_stay_frozen_and_keep_their_constructors() -> None:
    """The generated `__init__`s (`wire._fast_init`) keep the dataclass's keyword API, give each
    instance its own default containers, run `__post_init__` checks, and leave instances frozen:
    a shared reply (the node's table of `Ok`s) can never be changed through one holder."""
    import dataclasses

    ok = wire.Ok([4], "float32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ok.dtype = "int64"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        wire.Ref(1).obj_id = 2  # type: ignore[misc]
    assert wire.Op(result_id=1, op="add", args=[], kwargs={}) == wire.Op(1, "add", [], {}, "", [])
    assert wire.Ok().shape is not wire.Ok().shape  # a default factory per instance
    assert hash(wire.Ref(3)) == hash(wire.Ref(3)) and wire.Ref(3) != (3,)
    with pytest.raises(ProtocolError):
        wire.Failure("no-such-code", "", "", "bob", [])
    with pytest.raises(ProtocolError):
        wire.RawTensor("float32", (2,), memoryview(b"abc"))
    with pytest.raises(TypeError):
        wire.Op(1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("ext", "match"),
    [
        (msgpack.ExtType(2, b"\0" * 7), "bad object reference"),
        (msgpack.ExtType(1, msgpack.packb(["float32", [1]])), "bad tensor descriptor"),
        (msgpack.ExtType(1, msgpack.packb(["float32", [1], 1])), "missing or reused"),
        (msgpack.ExtType(9, b""), "unknown extension"),
    ],
)
def test_a_body_of_one_frame_refuses_a_bad_extension_as_one_of_several_does(ext: msgpack.ExtType, match: str) -> None:
    # a one-frame body decodes with a hook of its own (no closure over the frames): the same refusals
    header = msgpack.packb([wire.Op.KIND, 0, 1, "add", [ext], {}])
    for decode in (wire.decode, wire.decode_request):
        with pytest.raises(ProtocolError, match=match):
            decode([header])
    if match != "missing or reused":  # with a frame to spare, the closure's verdict is the same
        with pytest.raises(ProtocolError, match=match):
            wire.decode([header, b"\0" * 4])


def test_decode_request_reads_a_request_as_decode_does_and_keeps_no_ok() -> None:
    for msg in SAMPLES:
        frames = [bytes(f) for f in wire.encode(msg, budget_ms=7)]
        assert wire.decode_request(frames) == wire.decode(frames)
    ok = [bytes(wire.encode(wire.Ok([3, 3], "float64"))[0])]
    wire._OKS_DECODED.pop(ok[0], None)
    assert wire.decode_request(ok).message == wire.Ok([3, 3], "float64")
    assert ok[0] not in wire._OKS_DECODED


# --- red team round 8: a small header decoded without unpackb's limit keywords ---------------
# `decode_request` reads a header of at most `wire._SMALL_HEADER` bytes with msgpack's defaults
# (each length bounded by the header's own size); with `_SMALL_HEADER` at 0 it takes the path
# with the explicit limits, the decoder before that change. On any input both must give the same
# message, or both a ProtocolError (whose text may name a different limit), never anything else.
def _outcome(frames: list[bytes]) -> wire.Decoded | ProtocolError:
    try:
        return wire.decode_request(frames)
    except ProtocolError as e:
        return e


def _both_paths(frames: list[bytes]) -> tuple[object, object]:
    lean = _outcome(frames)
    saved = wire._SMALL_HEADER
    wire._SMALL_HEADER = 0  # not monkeypatch: hypothesis runs many examples in one test call
    try:
        limited = _outcome(frames)
    finally:
        wire._SMALL_HEADER = saved
    return lean, limited


def _agree(frames: list[bytes]) -> None:
    lean, limited = _both_paths(frames)
    if isinstance(lean, ProtocolError) or isinstance(limited, ProtocolError):
        assert isinstance(lean, ProtocolError) and isinstance(limited, ProtocolError), (lean, limited)
    else:
        assert isinstance(lean, wire.Decoded) and isinstance(limited, wire.Decoded)
        assert lean.budget_ms == limited.budget_ms and same(lean.message, limited.message)


_odd_ext = st.sampled_from(
    [
        msgpack.Timestamp(0),  # extension -1: msgpack decodes it itself, not through the hook
        msgpack.Timestamp(1 << 40, 5),
        msgpack.ExtType(2, b"\0" * 8),
        msgpack.ExtType(2, b"\0" * 9),
        msgpack.ExtType(1, msgpack.packb(["float32", [1], 1])),
        msgpack.ExtType(7, b""),
    ]
)
_hostile = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | _odd_ext,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=3) | st.integers(0, 3) | st.binary(max_size=2) | st.booleans(), inner, max_size=3
        )
    ),
    max_leaves=16,
)


@settings(max_examples=examples(400), deadline=None)
@given(st.sampled_from([m.KIND for m in SAMPLES]), st.integers(-1, 3), st.lists(_hostile, max_size=6))
def test_a_small_header_is_read_as_the_limited_decoder_reads_it(kind: int, budget: int, fields: list[object]) -> None:
    _agree([msgpack.packb([kind, budget, *fields])])


@settings(max_examples=examples(400), deadline=None)
@given(st.integers(0, len(SAMPLES) - 1), st.integers(0, 200), st.binary(min_size=1, max_size=12), st.booleans())
def test_a_mutated_request_is_read_as_the_limited_decoder_reads_it(
    which: int, at: int, noise: bytes, insert: bool
) -> None:
    frames = [bytes(f) for f in wire.encode(SAMPLES[which], budget_ms=3)]
    header = frames[0]
    at %= len(header) + 1
    frames[0] = header[:at] + noise + header[at + (0 if insert else len(noise)) :]
    _agree(frames)


@pytest.mark.parametrize(
    "header",
    [
        b"\x91" * 2000 + b"\xc0",  # nesting far past msgpack's own stack and MAX_VALUE_DEPTH
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {}])[:-1] + b"\x82\xa1a\x01\xa1a\x02",  # a duplicate key
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {1: 2}], strict_types=False),  # an int key
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {b"k": 2}]),  # a bytes key
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {"k": msgpack.Timestamp(1)}]),
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {}])[:-1] + b"\x81\xd6\xff\0\0\0\0\x01",  # a timestamp key
        msgpack.packb([wire.Op.KIND, 0, 1, "add", []]) + b"\xc7\x0c\xff" + b"\xff" * 12,  # nanoseconds past 1e9
        msgpack.packb([wire.Op.KIND, 0, 1, "add", []]) + b"\xc7\x05\xff" + b"\0" * 5,  # a timestamp of 5 bytes
        msgpack.packb([wire.Op.KIND, 0, 1, b"add", [], {}]),  # bin where a str is due
        msgpack.packb([wire.Op.KIND, 0, 1, "add", [[[]] * 1000], {}]),  # many small containers
        msgpack.packb([wire.Op.KIND, 0, 1, "add"])[:-4] + b"\xdb\xff\xff\xff\xff",  # a huge declared str
        msgpack.packb([wire.Op.KIND, 0, 1, "add"])[:-4] + b"\xc9\xff\xff\xff\xff\x02",  # a huge declared ext
    ],
    ids=[
        "deep",
        "duplicate-key",
        "int-key",
        "bytes-key",
        "timestamp",
        "timestamp-key",
        "bad-nanos",
        "ts-5-bytes",
        "bin-op",
        "containers",
        "str",
        "ext",
    ],
)
def test_hostile_small_headers_are_read_as_the_limited_decoder_reads_them(header: bytes) -> None:
    assert len(header) <= wire._SMALL_HEADER
    _agree([header])
    _agree([header, b"\0" * 4])  # a body of several frames: the closure's hook


@pytest.mark.parametrize("size", [wire._SMALL_HEADER - 1, wire._SMALL_HEADER, wire._SMALL_HEADER + 1])
def test_a_header_at_the_small_headers_bound_is_read_the_same_either_side(size: int) -> None:
    bare = len(msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {"k": ""}]))
    pad = size - bare - 2  # the empty str's head is 1 byte, one of 256 bytes or more 3
    header = msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {"k": "x" * pad}])
    assert len(header) == size
    _agree([header])
    assert isinstance(_both_paths([header])[0], wire.Decoded)
    too_long = msgpack.packb([wire.Op.KIND, 0, 1, "add", [], {"k": "x" * (limits.MAX_STR_BYTES + 1)}])
    assert all(isinstance(o, ProtocolError) for o in _both_paths([too_long]))
