"""Federated data: datasets that stay on their workers, and a loader that batches them there.

`FederatedDataset` holds, for each worker, pointers to the tensors of one dataset (features,
labels, ...), usually a worker's private data found by tag (`FederatedDataset.search`).
`FederatedDataLoader` iterates over minibatches as torch's DataLoader does (`batch_size`,
`shuffle`, `drop_last`), each batch a tuple of pointers made on the worker that holds the data
(``index_select`` of the rows the loader chose). No value leaves a worker: the client sends only
row numbers, and the worker's privacy policy applies to every batch as to any result derived
from its data.

Which rows make up each batch is decided in one place, `FederatedDataLoader.select_batches`, so
that another sampling scheme (a DP mode's Poisson sampling on the node) can replace it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fedptr.errors import InvalidArgumentError, UnsupportedTypeError
from fedptr.pointer import Pointer

if TYPE_CHECKING:
    from fedptr.client import Worker


def _workers(workers: Iterable[Worker]) -> list[Worker]:
    """`workers` as a list; a worker's bare name (which names no client to ask through) is
    refused with UnsupportedTypeError saying what to pass instead."""
    found = list(workers)
    for w in found:
        if isinstance(w, str):
            raise UnsupportedTypeError(f"expected Workers (client.worker({w!r})), not the name {w!r}")
    return found


class FederatedDataset:
    """For each worker, pointers to tensors that share their first dimension (one row per sample).

    ``dataset["bob"]`` is bob's tuple of pointers; `workers` the names in order; ``len`` the
    number of samples over all workers. Raises InvalidArgumentError when a worker's tensors do
    not have the same number of rows."""

    def __init__(self, parts: Mapping[str, Sequence[Pointer]]) -> None:
        self._parts: dict[str, tuple[Pointer, ...]] = {}
        for worker, tensors in parts.items():
            if not tensors:
                raise InvalidArgumentError(f"{worker!r} has no tensors in this dataset")
            rows = {len(t) for t in tensors}
            if len(rows) != 1:
                raise InvalidArgumentError(f"{worker!r}'s tensors have different numbers of rows: {sorted(rows)}")
            if any(t.location != worker for t in tensors):
                raise InvalidArgumentError(f"the tensors given for {worker!r} must live on {worker!r}")
            self._parts[worker] = tuple(tensors)

    @classmethod
    async def search(cls, workers: Iterable[Worker], tag: str) -> FederatedDataset:
        """The data each of `workers` was started with under `tag` (``--data TAG=PATH``; the
        arrays in the order of their names, e.g. ``x`` then ``y``). Raises InvalidArgumentError
        for a worker without such data."""
        parts: dict[str, list[Pointer]] = {}
        for worker in _workers(workers):
            found = await worker.search(tag)
            if not found:
                raise InvalidArgumentError(f"worker {worker.name!r} has no data tagged {tag!r}")
            parts[worker.name] = found
        return cls(parts)

    @classmethod
    async def federate(cls, tensors: Sequence[torch.Tensor], workers: Sequence[Worker]) -> FederatedDataset:
        """Split local `tensors` row-wise into one contiguous part per worker and send each part
        there (PySyft's ``dataset.federate``; the parts are the client's data, not private)."""
        workers = _workers(workers)
        if not workers:
            raise InvalidArgumentError("federate needs at least one worker")
        parts: dict[str, list[Pointer]] = {}
        chunks = [torch.tensor_split(t, len(workers)) for t in tensors]
        for i, worker in enumerate(workers):
            parts[worker.name] = [await worker.send(chunk[i].contiguous()) for chunk in chunks]
        return cls(parts)

    @property
    def workers(self) -> list[str]:
        """The workers holding a part, in order."""
        return list(self._parts)

    def __getitem__(self, worker: str) -> tuple[Pointer, ...]:
        return self._parts[worker]

    def rows(self, worker: str) -> int:
        """How many samples `worker` holds."""
        return len(self._parts[worker][0])

    def __len__(self) -> int:
        return sum(self.rows(w) for w in self._parts)

    def __repr__(self) -> str:
        return "FederatedDataset(" + ", ".join(f"{w}: {self.rows(w)} rows" for w in self._parts) + ")"


def sequential_batches(
    rows: int, batch_size: int, shuffle: bool, drop_last: bool, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The row numbers of each batch over `rows` samples, as torch's DataLoader picks them:
    in order or in a random permutation, the last batch smaller unless `drop_last`."""
    order = torch.randperm(rows, generator=generator) if shuffle else torch.arange(rows)
    batches = list(torch.split(order, batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class FederatedDataLoader:
    """Minibatches of a `FederatedDataset`, made where the data lives.

    Iterating gives, worker after worker, each batch as a tuple of pointers on that worker
    (``for x, y in loader:``), like torch's DataLoader with `batch_size`, `shuffle` (a new order
    every epoch; `generator` makes it reproducible) and `drop_last`. `batches` gives one
    worker's batches alone."""

    def __init__(
        self,
        dataset: FederatedDataset,
        batch_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if type(batch_size) is not int or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be a positive int, not {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator

    def select_batches(self, worker: str) -> list[torch.Tensor]:
        """The row numbers of each of `worker`'s batches for one epoch. This is the only place
        where samples are chosen: override it for another sampling scheme."""
        return sequential_batches(
            self.dataset.rows(worker), self.batch_size, self.shuffle, self.drop_last, self.generator
        )

    def batches(self, worker: str) -> Iterator[tuple[Pointer, ...]]:
        """One epoch of `worker`'s batches, each a tuple of pointers on `worker`."""
        tensors = self.dataset[worker]
        for rows in self.select_batches(worker):
            yield tuple(t.index_select(0, rows) for t in tensors)

    def __iter__(self) -> Iterator[tuple[Pointer, ...]]:
        for worker in self.dataset.workers:
            yield from self.batches(worker)

    def __len__(self) -> int:
        total = 0
        for worker in self.dataset.workers:
            rows = self.dataset.rows(worker)
            total += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return total

    @property
    def workers(self) -> list[str]:
        """The workers the batches come from."""
        return self.dataset.workers
