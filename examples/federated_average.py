"""Federated averaging on scikit-learn's handwritten digits, where the analyst sees DP releases only.

PySyft 0.2's Part 4, with a guarantee instead of a trusted label check. bob and alice hold the
digits (split non-IID) as private data and a privacy budget (epsilon per owner, delta 1e-5).
Each round the global model goes to each owner, which trains it with DP-SGD on its own data
(mechanism M2: the node samples every batch itself, clips each example's gradient, adds Gaussian
noise and charges its budget before each step); the DP-trained models are released by
post-processing and the client averages them. It prints the epsilon each owner has spent after
every round, and ends next to the same model trained centrally without privacy.

Why M2 and not M1 (owner-level DP aggregates): M2 protects every person in an owner's data,
which is the tutorial's promise (nobody sees one person's exact data or gradient), and its
noise is spread over an owner's hundreds of examples; M1 protects whole owners, and with two
owners the noise a useful epsilon needs would drown the average.

    python examples/federated_average.py [--epsilon 8] [--rounds 20] [--local-steps 10]
    python examples/federated_average.py --sweep --plot dp_accuracy.png   # epsilon 1, 4, 8 and exact

DP-FedAvg (owner-level DP, M1) with more owners is the other mode: 8 owners o1..o8 (the digits
split among them at random) each train the global linear model locally through pointers, and
each round the mean of their updates (clipped to 1 by each owner, charged once per round) is
released by M1's trusted aggregator, or with ``--secure`` by secure aggregation (SecAgg+: the
aggregator sees only the noised sum). ``--drop-one`` kills one owner's node half way through
the middle round's release; the round completes with the others. Same epsilon, same charges:

    python examples/federated_average.py --fedavg [--owners 8] [--epsilon 8] [--rounds 10]
    python examples/federated_average.py --secure --drop-one

On a terminal the rounds show as a progress bar (elsewhere, one line per round). With
``--address`` it trains on a running cluster instead of starting one, e.g. the Part 4 setup:

    python examples/prepare_digits.py && fedptr up examples/cluster.toml --detach
    python examples/federated_average.py --address tcp://127.0.0.1:5555 --epsilon 4

Before it starts, it says what the run will spend of each owner's budget and what is left. On
its own cluster every run starts with a fresh budget (the stores live in a temporary directory).
A running cluster's owners keep what was spent across runs and restarts: when what is left
cannot cover the run, it says so and stops (exit status 1); spend less (``--epsilon``), or clear
the demo cluster's stores (``fedptr down part4 --purge``, then ``fedptr up`` again).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import aggregate, dp, optim

OWNERS = ("bob", "alice")
DELTA = 1e-5
SAMPLE_RATE = 0.1
"""The Poisson rate of DP-SGD: each example joins a step's batch with this probability."""
MAX_GRAD_NORM = 1.0


@dataclass
class Split:
    """Each owner's private training data (saved as .npz), and the client's own test split."""

    files: dict[str, Path]
    counts: dict[str, int]
    pooled_x: torch.Tensor
    pooled_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Result:
    """What one run reached: test accuracies, the epsilon each owner spent, seconds per round."""

    epsilon: float
    federated_accuracy: float
    centralized_accuracy: float
    spent: dict[str, float] = field(default_factory=dict)
    seconds_per_round: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)
    """DP-FedAvg: each owner that dropped out of the run, and when and why."""


