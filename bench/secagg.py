"""Secure aggregation (SecAgg+) against plain M1, per round, on a local cluster.

A round releases the DP mean of one float32 vector of `DIM` numbers per owner, from N owners:

* **M1**: each owner's `fedptr.dp.contribute` (clip, charge, send the clipped vector to the
  aggregator), then `fedptr.aggregate.mean` and a get of the mean.
* **SecAgg+**: one `fedptr.dp.secure_mean` (the joins, the aggregator's four phases with the
  owners) and a get of the mean.

Figures per round (median after a warm-up round): seconds, and bytes through the broker (what
it received plus what it sent: every peer's link counters, as bench/fl.py counts them). Then the
protocol's computation alone, in one process (nodes/secagg.py, no wire): an owner's and the
aggregator's seconds per round, with no dropout and with one owner dropped after sharing its
keys, for N up to 32; and the protocol's analytic bytes per owner.

``python bench/secagg.py`` (``--owners 2,8,16``, ``--rounds 5``, ``--dim 100000``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fedptr.nodes import secagg

import fedptr
from fedptr import aggregate, dp, limits

sys.path.insert(0, str(Path(__file__).parent))
from fl import broker_bytes  # bench/ is not a package

TIMEOUT_S = 600.0
SIGMA = 1.0
EPSILON = 1e6


async def cluster_rounds(n: int, dim: int, rounds: int) -> dict[str, tuple[float, int]]:
    """Median seconds and bytes per round of M1 and of SecAgg+ with `n` owners."""
    owners = [f"o{i:02d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for o in owners:
            np.savez(f"{tmp}/{o}.npz", x=rng.normal(scale=0.01, size=(4, dim)).astype(np.float32))
        owner = ["--trust", "agg", "--epsilon", str(EPSILON), "--dp-noise-multiplier", str(SIGMA)]
        roster = [a for o in owners for a in ("--owners", o)]
        async with fedptr.local_cluster(
            [*owners, "agg"],
            data={o: {"d": f"{tmp}/{o}.npz"} for o in owners},
            node_args={
                **{o: [*owner, "--store", f"{tmp}/{o}"] for o in owners},
                "agg": ["--aggregator", *roster, "--min-owners", str(max(2, n - n // 8))],
            },
            start_timeout=TIMEOUT_S,
            call_timeout=TIMEOUT_S,
        ) as c:
            values = []
            for o in owners:
                (x,) = await c.client.worker(o).search("d")
                values.append(x.mean(0))

            async def m1() -> None:
                contributions = await asyncio.gather(*(dp.contribute(v, "agg") for v in values))
                await aggregate.mean([p for p, _ in contributions]).get()

            async def secure() -> None:
                mean, _ = await dp.secure_mean(values, "agg")
                await mean.get()

            out = {}
            for name, round_ in (("M1", m1), ("SecAgg+", secure)):
                seconds, traffic = [], []
                for i in range(rounds + 1):
                    before, start = await broker_bytes(c, [*owners, "agg"]), time.perf_counter()
                    await round_()
                    elapsed = time.perf_counter() - start
                    after = await broker_bytes(c, [*owners, "agg"])
                    if i:  # the first round warms up
                        seconds.append(elapsed)
                        traffic.append(after - before)
                out[name] = (statistics.median(seconds), int(statistics.median(traffic)))
            return out


def protocol_seconds(n: int, dim: int, dropped: int) -> tuple[float, float]:
    """Seconds of the slowest owner's computation (its shares, then its masked input) and of the
    aggregator's unmasking in a round of `n` owners, `dropped` of which drop after sharing
    their keys (in one process, no wire)."""
    config = secagg.Config(secrets.token_bytes(16), tuple(f"o{i:02d}" for i in range(n)), dim, 0, 2, 1.0, SIGMA)
    rng = np.random.default_rng(0)
    value = np.full(dim, 0.5 / np.sqrt(dim))
    owners = {o: secagg.Owner(o) for o in config.owners}
    agg = secagg.Aggregator(config)
    relayed = agg.relay_keys({o: w.advertise() for o, w in owners.items()})
    share_s, mask_s = 0.0, 0.0
    sent = {}
    for o in relayed:
        t = time.perf_counter()
        sent[o] = owners[o].share_keys(config, relayed)
        share_s = max(share_s, time.perf_counter() - t)
    inbox = agg.route_shares(sent)
    masked = {}
    for o in config.owners[dropped:]:
        t = time.perf_counter()
        masked[o] = owners[o].masked_input(value, inbox[o], rng)
        mask_s = max(mask_s, time.perf_counter() - t)
    request = agg.collect(masked)
    answers = {o: owners[o].unmask(request, request.survivors) for o in request.survivors}
    t = time.perf_counter()
    agg.finish(answers)
    return share_s + mask_s, time.perf_counter() - t


def analytic_bytes(n: int, dim: int) -> int:
    """Bytes one owner sends in a round, payloads only: two public keys, an encrypted pair of
    shares per neighbour, its masked input, one share per neighbour when unmasking, and its
    check of each neighbour's keys (a round id out, two keys and two floats back)."""
    k = secagg.Config(bytes(16), tuple(f"o{i:02d}" for i in range(n)), dim, 0, 2, 1.0, SIGMA).degree
    ciphertext = 2 * secagg.SHARE_BYTES + 16
    ring = 4 if limits.SECAGG_RING_BITS <= 32 else 8
    key_check = 16 + 64 + 16
    return 64 + k * ciphertext + dim * ring + k * secagg.SHARE_BYTES + k * key_check


