"""Operating a real cluster: `fedptr status` and `fedptr objects`, the Prometheus endpoints of the
broker and a node, JSON logs that follow one call by its request id, the name-taken message,
and progress bars for large transfers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import torch
from rich.console import Console
from typer.testing import CliRunner, Result

import fedptr
from fedptr import logs, metrics, progress
from fedptr.cli import app
from fedptr.cli.status import NOT_ALL_UP
from tests.conftest import eventually

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

WORKERS = ["bob", "alice", "carol", "dave"]
WATCHED = ["--metrics-port", "0", "--log-format", "json", "--log-level", "DEBUG"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ops(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[fedptr.Cluster]:
    """bob owns private data and is watched (metrics, JSON debug logs), as is the broker; carol
    aggregates; alice and dave are plain."""
    tmp = tmp_path_factory.mktemp("ops")
    np.savez(tmp / "bob.npz", x=np.ones((4, 2), np.float32))
    async with fedptr.local_cluster(
        WORKERS,
        broker_args=WATCHED,
        node_args={"bob": WATCHED, "carol": ["--aggregator"]},
        data={"bob": {"digits": tmp / "bob.npz"}},
        log_dir=tmp / "logs",
        curve=False,  # the CLI is given the bare address, as an operator on a trusted host would
    ) as cluster:
        yield cluster


async def cli(*args: str) -> Result:
    """Run the fedptr command in-process (on a thread: it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"COLUMNS": "200"})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def scrape(cluster: fedptr.Cluster, process: str) -> dict[str, float]:
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", cluster.log(process))
    assert port is not None, cluster.log(process)
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10) as response:
        return metrics.samples(response.read().decode())


