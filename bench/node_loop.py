"""The node's request path in one process: CPU µs per small pipelined op, without sockets.

    .venv/bin/python -m bench.node_loop [--reps 5] [--ops 10000] [--profile]

A real `Link` (its two socket calls stubbed: nothing is sent, no events are polled), `Session`
and `Node` are fed what the broker delivers for the chains `tests.cpuclock` runs: 100 dependent
``x + a`` on 4-element tensors, the first alone and the other 99 in one BATCH, then the client's
Deletes of the results. CPU time from `time.process_time` (this process alone, µs resolution),
best of `--reps` repetitions: steadier than the forked node's clock-tick figures for an A/B
of a change to the node or the wire codec, though it leaves out zmq's per-frame calls and the
event loop's polling (the forked node spends ~8 µs more per op). `--profile` prints a cProfile
of one more repetition (it inflates calls several times over: read its shares, not its times).
It also prints the Python function calls per op (`python_calls_per_op`), which the load does not
move: tests/test_cpu_budget.py keeps it under a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import sys
import time
from collections.abc import Iterator

import torch
from fedptr.nodes.__main__ import settle_heap
from fedptr.nodes.node import Node, NodeConfig
from fedptr.nodes.store import Entry

from fedptr import envelope, wire
from fedptr import link as linkmod

CLIENT = b"client"
CHAIN = 100

Work = list[tuple[list[bytes], list[bytes], list[bytes]]]


@contextlib.contextmanager
def stubbed_sockets() -> Iterator[None]:
    """The link's two socket calls stubbed (nothing is sent, no events are polled), and put
    back after: a test process goes on with real links."""
    send, events = linkmod.send_frames, linkmod.events
    linkmod.send_frames = lambda sock, frames: None  # type: ignore[assignment]
    linkmod.events = lambda sock: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        linkmod.send_frames, linkmod.events = send, events


class Harness:
    """A node fed as the broker feeds it, its link's two socket calls stubbed (see the module's
    docstring): `build` makes the work, `feed` hands it to the session as received multiparts."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.link = link = linkmod.Link("inproc://none", "bob", envelope.ROLE_WORKER)
        link._sock = object()  # type: ignore[assignment]
        self.node = node = Node("bob", link, NodeConfig())
        link.handler = node.handle
        link.run_handler = node.handle_ops
        self.a_id = wire.new_object_id()
        a = Entry.tensor(torch.ones(4), owner="client")
        node.store.add(self.a_id, a)
        node.store.commit(self.a_id, a, torch.ones(4))
        self.rid = 0

    def request(self, msg: wire.Message) -> list[bytes]:
        self.rid += 1
        return envelope.message(envelope.REQUEST, CLIENT, envelope.request_id_bytes(self.rid), wire.encode(msg))

    def build(self, n: int) -> Work:
        """`n` ops, as chains of `CHAIN`, each chain with its deletes."""
        out: Work = []
        for _ in range(n // CHAIN):
            ids, msgs, prev = [], [], self.a_id
            for _ in range(CHAIN):
                i = wire.new_object_id()
                msgs.append(self.request(wire.Op(i, "add", [wire.Ref(prev), wire.Ref(self.a_id)], {})))
                ids.append(i)
                prev = i
            deletes = [
                envelope.message(envelope.REQUEST, CLIENT, envelope.NO_REPLY, wire.encode(d)) for d in wire.deletes(ids)
            ]
            dels = envelope.pack_batch(deletes) if len(deletes) > 1 else envelope.framed(deletes[0])
            out.append((envelope.framed(msgs[0]), envelope.pack_batch(msgs[1:]), dels))
        return out

    async def feed(self, work: Work) -> None:
        link, loop = self.link, self.loop
        for first, rest, dels in work:
            link._handle(link.session.receive(first, loop.time()))
            link._handle(link.session.receive(rest, loop.time()))
            await asyncio.sleep(0)  # the replies' turn
            link._handle(link.session.receive(dels, loop.time()))
            await asyncio.sleep(0)


async def python_calls_per_op(ops: int = 1000) -> float:
    """Python function calls (C functions not counted) the node's request path makes per op,
    warmed as `main` warms it: a figure that does not move with the machine's load."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    with stubbed_sockets():
        harness = Harness()
        await harness.feed(harness.build(2000))
        work = harness.build(ops)
        sys.setprofile(count)
        try:
            await harness.feed(work)
        finally:
            sys.setprofile(None)
        await harness.node.aclose()
    return calls / ops


async def main(reps: int, ops: int, profile: bool) -> None:
    with stubbed_sockets():
        await _main(reps, ops, profile)
    print(f"Python calls per op: {await python_calls_per_op():.1f}")


async def _main(reps: int, ops: int, profile: bool) -> None:
    harness = Harness()
    await harness.feed(harness.build(2000))  # warm: the guard's tables, the reply cache full
    settle_heap()  # the collector as on a started node
    figures = []
    for _ in range(reps):
        work = harness.build(ops)
        t = time.process_time()
        await harness.feed(work)
        figures.append((time.process_time() - t) / ops * 1e6)
    print("CPU µs per op:", " ".join(f"{f:.1f}" for f in figures), f"best {min(figures):.1f}")
    if profile:
        work = harness.build(ops)
        p = cProfile.Profile()
        p.enable()
        await harness.feed(work)
        p.disable()
        pstats.Stats(p).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.reps, args.ops, args.profile))
