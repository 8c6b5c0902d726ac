"""The client's path in one process: CPU µs per pipelined op and per awaited op, without sockets.

    .venv/bin/python -m bench.client_loop [--reps 5] [--ops 10000] [--profile pipelined|awaited]

A real `Client`, `Link` and `Session` whose socket send is stubbed by a peer that answers at
once: every request it is handed is answered with the `Ok` a node gives a 4-element float32
result, in one BATCH per loop turn (what the broker delivers for a pipelined chain), fed to the
link as its reader would. Two workloads: chains of 100 dependent ``x = x + a`` awaited at their
end (the op, its reply, and the Delete of each dropped result), and ``await (a + a)`` one at a
time. CPU time from `time.process_time`, less the stub peer's own, best of `--reps`: steadier
than the forked processes' clock-tick figures for an A/B of a change to the client, though it
leaves out zmq's per-frame calls and the event loop's polling. `--profile` prints a cProfile
of one more repetition (it inflates calls several times over: read its shares, not its times).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from fedptr import envelope, wire
from fedptr import link as linkmod
from fedptr.client import Client

CHAIN = 100
WORKER = b"bob"


class Peer:
    """The broker and the node in one stub: answers each request in the next loop turn."""

    def __init__(self, link: linkmod.Link) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.replies: list[list[Any]] = []
        self.cpu = 0.0
        """CPU seconds spent here, not the client's."""
        self.ok = wire.encode(wire.Ok([4], "float32"))

    def send_frames(self, sock: object, frames: list[Any]) -> None:
        t = time.process_time()
        for env in envelope.parse(frames):
            if env.command == envelope.REQUEST and env.rid != envelope.NO_REPLY:
                if not self.replies:
                    self.loop.call_soon(self.deliver)
                self.replies.append(envelope.message(envelope.REPLY, WORKER, env.rid, self.ok))
        self.cpu += time.process_time() - t

    def deliver(self) -> None:
        t = time.process_time()
        replies, self.replies = self.replies, []
        frames = envelope.framed(replies[0]) if len(replies) == 1 else envelope.pack_batch(replies)
        self.cpu += time.process_time() - t
        self.link._handle(self.link.session.receive(frames, self.loop.time()))


async def pipelined(client: Client, a: Any, ops: int) -> None:
    for _ in range(ops // CHAIN):
        x = a
        for _ in range(CHAIN):
            x = x + a
        await x


async def awaited(client: Client, a: Any, ops: int) -> None:
    for _ in range(ops):
        await (a + a)


async def main(reps: int, ops: int, profile: str | None, sort: str) -> None:
    linkmod.events = lambda sock: 0  # type: ignore[assignment]
    link = linkmod.Link("inproc://none", "client-bench", envelope.ROLE_CLIENT)
    peer = Peer(link)
    linkmod.send_frames = peer.send_frames  # type: ignore[assignment]
    link._sock = object()  # type: ignore[assignment]
    client = Client(link)
    a = client.worker(WORKER.decode()).send(torch.ones(4))
    await a
    workloads: dict[str, Callable[[Client, Any, int], Awaitable[None]]] = {
        "pipelined": pipelined,
        "awaited": awaited,
    }
    for name, run in workloads.items():
        await run(client, a, 2000)  # warm: the meta tables, the id pool
        figures = []
        for _ in range(reps):
            peer.cpu = 0.0
            t = time.process_time()
            await run(client, a, ops)
            await asyncio.sleep(0)  # the last deletes leave
            figures.append((time.process_time() - t - peer.cpu) / ops * 1e6)
        print(f"{name}: client CPU µs per op:", " ".join(f"{f:.1f}" for f in figures), f"best {min(figures):.1f}")
        if profile == name:
            p = cProfile.Profile()
            p.enable()
            await run(client, a, ops)
            p.disable()
            pstats.Stats(p).sort_stats(sort).print_stats(40)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--profile", choices=["pipelined", "awaited"])
    parser.add_argument("--sort", default="tottime", help="the profile's order (cProfile's sort keys)")
    args = parser.parse_args()
    asyncio.run(main(args.reps, args.ops, args.profile, args.sort))
