"""Federated-learning rounds end to end on a local cluster, as fedptr runs them today.

A round is FedAvg with exact local SGD: the client sends the global model (an
``nn.Linear(1000, 1000)``, 1,001,000 float32 parameters) to the N owners in one upload
(`fedptr.broadcast`: the broker fans it out), each owner takes
`LOCAL_STEPS` full-batch SGD steps on its own private data through pointers (`fedptr.optim.SGD`,
owners started with ``--release exact`` so that the client may fetch what they trained), the
client fetches the N trained models and averages them. The owners work concurrently.

Figures per round: seconds; bytes through the broker (what it received plus what it sent, from
the client's link counters and each node's `wire.NodeStats`), against the minimum of the
model's size times (2N + 1); and the client's upload. Also: ms per local step with minibatches of 32
(``index_select`` of 32 rows on the owner, then forward, loss, backward, step, each step
awaited), op by op and as a plan (`fedptr.plan`: one message per step, the rows drawn on the
owner), a round of minibatch steps both ways, and a round with 8 owners with torch's default
threads per node against one thread.

``bench/run.py`` runs these after its other cases; ``python bench/fl.py`` runs them alone
(``--rounds-only``: the FedAvg rounds alone, the quickest comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import optim, wire

FEATURES = 1000
ROWS = 256  # samples per owner
BATCH = 32
LOCAL_STEPS = 2
LR = 0.01
TAG = "blobs"
TIMEOUT_S = 120.0
cross_entropy = cast("Callable[..., fedptr.Pointer]", functional.cross_entropy)
"""torch's, typed for pointers (it dispatches to them through ``__torch_function__``)."""


@dataclass(frozen=True)
class FlScale:
    """How much is measured: rounds per case and minibatch steps, bounded in time too."""

    owners: tuple[int, ...]
    rounds: int
    budget: float  # most seconds per case
    batch_steps: int
    threads_rounds: int


FL_SCALES = {
    "full": FlScale((2, 8, 16), 3, 40.0, 20, 3),
    "quick": FlScale((2, 8, 16), 2, 25.0, 10, 2),
    "smoke": FlScale((2,), 1, 10.0, 3, 1),
}


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def owner_names(n: int) -> list[str]:
    return [f"owner{i}" for i in range(n)]


