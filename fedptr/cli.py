"""The ``fedptr`` command: ``fedptr keys DIR NAME [NAME ...]`` writes CURVE key pairs."""

from __future__ import annotations

import argparse
import sys

from fedptr.security import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedptr", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="generate CURVE key pairs (NAME.key public, NAME.key_secret secret)")
    keys.add_argument("directory")
    keys.add_argument("names", nargs="+")
    args = p.parse_args(argv)
    for name in args.names:
        public, secret = generate(args.directory, name)
        print(f"{name}: public {public}  secret {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