def split_digits(directory: Path, seed: int, owners: Sequence[str] = OWNERS) -> Split:
    """Digits scaled to [0, 1]; a stratified 75/25 train/test split; the training part split
    non-IID between bob and alice (bob holds 80% of the 0-4s and 20% of the 5-9s, alice the
    rest), or, among other `owners`, each example to one drawn uniformly."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    if tuple(owners) == OWNERS:
        r = rng.random(len(y_train))
        to_bob = ((y_train < 5) & (r < 0.8)) | ((y_train >= 5) & (r < 0.2))
        masks = [to_bob, ~to_bob]
    else:
        drawn = rng.integers(0, len(owners), len(y_train))
        masks = [drawn == i for i in range(len(owners))]
    files, counts = {}, {}
    for owner, mask in zip(owners, masks, strict=True):
        files[owner] = directory / f"{owner}-digits.npz"
        np.savez(files[owner], x=x_train[mask], y=y_train[mask].astype(np.int64))
        counts[owner] = int(mask.sum())
    return Split(
        files,
        counts,
        torch.from_numpy(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
    )


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def average_into(model: nn.Module, trained: list[nn.Module], weights: list[float]) -> None:
    """Set `model` to the weighted mean of `trained` (post-processing of released models)."""
    total = sum(weights)
    with torch.no_grad():
        for p, *others in zip(model.parameters(), *(m.parameters() for m in trained), strict=True):
            p.copy_(sum(w * o for w, o in zip(weights, others, strict=True)) / total)


class CannotSpend(Exception):
    """The owners' budgets left cannot cover the run: the message says what to do instead."""


def noise_for(epsilon: float, rounds: int, local_steps: int, sample_rate: float = SAMPLE_RATE) -> float:
    """The noise multiplier that makes `rounds` x `local_steps` Gaussian mechanisms, each on a
    Poisson sample at `sample_rate` (DP-SGD's steps; 1.0 for M1's releases), spend `epsilon`
    (99% of it, for the accountant's rounding) at `DELTA`: computed before any connection,
    since Opacus's search takes seconds and would stall the client's heartbeats."""
    with warnings.catch_warnings():
        # the search tries noise levels whose optimal RDP order is the largest Opacus tries and
        # says so; the level it settles on is checked against the owners' own accountant anyway
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon * 0.99, target_delta=DELTA, sample_rate=sample_rate, steps=rounds * local_steps
            )
        )


async def check_budgets(client: fedptr.Client, epsilon: float) -> None:
    """Say what each owner has left and what the run will spend; raise CannotSpend when an
    owner's budget left is smaller (the owner would refuse the run part way)."""
    short = []
    for owner in OWNERS:
        b = await dp.budget(client.worker(owner))
        print(f"{owner}: epsilon {b.epsilon_left:.2f} left of {b.epsilon_spent + b.epsilon_left:g}", flush=True)
        if b.epsilon_left < epsilon:
            short.append(f"{owner} has epsilon {b.epsilon_left:.2f} left")
    if short:
        raise CannotSpend(
            f"this run would spend up to epsilon {epsilon:g} per owner, but {' and '.join(short)}.\n"
            "Spend less (--epsilon, below what is left), or, on the demo cluster of examples/cluster.toml, "
            "start again with fresh budgets:\n"
            "    fedptr down part4 --purge && fedptr up examples/cluster.toml --detach\n"
            "A real deployment never resets a budget."
        )


def node_args(epsilon: float | None, store: Path) -> dict[str, list[str]]:
    """Owners with a budget (and a store to keep it in), or, for epsilon None, ``--release exact``."""
    if epsilon is None:
        return {o: ["--release", "exact"] for o in OWNERS}
    return {o: ["--epsilon", str(epsilon), "--delta", str(DELTA), "--store", str(store / o)] for o in OWNERS}


