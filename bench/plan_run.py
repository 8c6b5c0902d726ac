"""A plan run, piece by piece: 100 dependent ``y + x`` on 4-element tensors as one plan, then get.

    .venv/bin/python -m bench.plan_run [--runs 400] [--reps 3] [--curve]

Prints, from the cheapest to the whole:

* torch's floor: the same 100 ``torch.add`` calls in a plain Python loop;
* the node's lean loop (`Compute._compute_lean`) and its whole RunPlan handler, in process
  (tests/harness.py: the real broker, node and client on one loop over inproc), median µs;
* plan + get in that process, median wall µs, and the multiparts each side sends per run;
* with ``--stages``: that in-process plan + get taken apart, the µs per run of each stage (its
  own time, without the stages it calls), from the client's building of the run to its decoding
  of the tensor; what no stage covers is the event loop and zmq's inproc queues;
* plan + get on a one-node process cluster (`fedptr.local_cluster`): median wall µs, and the CPU
  µs per run of the node, the broker and the client (every thread, from /proc; the least over
  `--reps` repetitions of `--runs` runs: the clock ticks at 10 ms, so a figure is good to
  ~10 ms / runs).

* with ``--ladder``: on that process cluster, in the same minutes (blocks of each, interleaved),
  the wall and CPU of a bare request (`Has`), one op, a plan of 1 add with and without the get,
  and of 100 adds with and without it: their differences put a figure on the round trip, the
  get that rides with the run, and the 99 further adds, end to end between processes.

Wall times on a shared machine follow its load; the CPU figures much less (tests/cpuclock.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import fedptr
from fedptr import wire
from tests import harness
from tests.cpuclock import cpu_seconds

CHAIN = 100


def _chain(y: fedptr.Pointer, x: fedptr.Pointer) -> fedptr.Pointer:
    for _ in range(CHAIN):
        y = y + x
    return y


def _median_us(ns: list[int]) -> float:
    return statistics.median(ns) / 1000


def torch_floor(reps: int = 500) -> float:
    """Least µs for `CHAIN` dependent torch.add calls on 4-element tensors."""
    x = torch.ones(4)
    best = float("inf")
    for _ in range(reps):
        y = x
        t = time.perf_counter_ns()
        for _ in range(CHAIN):
            y = torch.add(y, x)
        best = min(best, (time.perf_counter_ns() - t) / 1000)
    return best


class Stages:
    """Exclusive wall time per stage: a wrapped call's time less that of the wrapped calls it
    makes, so the stages add up to the time spent in them (wrapping costs ~0.3 µs a call)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._inner = [0]

    def wrap(self, owner: Any, attr: Any, label: str) -> None:
        """Time `owner.attr` (an instance's attribute, or a class's method for every instance)
        as `label`."""
        fn = owner[attr] if isinstance(owner, dict) else getattr(owner, attr)
        ns, calls, inner = self.ns, self.calls, self._inner
        ns.setdefault(label, 0)
        calls.setdefault(label, 0)

        def timed(*args: Any, **kwargs: Any) -> Any:
            inner.append(0)
            t = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter_ns() - t
                ns[label] += spent - inner.pop()
                calls[label] += 1
                inner[-1] += spent

        if isinstance(owner, dict):
            owner[attr] = timed
        else:
            setattr(owner, attr, timed)


