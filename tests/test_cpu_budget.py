"""The per-op CPU guard: a change that makes the node's hot path cost half again as much fails CI.

CPU time per small pipelined op in the node, the broker and the client (tests/cpuclock.py) is
compared with the figures stored in tests/cpu_baseline.json, scaled by a fixed reference
workload measured before each repetition (`cpuclock.reference`): the same commit costs 23 µs
per op on one VM and 43-77 on another, whose speed moves by half within minutes.
``python -m tests.cpuclock --write`` measures and stores them again, after a deliberate change
of cost. Only the node's figure is guarded: it is the bottleneck of every pipelined figure, and
at tens of µs per op it is many clock ticks above the clock's resolution (the broker's and the
client's are printed, for the record).
"""

from __future__ import annotations

import gc

import pytest
import torch

import fedptr
from tests import cpuclock

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

GROWTH = 1.5
"""How much more CPU per op than the baseline the node may spend before the guard fails."""
ATTEMPTS = 3
"""Measures before the guard fails: noise only ever adds CPU (the node's figure over the
reference's moved between 9.4 and 13.3 on one VM, the baseline's 10.2), a dearer hot path fails
every one."""


async def test_node_cpu_per_pipelined_op_within_budget() -> None:
    baseline = cpuclock.load_baseline()
    base = baseline["cpu_us_per_op"]["node"]
    seen = []
    for _ in range(ATTEMPTS):
        runs = await cpuclock.measure()
        now, speed = cpuclock.per_op(runs), cpuclock.reference(runs) / baseline["reference"]
        print(f"CPU µs per op now {now} (machine {speed:.2f}× the baseline's); baseline {baseline}; runs {runs}")
        seen.append(f"{now['node']:.1f} µs against {base * speed * GROWTH:.1f} (machine {speed:.2f}×)")
        if now["node"] <= base * speed * GROWTH:
            return
    raise AssertionError(
        f"the node spends more than {GROWTH}× the baseline's {base:.1f} µs of CPU per small pipelined op, scaled "
        f"to this machine, in {ATTEMPTS} measures: {'; '.join(seen)}; find what made the hot path dearer, or, if "
        "the cost is deliberate, store a new baseline with `python -m tests.cpuclock --write`"
    )


TRACKED_PER_OP = 6
"""Objects the cyclic GC tracks that one pipelined op may keep alive on the client until its
reply: its future, the session's record of it, the message kept for a resend, its deadline."""


async def test_a_pipelined_op_keeps_few_objects_for_the_cyclic_gc() -> None:
    # Every object alive across two young collections is promoted to the oldest generation, and
    # with torch loaded (~290,000 objects) each full pass costs the client ~0.2 s. With 12.7
    # objects per op in flight (two done callbacks, each with its Context) a full pass came every
    # ~6,000 ops and doubled the client's CPU per op; each object per op counts.
    async with fedptr.local_cluster(["bob"], curve=False) as cluster:
        x = await cluster.client.worker("bob").send(torch.ones(4))
        await (x + x)  # the meta cache and the reply table warmed up
        gc.disable()  # no pass (which would untrack some tuples) while counting
        try:
            before = len(gc.get_objects())
            y = x
            for _ in range(100):
                y = y + x
            per_op = (len(gc.get_objects()) - before) / 100
        finally:
            gc.enable()
        await y
    assert per_op <= TRACKED_PER_OP, f"a pipelined op keeps {per_op:.1f} tracked objects alive on the client"
