"""``fedptr status [TARGET] [--json]`` and ``fedptr objects TARGET NAME``.

TARGET is a broker's address (``tcp://HOST:PORT``), a cluster file, or the name of a cluster
started with ``fedptr up``; left out, the one cluster running. With a cluster file or a name,
the state file gives the broker's address, the file the nodes that should run and the client
key (CURVE); with an address, ``--curve-secret`` and ``--broker-key`` name the key files.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedptr import limits, wire
from fedptr.cli.clusterfile import ClusterSpec, load_cluster
from fedptr.cli.state import NoSuchCluster, cluster_name, default_run_dir, is_cluster_file, read_state
from fedptr.errors import FedptrError
from fedptr.security import CurveKeys
from fedptr.status import ClusterStatus, WorkerStatus, cluster_status, list_objects

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)

NONE = "—"
"""Shown where a figure is not known (a privacy budget no node reports, a worker that is down)."""

NOT_ALL_UP = 3
"""Exit status of ``fedptr status`` when some worker is not up (down, unresponsive, in error)."""

Target = Annotated[
    str | None,
    typer.Argument(help="a broker address (tcp://HOST:PORT), a cluster file, or a running cluster's name"),
]
RunDir = Annotated[Path | None, typer.Option(help="where state files live (default: as fedptr up)")]
CurveSecret = Annotated[Path | None, typer.Option(help="with an address: this client's .key_secret file (CURVE)")]
BrokerKey = Annotated[Path | None, typer.Option(help="with an address: the broker's public .key file (CURVE)")]
Timeout = Annotated[float, typer.Option(help="seconds to wait for the broker and for each worker")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of tables")]


@dataclass(frozen=True)
class Resolved:
    """Where to ask: the broker's address, the workers that should run, the client's keys."""

    address: str
    expected: tuple[str, ...] = ()
    curve: CurveKeys | None = None


def _from_spec(spec: ClusterSpec, address: str) -> Resolved:
    b = spec.broker
    keys = None
    if b.client_secret is not None and b.broker_key is not None:
        keys = CurveKeys.load(b.client_secret, b.broker_key)
    return Resolved(address, tuple(spec.nodes), keys)


def resolve(target: str | None, run_dir: Path | None, curve_secret: Path | None, broker_key: Path | None) -> Resolved:
    """The broker and keys TARGET stands for. Raises FedptrError (`NoSuchCluster`,
    `ClusterFileError`) when it names no running cluster."""
    if target is not None and "://" in target:
        keys = CurveKeys.load(curve_secret, broker_key) if curve_secret and broker_key else None
        return Resolved(target, (), keys)
    runs = run_dir or default_run_dir()
    name = cluster_name(target, runs)
    spec = load_cluster(target) if target is not None and is_cluster_file(target) else None
    try:
        state = read_state(runs, name)
    except NoSuchCluster:
        if spec is not None and "*" not in spec.broker.bind:
            return _from_spec(spec, spec.broker.bind)  # started some other way: ask where the file says
        raise
    if spec is None and Path(state.cluster_file).is_file():
        spec = load_cluster(state.cluster_file)
    return _from_spec(spec, state.address) if spec is not None else Resolved(state.address)


def _bytes(n: float | None) -> str:
    if n is None:
        return NONE
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _age(ms: int | None) -> str:
    if ms is None:
        return NONE
    return f"{ms} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _budget(w: WorkerStatus) -> str:
    """``ε LEFT / TOTAL`` (a data owner's privacy budget), or the figures a node reports, or —."""
    if not w.budget:
        return NONE
    b = w.budget
    if set(b) == {"epsilon_left", "epsilon_spent"}:
        return f"ε {_short(b['epsilon_left'])} / {_short(b['epsilon_left'] + b['epsilon_spent'])}"
    return ", ".join(f"{k} {_short(v)}" for k, v in sorted(b.items()))


def _short(x: float) -> str:
    """Two decimals at most: 0.09, 7.91, 8."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


_STATE_STYLE = {"up": "green", "unresponsive": "yellow", "down": "red", "error": "red"}


def _table(title: str) -> Table:
    # no vertical rules, one space between columns: six columns and their titles fit 80
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), show_edge=False)


def tables(status: ClusterStatus, width: int = limits.STATUS_WIDE_COLUMNS) -> list[Table]:
    """The workers table and the broker's peers table of `status`, for a terminal `width`
    columns wide (below `limits.STATUS_WIDE_COLUMNS`, without memory and traffic)."""
    wide = width >= limits.STATUS_WIDE_COLUMNS
    workers = _table(f"workers at {status.address}")
    # a name is what an operator copies (`fedptr objects CLUSTER NAME`): a state such as "down
    # (not registered)" wraps at its words first; a name folds only on a terminal too narrow
    # for it whole; figures never do
    workers.add_column("worker", overflow="fold")
    workers.add_column("state")
    workers.add_column("role", overflow="fold")
    for column in ("heartbeat", "objects"):
        workers.add_column(column, justify="right", no_wrap=True)
    if wide:
        for column in ("held", "RSS", "msgs in/out", "bytes in/out"):
            workers.add_column(column, justify="right", no_wrap=True)
    workers.add_column("budget left", justify="right", no_wrap=True)
    if wide:
        workers.add_column("uptime", justify="right", no_wrap=True)
    for w in status.workers:
        f = w.figures
        up = w.state == "up"
        state = f"[{_STATE_STYLE.get(w.state, 'red')}]{w.state}[/]"
        row = [
            w.name,
            state if up or not w.detail else f"{state} ({w.detail})",
            w.role or NONE,
            _age(w.heard_ms),
            str(int(f["objects"])) if "objects" in f else NONE,
        ]
        if wide:
            row += [
                _bytes(f.get("store_bytes")),
                _bytes(f.get("rss_bytes")),
                f"{int(f['messages_in'])}/{int(f['messages_out'])}" if up else NONE,
                f"{_bytes(f['bytes_in'])}/{_bytes(f['bytes_out'])}" if up else NONE,
            ]
        row.append(_budget(w) if up else NONE)
        if wide:
            row.append(_uptime(f.get("uptime_s")))
        workers.add_row(*row)
    b = status.broker
    peers = _table(
        f"broker: {len(status.peers)} peers ({sum(p.worker for p in status.peers)} workers), "
        f"{b.get('routed', 0)} messages routed, {b.get('dropped', 0)} dropped"
    )
    for column in ("peer", "role", "heartbeat", "queue", "refused", "delivered"):
        peers.add_column(column, justify="left" if column in ("peer", "role") else "right", no_wrap=True)
    for p in status.peers:
        peers.add_row(
            p.name,
            "worker" if p.worker else "client",
            _age(p.heard_ms),
            str(p.pending),
            str(p.refused),
            str(p.delivered),
        )
    return [workers, peers]


def _fail(message: object, code: int = 1) -> typer.Exit:
    # escaped: a message's brackets ('.[examples]', [nodes.NAME]) are text, not rich markup; one
    # line, unwrapped, so that a path or a command in it can be copied
    errors.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)
    return typer.Exit(code)


def status(
    target: Target = None,
    as_json: AsJson = False,
    run_dir: RunDir = None,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
    timeout: Timeout = limits.STATUS_TIMEOUT_S,
) -> None:
    """Show each worker (state, role, heartbeat age, objects and bytes held, memory, traffic,
    privacy budget left, uptime) and the broker's peers and queues.

    A worker that does not answer within --timeout is shown unresponsive; one that should run
    but is not registered, down. Exits 0 when every worker is up, 3 when one is not, 1 when the
    broker does not answer.

    Example: fedptr status examples/cluster.toml --json
    """
    try:
        where = resolve(target, run_dir, curve_secret, broker_key)
    except FedptrError as e:
        raise _fail(e) from None
    try:
        result = asyncio.run(cluster_status(where.address, where.expected, where.curve, timeout))
    except FedptrError as e:
        if as_json:
            console.print_json(json.dumps({"address": where.address, "error": str(e)}))
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        for table in tables(result, console.width):
            console.print(table)
    if any(w.state != "up" for w in result.workers):
        raise typer.Exit(NOT_ALL_UP)


def objects(
    target: Annotated[str, typer.Argument(help="a broker address, a cluster file, or a running cluster's name")],
    worker: Annotated[str, typer.Argument(help="the worker whose objects to list")],
    as_json: AsJson = False,
    previews: Annotated[
        bool, typer.Option("--previews", help="show the values of small tensors derived from no private data")
    ] = False,
    run_dir: RunDir = None,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
    timeout: Timeout = limits.STATUS_TIMEOUT_S,
) -> None:
    """List a worker's objects: ids, kinds, shapes, dtypes, owners, and where pointers point.

    Never values of private data: without --previews no values at all; with it, only those of
    small tensors that derive from no one's private data (the worker sends no others).

    Example: fedptr objects part4 bob
    """
    try:
        where = resolve(target, run_dir, curve_secret, broker_key)
        rows = asyncio.run(list_objects(where.address, worker, where.curve, timeout))
    except FedptrError as e:
        raise _fail(e) from None
    if as_json:
        typer.echo(json.dumps([_row_json(r, previews) for r in rows], indent=2))
        return
    table = Table(title=f"{worker}: {len(rows)} objects", title_justify="left")
    for column in ("id", "kind", "shape", "dtype", "owner", "points to"):
        table.add_column(column, justify="right" if column == "id" else "left")
    if previews:
        table.add_column("values")
    for r in rows:
        cells = [
            str(r.obj_id),
            r.kind,
            "×".join(map(str, r.shape)) if r.kind == "tensor" else "",
            r.dtype,
            _owner(r.owner),
            f"{r.location}:{r.id_at_location}" if r.kind == "pointer" else "",
        ]
        if previews:
            cells.append("" if r.preview is None else str(r.preview))
        table.add_row(*cells)
    console.print(table)


def _owner(owner: str) -> str:
    return "anyone (the worker's data)" if owner == "*" else owner or NONE


def _row_json(r: wire.ObjectRow, previews: bool) -> dict[str, object]:
    out: dict[str, object] = {
        "id": r.obj_id,
        "kind": r.kind,
        "shape": r.shape,
        "dtype": r.dtype,
        "owner": r.owner,
        "location": r.location,
        "id_at_location": r.id_at_location,
    }
    if previews:
        out["preview"] = r.preview
    return out
