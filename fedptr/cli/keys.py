"""``fedptr keys DIR NAME...``: write a CURVE key pair per name."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedptr.security import generate


def keys(
    directory: Annotated[Path, typer.Argument(help="where to write the key files (created if missing)")],
    names: Annotated[list[str], typer.Argument(help="one key pair per name: broker, each worker, each client")],
) -> None:
    """Generate CURVE key pairs: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    Example: fedptr keys keys/ broker bob alice secure_worker client
    """
    for name in names:
        public, secret = generate(directory, name)
        typer.echo(f"{name}: public {public}  secret {secret}")
