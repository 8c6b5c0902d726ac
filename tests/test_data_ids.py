"""A worker's datasets keep their object ids across its restarts ("ids survive restarts").

A data owner's arrays are loaded from files at every start; a client finds them with
`search` and then holds pointers to them. With a store directory (``--store``), each array's
id is derived from a random key kept in that directory and the array's tag, name, shape and
dtype: a restarted owner serves the same ids, so a client's pointers keep working. The key is
secret, so no client can learn a dataset's id before `search` shows it; an object a client
stored under an id that a dataset would take later keeps its id, and the dataset takes another.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fedptr.nodes.durable import DurableStore
from fedptr.nodes.node import Node, NodeConfig, data_id
from torch import nn

from fedptr import envelope, wire
from fedptr import link as linkmod

from . import harness

DATA = {"d": {"x": np.arange(8, dtype=np.float32).reshape(4, 2), "y": np.ones(4, dtype=np.int64)}}


@pytest.mark.asyncio
async def test_a_clients_pointers_to_a_dataset_work_after_its_owner_restarts() -> None:
    async with harness.cluster(["alice"], data={"alice": DATA}, stores=["alice"]) as c:
        alice = c.worker("alice")
        x, y = await alice.search("d")
        await c.restart_node("alice")
        again = await alice.search("d")
        assert [p.id_at_location for p in again] == [x.id_at_location, y.id_at_location]
        doubled = await (x * 2)  # an op on the pointer the client held before the restart
        assert tuple(doubled.shape) == (4, 2)
        assert tuple((await (y + 1)).shape) == (4,)


@pytest.mark.asyncio
async def test_two_stores_give_one_dataset_different_ids() -> None:
    """The key is per store: an id seen on one node predicts nothing about another's."""
    ids = []
    for _ in range(2):
        async with harness.cluster(["alice"], data={"alice": DATA}, stores=["alice"]) as c:
            ids.append([p.id_at_location for p in await c.worker("alice").search("d")])
    assert ids[0] != ids[1]


def _node(config: NodeConfig) -> Node:
    link = linkmod.Link("inproc://none", "alice", envelope.ROLE_WORKER)
    return Node("alice", link, config)


@pytest.mark.asyncio
async def test_an_object_stored_under_a_datasets_future_id_keeps_it() -> None:
    """A client's acknowledged object is never replaced by a dataset (nor the reverse): the
    dataset takes a fresh id, and `search` names it."""
    with tempfile.TemporaryDirectory() as tmp:
        store_dir, data_file = Path(tmp) / "store", Path(tmp) / "d.npz"
        np.savez(data_file, **DATA["d"])
        durable = DurableStore(store_dir)
        x = torch.from_numpy(DATA["d"]["x"])
        taken = data_id(durable.data_key(), "d", "x", x)
        mine = torch.full((3,), 7.0)
        durable.write_tensor(taken, mine.numpy().tobytes(), "float32", [3], "client", "", {})
        durable.sync()
        durable.close()
        node = _node(NodeConfig(store_dir=str(store_dir), data={"d": str(data_file)}))
        try:
            assert node.store.entries[taken].value.tolist() == [7.0, 7.0, 7.0]
            assert node.store.entries[taken].owner == "client"
            ids = node.store.tags["d"]
            assert taken not in ids and len(ids) == 2
            assert node.store.entries[ids[0]].value.tolist() == x.tolist()
            assert set(ids) <= node.store.pinned and taken not in node.store.pinned
        finally:
            await node.aclose()


@pytest.mark.asyncio
async def test_the_store_and_its_key_are_readable_by_the_node_alone() -> None:
    """The key that makes dataset ids unpredictable, the objects (values computed from private
    data), the budget and the audit log: none readable by another uid on the host, whatever
    the umask (they were 0644 under the usual 022, the key and private values readable by all)."""
    data = {"t": {"x": np.ones((16, 1), np.float32), "y": np.zeros((16, 1), np.float32)}}
    umask = os.umask(0o022)
    try:
        async with harness.cluster(
            ["alice"], data={"alice": data}, configs={"alice": NodeConfig(epsilon=1000.0)}, stores=["alice"]
        ) as c:
            alice = c.worker("alice")
            x, y = await alice.search("t")
            await (x * 2)  # a value from private data
            kept = await alice.send(torch.arange(3.0))  # an object, written to the store
            model = await alice.send(nn.Linear(1, 1, bias=False))
            train = wire.DPTrain(
                model.id_at_location, x.id_at_location, y.id_at_location, "mse_loss", 0.5, 0.5, 1, 1.0, 1.0
            )
            await c.client.call("alice", train)  # charged: the budget and the audit log are written
            store_dir = Path(c.configs["alice"].store_dir or "")
            assert kept.owned
            await c.stop_node("alice")  # what it queued is on disk
            names = {p.name for p in store_dir.iterdir()}
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [store_dir, *store_dir.iterdir()]}
    finally:
        os.umask(umask)
    assert {"data-ids.key", "privacy-budget.msgpack", "audit.jsonl"} <= names, names
    assert any(n.endswith(".rec") for n in names), names
    assert all(not mode & 0o077 for mode in modes.values()), {n: oct(m) for n, m in modes.items()}


def test_a_damaged_key_is_replaced_and_the_operator_told(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its write is atomic, so a key of another length was damaged outside the node: a new key
    (the pointers to the datasets from before name nothing, refused, never misread) and a
    warning that names the file, not a silent change of every dataset's id."""
    durable = DurableStore(tmp_path)
    first = durable.data_key()
    (tmp_path / "data-ids.key").write_bytes(first[:5])
    with caplog.at_level(logging.WARNING, logger="fedptr.node.durable"):
        second = durable.data_key()
    durable.close()
    assert len(second) == 32 and second != first
    assert "data-ids.key" in caplog.text and "5 bytes" in caplog.text, caplog.text
