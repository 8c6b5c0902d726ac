"""The per-op CPU guard: a change that makes the node's hot path cost half again as much fails CI.

CPU time per small pipelined op in the node, the broker and the client (tests/cpuclock.py) is
compared with the figures stored in tests/cpu_baseline.json, measured on this machine
(``python -m tests.cpuclock --write`` measures and stores them again, after a deliberate
change of cost or on other hardware). Only the node's figure is guarded: it is the bottleneck of
every pipelined figure, and at tens of µs per op it is many clock ticks above the clock's
resolution (the broker's and the client's are printed, for the record).
"""

from __future__ import annotations

import pytest

from tests import cpuclock

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

GROWTH = 1.5
"""How much more CPU per op than the baseline the node may spend before the guard fails."""


async def test_node_cpu_per_pipelined_op_within_budget() -> None:
    baseline = cpuclock.load_baseline()
    runs = await cpuclock.measure()
    now = cpuclock.per_op(runs)
    print(f"CPU µs per op now {now}, baseline {baseline}, repetitions {runs}")
    limit = baseline["node"] * GROWTH
    assert now["node"] <= limit, (
        f"the node spends {now['node']:.1f} µs of CPU per small pipelined op, more than {GROWTH}× the "
        f"baseline {baseline['node']:.1f} µs (repetitions: {runs['node']}); find what made the hot path "
        "dearer, or, if the cost is deliberate, store a new baseline with `python -m tests.cpuclock --write`"
    )
