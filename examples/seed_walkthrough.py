"""The seed tutorial (PySyft 0.2, Part 3: Advanced Remote Execution Tools) across real processes.

Starts a broker and two worker processes, bob and alice, then runs the twelve steps of
shared/seed/SCENARIO.md, printing both stores after each step as the tutorial does.
Run: ``python examples/seed_walkthrough.py``.
"""

from __future__ import annotations

import asyncio

import torch

import fedptr


async def show(step: int, what: str, bob: fedptr.Worker, alice: fedptr.Worker) -> None:
    print(f"\nstep {step:>2}: {what}")
    for name, worker in (("    bob", bob), ("  alice", alice)):  # ids as the pointers' reprs show them
        print(f"{name}:", await worker.objects())


async def main() -> None:
    async with fedptr.local_cluster(["bob", "alice"]) as cluster:
        client = cluster.client
        bob, alice = client.worker("bob"), client.worker("alice")
        print(f"broker at {cluster.address}; processes {cluster.pids}")

        print("\n== 3.1 Pointers to pointers ==")
        await show(1, "bob and alice exist", bob, alice)
        x = torch.tensor([1, 2, 3, 4])
        print(f"\nstep  2: x = {x!r} (local)")
        x_ptr = await bob.send(x)
        await show(3, f"x_ptr = x.send(bob) -> {x_ptr!r}", bob, alice)
        pointer_to_x_ptr = await x_ptr.send(alice)
        await show(4, f"pointer_to_x_ptr = x_ptr.send(alice) -> {pointer_to_x_ptr!r}", bob, alice)
        x_ptr = await pointer_to_x_ptr.get()
        await show(5, f"x_ptr = pointer_to_x_ptr.get() -> {x_ptr!r}", bob, alice)
        x = await x_ptr.get()
        await show(6, f"x = x_ptr.get() -> {x!r}", bob, alice)

        print("\n== 3.1 Arithmetic on pointer -> pointer -> data ==")
        p2p2x = await (await bob.send(torch.tensor([1, 2, 3, 4, 5]))).send(alice)
        await show(7, "p2p2x = torch.tensor([1,2,3,4,5]).send(bob).send(alice)", bob, alice)
        y = p2p2x + p2p2x
        await show(8, "y = p2p2x + p2p2x (runs on bob, where the data lives)", bob, alice)
        result = await (await y.get()).get()
        await show(9, f"y.get().get() -> {result!r}", bob, alice)
        result = await (await p2p2x.get()).get()
        await show(10, f"p2p2x.get().get() -> {result!r}", bob, alice)

        print("\n== 3.2 Operations on the end of a chain ==")
        x = await bob.send(torch.tensor([1, 2, 3, 4, 5]))
        await show(11, "x = torch.tensor([1,2,3,4,5]).send(bob)", bob, alice)
        before = client.bytes_received
        x = await x.move(alice)
        await show(12, f"x = x.move(alice) -> {x!r}", bob, alice)
        print(f"\nthe move brought {client.bytes_received - before} bytes to the client, none of them the tensor's")


if __name__ == "__main__":
    asyncio.run(main())
