"""What a node sends is the value it checked, not what a later write made of it (review9).

A get's reply and a move's Put carry the stored tensor's bytes as a view: the link hands them to
zmq without a copy, and when the broker's queue for the node is full (a slow peer) they wait in
the link's outbox, then in zmq's, while the node goes on handling requests. An in-place write
handled meanwhile (``add_`` of another owner's data, moved here by an owner who trusts this
node) changed what left, after the get was judged public or the move checked against the
destination: alice's data left bob, unaudited and uncharged.

The rule that keeps it so is the link's (`fedptr.link`): it keeps no caller memory past the call
that hands a message over. The property below writes into the stored value right after its reply
was handed over, on every path a reply can take (sizes either side of each threshold, CURVE's
paths or not, inproc, ipc, tcp with a direct path with shared memory or without, the queue full
or not, a tensor or a model), and checks the reply carries the value as it was.

On the in-process harness (the real broker, nodes and client); the full queue is made by
refusing bob's link its sends (zmq.Again, as a full queue does) for as long as the test holds it.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pytest
import torch
import zmq
from fedptr.nodes.node import Node, NodeConfig
from fedptr.nodes.replies import ReplyCache

import fedptr
from fedptr import envelope, limits, link, wire
from fedptr.errors import FedptrError, PermissionDenied, RemoteError, UsageError
from fedptr.link import Link
from fedptr.pointer import Pointer, remote_call
from fedptr.tensors import to_raw

from . import harness
from .conftest import eventually

DEADLINE_S = 10.0
"""How long the test waits for each step it orders."""


@contextmanager
def _full_queue(monkeypatch: pytest.MonkeyPatch, node: Node) -> Iterator[None]:
    """`node`'s link can send nothing while the block runs (its queue at the broker is full)."""
    sock = node.link._sock
    send = link.send_frames

    def refused(s: Any, frames: Any) -> None:
        if s is sock:
            raise zmq.Again()
        send(s, frames)

    monkeypatch.setattr(link, "send_frames", refused)
    try:
        yield
    finally:
        monkeypatch.setattr(link, "send_frames", send)
        node.link._writable.set()  # what waited goes out now


def _first(node: Node, obj_id: int) -> float:
    """The first number of a stored tensor, or NaN while it is not there yet or pending."""
    entry = node.store.entries.get(obj_id)
    return float(entry.result().reshape(-1)[0]) if entry is not None and entry.ok else math.nan


async def _now(value: bool) -> bool:
    return value


