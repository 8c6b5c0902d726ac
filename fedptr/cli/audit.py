"""``fedptr audit STORE_DIR``: print a data owner's record of everything that left its node."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedptr.logs import iso_time
from fedptr.nodes.audit import read


def audit(
    store: Annotated[Path, typer.Argument(help="the node's --store directory, where its audit.jsonl lives")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line, as stored")] = False,
) -> None:
    """Print what left a data owner's node: gets of released values, moves of private data, DP
    contributions (secure aggregation rounds too), DP-SGD runs and releases, with who asked and the epsilon spent.

    Example: fedptr audit examples/run/bob-store
    """
    if not store.is_dir():
        raise typer.BadParameter(f"{store} is not a directory", param_hint="STORE")
    records = read(store)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record, sort_keys=True))
        return
    table = Table(title=f"audit log of {store}")
    for column in ("time", "node", "event", "requester", "detail"):
        table.add_column(column)
    for r in records:
        detail = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("time", "node", "event", "requester"))
        when = r.get("time", "")
        table.add_row(
            iso_time(when) if isinstance(when, int | float) else str(when),  # older logs hold epoch seconds
            str(r.get("node", "")),
            str(r.get("event", "")),
            str(r.get("requester", "")),
            detail,
        )
    Console().print(table)