def write_data(directory: Path, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each owner's private data, an .npz of x (ROWS by FEATURES, float32) and y (class labels)."""
    rng = np.random.default_rng(0)
    data = {}
    for name in names:
        path = directory / f"{name}.npz"
        x = rng.standard_normal((ROWS, FEATURES), dtype=np.float32)
        np.savez(path, x=x, y=rng.integers(0, FEATURES, ROWS).astype(np.int64))
        data[name] = {TAG: str(path)}
    return data


@asynccontextmanager
async def owners_cluster(n: int, logs: Path, threads: int | None) -> AsyncIterator[fedptr.Cluster]:
    """N owners of private data that release exactly; `threads` as `local_cluster` takes it."""
    names = owner_names(n)
    with tempfile.TemporaryDirectory(prefix="fedptr-fl-") as tmp:
        async with fedptr.local_cluster(
            names,
            log_dir=logs,
            data=write_data(Path(tmp), names),
            node_args={name: ["--release", "exact"] for name in names},
            threads=threads,
            start_timeout=TIMEOUT_S,
            call_timeout=TIMEOUT_S,
        ) as cluster:
            yield cluster


async def broker_bytes(cluster: fedptr.Cluster, names: Sequence[str]) -> int:
    """Bytes the broker has received plus sent so far: every peer's sent plus received bytes."""
    client = cluster.client
    total = client.link.bytes_sent + client.link.bytes_received
    for name in names:
        reply = await client.call(name, wire.NodeStats())
        assert isinstance(reply, wire.NodeStatsReply)
        total += int(reply.figures["bytes_in"]) + int(reply.figures["bytes_out"])
    return total


class Federation:
    """The owners of a running cluster, their data's pointers, and the client's global model."""

    def __init__(self, cluster: fedptr.Cluster, n: int) -> None:
        self.cluster, self.names = cluster, owner_names(n)
        self.client = cluster.client
        torch.manual_seed(0)
        self.model = nn.Linear(FEATURES, FEATURES)

    async def setup(self) -> None:
        self.data = {name: await self.client.worker(name).search(TAG) for name in self.names}

    async def train(self, remote: fedptr.Pointer, steps: int, batch: int | None, planned: bool = False) -> nn.Module:
        """Take `steps` SGD steps on the global model's copy `remote` where it is (full batch, or
        minibatches of `batch` rows, op by op or as a plan) and fetch the trained model."""
        assert isinstance(remote, fedptr.ModulePointer)
        step = self.local_step(remote, batch, planned)
        for _ in range(steps):
            await step()
        trained = await remote.get()
        assert isinstance(trained, nn.Module)
        return trained

    def local_step(
        self, remote: fedptr.ModulePointer, batch: int | None, planned: bool
    ) -> Callable[[], fedptr.Pointer]:
        """One SGD step of `remote` on its owner's data (full batch, or `batch` rows drawn on the
        client, or, as a plan, on the owner); returns the loss's pointer."""
        x, y = self.data[remote.location]
        opt = optim.SGD(remote.parameters(), lr=LR)

        def sgd(xb: fedptr.Pointer, yb: fedptr.Pointer) -> fedptr.Pointer:
            loss = cross_entropy(remote(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        if batch is None:
            return lambda: sgd(x, y)
        if not planned:

            def by_ops() -> fedptr.Pointer:
                rows = torch.randint(0, ROWS, (batch,))
                return sgd(x.index_select(0, rows), y.index_select(0, rows))

            return by_ops
        template = self.client.worker(remote.location).send(torch.ones(batch))

        @fedptr.plan
        def minibatch(x: fedptr.Pointer, y: fedptr.Pointer, template: fedptr.Pointer) -> fedptr.Pointer:
            rows = (torch.rand_like(template) * ROWS).long()  # drawn on the owner: no upload
            return sgd(x.index_select(0, rows), y.index_select(0, rows))

        return lambda: minibatch(x, y, template)

    async def round(
        self, names: Sequence[str], steps: int = LOCAL_STEPS, batch: int | None = None, planned: bool = False
    ) -> None:
        """The global model to every owner in one upload (`fedptr.broadcast`), trained there, averaged here."""
        remotes = await fedptr.broadcast(self.model, [self.client.worker(name) for name in names])
        trained = await asyncio.gather(*(self.train(remote, steps, batch, planned) for remote in remotes))
        with torch.no_grad():
            for p, *others in zip(self.model.parameters(), *(m.parameters() for m in trained), strict=True):
                p.copy_(torch.stack(others).mean(0))

    async def timed_rounds(self, names: Sequence[str], sc: FlScale) -> dict[str, float]:
        """Median seconds per round and, from the last round, bytes through the broker and uploaded."""
        await self.round(names)  # warm-up: first sends, torch's first backward on each owner
        seconds, through, upload = [], 0, 0
        deadline = time.perf_counter() + sc.budget
        for i in range(sc.rounds):
            if i and time.perf_counter() > deadline:
                break
            before, sent = await broker_bytes(self.cluster, self.names), self.client.link.bytes_sent
            t0 = time.perf_counter()
            await self.round(names)
            seconds.append(time.perf_counter() - t0)
            upload = self.client.link.bytes_sent - sent
            through = await broker_bytes(self.cluster, self.names) - before
        return {"round_s": statistics.median(seconds), "broker_bytes": through, "upload_bytes": upload}

    async def step_ms(self, name: str, steps: int, planned: bool) -> float:
        """Milliseconds per local step with minibatches of BATCH, each step awaited."""
        remote = await self.client.worker(name).send(self.model)
        assert isinstance(remote, fedptr.ModulePointer)
        step = self.local_step(remote, BATCH, planned)
        samples = []
        for _ in range(steps):
            t0 = time.perf_counter()
            await step()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples[1:] or samples) * 1e3  # the first records the plan


def note(text: str) -> None:
    print(f"fl: {text}", file=sys.stderr, flush=True)


async def run_fl(sc: FlScale, logs: Path, rounds_only: bool = False) -> dict[str, Any]:
    """FL rounds with N owners for each N in `sc.owners` (one cluster of the largest N), then,
    unless `rounds_only`, minibatch steps and the threads comparison with 8 owners (or the
    largest N below)."""
    logs.mkdir(parents=True, exist_ok=True)
    top = max(sc.owners)
    figures: dict[str, Any] = {"model_bytes": model_bytes(nn.Linear(FEATURES, FEATURES)), "local_steps": LOCAL_STEPS}
    threads_n = min(8, top)
    async with owners_cluster(top, logs, fedptr.limits.LOCAL_CLUSTER_THREADS) as cluster:
        fed = Federation(cluster, top)
        await fed.setup()
        for n in sc.owners:
            note(f"round with {n} owners")
            figures[f"round-{n}"] = await fed.timed_rounds(fed.names[:n], sc)
        if rounds_only:
            return figures
        note("minibatch steps")
        for planned, key in ((False, "ops"), (True, "plan")):
            figures[f"batch_step_ms_{key}"] = await fed.step_ms(fed.names[0], sc.batch_steps, planned)
            t0 = time.perf_counter()
            await fed.round(fed.names[:threads_n], steps=sc.batch_steps, batch=BATCH, planned=planned)
            figures[f"batch_round_{threads_n}_s_{key}"] = time.perf_counter() - t0
        figures["threads_1_round_s"] = (await fed.timed_rounds(fed.names[:threads_n], replace_rounds(sc)))["round_s"]
    note(f"round with {threads_n} owners at torch's default threads")
    async with owners_cluster(threads_n, logs, None) as cluster:
        fed = Federation(cluster, threads_n)
        await fed.setup()
        figures["threads_default_round_s"] = (await fed.timed_rounds(fed.names, replace_rounds(sc)))["round_s"]
    figures["threads_owners"] = threads_n
    return figures


def replace_rounds(sc: FlScale) -> FlScale:
    return FlScale(sc.owners, sc.threads_rounds, sc.budget, sc.batch_steps, sc.threads_rounds)


def fl_rows(f: dict[str, Any], owners: Sequence[int]) -> list[tuple[str, str, str, str]]:
    """(what, figure, minimum or comparison, ratio) for the Markdown and text tables."""
    size = f["model_bytes"]
    out = []
    for n in owners:
        r = f[f"round-{n}"]
        minimum = size * (2 * n + 1)
        out.append(
            (
                f"FL round, {n} owners, {f['local_steps']} local steps",
                f"{r['round_s']:.2f} s; broker {r['broker_bytes'] / 1e6:,.1f} MB; client upload "
                f"{r['upload_bytes'] / 1e6:,.1f} MB",
                f"minimum model × (2N + 1) = {minimum / 1e6:,.1f} MB; one upload {size / 1e6:.1f} MB",
                f"broker {r['broker_bytes'] / minimum:.2f}×; upload {r['upload_bytes'] / size:.2f}×",
            )
        )
    if "threads_owners" not in f:
        return out  # --rounds-only
    n = f["threads_owners"]
    ops, planned = f["batch_step_ms_ops"], f["batch_step_ms_plan"]
    out.append(
        (
            "local step, minibatch of 32, awaited: a plan (one message) vs op by op",
            f"{planned:.1f} ms",
            f"{ops:.1f} ms",
            f"{planned / ops:.2f}×",
        )
    )
    ops_round, plan_round = f[f"batch_round_{n}_s_ops"], f[f"batch_round_{n}_s_plan"]
    out.append(
        (
            f"FL round, {n} owners, minibatch steps: a plan vs op by op",
            f"{plan_round:.2f} s",
            f"{ops_round:.2f} s",
            f"{plan_round / ops_round:.2f}×",
        )
    )
    out.append(
        (
            f"FL round, {n} owners, 1 torch thread per node",
            f"{f['threads_1_round_s']:.2f} s",
            f"torch's default threads {f['threads_default_round_s']:.2f} s",
            f"{f['threads_1_round_s'] / f['threads_default_round_s']:.2f}×",
        )
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(FL_SCALES), default="quick", help="rounds per case and time budget")
    p.add_argument("--owners", type=int, nargs="+", help="owner counts to measure (default: the scale's 2 8 16)")
    p.add_argument("--rounds", type=int, default=0, help="override the scale's timed rounds per case")
    p.add_argument("--rounds-only", action="store_true", help="only the FedAvg rounds: no minibatch or threads cases")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    p.add_argument("--logs", default="/tmp/fedptr-fl-logs")
    args = p.parse_args()
    sc = FL_SCALES[args.scale]
    owners = tuple(args.owners) if args.owners else sc.owners
    sc = FlScale(owners, args.rounds or sc.rounds, sc.budget, sc.batch_steps, sc.threads_rounds)
    figures = asyncio.run(run_fl(sc, Path(args.logs), args.rounds_only))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    for row in fl_rows(figures, owners):
        print(" | ".join(row))


if __name__ == "__main__":
    main()
