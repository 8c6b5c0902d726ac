"""Command line of a worker node: ``python -m fedptr.nodes --name bob --broker tcp://127.0.0.1:5555``.

Registers under the name, says ``fedptr-node NAME ready`` on stdout (in the log format) and
serves until SIGINT or SIGTERM. Exits with status 3 when the broker refuses the name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fedptr import limits, logs, metrics
from fedptr.errors import FedptrError
from fedptr.security import CurveKeys

from .node import Node, NodeConfig
from .serving import running

log = logging.getLogger("fedptr.node")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedptr-node", description=__doc__)
    p.add_argument("--name", required=True, help="the worker's unique name (letters, digits, -_.)")
    p.add_argument("--broker", required=True, help="the broker's address, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--pool-size", type=int, default=limits.NODE_POOL_SIZE, help="concurrent computations")
    p.add_argument("--max-forwards", type=int, default=limits.NODE_MAX_FORWARDS, help="requests waiting at once")
    p.add_argument(
        "--offload-numel", type=int, default=limits.OFFLOAD_NUMEL, help="elements above which ops run on a thread"
    )
    p.add_argument(
        "--heartbeat-ms", type=int, default=int(limits.HEARTBEAT_INTERVAL_S * 1000), help="heartbeat interval"
    )
    p.add_argument(
        "--liveness", type=int, default=limits.HEARTBEAT_LIVENESS, help="missed beats before the broker is dead"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=limits.NODE_THREADS,
        help="torch intra-op threads in this process (0: torch's default, one per core); 1 for co-located nodes",
    )
    p.add_argument("--store", default=None, help="persist objects in this directory (restored at start)")
    p.add_argument("--max-store-bytes", type=int, default=0, help="cap on stored tensor bytes (0: none)")
    p.add_argument(
        "--max-client-objects", type=int, default=limits.CLIENT_MAX_OBJECTS, help="most objects one client holds here"
    )
    p.add_argument(
        "--max-client-bytes",
        type=int,
        default=limits.CLIENT_MAX_BYTES,
        help="most tensor bytes one client's objects hold here (0: no cap)",
    )
    p.add_argument(
        "--register-timeout", type=float, default=limits.CONNECT_TIMEOUT_S, help="seconds to get the name (s)"
    )
    p.add_argument("--curve-secret", default=None, help="this node's .key_secret file (CURVE)")
    p.add_argument("--broker-key", default=None, help="the broker's public .key file (CURVE)")
    p.add_argument("--data", action="append", default=[], metavar="TAG=PATH", help="load an .npz as private data")
    p.add_argument("--trust", action="append", default=[], metavar="WORKER", help="a worker our data may move to")
    p.add_argument(
        "--release",
        choices=["dp", "exact"],
        default="dp",
        help="dp (default): what derives from our data leaves only through DP mechanisms; exact: the analyst "
        "may fetch it exactly (no protection from the analyst)",
    )
    p.add_argument("--epsilon", type=float, default=None, help="this owner's privacy budget (needs --store)")
    p.add_argument("--delta", type=float, default=limits.DP_DELTA, help="the delta of the budget")
    p.add_argument("--dp-clip", type=float, default=limits.DP_CLIP, help="L2 bound this owner clips contributions to")
    p.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=limits.DP_NOISE_MULTIPLIER,
        help="noise multiplier this owner charges each contribution for",
    )
    p.add_argument("--aggregator", action="store_true", help="release DP means of contributions")
    p.add_argument("--owners", action="append", default=[], metavar="OWNER", help="an aggregator's roster")
    p.add_argument("--min-owners", type=int, default=limits.MIN_OWNERS, help="k: owners a release needs")
    logs.add_arguments(p)
    metrics.add_arguments(p)
    return p.parse_args(argv)


def _tag_path(text: str) -> tuple[str, str]:
    tag, sep, path = text.partition("=")
    if not sep or not tag or not path:
        raise SystemExit(f"--data takes TAG=PATH, not {text!r}")
    if not Path(path).is_file():  # refused in one line here, not as numpy's traceback once the node is built
        raise SystemExit(f"--data {text}: no such file")
    return tag, path


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config = NodeConfig(
        args.pool_size,
        args.max_forwards,
        args.offload_numel,
        args.max_store_bytes,
        args.store,
        max_client_objects=args.max_client_objects,
        max_client_bytes=args.max_client_bytes,
        data=dict(_tag_path(d) for d in args.data),
        trust=args.trust,
        release_exact=args.release == "exact",
        aggregator=args.aggregator,
        owners=args.owners,
        min_owners=args.min_owners,
        epsilon=args.epsilon,
        delta=args.delta,
        dp_clip=args.dp_clip,
        dp_noise_multiplier=args.dp_noise_multiplier,
    )
    if args.epsilon is not None and not args.store:
        log.error("fedptr-node %s: --epsilon needs --store (a budget must survive restarts)", args.name)
        return 2

    before_register: list[Callable[[Node], None]] = []
    if args.metrics_port is not None:
        before_register.append(functools.partial(serve_metrics, args.metrics_port, args.metrics_host))
    before_register.append(lambda _: settle_heap())  # last: what the others started lives on too

    try:
        async with running(
            args.name,
            args.broker,
            config,
            heartbeat_s=args.heartbeat_ms / 1000,
            liveness=args.liveness,
            connect_timeout=args.register_timeout,
            curve=CurveKeys.load(args.curve_secret, args.broker_key) if args.curve_secret else None,
            before_register=before_register,
        ):
            logging.getLogger(logs.ANNOUNCE).info("fedptr-node %s ready", args.name)  # local_cluster waits for it
            await stop.wait()
    except FedptrError as e:
        log.error("fedptr-node %s: %s", args.name, e)
        return 3
    return 0


def serve_metrics(port: int, host: str, node: Node) -> None:
    """Serve `node`'s figures on the Prometheus endpoint `host`:`port` (``--metrics-port``)."""
    metrics.serve(port, host, node.figures.collect)


def settle_heap() -> None:
    """Once started (torch imported and warmed up, data loaded, the store restored): move
    everything alive into the collector's permanent generation, where no collection traverses
    it again, and collect the young generation less often (`limits.NODE_GC_THRESHOLD`). Without
    this, the cyclic collector walked torch's ~340,000 objects every few thousand ops and the
    ops in flight every few dozen: half the node's CPU per small op. What startup made lives as
    long as the process; a cycle of it that became garbage later would never be collected."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(limits.NODE_GC_THRESHOLD, older, oldest)


def set_threads(threads: int) -> None:
    """Use `threads` torch intra-op threads (0: leave torch's default), and as many inter-op
    threads where torch still allows it (only before its first parallel work)."""
    if threads < 0:
        raise SystemExit(f"--threads takes 0 or more, not {threads}")
    if threads == 0:
        return
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # inter-op work has started: its pool's size is fixed
        torch.set_num_interop_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    logs.setup(f"node {args.name}", args.log_level, args.log_format)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
