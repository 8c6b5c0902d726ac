"""``fedptr up CLUSTER.toml [--detach]`` and ``fedptr down [CLUSTER.toml|NAME] [--purge]``."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedptr.cli.clusterfile import ClusterFileError, ClusterSpec, load_cluster
from fedptr.cli.state import (
    ClusterState,
    NoSuchCluster,
    cluster_name,
    default_run_dir,
    is_cluster_file,
    read_state,
    state_path,
)
from fedptr.cli.supervise import DOWN_GRACE_S, check_not_running, detach, run_foreground, stop_detached
from fedptr.errors import FedptrError

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

RunDir = Annotated[
    Path | None,
    typer.Option(help="where state files live (default: $XDG_RUNTIME_DIR/fedptr, else ~/.fedptr/run)"),
]


def _table(spec: ClusterSpec, state: ClusterState) -> Table:
    table = Table(title=f"cluster {spec.name} at {state.address}")
    for column in ("name", "role", "pid", "data", "trusts"):
        table.add_column(column)
    table.add_row("broker", "broker", str(state.pids["broker"]), "", "")
    for node in spec.nodes.values():
        table.add_row(
            node.name,
            node.role,
            str(state.pids[node.name]),
            ", ".join(node.data),
            ", ".join(node.trust),
        )
    return table


def _fail(message: object, code: int = 1) -> typer.Exit:
    # escaped: a message's brackets ('.[examples]', [nodes.NAME]) are text, not rich markup; one
    # line, unwrapped, so that a path or a command in it can be copied
    errors.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)
    return typer.Exit(code)


def up(
    cluster_file: Annotated[Path, typer.Argument(help="the cluster file (TOML) to start")],
    detach_: Annotated[
        bool, typer.Option("--detach", "-d", help="start in the background, write the state file, return")
    ] = False,
    run_dir: RunDir = None,
    log_dir: Annotated[Path | None, typer.Option(help="process logs (default: RUN_DIR/NAME.logs)")] = None,
) -> None:
    """Start the broker and the nodes a cluster file describes; Ctrl-C stops them all.

    Waits until every node registered, prints a table of what runs and the broker's address,
    then serves in the foreground (or, with --detach, returns; stop it with fedptr down).

    Example: fedptr up examples/cluster.toml --detach
    """
    try:
        spec = load_cluster(cluster_file)
        spec.check_files()
    except FedptrError as e:
        raise _fail(e, 2) from None
    runs = run_dir or default_run_dir()
    logs = (log_dir or runs / f"{spec.name}.logs").resolve()
    try:
        check_not_running(runs, spec.name)
        if detach_:
            state = detach(spec.path, runs, logs, spec.start_timeout + 30)
            console.print(_table(spec, state))
            console.print(f"logs in {state.log_dir}")
            console.print(f"detached; state in {state_path(runs, spec.name)}; stop it with: fedptr down {spec.name}")
            return

        def ready(state: ClusterState) -> None:
            console.print(_table(spec, state))
            console.print(f"logs in {state.log_dir}")
            console.print(f"clients: fedptr.connect({state.address!r}); Ctrl-C stops everything.")

        def exited(name: str, code: int) -> None:
            errors.print(f"[yellow]{name} exited with status {code}[/yellow]; see {logs / (name + '.log')}")

        if asyncio.run(run_foreground(spec, runs, logs, ready, exited)):
            console.print("stopped")
        else:
            console.print("interrupted while starting; stopped")
    except FedptrError as e:
        raise _fail(e) from None


def _demo_spec(cluster: str | None, runs: Path) -> ClusterSpec:
    """The cluster file `cluster` names (a file, or the file a running cluster was started
    from), which must say ``demo = true``; raises `ClusterFileError` or `NoSuchCluster`."""
    if cluster is not None and is_cluster_file(cluster):
        spec = load_cluster(cluster)
    else:
        spec = load_cluster(read_state(runs, cluster_name(cluster, runs)).cluster_file)
    if not spec.demo:
        raise ClusterFileError(
            spec.path,
            "cluster.demo",
            "--purge clears the stores of a demo cluster only (demo = true): a real deployment never resets "
            "a privacy budget",
        )
    return spec


def _purge(spec: ClusterSpec) -> None:
    """Delete the stores of demo cluster `spec`'s nodes, saying which."""
    stores = [n.store for n in spec.nodes.values() if n.store is not None and n.store.exists()]
    for store in stores:
        shutil.rmtree(store)
    if stores:
        console.print(
            f"purged the demo stores (objects, privacy budgets spent, audit logs): {', '.join(map(str, stores))}"
        )
    else:
        console.print("no demo stores to purge")


def down(
    cluster: Annotated[
        str | None, typer.Argument(help="a cluster file or a cluster's name; may be left out if one runs")
    ] = None,
    run_dir: RunDir = None,
    grace: Annotated[float, typer.Option(help="seconds after SIGTERM before SIGKILL")] = DOWN_GRACE_S,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge", help="then delete the nodes' stores (budgets included) of a cluster file with demo = true"
        ),
    ] = False,
) -> None:
    """Stop a cluster started with fedptr up (SIGTERM, then SIGKILL after --grace seconds).

    With --purge, and a cluster file that says demo = true, also delete its nodes' stores: their
    objects, the privacy budgets they spent and their audit logs, so that the next fedptr up
    starts afresh. A cluster file without demo = true is refused (nothing is stopped): a real
    deployment never resets a budget. --purge of a demo cluster file that is not running only
    deletes the stores.

    Example: fedptr down examples/cluster.toml --purge
    """
    runs = run_dir or default_run_dir()
    try:
        spec = _demo_spec(cluster, runs) if purge else None
        state = read_state(runs, cluster_name(cluster, runs))
    except ClusterFileError as e:
        raise _fail(e, 2) from None
    except NoSuchCluster as e:
        if spec is None:
            raise _fail(e, 2 if cluster is None else 1) from None
        console.print(f"{spec.name} is not running")
        _purge(spec)
        return
    name = state.name
    killed = stop_detached(state, runs, grace)
    if killed:
        console.print(f"stopped {name}; killed after {grace:g} s: {', '.join(killed)}")
    else:
        console.print(f"stopped {name}")
    if spec is not None:
        _purge(spec)
