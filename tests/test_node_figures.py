"""The node's counters of replies (nodes/stats.py `NodeFigures.finished`), which `NodeStats`
reports as ``refusals`` and ``releases`` and Prometheus by code and kind: branch pernode6 let an
`Ok` skip the failure and release checks. Every other reply must still be counted as it was, and
a model handed out (a `ModuleReply` with a release kind) counts as a release as a tensor does."""

from __future__ import annotations

import time
import types

import torch
from fedptr.nodes.stats import NodeFigures

from fedptr import wire
from fedptr.tensors import to_raw


def test_failures_and_releases_are_counted_by_code_and_kind_and_nothing_else_is() -> None:
    figures = NodeFigures(types.SimpleNamespace())  # type: ignore[arg-type]  # `finished` reads no node
    tensor = to_raw(torch.ones(2))
    replies: list[wire.Message] = [
        wire.Ok([2], "float32"),
        wire.Ok(),
        wire.Failure(wire.FailureCode.DENIED, "", "private", "bob", ["bob"], "bob"),
        wire.Failure(wire.FailureCode.DENIED, "", "private", "bob", ["bob"], "bob"),
        wire.Failure(wire.FailureCode.STORE_FULL, "", "full", "bob", ["bob"]),
        wire.TensorReply(tensor),  # a value of the client's own: no release
        wire.TensorReply(tensor, "public"),
        wire.TensorReply(tensor, "aggregate"),
        wire.ModuleReply({}, [], "dp"),  # a model trained by DP-SGD, handed out
        wire.ModuleReply({}, []),  # the client's own model: no release
        wire.PointerReply("alice", 3),
        wire.PlanReply([[2]], ["float32"]),
    ]
    for reply in replies:
        figures.finished("client", b"rid", reply, ("Op", time.monotonic()))
    assert figures.failures == {wire.FailureCode.DENIED: 2, wire.FailureCode.STORE_FULL: 1}
    assert figures.releases == {"public": 1, "aggregate": 1, "dp": 1}
    assert figures.latencies.by_key["Op"].count == len(replies)
    figures.finished("client", b"rid", wire.Ok(), None)  # its peer left: not timed, not counted
    assert figures.latencies.by_key["Op"].count == len(replies) and len(figures.failures) == 2
