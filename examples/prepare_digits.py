"""Write the private data of examples/cluster.toml: bob's and alice's digits as .npz files.

The same non-IID split examples/federated_average.py makes (same seed), saved in
examples/data/ (ignored by git), where examples/cluster.toml points:

    python examples/prepare_digits.py && fedptr up examples/cluster.toml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from federated_average import split_digits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="the split's seed (federated_average.py's --seed)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    split = split_digits(args.out, args.seed)
    for owner, path in split.files.items():
        print(f"{owner}: {split.counts[owner]} samples in {path}")


if __name__ == "__main__":
    main()
