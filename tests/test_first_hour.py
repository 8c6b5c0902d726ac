"""A new user's first hour: the small traps of issue 21, each on the real broker and nodes.

A worker's name is accepted wherever a worker is (or a typed error says what is expected), a
connect to a wrong address fails within its deadline, ``fedptr status`` fits 80
columns, and ``fedptr keys`` never overwrites a key pair unasked.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import fedptr
from fedptr import dp
from fedptr.cli import app
from fedptr.cli import status as status_cli
from fedptr.status import ClusterStatus, PeerStatus, WorkerStatus


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


def _render(width: int) -> str:
    """`fedptr status`'s tables of a three-node cluster, as a terminal `width` columns wide shows them."""
    figures = {
        "objects": 2,
        "store_bytes": 177_900,
        "rss_bytes": 248_000_000,
        "messages_in": 979,
        "messages_out": 796,
        "bytes_in": 124_000,
        "bytes_out": 86_000,
        "uptime_s": 20,
    }
    spent = {"epsilon_left": 0.0860158, "epsilon_spent": 7.9139842}
    status = ClusterStatus(
        "tcp://127.0.0.1:5555",
        {"routed": 3698, "dropped": 0},
        [PeerStatus("client-3f2a9c01d2e4", False, 12, 0, 0, 40)],
        [
            WorkerStatus("alice", "up", "owner", figures, spent, 592),
            WorkerStatus("bob", "unresponsive", "owner", {}, None, 4100),
            WorkerStatus("secure_worker", "up", "owner+aggregator", figures, None, 110),
        ],
    )
    console = Console(width=width, record=True, file=io.StringIO())
    for table in status_cli.tables(status, width):
        console.print(table)
    return console.export_text()


def test_status_fits_80_columns_and_shows_budgets_as_left_of_total() -> None:
    text = _render(80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "ε 0.09 / 8" in text, text
    for name in ("alice", "bob", "secure_worker", "unresponsive", "owner+aggregator", "client-3f2a9c01d2e4"):
        assert name in text, text  # nothing wrapped or cut off
    wide = _render(200)
    assert "RSS" in wide and "bytes in/out" in wide and "ε 0.09 / 8" in wide


def test_keys_refuses_to_overwrite_a_pair_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["keys", str(tmp_path), "bob"]).exit_code == 0
    public, secret = (tmp_path / "bob.key").read_bytes(), (tmp_path / "bob.key_secret").read_bytes()
    refused = runner.invoke(app, ["keys", str(tmp_path), "alice", "bob"])
    assert refused.exit_code == 1 and "--force" in refused.output and "bob.key" in refused.output
    assert (tmp_path / "bob.key").read_bytes() == public and (tmp_path / "bob.key_secret").read_bytes() == secret
    assert not (tmp_path / "alice.key").exists()  # refused as a whole: nothing half written
    forced = runner.invoke(app, ["keys", str(tmp_path), "bob", "--force"])
    assert forced.exit_code == 0 and (tmp_path / "bob.key").read_bytes() != public
