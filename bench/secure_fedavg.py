"""DP-FedAvg on the digits with 8 owners: M1 against secure aggregation at the same epsilon,
with and without one owner dropping out mid-round (examples/federated_average.py's DP-FedAvg).

Two ways to run it:

* ``python bench/secure_fedavg.py [--seeds 0,1,2] [--epsilon 8] [--drop both]``: each run starts
  its own cluster of 9 processes (`run_fedavg`; about 2 minutes a run on 2 busy cores) and the
  dropout is a SIGKILL. Prints one line per run, then accuracy per mode.
* ``python bench/secure_fedavg.py --inproc --seeds 0-39``: the same training on the real broker
  and nodes in this process (tests/harness.py; seconds a run), the dropout a node stopped
  mid-round. For each seed both modes run on the same split, initial model and local training
  (all functions of the seed), so the seeds are paired and only the releases' noise differs;
  it prints the paired gap (SecAgg+ minus M1) with its standard error and 95% interval.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from scipy import stats

import fedptr

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "federated_average.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("federated_average", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["federated_average"] = module
    spec.loader.exec_module(module)
    return module


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-39`` (inclusive), or both comma-separated."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


async def run_inproc(example: ModuleType, plan: Any, epsilon: float, secure: bool, seed: int, drop_one: bool) -> Any:
    """One DP-FedAvg run of `plan` (example.plan_fedavg) on an in-process cluster: the nodes
    are configured as `run_fedavg`'s flags configure its processes."""
    sys.path.insert(0, str(ROOT))
    from fedptr.nodes.node import NodeConfig

    from tests import harness

    agg = example.AGGREGATOR
    owner = NodeConfig(
        epsilon=epsilon,
        delta=example.DELTA,
        trust=[agg],
        dp_clip=example.FEDAVG_CLIP,
        dp_noise_multiplier=plan.sigma,
    )
    aggregator = NodeConfig(aggregator=True, owners=list(plan.owners), min_owners=plan.need)
    configs = {**dict.fromkeys(plan.owners, owner), agg: aggregator}
    with tempfile.TemporaryDirectory(prefix="fedptr-digits-") as tmp:
        split = example.split_digits(Path(tmp), seed, plan.owners)
        async with harness.cluster(
            [*plan.owners, agg],
            configs=configs,
            data={o: {"digits": split.files[o]} for o in plan.owners},
            stores=list(plan.owners),
            call_timeout=60.0,
        ) as c:
            return await example.train_fedavg(
                c.client, split, plan.owners, secure, 10, 10, 1.0, seed, c.stop_node if drop_one else None, True
            )


def paired(m1: list[float], secure: list[float]) -> str:
    """The mean paired gap (secure minus M1, points) with its standard error and 95% t interval."""
    gaps = [100 * (s - m) for m, s in zip(m1, secure, strict=True)]
    n = len(gaps)
    mean = statistics.mean(gaps)
    sd = statistics.stdev(gaps) if n > 1 else math.nan
    se = sd / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * se if n > 1 else math.nan
    return (
        f"{n} paired seeds: M1 {100 * statistics.mean(m1):.1f}%, SecAgg+ {100 * statistics.mean(secure):.1f}%; "
        f"gap (SecAgg+ - M1) {mean:+.2f} points, standard error {se:.2f}, 95% interval "
        f"[{mean - half:+.2f}, {mean + half:+.2f}]; the gap's standard deviation {sd:.2f}"
    )


def main_inproc(example: ModuleType, seeds: list[int], epsilon: float, drops: tuple[bool, ...]) -> None:
    for drop in drops:
        plan = example.plan_fedavg(epsilon, 8, 10, drop)
        m1: list[float] = []
        secure: list[float] = []
        for seed in seeds:
            accs = []
            for mode in (False, True):
                started = time.monotonic()
                try:
                    r = asyncio.run(run_inproc(example, plan, epsilon, mode, seed, drop))
                except fedptr.FedptrError as e:
                    # one loop runs every node here: on a loaded machine a stalled loop can cost
                    # a second owner its liveness, and the round fails; the seed's pair goes
                    print(f"seed {seed} {'SecAgg+' if mode else 'M1'} failed, seed left out: {e!r}", flush=True)
                    break
                accs.append(r.federated_accuracy)
                print(
                    f"seed {seed} {'SecAgg+' if mode else 'M1':8} drop {drop!s:5} accuracy {r.federated_accuracy:.1%} "
                    f"epsilon {max(r.spent.values()):.2f} {time.monotonic() - started:.1f} s dropped {r.dropped}",
                    flush=True,
                )
            if len(accs) == 2:
                m1.append(accs[0])
                secure.append(accs[1])
        print(f"drop {drop}: {paired(m1, secure)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="e.g. 0,1,2 or 0-39")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument(
        "--drop", choices=["both", "yes", "no"], default="both", help="runs with the dropout, without, or both"
    )
    parser.add_argument("--inproc", action="store_true", help="in-process clusters, paired seeds, the paired gap")
    args = parser.parse_args()
    example = load_example()
    drops = {"both": (False, True), "yes": (True,), "no": (False,)}[args.drop]
    seeds = parse_seeds(args.seeds)
    if args.inproc:
        main_inproc(example, seeds, args.epsilon, drops)
        return
    table: dict[tuple[str, bool], list[float]] = {}
    for seed in seeds:
        for drop in drops:
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
    for drop in drops:
        if ("M1", drop) in table:
            print(f"drop {drop}: {paired(table[('M1', drop)], table[('SecAgg+', drop)])}")


if __name__ == "__main__":
    main()