def _timed(fn: Callable[..., Any], into: list[int]) -> Callable[..., Any]:
    def timed(*args: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return fn(*args)
        finally:
            into.append(time.perf_counter_ns() - t)

    return timed


async def in_process(runs: int) -> None:
    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.ones(4))
        plan = fedptr.plan(lambda y: _chain(y, x))
        await plan(x).get()
        node = c.node("bob")
        loop_ns: list[int] = []
        handler_ns: list[int] = []
        node.compute._compute_lean = _timed(node.compute._compute_lean, loop_ns)  # type: ignore[method-assign]
        node._handlers[wire.RunPlan] = _timed(node._handlers[wire.RunPlan], handler_ns)
        sent = node.link.multiparts_sent, c.client.link.multiparts_sent
        walls = []
        for _ in range(runs):
            t = time.perf_counter_ns()
            await plan(x).get()
            walls.append(time.perf_counter_ns() - t)
        node_sent = (node.link.multiparts_sent - sent[0]) / runs
        client_sent = (c.client.link.multiparts_sent - sent[1]) / runs
    loop_us, handler_us = _median_us(loop_ns), _median_us(handler_ns)
    print(f"in process: the node's lean loop {loop_us:.0f} µs, its RunPlan handler {handler_us:.0f}")
    sends = f"multiparts per run: client {client_sent:.2f}, node {node_sent:.2f}"
    print(f"in process: plan + get {_median_us(walls):.0f} µs; {sends}")


async def stages(runs: int) -> None:
    """The in-process plan + get taken apart by stage (see the module's description)."""
    from fedptr.broker.router import Broker
    from fedptr.nodes import compute, handover

    from fedptr import link, plans, pointer

    async with harness.cluster(["bob"]) as c:
        x = await c.worker("bob").send(torch.ones(4))
        chain = fedptr.plan(lambda y: _chain(y, x))
        for _ in range(50):
            await chain(x).get()
        node, client = c.node("bob"), c.client
        st = Stages()
        st.wrap(plans.Plan, "__call__", "client: the plan call (RunPlan built and queued)")
        st.wrap(pointer.Pointer, "_pending_failure", "client: get, before its request")
        st.wrap(client.link.session, "request", "client: a request encoded (session)")
        st.wrap(client.link.session, "notify", "client: a delete encoded (session)")
        st.wrap(client.link.session, "receive", "client: replies parsed, decoded, settled")
        st.wrap(client, "unwrap", "client: the tensor from the TensorReply")
        st.wrap(link, "recv_frames", "zmq receive (all three)")
        st.wrap(link, "send_frames", "zmq send (all three)")
        st.wrap(link, "events", "zmq events (all three)")
        st.wrap(link.envelope, "pack_batch", "batches packed (client and node)")
        st.wrap(Broker, "_receive", "broker: receive, parse, route")
        st.wrap(node.link.session, "receive", "node: requests parsed and decoded (session)")
        st.wrap(node.link, "handler", "node: dispatch (reply cache, figures)")
        st.wrap(node.compute.plans, "get", "node: plan lookup")
        st.wrap(node.compute, "_run_lean", "node: run checks, taints, output entries")
        st.wrap(node.compute, "_compute_lean", "node: the lean loop (100 adds)")
        st.wrap(node.compute, "_finish", "node: outputs stored, PlanReply built")
        st.wrap(node.store, "commit", "node: store.commit")
        st.wrap(node._handlers, wire.Get, "node: get handler")
        st.wrap(handover, "to_raw", "node: tensor to wire (to_raw)")
        st.wrap(node._handlers, wire.Delete, "node: delete handler")
        st.wrap(node.link.session, "reply", "node: replies encoded (session)")
        st.wrap(node, "reply", "node: reply cache and figures")
        st.wrap(compute, "dtype_name", "node: dtype names")
        walls = []
        per_run: dict[str, list[int]] = {label: [] for label in st.ns}
        for _ in range(runs):
            before = dict(st.ns)
            t = time.perf_counter_ns()
            await chain(x).get()
            walls.append(time.perf_counter_ns() - t)
            for label, ns in st.ns.items():
                per_run[label].append(ns - before[label])
    # medians: a run the machine's load stretched (other processes on its 2 cores) moves no figure
    print(f"in process, by stage (µs per plan + get, own time; median of {runs}):")
    covered = 0.0
    for label, spent in per_run.items():
        us = _median_us(spent)
        covered += us
        print(f"  {us:7.1f}  {label} ({st.calls[label] / runs:.1f} calls)")
    total = _median_us(walls)
    print(f"  {total - covered:7.1f}  the rest: the event loop's turns and wakes, futures, callbacks")
    print(f"  {total:7.1f}  plan + get (wall, median, timers included)")


