"""Where a running cluster is recorded: one JSON state file per cluster in a run directory.

``fedptr up`` writes ``RUN_DIR/NAME.json`` once every process registered and removes it when it
stops; ``fedptr down`` reads it to find the processes. The run directory is
``$XDG_RUNTIME_DIR/fedptr`` when that variable is set, else ``~/.fedptr/run``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fedptr.cli.clusterfile import load_cluster
from fedptr.errors import FedptrError


class NoSuchCluster(FedptrError):
    """Raised when the cluster named on the command line does not run (or none is named and
    not exactly one runs)."""


def default_run_dir() -> Path:
    """``$XDG_RUNTIME_DIR/fedptr``, or ``~/.fedptr/run`` without that variable."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "fedptr" if runtime else Path.home() / ".fedptr" / "run"


@dataclass(frozen=True)
class ClusterState:
    """A running cluster: the supervising ``fedptr up`` process, its children and its broker."""

    name: str
    cluster_file: str
    address: str
    supervisor_pid: int
    pids: dict[str, int]
    log_dir: str

    def write(self, run_dir: Path) -> Path:
        """Write (atomically) ``run_dir/NAME.json`` and return its path."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path = state_path(run_dir, self.name)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, path: Path) -> ClusterState:
        """Load a state file written by `write`."""
        fields = json.loads(path.read_text())
        return cls(
            name=str(fields["name"]),
            cluster_file=str(fields["cluster_file"]),
            address=str(fields["address"]),
            supervisor_pid=int(fields["supervisor_pid"]),
            pids={str(k): int(v) for k, v in fields["pids"].items()},
            log_dir=str(fields["log_dir"]),
        )


def state_path(run_dir: Path, name: str) -> Path:
    """The state file of cluster `name` in `run_dir`."""
    return run_dir / f"{name}.json"


def running(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped, counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def is_fedptr_process(pid: int) -> bool:
    """Whether `pid` runs a fedptr command (guards against signalling a reused process id)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fedptr" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def cluster_name(cluster: str | None, run_dir: Path) -> str:
    """The name of the cluster `cluster` stands for: a cluster file (its name), a cluster's
    name, or, when None, the only cluster running in `run_dir`. Raises `NoSuchCluster` when it
    is None and not exactly one runs, `ClusterFileError` for a bad cluster file."""
    if cluster is None:
        found = sorted(run_dir.glob("*.json"))
        if len(found) != 1:
            names = ", ".join(p.stem for p in found) or "none"
            raise NoSuchCluster(f"name the cluster; running in {run_dir}: {names}")
        return found[0].stem
    return load_cluster(cluster).name if is_cluster_file(cluster) else cluster


def is_cluster_file(text: str) -> bool:
    """Whether a command-line argument names a cluster file (rather than a cluster's name)."""
    return text.endswith(".toml") or Path(text).is_file()


def read_state(run_dir: Path, name: str) -> ClusterState:
    """The state of running cluster `name`; raises `NoSuchCluster` when it has no state file."""
    path = state_path(run_dir, name)
    if not path.exists():
        raise NoSuchCluster(f"no cluster {name!r} runs (no state file {path})")
    return ClusterState.read(path)
