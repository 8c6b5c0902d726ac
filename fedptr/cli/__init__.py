"""The ``fedptr`` command: ``keys``, ``broker``, ``node``, ``up``, ``down``, ``status``, ``objects``, ``audit``,
``store recover``.

Each subcommand lives in its own module; this one only assembles them. ``fedptr-broker`` and
``fedptr-node`` stay as aliases of ``fedptr broker`` and ``fedptr node``.
"""

from __future__ import annotations

import sys

import typer
from typer.main import get_command

from fedptr.cli import audit, keys, run, status, store, up

app = typer.Typer(
    name="fedptr",
    help=(
        "Operate fedptr: make keys, run a broker or a node, start and stop a cluster from a cluster file, "
        "see its status and a worker's objects."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(keys.keys)
app.command(context_settings=run.PASS_THROUGH, add_help_option=False)(run.broker)
app.command(context_settings=run.PASS_THROUGH, add_help_option=False)(run.node)
app.command()(up.up)
app.command()(up.down)
app.command()(status.status)
app.command()(status.objects)
app.command()(audit.audit)
app.add_typer(store.app, name="store")


def main(argv: list[str] | None = None) -> int:
    """Run the ``fedptr`` command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        get_command(app).main(args=argv, prog_name="fedptr", standalone_mode=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # a refusal's message (SystemExit("...")), as Python prints it uncaught
        return 1
    return 0