async def processes(runs: int, reps: int, curve: bool) -> None:
    async with fedptr.local_cluster(["bob"], curve=curve) as cluster:
        x = await cluster.client.worker("bob").send(torch.ones(4))
        plan = fedptr.plan(lambda y: _chain(y, x))
        for _ in range(runs // 2):  # warm: kernels loaded, caches grown
            await plan(x).get()
        pids = {"node": cluster.pids["bob"], "broker": cluster.pids["broker"], "client": os.getpid()}
        cpu: dict[str, list[float]] = {p: [] for p in pids}
        walls = []
        for _ in range(reps):
            before = {p: cpu_seconds(pid) for p, pid in pids.items()}
            for _ in range(runs):
                t = time.perf_counter_ns()
                await plan(x).get()
                walls.append(time.perf_counter_ns() - t)
            for p, pid in pids.items():
                cpu[p].append((cpu_seconds(pid) - before[p]) / runs * 1e6)
    per_run = ", ".join(f"{p} {min(v):.0f}" for p, v in cpu.items())
    curved = "on" if curve else "off"
    print(f"processes (CURVE {curved}): plan + get {_median_us(walls):.0f} µs; CPU µs per run: {per_run}")


async def ladder(runs: int, reps: int, curve: bool) -> None:
    """The process cluster's plan + get against cheaper requests (see the module's description)."""
    async with fedptr.local_cluster(["bob"], curve=curve) as cluster:
        client = cluster.client
        x = await client.worker("bob").send(torch.ones(4))
        one = fedptr.plan(lambda y: y + x)
        chain = fedptr.plan(lambda y: _chain(y, x))

        async def has() -> None:
            await client.call("bob", wire.Has(x.id_at_location))

        async def op() -> None:
            await (x + x)

        async def one_run() -> None:
            await one(x)

        async def one_get() -> None:
            await one(x).get()

        async def chain_run() -> None:
            await chain(x)

        async def chain_get() -> None:
            await chain(x).get()

        steps = {
            "a bare request (Has) and its reply": has,
            "one op, awaited (x + x)": op,
            "a plan of 1 add, awaited": one_run,
            "a plan of 1 add + get": one_get,
            "a plan of 100 adds, awaited": chain_run,
            "a plan of 100 adds + get": chain_get,
        }
        for step in steps.values():  # warm: kernels loaded, plans sent, caches grown
            for _ in range(runs // 4):
                await step()
        pids = {"node": cluster.pids["bob"], "broker": cluster.pids["broker"], "client": os.getpid()}
        walls: dict[str, list[int]] = {label: [] for label in steps}
        cpu: dict[str, dict[str, list[float]]] = {label: {p: [] for p in pids} for label in steps}
        for _ in range(reps):
            for label, step in steps.items():
                before = {p: cpu_seconds(pid) for p, pid in pids.items()}
                for _ in range(runs):
                    t = time.perf_counter_ns()
                    await step()
                    walls[label].append(time.perf_counter_ns() - t)
                for p, pid in pids.items():
                    cpu[label][p].append((cpu_seconds(pid) - before[p]) / runs * 1e6)
    print(f"processes (CURVE {'on' if curve else 'off'}), median wall µs and least CPU µs per call:")
    for label in steps:
        per = ", ".join(f"{p} {min(v):.0f}" for p, v in cpu[label].items())
        print(f"  {_median_us(walls[label]):7.0f}  {label}  (CPU: {per})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stages", action="store_true", help="the in-process run taken apart by stage")
    ap.add_argument("--ladder", action="store_true", help="the process cluster's plan + get against cheaper calls")
    ap.add_argument("--curve", action="store_true", help="the process cluster with CURVE on")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; torch's floor: {torch_floor():.0f} µs for {CHAIN} adds")
    asyncio.run(in_process(args.runs))
    if args.stages:
        asyncio.run(stages(args.runs))
    asyncio.run(processes(args.runs, args.reps, args.curve))
    if args.ladder:
        asyncio.run(ladder(args.runs, args.reps, args.curve))


if __name__ == "__main__":
    main()
