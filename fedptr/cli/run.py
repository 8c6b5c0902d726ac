"""``fedptr broker ...`` and ``fedptr node ...``: the broker and a node in the foreground.

Both hand their arguments unchanged to the ``main(argv)`` of `fedptr.broker` and `fedptr.nodes`
(the commands ``fedptr-broker`` and ``fedptr-node``), so every flag of those works here too.
"""

from __future__ import annotations

import typer

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
"""Click settings that give every argument, ``--help`` included, to the delegated command line."""

BROKER_EXAMPLE = (
    "Example: fedptr broker --bind tcp://0.0.0.0:5555 --curve-secret keys/broker.key_secret --allow keys/allow/"
)
NODE_EXAMPLE = (
    "Example: fedptr node --name bob --broker tcp://127.0.0.1:5555 --data digits=bob.npz --trust secure_worker"
)


def _wants_help(args: list[str]) -> bool:
    return "-h" in args or "--help" in args


def broker(ctx: typer.Context) -> None:
    """Run the broker in the foreground until Ctrl-C (the flags of fedptr-broker; --help lists them).

    Example: fedptr broker --bind tcp://0.0.0.0:5555 --curve-secret keys/broker.key_secret --allow keys/allow/
    """
    from fedptr.broker.__main__ import main

    if _wants_help(ctx.args):
        typer.echo(BROKER_EXAMPLE + "\n")
    raise typer.Exit(main(list(ctx.args)))


def node(ctx: typer.Context) -> None:
    """Run a worker node in the foreground until Ctrl-C (the flags of fedptr-node; --help lists them).

    Example: fedptr node --name bob --broker tcp://127.0.0.1:5555 --data digits=bob.npz --trust secure_worker
    """
    from fedptr.nodes.__main__ import main

    if _wants_help(ctx.args):
        typer.echo(NODE_EXAMPLE + "\n")
    raise typer.Exit(main(list(ctx.args)))
