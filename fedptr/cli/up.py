"""``fedptr up CLUSTER.toml [--detach]`` and ``fedptr down [CLUSTER.toml|NAME]``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedptr.cli.clusterfile import ClusterFileError, ClusterSpec, load_cluster
from fedptr.cli.state import ClusterState, NoSuchCluster, cluster_name, default_run_dir, read_state, state_path
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
    errors.print(f"[red]error:[/red] {message}")
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


def down(
    cluster: Annotated[
        str | None, typer.Argument(help="a cluster file or a cluster's name; may be left out if one runs")
    ] = None,
    run_dir: RunDir = None,
    grace: Annotated[float, typer.Option(help="seconds after SIGTERM before SIGKILL")] = DOWN_GRACE_S,
) -> None:
    """Stop a cluster started with fedptr up (SIGTERM, then SIGKILL after --grace seconds).

    Example: fedptr down examples/cluster.toml
    """
    runs = run_dir or default_run_dir()
    try:
        state = read_state(runs, cluster_name(cluster, runs))
    except ClusterFileError as e:
        raise _fail(e, 2) from None
    except NoSuchCluster as e:
        raise _fail(e, 2 if cluster is None else 1) from None
    name = state.name
    killed = stop_detached(state, runs, grace)
    if killed:
        console.print(f"stopped {name}; killed after {grace:g} s: {', '.join(killed)}")
    else:
        console.print(f"stopped {name}")
