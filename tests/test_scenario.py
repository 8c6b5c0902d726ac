"""Every row of shared/seed/SCENARIO.md, across real processes, asserting both stores after each step."""

from __future__ import annotations

import pytest
import torch

import fedptr

pytestmark = pytest.mark.inproc  # logic only: a fresh in-process cluster per test (tests/harness.py)


async def stores(
    bob: fedptr.Worker, alice: fedptr.Worker
) -> tuple[dict[int, fedptr.ObjectInfo], dict[int, fedptr.ObjectInfo]]:
    return await bob.objects(), await alice.objects()


def only_tensor(store: dict[int, fedptr.ObjectInfo], obj_id: int, values: list[int]) -> None:
    assert list(store) == [obj_id]
    info = store[obj_id]
    assert info.kind == "tensor"
    assert info.shape == (len(values),)
    assert info.dtype == "int64"
    assert info.preview == values


def pointer_to(info: fedptr.ObjectInfo, location: str, id_at_location: int) -> None:
    assert info.kind == "pointer"
    assert (info.location, info.id_at_location) == (location, id_at_location)


async def test_pointers_to_pointers(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    # step 1: both stores empty
    assert await stores(bob, alice) == ({}, {})
    # step 2: a local tensor
    x = torch.tensor([1, 2, 3, 4])
    # step 3: bob holds it; the client holds a pointer to it
    x_ptr = await bob.send(x)
    assert (x_ptr.location, type(x_ptr)) == ("bob", fedptr.Pointer)
    b, a = await stores(bob, alice)
    only_tensor(b, x_ptr.id_at_location, [1, 2, 3, 4])
    assert a == {}
    # step 4: the pointer goes to alice; the data does not move
    pointer_to_x_ptr = await x_ptr.send(alice)
    assert pointer_to_x_ptr.location == "alice"
    b, a = await stores(bob, alice)
    only_tensor(b, x_ptr.id_at_location, [1, 2, 3, 4])
    assert list(a) == [pointer_to_x_ptr.id_at_location]
    pointer_to(a[pointer_to_x_ptr.id_at_location], "bob", x_ptr.id_at_location)
    # step 5: getting alice's pointer empties alice and gives back a pointer to bob's tensor
    bob_id = x_ptr.id_at_location
    x_ptr2 = await pointer_to_x_ptr.get()
    assert isinstance(x_ptr2, fedptr.Pointer)
    assert (x_ptr2.location, x_ptr2.id_at_location) == ("bob", bob_id)
    b, a = await stores(bob, alice)
    only_tensor(b, bob_id, [1, 2, 3, 4])
    assert a == {}
    # step 6: getting that empties bob and brings the tensor home
    x = await x_ptr2.get()
    assert torch.equal(x, torch.tensor([1, 2, 3, 4]))
    assert await stores(bob, alice) == ({}, {})


async def test_arithmetic_on_pointer_to_pointer(bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    # step 7
    p2x = await bob.send(torch.tensor([1, 2, 3, 4, 5]))
    x_id = p2x.id_at_location
    p2p2x = await p2x.send(alice)
    b, a = await stores(bob, alice)
    only_tensor(b, x_id, [1, 2, 3, 4, 5])
    assert list(a) == [p2p2x.id_at_location]
    pointer_to(a[p2p2x.id_at_location], "bob", x_id)
    # step 8: the addition runs on bob
    y = p2p2x + p2p2x
    assert y.location == "alice"
    b, a = await stores(bob, alice)
    assert len(b) == 2 and b[x_id].preview == [1, 2, 3, 4, 5]
    (result_id,) = set(b) - {x_id}
    assert b[result_id].preview == [2, 4, 6, 8, 10]
    assert set(a) == {p2p2x.id_at_location, y.id_at_location}
    pointer_to(a[p2p2x.id_at_location], "bob", x_id)
    pointer_to(a[y.id_at_location], "bob", result_id)
    # step 9
    y_ptr = await y.get()
    assert isinstance(y_ptr, fedptr.Pointer)
    assert torch.equal(await y_ptr.get(), torch.tensor([2, 4, 6, 8, 10]))
    b, a = await stores(bob, alice)
    only_tensor(b, x_id, [1, 2, 3, 4, 5])
    assert list(a) == [p2p2x.id_at_location]
    pointer_to(a[p2p2x.id_at_location], "bob", x_id)
    # step 10
    x_ptr = await p2p2x.get()
    assert isinstance(x_ptr, fedptr.Pointer)
    assert torch.equal(await x_ptr.get(), torch.tensor([1, 2, 3, 4, 5]))
    assert await stores(bob, alice) == ({}, {})


async def test_move_along_a_chain(client: fedptr.Client, bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    # step 11
    x = await bob.send(torch.tensor([1, 2, 3, 4, 5]))
    b, a = await stores(bob, alice)
    only_tensor(b, x.id_at_location, [1, 2, 3, 4, 5])
    assert a == {}
    # step 12: bob -> alice directly; the client receives none of the tensor's bytes
    before = client.bytes_received
    moved = await x.move(alice)
    received = client.bytes_received - before
    assert moved.location == "alice"
    b, a = await stores(bob, alice)
    assert b == {}
    only_tensor(a, moved.id_at_location, [1, 2, 3, 4, 5])
    assert received < 200, received  # one small Ok reply; the tensor alone is 40 bytes