async def test_status_shows_every_worker_and_the_brokers_peers(ops: fedptr.Cluster) -> None:
    bob = ops.client.worker("bob")
    kept = await bob.send(torch.ones(1000))
    result = await cli("status", ops.address, "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    workers = {w["name"]: w for w in status["workers"]}
    assert sorted(workers) == sorted(WORKERS)
    assert {n: w["role"] for n, w in workers.items()} == {
        "bob": "owner",
        "alice": "plain",
        "carol": "aggregator",
        "dave": "plain",
    }
    b = workers["bob"]
    assert b["state"] == "up" and b["budget"] is None
    assert b["figures"]["objects"] >= 2  # its data array and the tensor sent
    assert b["figures"]["store_bytes"] >= 4000 and b["figures"]["rss_bytes"] > 10 << 20
    assert b["figures"]["messages_in"] > 0 and b["figures"]["bytes_in"] > 4000 and b["figures"]["uptime_s"] > 0
    assert 0 <= b["heard_ms"] < 5000
    peers = {p["name"]: p for p in status["peers"]}
    assert set(WORKERS) <= set(peers) and ops.client.name in peers
    assert peers["bob"]["worker"] and not peers[ops.client.name]["worker"]
    assert status["broker"]["workers"] == 4 and status["broker"]["routed"] > 0
    table = await cli("status", ops.address)
    assert table.exit_code == 0, table.output
    for text in ("bob", "owner", "aggregator", "—", "broker:", "queue", ops.client.name):
        assert text in table.output, table.output
    del kept


async def test_status_of_a_stopped_worker_says_so_within_the_deadline(ops: fedptr.Cluster) -> None:
    ops.signal("dave", signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = await cli("status", ops.address, "--json", "--timeout", "1")
        took = time.monotonic() - started
    finally:
        ops.signal("dave", signal.SIGCONT)
    assert result.exit_code == NOT_ALL_UP, result.output
    dave = next(w for w in json.loads(result.output)["workers"] if w["name"] == "dave")
    assert dave["state"] in ("unresponsive", "down"), dave
    assert took < 5.0

    async def back() -> bool:
        return (await cli("status", ops.address, "--json")).exit_code == 0

    assert await eventually(back, 15.0)


async def test_status_of_no_broker_fails_fast() -> None:
    started = time.monotonic()
    result = await cli("status", "tcp://127.0.0.1:1", "--timeout", "1")
    assert result.exit_code == 1
    assert "no answer from the broker at tcp://127.0.0.1:1" in result.output
    assert time.monotonic() - started < 5.0


async def test_objects_lists_ids_kinds_shapes_owners_and_no_values(ops: fedptr.Cluster) -> None:
    bob = ops.client.worker("bob")
    public = await bob.send(torch.tensor([7.5, 8.5]))
    pointer = await (await ops.client.worker("alice").send(torch.ones(2))).send(bob)
    result = await cli("objects", ops.address, "bob", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.output)}
    assert rows[public.id_at_location] == {
        "id": public.id_at_location,
        "kind": "tensor",
        "shape": [2],
        "dtype": "float32",
        "owner": ops.client.name,
        "location": "",
        "id_at_location": 0,
    }
    assert rows[pointer.id_at_location]["kind"] == "pointer" and rows[pointer.id_at_location]["location"] == "alice"
    data = [r for r in rows.values() if r["owner"] == "*"]
    assert len(data) == 1 and data[0]["shape"] == [4, 2]
    table = await cli("objects", ops.address, "bob")
    assert table.exit_code == 0 and "7.5" not in table.output and "anyone" in table.output, table.output
    shown = await cli("objects", ops.address, "bob", "--previews", "--json")
    previews = {r["id"]: r["preview"] for r in json.loads(shown.output)}
    assert previews[public.id_at_location] == [7.5, 8.5]
    assert previews[data[0]["id"]] is None  # private data: never its values
    del public, pointer


async def test_metrics_of_the_broker_and_a_node_move(ops: fedptr.Cluster) -> None:
    bob = ops.client.worker("bob")
    broker_before, bob_before = scrape(ops, "broker"), scrape(ops, "bob")
    x = await bob.send(torch.ones(4))
    assert torch.equal(await (x + 1).get(), torch.full((4,), 2.0))  # type: ignore[arg-type]
    (data,) = await bob.search("digits")
    with pytest.raises(fedptr.PermissionDenied):
        await (data * 2).get()
    broker, node = scrape(ops, "broker"), scrape(ops, "bob")

    def moved(after: dict[str, float], before: dict[str, float], key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    b, n = '{process="broker"}', 'process="bob"'
    assert moved(broker, broker_before, f"fedptr_broker_routed_total{b}") >= 8
    assert moved(broker, broker_before, 'fedptr_broker_messages_total{command="request",process="broker"}') >= 1
    assert moved(broker, broker_before, 'fedptr_broker_command_seconds_count{command="reply",process="broker"}') >= 1
    assert moved(broker, broker_before, f"fedptr_bytes_in_total{b}") > 0
    assert 'fedptr_broker_queue_depth{peer="bob",process="broker"}' in broker
    assert broker[f"fedptr_broker_workers{b}"] == 4
    assert moved(node, bob_before, f'fedptr_node_requests_total{{kind="Put",{n}}}') == 1
    assert moved(node, bob_before, f'fedptr_node_request_seconds_count{{kind="Op",{n}}}') == 2
    assert moved(node, bob_before, f'fedptr_node_releases_total{{{n},release="public"}}') == 1
    assert moved(node, bob_before, f"fedptr_node_refusals_total{{{n}}}") == 1
    assert moved(node, bob_before, f"fedptr_messages_in_total{{{n}}}") >= 4
    assert moved(node, bob_before, f"fedptr_bytes_out_total{{{n}}}") > 0
    assert node[f"fedptr_node_objects{{{n}}}"] >= 2 and node[f"fedptr_node_store_bytes{{{n}}}"] >= 32
    assert f"fedptr_heartbeat_misses_total{{{n}}}" in node and "process_resident_memory_bytes" in node
    del x


def test_a_scrape_lists_kinds_in_one_order_whatever_order_they_came_in() -> None:
    """Which kind of request finished (or came) first is timing; a scrape must not show it (the
    twin-world test with releases once saw SecAggUnmask and SecAggConfirm swap places)."""

    def scraped(kinds: list[str]) -> list[str]:
        latencies = metrics.Latencies()
        for kind in kinds:
            latencies.observe(kind, 0.001)
        families = [
            latencies.family("t_seconds", "t", "kind", "bob"),
            metrics.labelled_counter("t", "t", "bob", "kind", dict.fromkeys(kinds, 1.0)),
        ]
        return [s.labels["kind"] for fam in families for s in fam.samples]

    assert scraped(["SecAggUnmask", "SecAggConfirm", "Get"]) == scraped(["Get", "SecAggConfirm", "SecAggUnmask"])


async def test_json_logs_follow_one_call_by_its_request_id(ops: fedptr.Cluster) -> None:
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logs.JsonFormatter(ops.client.name))
    link_log = logging.getLogger("fedptr.link")
    link_log.addHandler(handler)
    link_log.setLevel(logging.DEBUG)
    try:
        rid = ops.client.link.session.next_request_id().hex()
        p = await ops.client.worker("bob").send(torch.zeros(3))
    finally:
        link_log.removeHandler(handler)
        link_log.setLevel(logging.NOTSET)
    client_lines = [line for line in json_lines(captured.getvalue()) if line.get("rid") == rid]
    assert client_lines and client_lines[0]["process"] == ops.client.name

    def followed(process: str) -> list[dict[str, Any]]:
        return [line for line in json_lines(ops.log(process)) if line.get("rid") == rid]

    async def seen() -> bool:
        return bool(followed("broker")) and len(followed("bob")) >= 2

    assert await eventually(seen)
    for line in followed("broker") + followed("bob"):
        assert set(line) >= {"time", "level", "process", "message", "rid"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert {line["process"] for line in followed("bob")} == {"node bob"}
    assert any("Put" in line["message"] for line in followed("bob"))
    # an ordinary disconnect (the status command's client leaving) is INFO, never a warning
    await cli("status", ops.address)
    gone = [line for line in json_lines(ops.log("broker")) if "(disconnected)" in line["message"]]
    assert gone and {line["level"] for line in gone} == {"INFO"}
    del p


async def test_a_taken_name_is_said_at_once(ops: fedptr.Cluster, tmp_path: Path) -> None:
    log_path = tmp_path / "second-bob.log"
    with open(log_path, "wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedptr.nodes",
                "--name",
                "bob",
                "--broker",
                ops.address,
                "--register-timeout",
                "60",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:

        async def said() -> bool:
            return "the name is taken" in log_path.read_text()

        assert await eventually(said, 30.0), log_path.read_text()
        assert proc.poll() is None  # said on the first refusal, while still trying
        assert "WARNING" in log_path.read_text()
    finally:
        proc.kill()
        proc.wait()


async def test_a_node_names_an_unreachable_broker_as_the_broker(tmp_path: Path) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "fedptr.nodes",
            "--name",
            "n",
            "--broker",
            "tcp://127.0.0.1:1",
            "--register-timeout",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "no answer from the broker at tcp://127.0.0.1:1" in result.stderr
    assert "worker 'broker'" not in result.stderr


async def test_large_transfers_show_progress_only_when_asked_on_a_terminal(ops: fedptr.Cluster) -> None:
    assert progress.transfers_for(True) is None  # stderr is no terminal under pytest
    assert progress.transfers_for(None) is None and ops.client.link.progress is None
    screen = io.StringIO()
    ops.client.link.progress = progress.Transfers(Console(file=screen, force_terminal=True, width=100))
    try:
        big = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB: streamed as chunks
        p = await ops.client.worker("alice").send(big)
        assert torch.equal(await p.get(), big)  # type: ignore[arg-type]
        small = await ops.client.worker("alice").send(torch.ones(10))
        await small.get()
    finally:
        ops.client.link.progress = None
    shown = screen.getvalue()
    # each bar drawn full, named for alice on every path (the get's chunks over same-host shared
    # memory, its broker chunk maybe last, named it for the client: tests/test_progress.py)
    assert "send to alice" in shown and "get from alice" in shown and "client-" not in shown
    assert shown.count("12.0/12.0 MiB") >= 2, shown  # both drawn full