class Rounds:
    """Reports each round: a rich progress bar on a terminal, a printed line elsewhere, nothing when quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.bar: Progress | None = None
        if not quiet and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}")
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def done(self, r: int, line: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=r, description=line)
        elif not self.quiet:
            print(f"round {r:>3}/{self.total}  {line}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


async def train_federated(
    client: fedptr.Client,
    split: Split,
    epsilon: float | None,
    sigma: float,
    rounds: int,
    local_steps: int,
    lr: float,
    seed: int,
    quiet: bool,
) -> Result:
    """`rounds` rounds of federated averaging; with DP-SGD at the owners, at noise multiplier
    `sigma`, unless `epsilon` is None (then exact local SGD, which the owners allow with
    ``--release exact``)."""
    data = {o: await client.worker(o).search("digits") for o in OWNERS}  # [x, y] on each owner
    model = make_model(seed)
    spent: dict[str, float] = {}
    started = time.monotonic()
    report = Rounds(rounds, quiet)
    for r in range(1, rounds + 1):
        trained = []
        for owner in OWNERS:
            remote = await client.worker(owner).send(model)
            assert isinstance(remote, fedptr.ModulePointer)
            x, y = data[owner]
            if epsilon is None:
                opt = optim.SGD(remote.parameters(), lr=lr)
                for _ in range(local_steps):
                    await functional.cross_entropy(remote(x), y).backward()
                    await opt.step()
                    await opt.zero_grad()
            else:
                charged = await dp.train(
                    remote,
                    x,
                    y,
                    lr=lr,
                    sample_rate=SAMPLE_RATE,
                    steps=local_steps,
                    max_grad_norm=MAX_GRAD_NORM,
                    noise_multiplier=sigma,
                )
                spent[owner] = charged.epsilon_spent
            released = await remote.get()  # DP-trained (post-processing), or exact by the owner's choice
            assert isinstance(released, nn.Module)
            trained.append(released)
        average_into(model, trained, [float(split.counts[o]) for o in OWNERS])
        budget = "  ".join(f"epsilon {o} {e:.2f}" for o, e in spent.items()) or "exact (no DP)"
        report.done(r, f"{budget}  test accuracy {accuracy(model, split.test_x, split.test_y):.1%}")
    report.close()
    per_round = (time.monotonic() - started) / rounds
    return Result(
        math.inf if epsilon is None else epsilon,
        accuracy(model, split.test_x, split.test_y),
        0.0,
        spent,
        per_round,
    )


def train_centralized(
    split: Split, steps: int, lr: float, seed: int, make: Callable[[int], nn.Module] = make_model
) -> nn.Module:
    """The same model, trained the same number of steps on the pooled data in one place."""
    model = make(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        functional.cross_entropy(model(split.pooled_x), split.pooled_y).backward()
        opt.step()
    return model


AGGREGATOR = "agg"
FEDAVG_CLIP = 1.0
"""DP-FedAvg: the L2 bound each owner clips its model update to (its node's ``--dp-clip``)."""
GONE = (fedptr.LostWorkerError, fedptr.UnknownWorkerError, fedptr.DeadlineExceeded)
"""What a call to an owner whose node has died raises: the owner drops out of the run."""


def make_linear(seed: int) -> nn.Module:
    """DP-FedAvg's model: owner-level noise is spread over every parameter, so fewer is better
    (a linear model learns the digits where the MLP drowns at the same epsilon)."""
    torch.manual_seed(seed)
    return nn.Linear(64, 10)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


async def local_update(
    client: fedptr.Client, owner: str, model: nn.Module, data: list[fedptr.Pointer], local_steps: int, lr: float
) -> fedptr.Pointer:
    """Train the global `model` on `owner`'s node, on its data, with plain SGD through pointers;
    the update (trained parameters minus the global ones, one flat vector) stays there, private."""
    worker = client.worker(owner)
    remote = await worker.send(model)
    assert isinstance(remote, fedptr.ModulePointer)
    start = await worker.send(flat(model))
    x, y = data
    opt = optim.SGD(remote.parameters(), lr=lr)
    for _ in range(local_steps):
        await functional.cross_entropy(remote(x), y).backward()
        await opt.step()
        await opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in remote.parameters()]) - start