def flower_protocol(n: int, dim: int, dropped: int) -> tuple[float, float, int] | None:
    """Flower 1.42's SecAgg+ on the same workload, its own code in one process (no gRPC, no
    SuperLink): each owner's stages of `secaggplus_mod` (setup, share keys, masked vector) and
    the server's unmasking steps of `SecAggPlusWorkflow.unmask_stage` with Flower's primitives,
    with as many neighbours and the same threshold as ours. Returns the slowest owner's seconds,
    the server's unmasking seconds and the payload bytes one owner sends (keys, ciphertexts,
    masked vector, unmask shares); None where flwr is not installed."""
    try:
        # the package's own name `secaggplus_mod` is the mod function, not its module
        fm = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
        from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
        from flwr.common.secure_aggregation import ndarrays_arithmetic as fa
        from flwr.common.secure_aggregation import quantization as fq
        from flwr.common.secure_aggregation.crypto import shamir
        from flwr.common.secure_aggregation.secaggplus_constants import Key
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    except ImportError:
        return None
    ours = secagg.Config(bytes(16), tuple(f"o{i:02d}" for i in range(n)), dim, 0, 2, 1.0, SIGMA)
    shares, threshold = min(n, ours.degree + 1), ours.threshold  # Flower counts the owner in its neighbours
    nids = list(range(1, n + 1))
    half = shares >> 1
    neighbours = {nid: {nids[(i + o) % n] for o in range(-half, half + 1)} for i, nid in enumerate(nids)}
    setup: dict[str, Any] = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 1 << 22,
        Key.MOD_RANGE: 1 << 32,
        Key.MAX_WEIGHT: 1.0,  # each owner weighs 1 (a larger bound costs precision)
    }
    states = {nid: fm.SecAggPlusState(nid=nid) for nid in nids}
    owner_s = dict.fromkeys(nids, 0.0)
    sent = dict.fromkeys(nids, 0)

    def timed(nid: int, stage: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        out = stage()
        owner_s[nid] += time.perf_counter() - start
        sent[nid] += sum(
            len(b) for v in out.values() for b in (v if isinstance(v, list) else [v]) if isinstance(b, bytes)
        )
        return out

    keys = {nid: timed(nid, lambda nid=nid: fm._setup(states[nid], setup)) for nid in nids}  # type: ignore[arg-type]
    inbox: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in nids}
    for nid in nids:
        relayed = {str(j): [keys[j][Key.PUBLIC_KEY_1], keys[j][Key.PUBLIC_KEY_2]] for j in neighbours[nid]}
        out = timed(nid, lambda nid=nid, relayed=relayed: fm._share_keys(states[nid], relayed))  # type: ignore[arg-type]
        for dst, ciphertext in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST], strict=True):  # type: ignore[arg-type]
            inbox[dst][0].append(nid)
            inbox[dst][1].append(ciphertext)
    active, dead = set(nids[dropped:]), set(nids[:dropped])
    value = ndarrays_to_parameters([np.full(dim, 0.5 / np.sqrt(dim), dtype=np.float32)])
    total = None
    for nid in sorted(active):
        ask = {Key.CIPHERTEXT_LIST: inbox[nid][1], Key.SOURCE_LIST: inbox[nid][0]}
        out = timed(nid, lambda nid=nid, ask=ask: fm._collect_masked_vectors(states[nid], ask, 1, value))  # type: ignore[arg-type]
        masked = [bytes_to_ndarray(b) for b in out[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
        total = masked if total is None else fa.parameters_addition(total, masked)
    collected: dict[int, list[bytes]] = {nid: [] for nid in nids}
    for nid in sorted(active):
        ask = {
            Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active),
            Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead),
        }
        out = timed(nid, lambda nid=nid, ask=ask: fm._unmask(states[nid], ask))  # type: ignore[arg-type]
        for owner, share in zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST], strict=True):  # type: ignore[arg-type]
            collected[owner].append(share)
    assert total is not None
    start = time.perf_counter()  # the server's unmasking, as SecAggPlusWorkflow.unmask_stage does it
    shape = fa.get_parameters_shape(total)
    for nid, share_list in collected.items():
        secret = shamir.combine_shares(share_list)
        if nid in active:
            total = fa.parameters_subtraction(total, pseudo_rand_gen(secret, 1 << 32, shape))
            continue
        for peer in neighbours[nid] - {nid}:
            shared = fm.generate_shared_key(
                fm.bytes_to_private_key(secret),
                fm.bytes_to_public_key(keys[peer][Key.PUBLIC_KEY_1]),  # type: ignore[arg-type]
            )
            mask = pseudo_rand_gen(shared, 1 << 32, shape)
            total = fa.parameters_addition(total, mask) if nid > peer else fa.parameters_subtraction(total, mask)
    weight, unmasked = fa.factor_extract(fa.parameters_mod(total, 1 << 32))
    (got,) = fq.dequantize(unmasked, 8.0, 1 << 22)
    server_s = time.perf_counter() - start
    # the workflow's offset, and its division by the weights: the mean
    got = (got - (len(active) - 1) * 8.0) * ((1 << 22) / weight)
    assert np.allclose(got, 0.5 / np.sqrt(dim), atol=1e-4), "Flower's mean did not unmask"
    return max(owner_s[nid] for nid in active), server_s, sent[nids[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--owners", default="2,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=100_000)
    parser.add_argument("--protocol-owners", default="2,8,16,32")
    args = parser.parse_args()
    dim = args.dim
    print(f"vector of {dim} float32 ({dim * 4 / 1e6:.1f} MB) per owner, sigma {SIGMA}")
    print("| owners | M1 s | SecAgg+ s | ratio | M1 MB | SecAgg+ MB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, filter(None, args.owners.split(","))):  # --owners "": the protocol alone
        r = asyncio.run(cluster_rounds(n, dim, args.rounds))
        (m1_s, m1_b), (sa_s, sa_b) = r["M1"], r["SecAgg+"]
        times = f"{m1_s:.3f} | {sa_s:.3f} | {sa_s / m1_s:.2f}x"
        print(f"| {n} | {times} | {m1_b / 1e6:.1f} | {sa_b / 1e6:.1f} | {sa_b / m1_b:.2f}x |")
    print()
    print("| owners | degree k | owner s | aggregator s | aggregator s, 1 dropped | analytic bytes/owner | d x 4 B |")
    print("|---|---|---|---|---|---|---|")
    for n in map(int, args.protocol_owners.split(",")):
        k = secagg.Config(bytes(16), tuple(f"o{i:02d}" for i in range(n)), dim, 0, 2, 1.0, SIGMA).degree
        owner_s, agg_s = protocol_seconds(n, dim, 0)
        drop = f"{protocol_seconds(n, dim, 1)[1]:.3f}" if n > 2 else "-"  # 2 owners cannot lose one
        print(f"| {n} | {k} | {owner_s:.3f} | {agg_s:.3f} | {drop} | {analytic_bytes(n, dim):,} | {dim * 4:,} |")
    print()
    if flower_protocol(2, 10, 0) is None:
        print("Flower's SecAgg+: skipped, flwr is not installed (pip install flwr==1.42 to compare)")
        return
    print("Flower 1.42's SecAgg+ (secaggplus_mod and the workflow's unmasking, in one process, no wire):")
    print("| owners | owner s | server s | server s, 1 dropped | payload bytes/owner |")
    print("|---|---|---|---|---|")
    for n in map(int, args.protocol_owners.split(",")):
        flower = flower_protocol(n, dim, 0)
        assert flower is not None
        drop = f"{flower_protocol(n, dim, 1)[1]:.3f}" if n > 2 else "-"  # type: ignore[index]
        print(f"| {n} | {flower[0]:.3f} | {flower[1]:.3f} | {drop} | {flower[2]:,} |")


if __name__ == "__main__":
    main()
