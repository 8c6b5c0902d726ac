"""``fedptr store recover DIR``: move a node store's damaged objects aside, and say what was lost.

A node refuses to start on a damaged ``--store`` (nodes/durable.py): recovering is the
operator's explicit decision, never the node's. The node's own code does the work, imported only
when the command runs (it loads torch to validate tensor files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Inspect and repair a node's --store directory.", no_args_is_help=True)


@app.command()
def recover(
    store: Annotated[Path, typer.Argument(help="the node's --store directory")],
) -> None:
    """Move the files of every damaged object (a torn tensor file, a record that does not parse)
    into STORE/damaged/ and print each one: those objects are lost. The node then starts with
    the rest. Exits 1 when something was moved aside, 0 when the store was whole.

    Example: fedptr store recover examples/run/bob-store
    """
    if not store.is_dir():
        raise typer.BadParameter(f"{store} is not a directory", param_hint="STORE")
    from fedptr.nodes.durable import DAMAGED_DIR
    from fedptr.nodes.durable import recover as recover_store

    lost = recover_store(store)
    for d in lost:
        typer.echo(f"lost object {d.obj_id}: {', '.join(d.files)} ({d.reason})")
    if not lost:
        typer.echo(f"{store}: every stored object is whole")
        return
    typer.echo(f"{len(lost)} damaged objects moved aside into {store / DAMAGED_DIR}")
    raise typer.Exit(1)