async def release_mean(
    updates: dict[str, fedptr.Pointer], secure: bool
) -> tuple[torch.Tensor, dict[str, float], dict[str, str]]:
    """The DP mean of the owners' updates by M1 (each owner clips its update, charges its budget
    and sends it to the aggregator, which noises the sum) or by secure aggregation (the
    aggregator sees only the noised sum); the epsilon each owner has spent, and who dropped out."""
    if secure:
        mean, cost = await dp.secure_mean(list(updates.values()), AGGREGATOR)
        return await mean.get(), {o: s.epsilon_spent for o, s in cost.spent.items()}, cost.dropped
    outcomes = await asyncio.gather(*(dp.contribute(u, AGGREGATOR) for u in updates.values()), return_exceptions=True)
    contributions, spent, dropped = [], {}, {}
    for owner, outcome in zip(updates, outcomes, strict=True):
        if isinstance(outcome, GONE):
            dropped[owner] = f"contribute: {outcome}"
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            contributions.append(outcome[0])
            spent[owner] = outcome[1].epsilon_spent
    return await aggregate.mean(contributions).get(), spent, dropped


async def train_fedavg(
    cluster: fedptr.Cluster,
    split: Split,
    owners: Sequence[str],
    secure: bool,
    rounds: int,
    local_steps: int,
    lr: float,
    seed: int,
    drop_one: bool,
    quiet: bool,
) -> Result:
    """`rounds` rounds of DP-FedAvg: each owner still in the run trains the global model locally
    and the mean of their updates is released by M1, or by secure aggregation with `secure`.
    With `drop_one`, the last owner's node is killed (SIGKILL) half way through the middle
    round's release (the previous round's release time tells how long that is)."""
    client = cluster.client
    data = {o: await client.worker(o).search("digits") for o in owners}
    alive = list(owners)
    model = make_linear(seed)
    spent: dict[str, float] = {}
    dropped: dict[str, str] = {}
    release_s = 0.0
    started = time.monotonic()
    report = Rounds(rounds, quiet)
    for r in range(1, rounds + 1):
        outcomes = await asyncio.gather(
            *(local_update(client, o, model, data[o], local_steps, lr) for o in alive), return_exceptions=True
        )
        updates = {}
        for owner, outcome in zip(list(alive), outcomes, strict=True):
            if isinstance(outcome, GONE):
                dropped.setdefault(owner, f"round {r}, local training: {outcome}")
                alive.remove(owner)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                updates[owner] = outcome
        release_started = time.monotonic()
        release = asyncio.ensure_future(release_mean(updates, secure))
        if drop_one and r == rounds // 2 + 1:
            # a deadline, not a sleep: the kill lands mid-release unless the release is done by then
            await asyncio.wait([release], timeout=release_s / 2)
            cluster.signal(owners[-1], signal.SIGKILL)
        mean, charged, gone = await release
        release_s = time.monotonic() - release_started
        spent.update(charged)
        for owner, why in gone.items():
            dropped.setdefault(owner, f"round {r}, {why}")
            if owner in alive:
                alive.remove(owner)
        torch.nn.utils.vector_to_parameters(flat(model) + mean, model.parameters())
        budget = f"epsilon spent up to {max(spent.values()):.2f}, {len(charged)} owners"
        report.done(r, f"{budget}  test accuracy {accuracy(model, split.test_x, split.test_y):.1%}")
    report.close()
    return Result(
        math.inf,
        accuracy(model, split.test_x, split.test_y),
        0.0,
        spent,
        (time.monotonic() - started) / rounds,
        dropped,
    )


