"""Command line of the broker: ``python -m fedptr.broker --bind tcp://127.0.0.1:5555``.

Prints ``fedptr-broker listening on ENDPOINT`` once bound (a ``*`` port is resolved), then
routes until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from fedptr import limits, logs, metrics
from fedptr.security import needs_keys

from .router import Broker, BrokerConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedptr-broker", description=__doc__)
    p.add_argument("--bind", default="tcp://127.0.0.1:5555", help="endpoint to bind; tcp://HOST:* picks a free port")
    p.add_argument("--max-message-bytes", type=int, default=limits.MAX_MESSAGE_BYTES, help="largest frame accepted")
    p.add_argument("--max-peers", type=int, default=limits.BROKER_MAX_PEERS, help="most registered names")
    p.add_argument(
        "--hwm", type=int, default=limits.SOCKET_HWM, help="messages queued per peer before sends are refused"
    )
    p.add_argument(
        "--heartbeat-ms", type=int, default=int(limits.HEARTBEAT_INTERVAL_S * 1000), help="heartbeat interval"
    )
    p.add_argument("--liveness", type=int, default=limits.HEARTBEAT_LIVENESS, help="missed beats before a peer is dead")
    p.add_argument("--curve-secret", default=None, help="the broker's .key_secret file: turns CURVE on")
    p.add_argument("--allow", default=None, help="directory of allowed public keys (NAME.key binds NAME)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback tcp bind without keys")
    logs.add_arguments(p)
    metrics.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup("broker", args.log_level, args.log_format)
    if needs_keys(args.bind) and not args.curve_secret and not args.insecure:
        print(f"refusing to bind {args.bind} without keys (--curve-secret, --allow) or --insecure", file=sys.stderr)
        return 2
    if bool(args.curve_secret) != bool(args.allow):
        print("--curve-secret and --allow go together", file=sys.stderr)
        return 2
    broker = Broker(
        BrokerConfig(
            bind=args.bind,
            max_message_bytes=args.max_message_bytes,
            max_peers=args.max_peers,
            hwm=args.hwm,
            heartbeat_s=args.heartbeat_ms / 1000,
            liveness=args.liveness,
            curve_secret=args.curve_secret,
            allow=args.allow,
            timed=args.metrics_port is not None,
        )
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        broker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.metrics_port is not None:
        try:
            metrics.serve(args.metrics_port, args.metrics_host, broker.stats.collect)
        except metrics.MetricsError as e:
            print(e, file=sys.stderr)
            broker.close()
            return 2
    print(f"fedptr-broker listening on {broker.endpoint}", flush=True)
    try:
        broker.serve()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
