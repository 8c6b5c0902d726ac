"""The client's path in one process: CPU µs per pipelined op and per awaited op, without sockets.

    .venv/bin/python -m bench.client_loop [--reps 5] [--ops 10000] [--profile pipelined|awaited]

A real `Client`, `Link` and `Session` whose socket send is stubbed by a peer that answers at
once: every request it is handed is answered with the `Ok` a node gives a 4-element float32
result, in one BATCH per loop turn, the Oks to consecutive requests merged into one ACKS record
as a node's link merges them (what the broker delivers for a pipelined chain), fed to the
link as its reader would. Two workloads: chains of 100 dependent ``x = x + a`` awaited at their
end (the op, its reply, and the Delete of each dropped result), and ``await (a + a)`` one at a
time. CPU time from `time.process_time`, less the stub peer's own, best of `--reps`: steadier
than the forked processes' clock-tick figures for an A/B of a change to the client, though it
leaves out zmq's per-frame calls and the event loop's polling. `--profile` prints a cProfile
of one more repetition (it inflates calls several times over: read its shares, not its times).

It also prints the Python function calls the client makes per pipelined op
(`python_calls_per_op`, the stub peer's own not counted), which the load does not move:
tests/test_call_budget.py keeps it under a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
        self.busy = False
        """Whether the peer's own work is running (`python_calls_per_op` does not count it)."""
        self.ok = wire.encode(wire.Ok([4], "float32"))

    def send_frames(self, sock: object, frames: list[Any]) -> None:
        t = time.process_time()
        self.busy = True
        for env in envelope.parse(frames):
            if env.command == envelope.REQUEST and env.rid != envelope.NO_REPLY:
                if not self.replies:
                    self.loop.call_soon(self.deliver)
                reply = envelope.message(envelope.REPLY, WORKER, env.rid, self.ok)
                # as a node's link does: an Ok to the request after the last one answered joins it (an ACKS)
                merged = envelope.merged(self.replies[-1], reply) if self.replies else None
                if merged is None:
                    self.replies.append(reply)
                else:
                    self.replies[-1] = merged
        self.busy = False
        self.cpu += time.process_time() - t

    def deliver(self) -> None:
        t = time.process_time()
        self.busy = True
        replies, self.replies = self.replies, []
        frames = envelope.framed(replies[0]) if len(replies) == 1 else envelope.pack_batch(replies)
        self.busy = False
        self.cpu += time.process_time() - t
        self.link._handle(self.link.session.receive(frames, self.loop.time()))


@contextlib.asynccontextmanager
async def stubbed_client() -> AsyncIterator[tuple[Client, Peer, Any]]:
    """A client whose link's socket calls are stubbed by a `Peer`, and a pointer to a 4-element
    tensor on its worker; the link module's socket calls are put back after (a test process
    goes on with real links)."""
    send, events = linkmod.send_frames, linkmod.events
    linkmod.events = lambda sock: 0  # type: ignore[assignment]
    try:
        link = linkmod.Link("inproc://none", "client-bench", envelope.ROLE_CLIENT)
        peer = Peer(link)
        linkmod.send_frames = peer.send_frames  # type: ignore[assignment]
        link._sock = object()  # type: ignore[assignment]
        client = Client(link)
        a = client.worker(WORKER.decode()).send(torch.ones(4))
        await a
        yield client, peer, a
        client._open = False  # nothing left to send: the deletes of the last pointers are dropped
    finally:
        linkmod.send_frames, linkmod.events = send, events


async def pipelined(client: Client, a: Any, ops: int) -> None:
    for _ in range(ops // CHAIN):
        x = a
        for _ in range(CHAIN):
            x = x + a
        await x


async def awaited(client: Client, a: Any, ops: int) -> None:
    for _ in range(ops):
        await (a + a)


async def python_calls_per_op(ops: int = 1000) -> float:
    """Python function calls (C functions not counted) the client makes per pipelined op of
    the chains of `pipelined`, issuing, settling the replies and queueing the deletes, warmed
    as `main` warms it; the stub peer's own calls are not counted. A figure the load does not move."""
    calls = 0
    async with stubbed_client() as (client, peer, a):

        def count(frame: object, event: str, arg: object) -> None:
            nonlocal calls
            if event == "call" and not peer.busy:
                calls += 1

        await pipelined(client, a, 2000)
        sys.setprofile(count)
        try:
            await pipelined(client, a, ops)
            await asyncio.sleep(0)  # the last deletes leave
        finally:
            sys.setprofile(None)
    return calls / ops


async def main(reps: int, ops: int, profile: str | None, sort: str) -> None:
    async with stubbed_client() as (client, peer, a):
        await _main(client, peer, a, reps, ops, profile, sort)
    print(f"Python calls per pipelined op: {await python_calls_per_op():.1f}")


async def _main(client: Client, peer: Peer, a: Any, reps: int, ops: int, profile: str | None, sort: str) -> None:
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
