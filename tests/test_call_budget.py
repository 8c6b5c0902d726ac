"""The node's and the client's paths in Python calls per op: a figure the machine's load does not move.

`bench.node_loop.python_calls_per_op` feeds a real `Link` (its socket calls stubbed), `Session`
and `Node` the batches a 100-op chain of pipelined ``x + a`` arrives in, then its deletes, and
counts the Python function calls made per op (C functions not counted). CPU time per op is the
figure issue 20 sets (tests/test_cpu_budget.py guards it, at a tolerance the shared machine
forces); the call count moves with every layer added or removed along the path, and only with
that, so it guards the path closely. `bench.client_loop.python_calls_per_op` does the same for
the client: a chain of pipelined ``x + a`` issued, answered by a stub peer (whose own calls are
not counted), settled, and its results' deletes queued.
"""

from __future__ import annotations

from bench import client_loop, node_loop

PYTHON_CALLS_PER_OP = 22.0
"""The ceiling: 21.0 calls per op measured on branch node13 (+5%; node12 made 24.9, main at
80e4e16 39.8): a BATCH's run of ops goes to `Node.handle_ops` as one unit, a plain public op
takes `Compute.ops`' lane (no dispatch, `_Run`, `_operands`, `_start`, `_values`, `_compute`,
`guard.run`, `_finish` or `Node.reply` calls), and the lane's `Ok`s leave through one
`Link.reply_each` per run (no `Link.reply`, `Session.reply`, `wire.encode`, `envelope.merged`
per op). A change that adds a call per op on purpose raises it here, saying why, in the same
commit."""


async def test_the_node_request_path_makes_few_python_calls_per_op() -> None:
    calls = await node_loop.python_calls_per_op()
    assert calls <= PYTHON_CALLS_PER_OP, (
        f"the node's request path makes {calls:.1f} Python calls per pipelined op, over the "
        f"ceiling of {PYTHON_CALLS_PER_OP}: find the layer added, or raise the ceiling saying why"
    )


CLIENT_PYTHON_CALLS_PER_OP = 28.1
"""The client's ceiling: 26.8 calls per pipelined op (issued, its reply settled, its result's
delete queued) measured on branch reply2 (+5%; main at 6d73f4e made 30.7: a chain's Oks now
come as one ACKS record, parsed and decoded once). A change that adds a call per op on purpose
raises it here, saying why, in the same commit."""


async def test_the_client_op_path_makes_few_python_calls_per_op() -> None:
    calls = await client_loop.python_calls_per_op()
    assert calls <= CLIENT_PYTHON_CALLS_PER_OP, (
        f"the client makes {calls:.1f} Python calls per pipelined op, over the ceiling of "
        f"{CLIENT_PYTHON_CALLS_PER_OP}: find the layer added, or raise the ceiling saying why"
    )
