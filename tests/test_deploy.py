"""`fedptr up` starts a cluster file's broker and nodes, and stops every process on Ctrl-C or
`fedptr down`; `fedptr keys`, `broker`, `node` and `--help`; cluster-file validation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

import fedptr
from fedptr.cli import app, main
from fedptr.cli.clusterfile import ClusterFileError, load_cluster
from fedptr.cli.state import ClusterState
from fedptr.cli.status import NOT_ALL_UP
from tests.conftest import alive, eventually

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

ROOT = Path(__file__).resolve().parents[1]
START_S = 90.0

CLUSTER = """
[cluster]
name = "{name}"

[broker]
bind = "tcp://127.0.0.1:*"
heartbeat_ms = 200

[nodes.bob]
data = {{ digits = "bob.npz" }}
trust = ["secure_worker"]
store = "store/bob"

[nodes.alice]
data = {{ digits = "alice.npz" }}
trust = ["secure_worker"]

[nodes.secure_worker]
aggregator = true
min_owners = 2
"""


def _children(parent: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _cluster_file(tmp_path: Path, name: str) -> Path:
    for owner in ("bob", "alice"):
        np.savez(tmp_path / f"{owner}.npz", x=np.ones((4, 2), np.float32), y=np.zeros(4, np.int64))
    path = tmp_path / "cluster.toml"
    path.write_text(CLUSTER.format(name=name))
    return path


def _fedptr(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedptr.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _gone(pids: list[int], timeout: float = 10.0) -> None:
    await _wait_for(lambda: not any(alive(p) for p in pids), timeout, f"processes {pids} to exit")


async def _use(address: str) -> None:
    """The cluster serves: the names are registered, a pointer chain works, private data is private."""
    async with fedptr.connect(address, timeout=20) as client:
        assert await client.workers() == ["alice", "bob", "secure_worker"]
        bob, alice = client.worker("bob"), client.worker("alice")
        p = await (await bob.send(torch.ones(2))).send(alice)
        inner = await p.get()
        assert isinstance(inner, fedptr.Pointer)
        assert torch.equal(await inner.get(), torch.ones(2))  # type: ignore[arg-type]
        x, _ = await bob.search("digits")
        with pytest.raises(fedptr.PermissionDenied):
            await x.get()


async def _cli(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"COLUMNS": "200"})


async def _status_and_objects(cluster: Path, run_dir: Path, state: ClusterState) -> None:
    """`fedptr status` and `fedptr objects` by cluster name and by cluster file; a killed node is
    reported down (it should run: the cluster file names it)."""
    by_name = await _cli("status", state.name, "--run-dir", str(run_dir), "--json")
    assert by_name.exit_code == 0, by_name.output
    roles = {w["name"]: (w["state"], w["role"]) for w in json.loads(by_name.output)["workers"]}
    assert roles == {"bob": ("up", "owner"), "alice": ("up", "owner"), "secure_worker": ("up", "aggregator")}
    by_file = await _cli("status", str(cluster), "--run-dir", str(run_dir))
    assert by_file.exit_code == 0 and "secure_worker" in by_file.output and "aggregator" in by_file.output
    objects = await _cli("objects", state.name, "bob", "--run-dir", str(run_dir), "--json")
    assert objects.exit_code == 0, objects.output
    assert sorted(tuple(r["shape"]) for r in json.loads(objects.output)) == [(4,), (4, 2)]
    assert all(r["owner"] == "*" and "preview" not in r for r in json.loads(objects.output))
    os.kill(state.pids["secure_worker"], signal.SIGKILL)

    async def reported_down() -> bool:
        result = await _cli("status", state.name, "--run-dir", str(run_dir), "--json")
        workers = {w["name"]: w["state"] for w in json.loads(result.output)["workers"]}
        return result.exit_code == NOT_ALL_UP and workers["secure_worker"] == "down"

    assert await eventually(reported_down, 10.0)


async def test_up_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _fedptr("up", str(_cluster_file(tmp_path, "fg")), "--run-dir", str(run_dir))
    state_file = run_dir / "fg.json"
    try:
        await _wait_for(lambda: state_file.exists() or proc.poll() is not None, START_S, "the state file")
        assert proc.poll() is None, proc.communicate()[0]
        state = ClusterState.read(state_file)
        assert state.supervisor_pid == proc.pid
        children = _children(proc.pid)  # the broker and the launcher, which forked the three nodes
        assert sorted(children) == sorted([state.pids["broker"], state.pids["launcher"]])
        nodes = _children(state.pids["launcher"])
        assert sorted(nodes) == sorted(state.pids[n] for n in ("bob", "alice", "secure_worker"))
        children += nodes
        assert (tmp_path / "store" / "bob").is_dir()
        await _use(state.address)
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
        assert proc.returncode == 0, out
        assert "secure_worker" in out and "aggregator" in out and "stopped" in out
        await _gone(children)
        assert not state_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_up_detach_then_down_leaves_no_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cluster = _cluster_file(tmp_path, "bg")
    up = _fedptr("up", str(cluster), "--detach", "--run-dir", str(run_dir))
    out, _ = await asyncio.to_thread(up.communicate, timeout=START_S + 30)
    assert up.returncode == 0, out
    state = ClusterState.read(run_dir / "bg.json")
    everything = [state.supervisor_pid, *state.pids.values()]
    try:
        assert all(alive(p) for p in everything)
        await _use(state.address)
        await _status_and_objects(cluster, run_dir, state)
        again = _fedptr("up", str(cluster), "--detach", "--run-dir", str(run_dir))
        out, _ = await asyncio.to_thread(again.communicate, timeout=30)
        assert again.returncode == 1 and "already runs" in out, out
        down = _fedptr("down", str(cluster), "--run-dir", str(run_dir))
        out, _ = await asyncio.to_thread(down.communicate, timeout=60)
        assert down.returncode == 0 and "stopped bg" in out and "killed" not in out, out
        await _gone(everything)
        assert not (run_dir / "bg.json").exists()
        assert "stopped" in (Path(state.log_dir) / "up.log").read_text()
    finally:
        for pid in everything:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_down_without_a_running_cluster_fails(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["down", "nothing", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no cluster 'nothing' runs" in result.output


def test_up_names_a_missing_data_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[nodes.bob]\ndata = { digits = "nowhere.npz" }\n')
    result = CliRunner().invoke(app, ["up", str(path), "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "nodes.bob.data.digits" in result.output and "nowhere.npz" in result.output


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[nodes.bob]\ntrsut = []\n", "nodes.bob.trsut", "unknown key"),
        ("[nodes.bob]\ntrust = 'alice'\n", "nodes.bob.trust", "must be a list of strings"),
        ("[nodes.bob]\ntrust = ['al ice']\n", "nodes.bob.trust", "not a worker name"),
        ("[nodes.bob]\naggregator = 1\n", "nodes.bob.aggregator", "true or false"),
        ("[nodes.bob]\nmin_owners = 0\n", "nodes.bob.min_owners", "at least 1"),
        ("[nodes.bob]\nmax_store_bytes = true\n", "nodes.bob.max_store_bytes", "an integer"),
        ("[broker]\nbind = 'localhost'\n[nodes.bob]\n", "broker.bind", "endpoint"),
        ("[broker]\ncurve_secret = 'b.key_secret'\n[nodes.bob]\n", "broker.allow", "go together"),
        ("[broker]\nheartbeat_ms = 0\n[nodes.bob]\n", "broker.heartbeat_ms", "at least 1"),
        ("[broker]\n", "nodes", "no nodes"),
        ("[brokers]\n", "brokers", "unknown table"),
        ("[nodes]\nbob = 1\n", "nodes.bob", "must be a table"),
        ("[cluster]\nname = 'a/b'\n[nodes.bob]\n", "cluster.name", "letters, digits"),
        ("[nodes.bob\n", "", "not valid TOML"),
    ],
)
def test_cluster_file_errors_name_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, fedptr.FedptrError)
    assert caught.value.key == key and caught.value.path == path
    assert problem in str(caught.value) and str(path) in str(caught.value)


def test_cluster_file_keys_dir_gives_every_process_its_key_files(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[broker]\nkeys_dir = "keys"\n[nodes.bob]\n')
    spec = load_cluster(path)
    keys = tmp_path / "keys"
    assert spec.name == "c"
    assert spec.broker.argv()[-4:] == ["--curve-secret", str(keys / "broker.key_secret"), "--allow", str(keys)]
    bob = spec.nodes["bob"].argv(spec.broker)
    assert ["--curve-secret", str(keys / "bob.key_secret"), "--broker-key", str(keys / "broker.key")] == bob[4:8]
    assert spec.broker.client_secret == keys / "client.key_secret"
    with pytest.raises(ClusterFileError, match=r"broker\.curve_secret: no such file"):
        spec.check_files()


def test_example_cluster_file_is_the_part4_setup() -> None:
    spec = load_cluster(ROOT / "examples" / "cluster.toml")
    assert {n: s.role for n, s in spec.nodes.items()} == {
        "bob": "data owner",
        "alice": "data owner",
        "secure_worker": "aggregator",
    }
    assert spec.nodes["bob"].trust == spec.nodes["alice"].trust == ("secure_worker",)
    bob = spec.nodes["bob"].argv(spec.broker)
    assert f"--data=digits={ROOT / 'examples' / 'data' / 'bob-digits.npz'}" in bob


def test_keys_writes_key_pairs(tmp_path: Path) -> None:
    assert main(["keys", str(tmp_path), "broker", "bob"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"broker.key", "broker.key_secret", "bob.key", "bob.key_secret"}
    assert (tmp_path / "bob.key_secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "command", [[], ["keys"], ["broker"], ["node"], ["up"], ["down"], ["status"], ["objects"], ["audit"]]
)
def test_every_command_has_help_with_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert (
        ("Example: fedptr " in out)
        if command
        else all(c in out for c in ("keys", "broker", "node", "up", "down", "status", "objects", "audit"))
    )


@pytest.mark.parametrize(("command", "prog"), [("broker", "fedptr-broker"), ("node", "fedptr-node")])
def test_broker_and_node_pass_their_arguments_through(command: str, prog: str) -> None:
    """The delegated command line parses the arguments: its errors and usage are the alias's."""
    result = subprocess.run(
        [sys.executable, "-m", "fedptr.cli", command, "--name", "n", "--broker", "tcp://127.0.0.1:1", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"usage: {prog}" in result.stderr and "--no-such-flag" in result.stderr


async def test_broker_runs_in_the_foreground_until_sigterm(tmp_path: Path) -> None:
    proc = _fedptr("broker", "--bind", f"ipc://{tmp_path}/b.sock")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.startswith(f"fedptr-broker listening on ipc://{tmp_path}/b.sock"), line
        # a registration proves the routing loop runs (a SIGTERM before it starts would be lost)
        async with fedptr.connect(f"ipc://{tmp_path}/b.sock", timeout=20) as client:
            assert await client.workers() == []
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