async def run_fedavg(
    epsilon: float = 8.0,
    secure: bool = False,
    n_owners: int = 8,
    rounds: int = 10,
    local_steps: int = 10,
    lr: float = 1.0,
    seed: int = 0,
    drop_one: bool = False,
    quiet: bool = False,
) -> Result:
    """One DP-FedAvg run on its own cluster: `n_owners` owners o1, o2... (the digits split among
    them at random) with budget `epsilon`, each clipping its update to `FEDAVG_CLIP` and charging
    one Gaussian mechanism per round at the noise multiplier that makes `rounds` of them spend
    `epsilon`; the same in both modes, so M1 and secure aggregation spend the same. The aggregator
    needs every owner (``--min-owners``), or all but one with `drop_one`: secure aggregation sizes
    each owner's noise share so that that many survivors carry the full noise."""
    if n_owners < 3 or (n_owners < 4 and drop_one):
        raise ValueError("DP-FedAvg here takes at least 3 owners (4 to drop one)")
    owners = tuple(f"o{i}" for i in range(1, n_owners + 1))
    sigma = noise_for(epsilon, rounds, 1, sample_rate=1.0)
    if not quiet:
        how = "secure aggregation (SecAgg+)" if secure else "M1 (a trusted aggregator)"
        print(
            f"DP-FedAvg, {n_owners} owners, updates released by {how}: up to epsilon {epsilon * 0.99:.2f} per "
            f"owner (delta {DELTA:g}), {rounds} releases at noise multiplier {sigma:.2f}, clip {FEDAVG_CLIP:g}",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="fedptr-digits-") as tmp:
        split = split_digits(Path(tmp), seed, owners)
        owner_args = [
            *("--epsilon", str(epsilon), "--delta", str(DELTA), "--trust", AGGREGATOR),
            *("--dp-clip", str(FEDAVG_CLIP), "--dp-noise-multiplier", str(sigma)),
        ]
        roster = [a for o in owners for a in ("--owners", o)]
        need = n_owners - 1 if drop_one else n_owners
        async with fedptr.local_cluster(
            [*owners, AGGREGATOR],
            data={o: {"digits": split.files[o]} for o in owners},
            node_args={
                **{o: [*owner_args, "--store", f"{tmp}/{o}"] for o in owners},
                AGGREGATOR: ["--aggregator", *roster, "--min-owners", str(need)],
            },
        ) as cluster:
            result = await train_fedavg(cluster, split, owners, secure, rounds, local_steps, lr, seed, drop_one, quiet)
        result.epsilon = epsilon
        central = train_centralized(split, rounds * local_steps, lr, seed, make_linear)
        result.centralized_accuracy = accuracy(central, split.test_x, split.test_y)
        return result


async def run(
    epsilon: float | None = 8.0,
    rounds: int = 20,
    local_steps: int = 10,
    lr: float | None = None,
    seed: int = 0,
    quiet: bool = False,
    address: str | None = None,
) -> Result:
    """One federated run at per-owner budget `epsilon` (None: exact, no DP) on its own cluster,
    or on the running cluster at `address` (whose owners hold the digits split with `seed`),
    next to the model trained centrally. `lr` defaults to 2.0 with DP-SGD and 0.5 exact."""
    rate = lr if lr is not None else (0.5 if epsilon is None else 2.0)
    sigma = 0.0 if epsilon is None else noise_for(epsilon, rounds, local_steps)
    if epsilon is not None and not quiet:
        print(
            f"this run spends up to epsilon {epsilon * 0.99:.2f} per owner (delta {DELTA:g}): "
            f"{rounds} rounds x {local_steps} DP-SGD steps at noise multiplier {sigma:.2f}",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="fedptr-digits-") as tmp:
        split = split_digits(Path(tmp), seed)
        if address is not None:
            async with fedptr.connect(address, progress=not quiet) as client:
                if epsilon is not None:
                    await check_budgets(client, epsilon * 0.99)
                result = await train_federated(client, split, epsilon, sigma, rounds, local_steps, rate, seed, quiet)
        else:
            if epsilon is not None and not quiet:
                print(f"a fresh cluster: each owner starts with epsilon {epsilon:g}, in a temporary store", flush=True)
            async with fedptr.local_cluster(
                list(OWNERS),
                data={o: {"digits": split.files[o]} for o in OWNERS},
                node_args=node_args(epsilon, Path(tmp)),
            ) as cluster:
                result = await train_federated(
                    cluster.client, split, epsilon, sigma, rounds, local_steps, rate, seed, quiet
                )
        central = train_centralized(split, rounds * local_steps, 0.5, seed)
        result.centralized_accuracy = accuracy(central, split.test_x, split.test_y)
        return result


