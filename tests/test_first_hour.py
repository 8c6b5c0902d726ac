"""A new user's first hour: the small traps of issue 21, each on the real broker and nodes.

A worker's name is accepted wherever a worker is (or a typed error says what is expected), and a
connect to a wrong address fails within its deadline.
"""

from __future__ import annotations

import time

import pytest
import torch

import fedptr
from fedptr import dp


async def test_a_worker_name_is_taken_wherever_a_worker_is(client: fedptr.Client, bob: fedptr.Worker) -> None:
    p = await bob.send(torch.tensor([1, 2, 3]))
    chained = await p.send("alice")
    assert chained.location == "alice"
    assert torch.equal(await (await chained.get()).get(), torch.tensor([1, 2, 3]))
    q = await (await bob.send(torch.ones(2))).move("alice")
    assert q.location == "alice" and torch.equal(await q.get(), torch.ones(2))
    assert await (await bob.send(torch.ones(1))).move("bob") is not None


async def test_what_is_not_a_worker_is_refused_with_a_typed_error_saying_what_is_expected(
    client: fedptr.Client, bob: fedptr.Worker
) -> None:
    p = await bob.send(torch.ones(2))
    with pytest.raises(fedptr.UnsupportedTypeError, match="expected a Worker"):
        p.send(3)  # type: ignore[arg-type]
    with pytest.raises(fedptr.UnsupportedTypeError, match="expected a Worker"):
        await p.move(None)  # type: ignore[arg-type]
    with pytest.raises(fedptr.UnsupportedTypeError, match="Workers"):
        await fedptr.data.FederatedDataset.search(["bob"], "digits")  # type: ignore[list-item]
    with pytest.raises(fedptr.UnsupportedTypeError, match="Workers"):
        await fedptr.broadcast(torch.ones(2), ["bob"])  # type: ignore[list-item]
    with pytest.raises(fedptr.UnsupportedTypeError, match="expected a Worker"):
        await dp.budget("bob")  # type: ignore[arg-type]
    assert torch.equal(await p.get(), torch.ones(2))  # nothing was consumed by the refusals


async def test_connect_to_a_wrong_address_fails_within_its_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(fedptr.FedptrError):
        async with fedptr.connect("tcp://127.0.0.1:9", timeout=2):
            pass
    assert time.monotonic() - started < 2 + 0.5