async def _got_then_written(monkeypatch: pytest.MonkeyPatch) -> None:
    configs = {"bob": NodeConfig(), "alice": NodeConfig(trust=["bob"])}
    data = {"alice": {"data": {"x": np.full((256, 1024), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob", "alice"], configs=configs, data=data, call_timeout=30.0) as c:
        bob, alice = c.worker("bob"), c.worker("alice")
        (ax,) = await alice.search("data")
        stolen = await (ax * 1).move("bob")  # alice trusts bob with what derives from her data
        public = await bob.send(torch.zeros(256, 1024))
        node = c.node("bob")
        with _full_queue(monkeypatch, node):
            got = c.client.request_nowait("bob", wire.Get(public.id_at_location))
            assert await eventually(lambda: _now(len(node.link._outbox) > 0), DEADLINE_S)  # judged public, queued
            public.add_(stolen)
            assert await eventually(lambda: _now(_first(node, public.id_at_location) == 0.5), DEADLINE_S)
        reply = await asyncio.wait_for(got, DEADLINE_S)
        assert isinstance(reply, wire.TensorReply)
        value = torch.frombuffer(bytearray(reply.tensor.data), dtype=torch.float32)
        assert torch.equal(value, torch.zeros(256 * 1024)), f"alice's data left bob in a public get: {value}"


def test_a_gets_reply_is_the_value_it_released_not_a_later_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_got_then_written(monkeypatch))


PUBLIC, PRIVATE = 0.0, 0.5
"""What a stored value holds when its get is judged, and what a write right after makes of it."""

_EDGES = sorted(
    {
        limits.INLINE_FRAME_BYTES,
        limits.TENSOR_VIEW_MIN_BYTES,
        zmq.COPY_THRESHOLD,
        limits.DIRECT_STREAM_THRESHOLD_BYTES,
        limits.DIRECT_SHM_MIN_BYTES,
        limits.STREAM_THRESHOLD_BYTES,
    }
)
"""The sizes (bytes) at which a reply's buffer changes its path: inlined in its head, a view
of the value, handed to zmq zero-copy, streamed over a direct path, into shared memory, streamed."""

_SEED = 9
_RANDOM_SIZES = 4
"""Sizes drawn (seeded) between the edges, per cluster, besides one element either side of each."""


@dataclass(frozen=True)
class _Case:
    elements: int
    model: bool
    curve: bool
    full: bool


def _cases(rng: random.Random) -> list[_Case]:
    sizes = [edge // 4 + d for edge in _EDGES for d in (-1, 1)]
    sizes += [rng.randrange(1, 2 * limits.STREAM_THRESHOLD_BYTES // 4) for _ in range(_RANDOM_SIZES)]
    cases = [
        _Case(n, model, curve, full)
        for n in sizes
        for model in (False, True)
        for curve in (False, True)
        for full in (False, True)
    ]
    rng.shuffle(cases)
    return cases


def _features(elements: int) -> tuple[int, int]:
    """A Linear's (in, out) features whose weight holds `elements`, or a few more when no two
    factors of it fit a Linear's bound on each (`fedptr.modules`)."""
    bound = 1 << 16
    for d in range(min(elements, bound), 0, -1):
        if elements % d == 0 and elements // d <= bound:
            return d, elements // d
        if d * bound < elements:
            break
    return bound, -(-elements // bound)


def _write_after_reply(monkeypatch: pytest.MonkeyPatch, node: Node, obj_id: int, done: asyncio.Event) -> None:
    """The node's next get reply is followed at once, before the reply call's caller goes on, by
    an in-place write of PRIVATE into the stored value (what a later request would do)."""
    reply = node.reply

    def then_written(dest: str, rid: bytes, msg: wire.Message) -> None:
        reply(dest, rid, msg)
        if isinstance(msg, wire.TensorReply | wire.ModuleReply) and not done.is_set():
            value = node.store.entries[obj_id].result()
            with torch.no_grad():
                for t in value.state_dict().values() if isinstance(value, torch.nn.Module) else [value]:
                    t.fill_(PRIVATE)
            done.set()

    monkeypatch.setattr(node, "reply", then_written)


def _carried(reply: wire.Message) -> list[np.ndarray[Any, Any]]:
    """The float32 values a get's reply carries."""
    if isinstance(reply, wire.TensorReply):
        raws = [reply.tensor]
    else:
        assert isinstance(reply, wire.ModuleReply), reply
        raws = [p for p in reply.params if isinstance(p, wire.RawTensor)]
    return [np.frombuffer(bytes(r.data), dtype=np.float32) for r in raws]


async def _one_get(monkeypatch: pytest.MonkeyPatch, c: harness.InprocCluster, case: _Case) -> bool:
    """Whether the get's reply carried the value as it was when the reply was handed over."""
    bob, node = c.worker("bob"), c.node("bob")
    if case.model:
        sent = torch.nn.Linear(*_features(case.elements), bias=False)
        with torch.no_grad():
            sent.weight.fill_(PUBLIC)
    else:
        sent = torch.full((case.elements,), PUBLIC)
    pointer = bob.send(sent)
    await pointer
    done = asyncio.Event()
    with monkeypatch.context() as m:
        _write_after_reply(m, node, pointer.id_at_location, done)
        if (
            case.curve
        ):  # the paths CURVE takes (an earlier stream over the direct path); the bytes are not encrypted here
            m.setattr(node.link, "curve", object())
        with _full_queue(m, node) if case.full else nullcontext():
            got = c.client.request_nowait("bob", wire.Get(pointer.id_at_location))
            await asyncio.wait_for(done.wait(), DEADLINE_S)
        reply = await asyncio.wait_for(got, DEADLINE_S)
    return all(np.all(values == PUBLIC) for values in _carried(reply))


async def _direct_path_open(c: harness.InprocCluster, shared: bool) -> None:
    """A large reply from bob opens the client's direct path; wait until bob's replies take it."""
    bob, node = c.worker("bob"), c.node("bob")
    await bob.send(torch.zeros(limits.STREAM_THRESHOLD_BYTES)).get()
    direct, client = node.link.direct, c.client.link.name.encode()
    assert direct is not None
    assert await eventually(lambda: _now(direct.ready(client, envelope.REPLY)), DEADLINE_S)
    assert direct.shares_memory(client, envelope.REPLY) == shared


@pytest.mark.parametrize(
    ("transport", "shared"),
    [
        ("inproc", False),
        *(pytest.param(*p, marks=pytest.mark.slow) for p in [("ipc", False), ("tcp", True), ("tcp", False)]),
    ],
)  # the socket transports (5-15 s each) in the full run only
def test_no_write_after_a_get_changes_what_it_carries(
    monkeypatch: pytest.MonkeyPatch, transport: Literal["inproc", "ipc", "tcp"], shared: bool
) -> None:
    """Every path a reply takes (inlined, batched, zero-copy, streamed through the broker or over a
    direct path, into shared memory or sealed, queued in the outbox), for a tensor and a model:
    a write into the stored value right after its reply was handed to the link never shows in it."""
    if transport == "tcp" and not shared:
        monkeypatch.setattr(limits, "DIRECT_SHM_DIR", "")

    async def run() -> None:
        async with harness.cluster(["bob"], transport=transport, call_timeout=30.0) as c:
            if transport == "tcp":
                await _direct_path_open(c, shared)
            cases = _cases(random.Random(f"{_SEED}-{transport}-{shared}"))
            changed = [case for case in cases if not await _one_get(monkeypatch, c, case)]
            assert not changed, (
                f"a write after the get changed what it carried in {len(changed)} of {len(cases)}: {changed}"
            )

    asyncio.run(run())


def test_a_replayed_reply_is_not_a_view_of_the_stored_value() -> None:
    """The node keeps small replies for replays (a request resent after a broker restart): one
    kept must be the value as it was judged, so it may not be a view of the stored tensor (every
    size the cache keeps is below `limits.TENSOR_VIEW_MIN_BYTES`, where `to_raw` copies)."""
    cache = ReplyCache("bob")
    for nbytes in (limits.TENSOR_VIEW_MIN_BYTES - 4, limits.TENSOR_VIEW_MIN_BYTES, limits.TENSOR_VIEW_MIN_BYTES + 4):
        key = ("c", nbytes.to_bytes(8, "little"))
        stored = torch.full((nbytes // 4,), PUBLIC)
        cache.begin(key)
        cache.finish(key, wire.TensorReply(to_raw(stored)))
        stored.fill_(PRIVATE)
        kept = cache.cached(key)
        assert not isinstance(kept, wire.TensorReply) or np.all(_carried(kept)[0] == PUBLIC), nbytes


_WIRE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
"""The wire's floating and complex dtypes: those numpy holds take `to_raw`'s short path, the
others (bfloat16, complex) its general one."""


async def _replayed_gets() -> list[str]:
    """For each dtype, a small public get of bob's is answered, a write of alice's data into the
    stored value follows, and the very request is replayed (a retry after a lost reply): what
    the replay carries must be what the get released."""
    configs = {"bob": NodeConfig(), "alice": NodeConfig(trust=["bob"])}
    data = {"alice": {"data": {"x": np.full((64,), PRIVATE, dtype=np.float32)}}}
    changed = []
    async with harness.cluster(["bob", "alice"], configs=configs, data=data, call_timeout=30.0) as c:
        bob, alice, node = c.worker("bob"), c.worker("alice"), c.node("bob")
        (ax,) = await alice.search("data")
        stolen = await (ax * 1).move("bob")  # alice trusts bob with what derives from her data
        answers: dict[bytes, list[bytes]] = {}
        reply = node.link.reply

        def kept(dest: str, rid: bytes, msg: wire.Message) -> None:
            if isinstance(msg, wire.TensorReply):  # the bytes as they leave, before any later write
                answers.setdefault(rid, []).append(bytes(msg.tensor.data))
            reply(dest, rid, msg)

        node.link.reply = kept  # type: ignore[method-assign]
        link = c.client._link
        for dtype in _WIRE_FLOATS:
            public = await bob.send(torch.zeros(64, dtype=dtype))
            rid = link.session.next_request_id()
            get = wire.Get(public.id_at_location)
            assert isinstance(await c.client.request_nowait("bob", get), wire.TensorReply)
            await public.add_(stolen)
            link._push_frames(envelope.framed([envelope.REQUEST, b"bob", rid, *wire.encode(get, budget_ms=30_000)]))
            assert await eventually(lambda rid=rid: _now(len(answers.get(rid, [])) == 2), DEADLINE_S)  # type: ignore[misc]
            first, replayed = answers[rid]
            if replayed != first:
                changed.append(str(dtype))
    return changed


def test_a_replayed_get_carries_what_the_get_released() -> None:
    changed = asyncio.run(_replayed_gets())
    assert not changed, f"a replayed get carried alice's data, written after the get was judged public: {changed}"


async def _public_aliased_beside_data(c: harness.InprocCluster) -> tuple[Pointer, Pointer, Pointer]:
    """bob's data (0.5s), a public tensor of zeros sent to bob, and an alias entry of it, kept:
    the alias stays on bob when the public tensor moves."""
    bob = c.worker("bob")
    (bx,) = await bob.search("data")
    public = await bob.send(torch.zeros(256, 1024))
    return bx, public, await remote_call("add_", (public, 0.0))


def _alias_plus_data(alias: Pointer, bx: Pointer) -> wire.Op:
    """The write through the alias that would taint the public tensor with bob's data."""
    return wire.Op(wire.new_object_id(), "add_", [wire.Ref(alias.id_at_location), wire.Ref(bx.id_at_location)], {})


async def _carol_got_zeros(c: harness.InprocCluster, moved_id: int) -> None:
    """Carol holds the moved public tensor as it was checked: zeros, none of bob's data."""
    reply = await asyncio.wait_for(c.client.request_nowait("carol", wire.Get(moved_id)), DEADLINE_S)
    assert isinstance(reply, wire.TensorReply)
    value = torch.frombuffer(bytearray(reply.tensor.data), dtype=torch.float32)
    assert torch.equal(value, torch.zeros(256 * 1024)), f"bob's data left bob in a public move: {value}"


async def _moved_then_written(monkeypatch: pytest.MonkeyPatch) -> None:
    data = {"bob": {"data": {"x": np.full((256, 1024), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob", "carol"], data=data, call_timeout=30.0) as c:
        bx, public, alias = await _public_aliased_beside_data(c)
        node, new_id = c.node("bob"), wire.new_object_id()
        with _full_queue(monkeypatch, node):
            moved = c.client.request_nowait("bob", wire.Move(public.id_at_location, "carol", new_id))
            assert await eventually(lambda: _now(len(node.link._outbox) > 0), DEADLINE_S)  # checked public, queued
            written = c.client.request_nowait("bob", _alias_plus_data(alias, bx))
            assert await eventually(lambda: _now(_first(node, alias.id_at_location) == 0.5), DEADLINE_S)
        await asyncio.wait_for(moved, DEADLINE_S)
        await asyncio.wait_for(written, DEADLINE_S)
        await _carol_got_zeros(c, new_id)


def test_a_moves_put_is_the_value_it_checked_not_a_later_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_moved_then_written(monkeypatch))


async def _moved_then_written_during_its_records_fsync() -> None:
    data = {"bob": {"data": {"x": np.full((256, 1024), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob", "carol"], data=data, stores=["bob"], call_timeout=30.0) as c:
        bx, public, alias = await _public_aliased_beside_data(c)
        node, new_id = c.node("bob"), wire.new_object_id()
        durable = node.store.durable
        assert durable is not None
        loop, release = asyncio.get_running_loop(), threading.Event()
        recording: asyncio.Future[None] = loop.create_future()
        write_move = durable.write_move

        def slow_write_move(obj_id: int, dest: str, moved_id: int) -> None:
            # on the write-ahead's thread: the move's Put is built, its record not yet durable
            loop.call_soon_threadsafe(lambda: recording.done() or recording.set_result(None))
            release.wait(DEADLINE_S)
            write_move(obj_id, dest, moved_id)

        durable.write_move = slow_write_move  # type: ignore[method-assign]
        try:
            moved = c.client.request_nowait("bob", wire.Move(public.id_at_location, "carol", new_id))
            await asyncio.wait_for(recording, DEADLINE_S)  # checked public, its record awaited
            written = c.client.request_nowait("bob", _alias_plus_data(alias, bx))
            assert await eventually(lambda: _now(_first(node, alias.id_at_location) == 0.5), DEADLINE_S)
            assert not moved.done()  # the write landed inside the window
        finally:
            release.set()
        await asyncio.wait_for(moved, DEADLINE_S)
        await asyncio.wait_for(written, DEADLINE_S)
        await _carol_got_zeros(c, new_id)


def test_a_write_during_a_moves_record_fsync_does_not_change_what_the_destination_gets() -> None:
    """A `--store` node builds a move's Put, then awaits its move record on the write-ahead's
    thread: a write through an alias handled in that window must not reach the destination
    (red17 closed it with the Put's copy; no test drove it). The record's write waits on an
    event here, so the write lands in the window every time."""
    asyncio.run(_moved_then_written_during_its_records_fsync())


async def _moved_then_written_then_resent(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # "streamed": over limits.STREAM_THRESHOLD_BYTES, on tcp://: the Put's chunks but the first
    # take bob's direct path to carol (shared memory) while the broker path is blocked
    streamed = kind == "streamed tensor"
    rows = 2048 if streamed else 256
    data = {"bob": {"data": {"x": np.full((rows, 1024), 0.5, dtype=np.float32)}}}
    transport: Literal["tcp", "inproc"] = "tcp" if streamed else "inproc"
    async with harness.cluster(
        ["bob", "carol"], data=data, heartbeat_s=0.1, call_timeout=30.0, transport=transport
    ) as c:
        bob = c.worker("bob")
        (bx,) = await bob.search("data")
        node, carol, new_id = c.node("bob"), c.node("carol"), wire.new_object_id()
        if streamed:
            direct = node.link.direct
            assert direct is not None
            while not direct.ready(b"carol", envelope.REQUEST):
                node.link._want_direct(b"carol")
                await asyncio.sleep(limits.POLL_INTERVAL_S)
        if kind == "model":
            public = await bob.send(torch.nn.Linear(1024, 256, bias=False).requires_grad_(False).apply(_zeroed))
            weight = node.store.entries[public.id_at_location].result().weight

            def write() -> None:  # a training step on bob's data, say: in place, on the loop
                with torch.no_grad():
                    weight.add_(0.5)

            def written() -> bool:
                return float(weight.detach().reshape(-1)[0]) == 0.5
        else:
            public = await bob.send(torch.zeros(rows, 1024))
            alias = await remote_call("add_", (public, 0.0))  # an alias entry of public, kept when public moves

            def write() -> None:
                c.client.request_nowait("bob", _alias_plus_data(alias, bx))

            def written() -> bool:
                return _first(node, alias.id_at_location) == 0.5

        assert node.store.wal is None  # no move record: the Put carries views since bulk2
        broker = c.broker
        assert broker is not None
        with _full_queue(monkeypatch, node):
            moved = c.client.request_nowait("bob", wire.Move(public.id_at_location, "carol", new_id))
            assert await eventually(lambda: _now(len(node.link._outbox) > 0), DEADLINE_S)  # checked public, queued
            write()
            assert await eventually(lambda: _now(written()), DEADLINE_S)
            # bob, silent while its queue is full, is forgotten: its queued Put is refused "not
            # registered" once it leaves, and the session sends the message it kept again
            assert await eventually(lambda: _now(b"bob" not in broker.table.by_name), DEADLINE_S)
        with suppress(FedptrError):  # the client heard bob was lost
            await asyncio.wait_for(moved, DEADLINE_S)
        # the move settles: carol holds the object, or (the Put refused, not sent again) bob
        # asked carol, heard she has none, and took it back under its id
        entries = carol.store.entries, node.store.entries
        assert await eventually(
            lambda: _now(new_id in entries[0] or public.id_at_location in entries[1]), DEADLINE_S
        ), "the move never settled"
        assert node.link.reregistrations >= 1
        if streamed:  # a Put refused and not sent again: bob gives up its chunks at carol, or she took it whole
            reassembly = carol.link.session._reassembly
            assert await eventually(lambda: _now(reassembly.pending_bytes == 0), ABANDONED_S), (
                f"carol holds {reassembly.pending_bytes} bytes of a Put that never comes"
            )
        if new_id not in carol.store.entries:
            return
        reply = await asyncio.wait_for(c.client.request_nowait("carol", wire.Get(new_id)), DEADLINE_S)
        tensor = reply.params[0] if isinstance(reply, wire.ModuleReply) else getattr(reply, "tensor", None)
        assert isinstance(tensor, wire.RawTensor), reply
        value = torch.frombuffer(bytearray(tensor.data), dtype=torch.float32)
        assert torch.equal(value, torch.zeros(rows * 1024)), f"bob's data left bob in a public move: {value}"


ABANDONED_S = 10.0
"""Within this a Put's chunks its sender gave up are gone from the destination (well short of
`limits.STREAM_TIMEOUT_S`, after which they went anyway)."""


def _zeroed(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.zero_()


@pytest.mark.parametrize("kind", ["tensor", "model", "streamed tensor"])
def test_a_moves_put_resent_after_the_broker_forgot_the_node_is_the_value_it_checked(
    monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A node's session keeps a request's message to send it again when the broker answers "not
    registered" (it forgot the node, or restarted). A move's Put kept as views of the stored
    tensor (bulk2: no copy when the node awaits no move record) was resent with what a write
    through an alias made of it after the origins were read: bob's data left in a public move
    (review11). The link copies what it keeps; the session's kept message is not the link's.
    A model's Put (`PutModule`, views of its parameters) takes the same flag: a write into the
    stored model after the check must not reach carol either; nor a streamed Put's, whose chunks
    but the first take bob's direct path to carol."""
    asyncio.run(_moved_then_written_then_resent(monkeypatch, kind))


RESENT = ["tensor", "small tensor", "model", "op constant", "broadcast", "broadcast model"]
"""What a client sends from its own memory: a tensor above `limits.SEND_COPY_MAX_BYTES` (sent
from its memory), one below it (copied), a model's parameters, a tensor argument of an op, and
a broadcast's tensor (above `limits.STREAM_THRESHOLD_BYTES`: its fan-out streams) or model."""


def _written_once_fanned_out(link: Link, write: Callable[[], None]) -> None:
    """`write` runs right after `link` queued its next fan-out (a broadcast is awaited as a
    whole: a write meanwhile is a concurrent task's, after the bytes left the first time)."""
    fan_out = link.request_many_nowait

    def then_written(*args: Any) -> list[asyncio.Future[wire.Message]]:
        futures = fan_out(*args)
        write()
        return futures

    link.request_many_nowait = then_written  # type: ignore[method-assign]


async def _written_after_the_call_then_resent(kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The value as the call took it, and the one the worker holds (None: the call failed typed,
    as a send whose tensor changed before it was acknowledged does)."""
    # the sender hears nothing of the broker's restart before its next request is refused
    async with harness.cluster(["bob"], transport="ipc", heartbeat_s=0.1) as c, c.connect(heartbeat_s=30.0) as sender:
        bob = sender.worker("bob")
        zeros = await bob.send(torch.zeros(1 << 16))
        await c.stop_broker()
        c.start_broker()
        assert await eventually(lambda: _now(c.broker is not None and b"bob" in c.broker.table.by_name), DEADLINE_S)
        value: torch.Tensor
        stored: Any
        if kind in ("model", "broadcast model"):
            model = torch.nn.Linear(256, 256, bias=False)
            value = model.weight.detach().clone()
            if kind == "model":
                stored = bob.send(model)
                with torch.no_grad():
                    model.weight.add_(1.0)  # right after the call: its first sending has left
            else:
                _written_once_fanned_out(sender.link, lambda: model.weight.detach().add_(1.0))
                stored = _first_copy(fedptr.broadcast(model, [bob]))
        elif kind == "broadcast":
            sent = torch.randn(1 << 21)
            value = sent.clone()
            _written_once_fanned_out(sender.link, lambda: sent.add_(1.0))
            stored = _first_copy(fedptr.broadcast(sent, [bob]))
        else:
            numel = {"tensor": 1 << 19, "small tensor": 1 << 16, "op constant": 1 << 16}[kind]
            sent = torch.randn(numel)
            value = sent.clone()
            stored = zeros + sent if kind == "op constant" else bob.send(sent)
            sent.add_(1.0)
        try:
            ptr = await asyncio.wait_for(stored, DEADLINE_S)
        except UsageError:
            assert sender.link.reregistrations >= 1
            return value, None
        assert sender.link.reregistrations >= 1  # the broker refused it: it was sent again
        got = await ptr.get()
        return value, (got.weight.detach() if kind.endswith("model") else got)


async def _first_copy(broadcast: Awaitable[list[Pointer]]) -> Pointer:
    (copy,) = await broadcast
    return copy


@pytest.mark.parametrize("kind", RESENT)
def test_a_request_resent_after_the_broker_forgot_the_client_carries_what_the_call_took(kind: str) -> None:
    """The session keeps a request's message to send it again when the broker answers "not
    registered" (it forgot the client, or restarted, and delivered nothing). Kept as views of
    the caller's memory, a resend carried what the caller wrote after the call returned, which
    its first sending did not (the link copies what it sends): the worker stored bytes nobody
    sent it, under the call's acknowledgement."""
    value, held = asyncio.run(_written_after_the_call_then_resent(kind))
    assert held is None or torch.equal(held, value), f"{kind}: the worker holds bytes written after the call"


async def _aliased_then_handed_over() -> None:
    data = {"bob": {"data": {"x": np.full((10, 10), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob"], data=data, call_timeout=30.0) as c, c.connect() as writer:
        bob = c.worker("bob")
        public = await bob.send(torch.zeros(10, 10))
        alias = await remote_call("add_", (public, 0.0))  # an alias entry of public, kept
        handovers = [
            wire.Grant(alias.id_at_location, writer.name),
            wire.Move(alias.id_at_location, "bob", wire.new_object_id(), writer.name),
            wire.Grant(public.id_at_location, writer.name),
        ]
        for handover in handovers:
            with pytest.raises(RemoteError) as refused:
                await c.client.request_nowait("bob", handover)
            assert refused.value.remote_type == "InvalidArgumentError", refused.value
        del alias  # its delete goes out before the next request
        assert isinstance(await c.client.request_nowait("bob", handovers[-1]), wire.Ok)  # alone now: handed over
        (bx,) = await writer.worker("bob").search("data")
        write = wire.Op(
            wire.new_object_id(), "add_", [wire.Ref(public.id_at_location), wire.Ref(bx.id_at_location)], {}
        )
        assert isinstance(await writer.request_nowait("bob", write), wire.Ok)
        with pytest.raises(PermissionDenied):  # the writer's object now, and private
            await public.get()


def test_an_object_sharing_its_memory_is_not_handed_to_another_client() -> None:
    """A write through an alias kept by one client is not ordered with a computation of the
    object's new owner: before the fix, a plan of the new owner, public on arrival, read the
    value after its first long step (``(e @ e).sum() * 0.0 + p`` on a 1500x1500 ``e``, on the
    node's thread), the other client's ``add_`` of bob's data through the alias ran inline
    meanwhile, and the plan's public output held bob's data exactly (docs/REDTEAM.md, red17)."""
    asyncio.run(_aliased_then_handed_over())


async def _graph_then_granted() -> wire.Message | None:
    data = {"bob": {"data": {"x": np.full((4, 3), 0.5, dtype=np.float32)}}}
    async with harness.cluster(["bob"], data=data, call_timeout=30.0) as c, c.connect() as other:
        (bx,) = await c.worker("bob").search("data")
        leaf = await c.worker("bob").send(torch.zeros(4, 3, requires_grad=True))
        loss = await remote_call("sum", (leaf * bx,))  # its graph reaches the leaf
        assert isinstance(await c.client.request_nowait("bob", wire.Grant(leaf.id_at_location, other.name)), wire.Ok)
        backward = wire.Op(wire.new_object_id(), "backward", [wire.Ref(loss.id_at_location)], {})
        assert isinstance(await c.client.request_nowait("bob", backward), wire.Ok)
        grad = wire.Op(wire.new_object_id(), "grad", [wire.Ref(leaf.id_at_location)], {})
        try:
            await other.request_nowait("bob", grad)
            return await other.request_nowait("bob", wire.Get(grad.result_id))
        except FedptrError:
            return None  # no gradient, or a private one: nothing of bob's left


def test_a_graph_built_before_a_grant_does_not_reach_the_granted_leaf() -> None:
    """A graph its first owner built before granting a leaf to another client still wrote the
    leaf's gradient: the backward's taint rule covers its caller's objects only, and the new
    owner fetched bob's x exactly as the leaf's gradient (red17)."""
    got = asyncio.run(_graph_then_granted())
    if isinstance(got, wire.TensorReply):
        value = torch.frombuffer(bytearray(got.tensor.data), dtype=torch.float32)
        assert not torch.equal(value, torch.full((12,), 0.5)), "bob's x as the gradient of a leaf granted away"


async def _resent_after_its_chunks_took_the_direct_path() -> tuple[torch.Tensor, Any]:
    async with harness.cluster(["bob"], transport="tcp", heartbeat_s=0.1) as c, c.connect(heartbeat_s=30.0) as sender:
        bob = sender.worker("bob")
        await bob.send(torch.zeros(limits.STREAM_THRESHOLD_BYTES))  # a large request opens the path
        direct = sender.link.direct
        assert direct is not None
        assert await eventually(lambda: _now(direct.ready(b"bob", envelope.REQUEST)), DEADLINE_S)
        broker = c.broker
        assert broker is not None
        # the broker forgets the sender, silent for its liveness (0.3 s): it learns so from a refusal
        assert await eventually(lambda: _now(sender.name.encode() not in broker.table.by_name), DEADLINE_S)
        value = torch.randn(2 << 20)  # 8 MiB: its chunks but the first take the path
        try:
            got: Any = await (await asyncio.wait_for(bob.send(value), DEADLINE_S)).get()
        except FedptrError as e:
            got = e
        assert sender.link.reregistrations >= 1
        return value, got


def test_a_request_resent_after_its_chunks_took_the_direct_path_arrives_whole() -> None:
    """A request the broker refused undelivered (it forgot the sender) is sent again, chunks
    and all; those of its first sending that took the direct path were at the worker already, and
    the resent ones were refused as overlapping them: an 8 MiB send failed with ProtocolError
    after the broker forgot its client (nemesis7). A chunk sent again with the same bytes is
    taken, counted once."""
    value, got = asyncio.run(_resent_after_its_chunks_took_the_direct_path())
    assert isinstance(got, torch.Tensor) and torch.equal(got, value), got