def plot(results: list[Result], path: Path) -> None:
    """Test accuracy against epsilon, exact federated and central as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    private = [r for r in results if math.isfinite(r.epsilon)]
    exact = [r for r in results if not math.isfinite(r.epsilon)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r.epsilon for r in private], [100 * r.federated_accuracy for r in private], "o-", label="federated, DP-SGD"
    )
    if exact:
        ax.axhline(100 * exact[0].federated_accuracy, color="tab:green", ls="--", label="federated, exact (no DP)")
    ax.axhline(100 * results[0].centralized_accuracy, color="tab:gray", ls=":", label="central, no DP")
    ax.set_xlabel("epsilon per data owner (delta 1e-5)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Digits, 2 owners: accuracy against privacy budget")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_fedavg(args: argparse.Namespace) -> None:
    if not args.epsilon or args.sweep or args.address:
        sys.exit("DP-FedAvg runs on its own cluster, at one epsilon above 0 (no --sweep, --address)")
    result = asyncio.run(
        run_fedavg(
            args.epsilon, args.secure, args.owners, args.rounds or 10, args.local_steps, 1.0, args.seed, args.drop_one
        )
    )
    for owner, why in result.dropped.items():
        print(f"{owner} dropped out: {why}")
    print(
        f"federated: {result.federated_accuracy:.1%}  central (no DP): {result.centralized_accuracy:.1%}  "
        f"epsilon spent up to {max(result.spent.values()):.2f}  {result.seconds_per_round:.2f} s per round",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilon", type=float, default=8.0, help="per-owner budget; 0 for exact (no DP)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 20; DP-FedAvg 10)")
    p.add_argument("--local-steps", type=int, default=10, help="local steps per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="epsilon 1, 4, 8 and exact")
    p.add_argument("--address", default=None, help="train on the running cluster at this address")
    p.add_argument("--plot", type=Path, default=Path("dp_accuracy.png"), help="where --sweep saves its plot")
    fedavg = p.add_argument_group("DP-FedAvg (owner-level DP: each round's mean update released by M1)")
    fedavg.add_argument("--fedavg", action="store_true", help="DP-FedAvg on its own cluster instead of DP-SGD")
    fedavg.add_argument("--secure", action="store_true", help="DP-FedAvg, the mean released by secure aggregation")
    fedavg.add_argument("--owners", type=int, default=8, help="DP-FedAvg's number of data owners")
    fedavg.add_argument("--drop-one", action="store_true", help="kill one owner's node mid-round, half way through")
    args = p.parse_args()
    if args.fedavg or args.secure:
        main_fedavg(args)
        return
    args.rounds = args.rounds or 20
    budgets: list[float | None] = [1.0, 4.0, 8.0, None] if args.sweep else [args.epsilon or None]
    results = []
    for epsilon in budgets:
        print(f"\n== epsilon {epsilon if epsilon is not None else 'exact (no DP)'} per owner ==", flush=True)
        try:
            result = asyncio.run(run(epsilon, args.rounds, args.local_steps, seed=args.seed, address=args.address))
        except CannotSpend as e:
            sys.exit(f"stopped before training: {e}")
        except fedptr.BudgetExhaustedError as e:  # the owner's own accountant has the last word
            sys.exit(f"stopped: an owner refused to spend more of its budget ({e}); spend less (--epsilon)")
        results.append(result)
        print(
            f"federated: {result.federated_accuracy:.1%}  central (no DP): {result.centralized_accuracy:.1%}  "
            f"{result.seconds_per_round:.2f} s per round",
            flush=True,
        )
    if args.sweep:
        plot(results, args.plot)
        print(f"\nplot saved to {args.plot}")


if __name__ == "__main__":
    main()
