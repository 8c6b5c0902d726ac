"""Store bounds and at-most-once replies, on a real node started with a byte cap."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch

import fedptr
from fedptr import envelope, wire
from fedptr.tensors import to_raw
from tests.test_robustness import raw_socket, recv, register

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def capped() -> AsyncIterator[fedptr.Cluster]:
    async with fedptr.local_cluster(["capped"], node_args={"capped": ["--max-store-bytes", "4096"]}) as c:
        yield c


async def test_store_cap_refuses_with_a_clear_error(capped: fedptr.Cluster) -> None:
    w = capped.client.worker("capped")
    small = await w.send(torch.zeros(512))  # 2 KiB
    with pytest.raises(fedptr.StoreFullError) as info:
        await w.send(torch.zeros(1024))  # 4 KiB more: over the cap
    assert info.value.worker == "capped" and "4096" in info.value.detail
    with pytest.raises(fedptr.StoreFullError):
        await (small.reshape(2, 256) @ torch.zeros(256, 300))  # a 2400-byte result: over the cap
    assert torch.equal(await (small + 1).get(), torch.ones(512))  # type: ignore[arg-type]
    del small
    await w.clear()
    await w.send(torch.zeros(1000))  # the bytes were released


async def test_replayed_request_is_answered_from_memory(capped: fedptr.Cluster) -> None:
    sock = raw_socket(capped)
    assert (await register(sock, b"replayer")).command == envelope.ACCEPTED
    rid = envelope.request_id_bytes(99)
    put = envelope.build(envelope.REQUEST, b"capped", rid, *wire.encode(wire.Put(777, to_raw(torch.ones(3)))))
    add = wire.Op(778, "add", [wire.Ref(777), 1.0], {})
    op = envelope.build(envelope.REQUEST, b"capped", envelope.request_id_bytes(100), *wire.encode(add))
    replies = []
    for frames in (put, put, op, op):  # each sent twice, as a retry after a lost reply would be
        await sock.send_multipart(frames)  # type: ignore[arg-type]
        replies.append(await recv(sock))
    oks = [wire.decode(envelope.parse(r)[0].body).message for r in replies]
    assert all(isinstance(m, wire.Ok) for m in oks), oks  # no "object id already exists"
    # an in-place update, delivered twice, is applied once
    add_ = wire.Op(779, "add_", [wire.Ref(777), 1.0], {})
    inc = envelope.build(envelope.REQUEST, b"capped", envelope.request_id_bytes(101), *wire.encode(add_))
    for _ in range(2):
        await sock.send_multipart(inc)  # type: ignore[arg-type]
        assert isinstance(wire.decode(envelope.parse(await recv(sock))[0].body).message, wire.Ok)
    w = capped.client.worker("capped")
    objects = await w.objects()
    assert sorted(objects) == [777, 778, 779]  # each replayed op ran once: one result each
    assert objects[777].preview == [2.0, 2.0, 2.0]  # ones, plus 1 once
    sock.send_multipart(
        envelope.build(envelope.REQUEST, b"capped", envelope.NO_REPLY, *wire.encode(wire.Delete([777, 778, 779])))
    )
    sock.close()
