"""Federated averaging with a trusted aggregator, on scikit-learn's handwritten digits.

PySyft 0.2's Part 4, with its privacy promise enforced by the workers: the digits are split
non-IID between bob and alice as private data; each round the global model trains E local
steps where the data lives, the updated models (``--mode models``) or the gradients
(``--mode gradients``) move straight to secure_worker, and only their weighted mean comes back.
The client never sees an individual update, gradient, loss or data sample: those gets are
refused. At the end it prints the accuracy next to the same model trained centrally.

    python examples/federated_average.py [--rounds 20] [--local-steps 10] [--mode models]

On a terminal the rounds show as a progress bar (elsewhere, one line per round). With
``--address`` it trains on a running cluster instead of starting one, e.g. the Part 4 setup:

    python examples/prepare_digits.py && fedptr up examples/cluster.toml --detach
    python examples/federated_average.py --address tcp://127.0.0.1:5555
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import aggregate, optim

OWNERS = ("bob", "alice")
AGGREGATOR = "secure_worker"


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
    federated_accuracy: float
    centralized_accuracy: float
    released_losses: list[float] = field(default_factory=list)


def split_digits(directory: Path, seed: int) -> Split:
    """Digits scaled to [0, 1]; a stratified 75/25 train/test split; the training part split
    non-IID: bob holds 80% of the 0-4s and 20% of the 5-9s, alice the rest."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    r = rng.random(len(y_train))
    to_bob = ((y_train < 5) & (r < 0.8)) | ((y_train >= 5) & (r < 0.2))
    files, counts = {}, {}
    for owner, mask in (("bob", to_bob), ("alice", ~to_bob)):
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


def progress(done: int, total: int, loss: float, acc: float, width: int = 30) -> str:
    filled = round(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] round {done:>3}/{total}  loss {loss:.4f}  test accuracy {acc:.1%}"


class Rounds:
    """Reports each round: a rich progress bar on a terminal, a printed line elsewhere, nothing when quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.bar: Progress | None = None
        if not quiet and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn("rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def done(self, r: int, loss: float, acc: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=r, description=f"loss {loss:.4f}  test accuracy {acc:.1%}")
        elif not self.quiet:
            print(progress(r, self.total, loss, acc), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


async def train_federated(
    client: fedptr.Client, split: Split, rounds: int, local_steps: int, lr: float, mode: str, seed: int, quiet: bool
) -> tuple[nn.Module, list[float]]:
    report = Rounds(rounds, quiet)
    try:
        return await _train(client, split, rounds, local_steps, lr, mode, seed, report)
    finally:
        report.close()


async def _train(
    client: fedptr.Client, split: Split, rounds: int, local_steps: int, lr: float, mode: str, seed: int, report: Rounds
) -> tuple[nn.Module, list[float]]:
    secure = client.worker(AGGREGATOR)
    data = {o: await client.worker(o).search("digits") for o in OWNERS}  # [x, y] on each owner
    weights = [split.counts[o] for o in OWNERS]
    model = make_model(seed)
    losses: list[float] = []
    for r in range(1, rounds + 1):
        updates, round_losses = [], []
        for owner in OWNERS:
            remote = await client.worker(owner).send(model)
            assert isinstance(remote, fedptr.ModulePointer)
            x, y = data[owner]
            opt = optim.SGD(remote.parameters(), lr=lr)
            for _ in range(local_steps if mode == "models" else 1):
                loss = functional.cross_entropy(remote(x), y)
                await loss.backward()
                if mode == "models":
                    await opt.step()
                    await opt.zero_grad()
            if mode == "models":
                updates.append(await remote.move(secure))
            else:
                updates.append([await p.grad.move(secure) for p in remote.parameters()])
            round_losses.append(await loss.move(secure))
        # the only things that come back: weighted means over both owners
        if mode == "models":
            per_param = zip(*[u.parameters() for u in updates], strict=True)  # type: ignore[attr-defined]
        else:
            per_param = zip(*updates, strict=True)
        averaged = [await aggregate.weighted_mean(list(ps), weights).get() for ps in per_param]
        released_loss = await aggregate.weighted_mean(round_losses, weights).get()
        with torch.no_grad():
            for p, avg in zip(model.parameters(), averaged, strict=True):
                if mode == "models":
                    p.copy_(avg)  # type: ignore[arg-type]
                else:
                    p.sub_(lr * avg)  # type: ignore[operator]
        losses.append(float(released_loss))  # type: ignore[arg-type]
        report.done(r, losses[-1], accuracy(model, split.test_x, split.test_y))
    return model, losses


def train_centralized(split: Split, steps: int, lr: float, seed: int) -> nn.Module:
    """The same model, trained the same number of steps on the pooled data in one place."""
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        functional.cross_entropy(model(split.pooled_x), split.pooled_y).backward()
        opt.step()
    return model


async def run(
    rounds: int = 20,
    local_steps: int = 10,
    lr: float = 0.5,
    mode: str = "models",
    seed: int = 0,
    quiet: bool = False,
    cluster: fedptr.Cluster | None = None,
    address: str | None = None,
) -> Result:
    """Train both ways and return the two accuracies. Starts its own cluster unless given one,
    or the `address` of a running one (either must have bob and alice holding `digits` data,
    split with this `seed`, and an aggregator secure_worker)."""
    with tempfile.TemporaryDirectory(prefix="fedptr-digits-") as tmp:
        split = split_digits(Path(tmp), seed)
        if address is not None:
            async with fedptr.connect(address, progress=not quiet) as client:
                model, losses = await train_federated(client, split, rounds, local_steps, lr, mode, seed, quiet)
        elif cluster is None:
            async with fedptr.local_cluster(
                [*OWNERS, AGGREGATOR],
                data={o: {"digits": split.files[o]} for o in OWNERS},
                node_args={
                    "bob": ["--trust", AGGREGATOR],
                    "alice": ["--trust", AGGREGATOR],
                    AGGREGATOR: ["--aggregator"],
                },
            ) as own:
                model, losses = await train_federated(own.client, split, rounds, local_steps, lr, mode, seed, quiet)
        else:
            model, losses = await train_federated(cluster.client, split, rounds, local_steps, lr, mode, seed, quiet)
        steps = rounds * (local_steps if mode == "models" else 1)
        central = train_centralized(split, steps, lr, seed)
        return Result(
            accuracy(model, split.test_x, split.test_y), accuracy(central, split.test_x, split.test_y), losses
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=10, help="local SGD steps per round (models mode)")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--mode", choices=["models", "gradients"], default="models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default=None, help="train on the running cluster whose broker is here")
    args = p.parse_args()
    started = time.monotonic()
    result = asyncio.run(run(args.rounds, args.local_steps, args.lr, args.mode, args.seed, address=args.address))
    gap = (result.centralized_accuracy - result.federated_accuracy) * 100
    print(f"\nfederated ({args.mode}, {args.rounds} rounds): {result.federated_accuracy:.1%} test accuracy")
    print(f"centralized (pooled data, same steps):  {result.centralized_accuracy:.1%} test accuracy")
    print(f"gap: {gap:+.1f} points (target: within 2); {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
