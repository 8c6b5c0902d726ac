"""``fedptr keys DIR NAME... [--force]``: write a CURVE key pair per name, never over an existing one unasked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedptr.security import generate


def keys(
    directory: Annotated[Path, typer.Argument(help="where to write the key files (created if missing)")],
    names: Annotated[list[str], typer.Argument(help="one key pair per name: broker, each worker, each client")],
    force: Annotated[bool, typer.Option("--force", help="replace key pairs that exist already")] = False,
) -> None:
    """Generate CURVE key pairs: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    A name whose pair exists already is refused (nothing is written) unless --force: a running
    broker may trust the old public key, and a replaced secret cannot be had back.

    Example: fedptr keys keys/ broker bob alice secure_worker client
    """
    pairs = [(directory / f"{name}.key", directory / f"{name}.key_secret") for name in names]
    existing = [str(path) for pair in pairs for path in pair if path.exists()]
    if existing and not force:
        typer.echo(
            f"refused: {', '.join(existing)} exist already; --force replaces them "
            "(a broker or node holding the old keys then refuses the new ones)",
            err=True,
        )
        raise typer.Exit(1)
    for name in names:
        public, secret = generate(directory, name)
        typer.echo(f"{name}: public {public}  secret {secret}")
