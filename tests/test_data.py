"""Federated datasets and the federated data loader: batches made where the data lives."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

import fedptr
from fedptr import optim
from fedptr.data import FederatedDataLoader, FederatedDataset

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
OWNERS = ["bob", "alice", "carol"]
DEADLINE_S = 90.0


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes in 4-d, separable by the sign of the sum of the first two features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fed() -> AsyncIterator[fedptr.Cluster]:
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for i, owner in enumerate(OWNERS):
            x, y = blobs(40 + 10 * i, seed=i)
            files[owner] = Path(tmp) / f"{owner}.npz"
            np.savez(files[owner], x=x.numpy(), y=y.numpy())
        # the owners that train with the loader trust the analyst (--release exact): batches
        # chosen by the client are no DP mechanism (that is fedptr.dp.train); erin keeps DP
        async with fedptr.local_cluster(
            [*OWNERS, "erin", "secure_worker"],
            data={o: {"blobs": files[o]} for o in OWNERS} | {"erin": {"blobs": files[OWNERS[0]]}},
            node_args={o: ["--release", "exact"] for o in OWNERS},
        ) as c:
            yield c


@MODULE_LOOP
async def test_the_loader_trains_a_model_across_three_workers(fed: fedptr.Cluster) -> None:
    client = fed.client
    async with asyncio.timeout(DEADLINE_S):
        dataset = await FederatedDataset.search([client.worker(o) for o in OWNERS], "blobs")
        assert dataset.workers == OWNERS and len(dataset) == 40 + 50 + 60
        loader = FederatedDataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
        assert len(loader) == 3 + 4 + 4
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        test_x, test_y = blobs(200, seed=99)
        before = float((model(test_x).argmax(1) == test_y).float().mean())
        sent_before = client.bytes_received
        for _ in range(8):
            updates = []
            for owner in OWNERS:
                remote = await client.worker(owner).send(model)
                assert isinstance(remote, fedptr.ModulePointer)
                opt = optim.SGD(remote.parameters(), lr=0.3)
                for x, y in loader.batches(owner):
                    assert x.location == owner and x.shape[1:] == (4,) and y.dtype == torch.long
                    opt.zero_grad()
                    functional.cross_entropy(remote(x), y).backward()
                    opt.step()
                trained = await remote.get()  # exact: these owners allow it
                assert isinstance(trained, nn.Module)
                updates.append(trained)
            sizes = [float(dataset.rows(o)) for o in OWNERS]
            with torch.no_grad():
                for p, *ps in zip(model.parameters(), *(u.parameters() for u in updates), strict=True):
                    p.copy_(sum(w * q for w, q in zip(sizes, ps, strict=True)) / sum(sizes))
        after = float((model(test_x).argmax(1) == test_y).float().mean())
        assert after > max(before, 0.85), (before, after)
        # only the trained models came back: a few KiB, never the 150 samples
        assert client.bytes_received - sent_before < 200_000


@MODULE_LOOP
async def test_every_batch_stays_private(fed: fedptr.Cluster) -> None:
    async with asyncio.timeout(DEADLINE_S):
        dataset = await FederatedDataset.search([fed.client.worker("erin")], "blobs")
        for x, y in FederatedDataLoader(dataset, batch_size=8, drop_last=True):
            with pytest.raises(fedptr.PermissionDenied) as info:
                await x.get()
            assert info.value.owner == "erin"
            with pytest.raises(fedptr.PermissionDenied):
                await y.sum().get()
            break
        with pytest.raises(fedptr.InvalidArgumentError, match="no data tagged"):
            await FederatedDataset.search([fed.client.worker("secure_worker")], "blobs")


@MODULE_LOOP
async def test_batches_are_those_torch_would_pick(fed: fedptr.Cluster) -> None:
    x, y = torch.arange(22.0).reshape(11, 2), torch.arange(11)
    async with asyncio.timeout(DEADLINE_S):
        dataset = await FederatedDataset.federate([x, y], [fed.client.worker("secure_worker")])
        for shuffle in (False, True):
            for drop_last in (False, True):
                ours = FederatedDataLoader(dataset, 3, shuffle, drop_last, generator=torch.Generator().manual_seed(5))
                rows = range(11)
                sampler = RandomSampler(rows, generator=torch.Generator().manual_seed(5)) if shuffle else None
                theirs = list(BatchSampler(sampler or SequentialSampler(rows), 3, drop_last))
                assert len(ours) == len(theirs)
                for (bx, by), picked in zip(ours, theirs, strict=True):
                    assert torch.equal(await bx.get(), x[picked]) and torch.equal(await by.get(), y[picked])  # type: ignore[arg-type]
        two = await FederatedDataset.federate([x], [fed.client.worker("bob"), fed.client.worker("alice")])
        assert [two.rows(w) for w in two.workers] == [6, 5]
        assert [b[0].location for b in FederatedDataLoader(two, batch_size=4)] == ["bob", "bob", "alice", "alice"]
        with pytest.raises(fedptr.InvalidArgumentError):
            FederatedDataLoader(two, batch_size=0)
