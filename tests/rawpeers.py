"""Lightweight raw peers for the departure test: N DEALER sockets that speak the wire protocol
through `fedptr.envelope` and `fedptr.wire` alone (no torch, no asyncio).

``python -m tests.rawpeers ADDRESS N TARGET BEAT_S`` registers ``raw-<pid>-<i>`` for i < N as
clients, has each ask worker TARGET one question (so its departure concerns TARGET), prints
``ready`` and then beats every BEAT_S seconds until stdin says ``disconnect`` (every peer says
goodbye and the process exits) or the process is stopped or killed.
"""

from __future__ import annotations

import os
import select
import sys
import time

import zmq

from fedptr import envelope, wire

SETUP_TIMEOUT_S = 120.0


def _drain(socks: list[zmq.Socket[bytes]], poller: zmq.Poller, timeout_ms: int) -> dict[bytes, int]:
    """Receive what waits on every socket; counts of the commands seen."""
    seen: dict[bytes, int] = {}
    for sock, _ in poller.poll(timeout_ms):
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            for env in envelope.parse(frames):
                seen[env.command] = seen.get(env.command, 0) + 1
    return seen


def _await_all(
    socks: list[zmq.Socket[bytes]], poller: zmq.Poller, command: bytes, count: int, what: str, beat_s: float
) -> None:
    """Wait until `count` messages `command` arrived, beating meanwhile so that no peer is
    taken for silent while the others are set up."""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    got = 0
    next_beat = time.monotonic() + beat_s
    while got < count:
        now = time.monotonic()
        if now > deadline:
            raise SystemExit(f"rawpeers: {got}/{count} {what} within {SETUP_TIMEOUT_S} s")
        if now >= next_beat:
            _beat(socks)
            next_beat = now + beat_s
        got += _drain(socks, poller, 20).get(command, 0)


def _beat(socks: list[zmq.Socket[bytes]]) -> None:
    beat = envelope.build(envelope.HEARTBEAT, b"", envelope.NO_REPLY)
    for sock in socks:
        sock.send_multipart(beat)


def main(address: str, n: int, target: str, beat_s: float) -> int:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 64)
    socks: list[zmq.Socket[bytes]] = []
    poller = zmq.Poller()
    for i in range(n):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
        name = f"raw-{os.getpid()}-{i}".encode()
        sock.send_multipart(envelope.build(envelope.REGISTER, name, envelope.request_id_bytes(1), envelope.ROLE_CLIENT))
    _await_all(socks, poller, envelope.ACCEPTED, n, "registered", beat_s)
    body = wire.encode(wire.Search("nothing"))
    for sock in socks:
        sock.send_multipart(envelope.build(envelope.REQUEST, target.encode(), envelope.request_id_bytes(2), *body))
    _await_all(socks, poller, envelope.REPLY, n, "answered", beat_s)
    print("ready", flush=True)
    while True:
        _beat(socks)
        _drain(socks, poller, 0)
        readable, _, _ = select.select([sys.stdin], [], [], beat_s)
        if readable and sys.stdin.readline().strip() == "disconnect":
            bye = envelope.build(envelope.DISCONNECT, b"", envelope.NO_REPLY)
            for sock in socks:
                sock.send_multipart(bye)
            for sock in socks:
                sock.close(linger=1000)
            ctx.term()
            print("gone", flush=True)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])))
