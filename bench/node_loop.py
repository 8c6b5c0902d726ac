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
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import torch
from fedptr.nodes.__main__ import settle_heap
from fedptr.nodes.node import Node, NodeConfig
from fedptr.nodes.store import Entry

from fedptr import envelope, wire
from fedptr import link as linkmod

CLIENT = b"client"
CHAIN = 100

Work = list[tuple[list[bytes], list[bytes], list[bytes]]]


async def main(reps: int, ops: int, profile: bool) -> None:
    linkmod.send_frames = lambda sock, frames: None  # type: ignore[assignment]
    linkmod.events = lambda sock: 0  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    link = linkmod.Link("inproc://none", "bob", envelope.ROLE_WORKER)
    link._sock = object()  # type: ignore[assignment]
    node = Node("bob", link, NodeConfig())
    link.handler = node.handle
    a_id = wire.new_object_id()
    a = Entry.tensor(torch.ones(4), owner="client")
    node.store.add(a_id, a)
    node.store.commit(a_id, a, torch.ones(4))
    rid = 0

    def request(msg: wire.Message) -> list[bytes]:
        nonlocal rid
        rid += 1
        return envelope.message(envelope.REQUEST, CLIENT, envelope.request_id_bytes(rid), wire.encode(msg))

    def build(n: int) -> Work:
        out: Work = []
        for _ in range(n // CHAIN):
            ids, msgs, prev = [], [], a_id
            for _ in range(CHAIN):
                i = wire.new_object_id()
                msgs.append(request(wire.Op(i, "add", [wire.Ref(prev), wire.Ref(a_id)], {})))
                ids.append(i)
                prev = i
            deletes = [
                envelope.message(envelope.REQUEST, CLIENT, envelope.NO_REPLY, wire.encode(d)) for d in wire.deletes(ids)
            ]
            dels = envelope.pack_batch(deletes) if len(deletes) > 1 else envelope.framed(deletes[0])
            out.append((envelope.framed(msgs[0]), envelope.pack_batch(msgs[1:]), dels))
        return out

    async def feed(work: Work) -> None:
        for first, rest, dels in work:
            link._handle(link.session.receive(first, loop.time()))
            link._handle(link.session.receive(rest, loop.time()))
            await asyncio.sleep(0)  # the replies' turn
            link._handle(link.session.receive(dels, loop.time()))
            await asyncio.sleep(0)

    await feed(build(2000))  # warm: the guard's tables, the reply cache full
    settle_heap()  # the collector as on a started node
    figures = []
    for _ in range(reps):
        work = build(ops)
        t = time.process_time()
        await feed(work)
        figures.append((time.process_time() - t) / ops * 1e6)
    print("CPU µs per op:", " ".join(f"{f:.1f}" for f in figures), f"best {min(figures):.1f}")
    if profile:
        work = build(ops)
        p = cProfile.Profile()
        p.enable()
        await feed(work)
        p.disable()
        pstats.Stats(p).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.reps, args.ops, args.profile))
