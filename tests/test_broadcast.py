"""`fedptr.broadcast` on an in-process cluster: one upload, a copy on each worker; a destination
that fails alone; and fan-outs sent raw to the broker, malformed or from a stranger."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq.asyncio
from torch import nn

import fedptr
from fedptr import envelope, limits, wire
from tests import harness
from tests.test_robustness import raw_socket, recv, register

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)


async def test_a_tensor_reaches_three_workers_for_one_upload(client: fedptr.Client) -> None:
    workers = [client.worker(n) for n in ("bob", "alice", "carol")]
    x = torch.arange(250_000, dtype=torch.float32).reshape(500, 500).requires_grad_()  # 1 MB
    sent = client.link.bytes_sent
    pointers = await fedptr.broadcast(x, workers)
    assert client.link.bytes_sent - sent < x.numel() * 4 + 4096  # once, not three times
    assert [p.location for p in pointers] == ["bob", "alice", "carol"]
    assert len({p.id_at_location for p in pointers}) == 1
    for p in pointers:
        assert p.shape == x.shape and p.requires_grad
        got = await p.get()
        assert isinstance(got, torch.Tensor) and torch.equal(got, x) and got.requires_grad


async def test_each_workers_copy_is_its_own_in_one_process() -> None:
    """In one process (the broker's `serve_async` over inproc://) zmq hands every destination of
    a fan-out the same message memory, which each node's tensor wraps without a copy: a write on
    bob showed in carol's copy. Sizes either side of the view threshold and a streamed one."""
    async with harness.cluster(["bob", "carol"]) as c:
        bob, carol = c.worker("bob"), c.worker("carol")
        for numel in (1 << 10, limits.TENSOR_VIEW_MIN_BYTES // 4, 1 << 18, limits.STREAM_THRESHOLD_BYTES // 4 + 1):
            at_bob, at_carol = await fedptr.broadcast(torch.zeros(numel), [bob, carol])
            await at_bob.add_(1.0)
            assert float((await at_carol.get()).abs().sum()) == 0.0, f"bob's write reached carol's copy ({numel})"


async def test_a_model_reaches_three_workers_and_runs_on_each(client: fedptr.Client) -> None:
    workers = [client.worker(n) for n in ("bob", "alice", "carol")]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    remotes = await fedptr.broadcast(model, workers)
    x = torch.randn(5, 4)
    for worker, remote in zip(workers, remotes, strict=True):
        assert isinstance(remote, fedptr.ModulePointer) and not remote.training
        out = await remote(await worker.send(x)).get()
        assert isinstance(out, torch.Tensor) and torch.allclose(out, model(x))


async def test_a_streamed_tensor_reaches_every_worker_whole(client: fedptr.Client) -> None:
    workers = [client.worker(n) for n in ("bob", "alice", "carol")]
    x = torch.randn(3 << 20)  # 12 MiB: streamed as chunks, each fanned out
    assert x.numel() * 4 > limits.STREAM_THRESHOLD_BYTES
    sent = client.link.bytes_sent
    pointers = await fedptr.broadcast(x, workers)
    assert client.link.bytes_sent - sent < x.numel() * 4 * 1.01
    for p in pointers:
        got = await p.get()
        assert isinstance(got, torch.Tensor) and torch.equal(got, x)


async def test_the_pointers_describe_what_the_call_took(client: fedptr.Client) -> None:
    """A small tensor is copied at the call; its pointers must describe that copy, as
    `Worker.send`'s do, not the tensor as it is once every destination answered: reshaped in
    place meanwhile (``unsqueeze_``, ``requires_grad_``), the pointers said ``[1, 4]`` and
    requires_grad of copies that are ``[4]`` and plain. (Failed on main.)"""
    workers = [client.worker(n) for n in ("bob", "alice")]
    x = torch.arange(4, dtype=torch.float32)
    sent = client.link.bytes_sent
    broadcast = asyncio.ensure_future(fedptr.broadcast(x, workers))
    await asyncio.sleep(0)  # one turn: the task's first step takes its request and sends it
    assert client.link.bytes_sent > sent and not broadcast.done()
    x.unsqueeze_(0).requires_grad_()
    for p in await broadcast:
        got = await p.get()
        assert isinstance(got, torch.Tensor) and torch.equal(got, torch.arange(4, dtype=torch.float32))
        assert (p.shape, p.requires_grad) == (got.shape, got.requires_grad) == (torch.Size([4]), False)


async def test_an_unknown_worker_fails_alone(client: fedptr.Client) -> None:
    workers = [client.worker(n) for n in ("bob", "nobody", "alice")]
    with pytest.raises(fedptr.BroadcastError) as caught:
        await fedptr.broadcast(torch.ones(3), workers)
    error = caught.value
    assert list(error.errors) == ["nobody"] and isinstance(error.errors["nobody"], fedptr.UnknownWorkerError)
    bob, missing, alice = error.pointers
    assert missing is None and bob is not None and alice is not None
    for p in (bob, alice):
        got = await p.get()
        assert isinstance(got, torch.Tensor) and torch.equal(got, torch.ones(3))


async def test_broadcast_refuses_what_it_cannot_send(client: fedptr.Client) -> None:
    bob = client.worker("bob")
    with pytest.raises(fedptr.InvalidArgumentError):
        await fedptr.broadcast(torch.ones(1), [])
    with pytest.raises(fedptr.InvalidArgumentError):
        await fedptr.broadcast(torch.ones(1), [bob, bob])
    with pytest.raises(fedptr.UnsupportedTypeError):
        await fedptr.broadcast([1.0], [bob])  # type: ignore[arg-type]
    assert client.link.in_flight == 0


def fan(targets: list[tuple[bytes, bytes]], inner: list[bytes]) -> list[bytes]:
    return envelope.framed(envelope.fanout(envelope.pack_targets(targets), inner))


async def replies(sock: zmq.asyncio.Socket, rids: set[bytes]) -> dict[bytes, list[bytes]]:
    """The messages that answer `rids` (each ``[command, name, rid, *body]``), waited for in turn."""
    got: dict[bytes, list[bytes]] = {}
    while not rids <= got.keys():
        for e in envelope.parse(await recv(sock)):
            if e.rid in rids:
                got[e.rid] = envelope.message(e.command, e.name, e.rid, e.body)
    return got


@pytest.mark.inproc(False)  # a raw client's registration goes unanswered in-process: not yet understood
async def test_the_broker_drops_malformed_fan_outs_and_keeps_routing(
    cluster: fedptr.Cluster, client: fedptr.Client
) -> None:
    search = envelope.message(envelope.REQUEST, b"", envelope.NO_REPLY, wire.encode(wire.Search("nothing")))
    rid = envelope.request_id_bytes
    stranger = raw_socket(cluster)  # not registered: its fan-out reaches no one
    await stranger.send_multipart(fan([(b"bob", rid(1)), (b"alice", rid(2))], search))
    refused = await asyncio.wait_for(replies(stranger, {rid(1), rid(2)}), 10.0)
    assert {m[0] for m in refused.values()} == {envelope.BROKER_ERROR}
    assert {bytes(m[3]) for m in refused.values()} == {envelope.REASON_NOT_REGISTERED}
    stranger.close()

    sock = raw_socket(cluster)
    assert (await register(sock, b"fan-fuzzer")).command == envelope.ACCEPTED
    dropped = (await client.link.broker_stats(5.0))["dropped"]
    one = [(b"bob", rid(3))]
    malformed = [
        fan([], search),
        fan([(b"bob", rid(3))], envelope.message(envelope.REPLY, b"", envelope.NO_REPLY, [b"x"])),
        fan([(b"bob", rid(3)), (b"bob", rid(4))], search),
        fan([(b"no such name!", rid(3))], search),
        fan([(f"w{i}".encode(), rid(i)) for i in range(limits.FANOUT_MAX_WIDTH + 1)], search),
        envelope.build(envelope.FANOUT, envelope.pack_targets(one)[:-3], envelope.NO_REPLY, *search[:1]),
        envelope.build(envelope.FANOUT, envelope.pack_targets(one), envelope.NO_REPLY),
        envelope.build(envelope.FANOUT, envelope.pack_targets(one), envelope.NO_REPLY, b"Q" * 1000, b"h"),
    ]
    for frames in malformed:
        await sock.send_multipart(frames)
    # a batch: its malformed fan-out is dropped, the request beside it is routed
    good = envelope.message(envelope.REQUEST, b"bob", rid(5), wire.encode(wire.Search("nothing")))
    await sock.send_multipart(envelope.pack_batch([envelope.fanout(b"\x03bo", search), good]))
    # a well-formed fan-out to a worker and to a name nobody holds: answered for each
    await sock.send_multipart(fan([(b"bob", rid(6)), (b"nobody", rid(7)), (b"alice", rid(8))], search))
    answers = await asyncio.wait_for(replies(sock, {rid(5), rid(6), rid(7), rid(8)}), 10.0)
    sock.close()
    assert [answers[rid(i)][0] for i in (5, 6, 7, 8)] == [
        envelope.REPLY,
        envelope.REPLY,
        envelope.BROKER_ERROR,
        envelope.REPLY,
    ]
    assert (answers[rid(6)][1], answers[rid(8)][1]) == (b"bob", b"alice")
    assert bytes(answers[rid(7)][3]) == envelope.REASON_UNKNOWN_NAME
    assert (await client.link.broker_stats(5.0))["dropped"] - dropped == len(malformed) + 1
    pointers = await fedptr.broadcast(torch.ones(2), [client.worker("bob"), client.worker("alice")])
    assert [p.location for p in pointers] == ["bob", "alice"]
