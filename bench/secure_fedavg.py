"""DP-FedAvg on the digits with 8 owners: M1 against secure aggregation at the same epsilon,
with and without one owner killed mid-round (examples/federated_average.py's `run_fedavg`).

Prints one line per run as it ends, then a table of test accuracy (mean and range over the
seeds) per mode. ``python bench/secure_fedavg.py [--seeds 0,1,2] [--epsilon 8] [--drop both]``; each run
starts its own cluster of 9 nodes (about 2 minutes each on 2 busy cores).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "federated_average.py"


def load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("federated_average", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["federated_average"] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument(
        "--drop", choices=["both", "yes", "no"], default="both", help="runs with the dropout, without, or both"
    )
    args = parser.parse_args()
    example = load_example()
    table: dict[tuple[str, bool], list[float]] = {}
    for seed in map(int, args.seeds.split(",")):
        for drop in {"both": (False, True), "yes": (True,), "no": (False,)}[args.drop]:
            for secure in (False, True):
                r = asyncio.run(example.run_fedavg(args.epsilon, secure, seed=seed, drop_one=drop, quiet=True))
                mode = "SecAgg+" if secure else "M1"
                table.setdefault((mode, drop), []).append(r.federated_accuracy)
                print(
                    f"seed {seed} {mode:8} drop {drop!s:5} accuracy {r.federated_accuracy:.1%} "
                    f"central {r.centralized_accuracy:.1%} epsilon {max(r.spent.values()):.2f} "
                    f"{r.seconds_per_round:.2f} s/round dropped {r.dropped}",
                    flush=True,
                )
    print("\n| release | 1 of 8 killed mid-round | test accuracy, mean | min | max | runs |")
    print("|---|---|---:|---:|---:|---:|")
    for (mode, drop), accs in table.items():
        mean = statistics.mean(accs)
        print(f"| {mode} | {'yes' if drop else 'no'} | {mean:.1%} | {min(accs):.1%} | {max(accs):.1%} | {len(accs)} |")


if __name__ == "__main__":
    main()
