"""Requests ended by their deadline or by a LOST, checked against what the node then did
(nemesis9). Neither ends the request at its node: its message may still be queued there (behind
a long computation, in a stalled process, in a socket's buffer) and run after the client was
told it failed. The rule (docs/REDTEAM.md, "Durability by property, round nine"): such an error
says the outcome is unknown, not that nothing happened, and the client resolves that doubt
itself before it counts on the id or the quota: an object a failed request may have made is
deleted under its id, a Delete queued behind the request and sent again once the node answers
anything later (`Client._heard`), so it lands after the request if the request ever runs.

The model is Jepsen's: a history of requests from one client to bob (sends, ops on what bob
acknowledged, broadcasts to bob and carol, pointers dropped), some of them held at bob by a gate
between his link and his node until their deadline passed or the client was told bob was lost
(a LOST the client's session receives while bob lives on), then run late. After each stall, and
once the client dropped every pointer whose request failed, the stores must hold exactly what
the replies promised: each acknowledged object with its value, nothing else of the client's, and
its quota charged for exactly those.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
import torch
from fedptr.nodes.node import Node
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import fedptr
from fedptr import envelope
from fedptr.errors import BroadcastError, FedptrError
from fedptr.pointer import Pointer
from fedptr.session import Incoming

from . import harness

SHORT_S = 0.2
"""The deadline (s) of a request the gate holds: it passes while the request waits at bob."""

EXAMPLES = 10
"""Histories drawn per run (a few seconds each, in-process)."""

LONG_S = 20.0
"""The deadline (s) of every other request: an in-process round trip takes milliseconds."""


class Gate:
    """Between `node`'s link and the node: while closed, requests wait here in arrival order (as
    a stalled process or a long computation would keep them), a run of ops gathered from one
    BATCH (`Link.run_handler`: the node's lane, `Compute.ops`) as one; `open` hands them to the
    node as they came."""

    def __init__(self, node: Node) -> None:
        link = node.link
        self._handle, self._runs = link.handler, link.run_handler
        assert self._handle is not None and self._runs is not None
        self.held: list[tuple[bool, list[Incoming]]] = []
        """What waits, in order: (a run of ops?, its requests)."""
        self.closed = False
        link.handler = self._request
        link.run_handler = self._run

    def _request(self, source: str, rid: bytes, request: Any) -> None:
        if self.closed:
            self.held.append((False, [Incoming(source, rid, request)]))
        else:
            assert self._handle is not None
            self._handle(source, rid, request)

    def _run(self, run: list[Incoming]) -> None:
        if self.closed:
            self.held.append((True, run))
        else:
            assert self._runs is not None
            self._runs(run)

    def open(self) -> None:
        self.closed = False
        held, self.held = self.held, []
        assert self._handle is not None and self._runs is not None
        for is_run, requests in held:
            if is_run:
                self._runs(requests)
            else:
                self._handle(*requests[0])


def _lost(client: fedptr.Client, name: str) -> None:
    """The broker's LOST for `name`, received by `client`'s session as from its socket."""
    link = client.link
    notice = envelope.message(
        envelope.LOST, name.encode(), envelope.NO_REPLY, [envelope.ROLE_WORKER, envelope.GONE_SILENT]
    )
    link._handle(link.session.receive(envelope.framed(notice), asyncio.get_running_loop().time()))


class History:
    """The client's pointers and what each reply promised: `acked` holds each acknowledged
    pointer with the value its object must have; `doubtful` the pointers whose request failed."""

    def __init__(self, c: harness.InprocCluster) -> None:
        self.c = c
        self.acked: dict[fedptr.Pointer, torch.Tensor] = {}
        self.doubtful: list[fedptr.Pointer] = []
        self.issued: list[tuple[asyncio.Future[Any], list[tuple[fedptr.Pointer | None, torch.Tensor]]]] = []
        self.counter = 0

    def _fresh(self) -> torch.Tensor:
        self.counter += 1
        return torch.full((4,), float(self.counter))

    def issue(self, action: tuple[Any, ...]) -> None:
        """Start `action`; its outcome is recorded by `settle`."""
        client, kind = self.c.client, action[0]
        on_bob = [p for p in self.acked if p.location == "bob"]
        if kind == "send":
            value = self._fresh()
            p = client.worker("bob").send(value)
            self.issued.append((asyncio.ensure_future(_awaited(p)), [(p, value)]))
        elif kind == "op" and on_bob:
            a, b = on_bob[action[1] % len(on_bob)], on_bob[action[2] % len(on_bob)]
            p = a + b
            self.issued.append((asyncio.ensure_future(_awaited(p)), [(p, self.acked[a] + self.acked[b])]))
        elif kind == "broadcast":
            value = self._fresh()
            workers = [client.worker("bob"), client.worker("carol")]
            self.issued.append((asyncio.ensure_future(fedptr.broadcast(value, workers)), [(None, value)] * 2))
        elif kind == "drop" and self.acked:
            victims = list(self.acked)
            del self.acked[victims[action[1] % len(victims)]]

    async def settle(self) -> None:
        """Wait for every issued request and record what its reply promised."""
        issued, self.issued = self.issued, []
        for fut, made in issued:
            await asyncio.wait([fut])
            error = fut.exception()
            if isinstance(error, BroadcastError):
                got: list[Any] = error.pointers
            elif error is not None:
                assert isinstance(error, FedptrError), error
                got = [None for _ in made]
            else:
                got = fut.result() if made[0][0] is None else [p for p, _ in made]
            for (p, value), ok in zip(made, got, strict=True):
                if ok is not None:
                    self.acked[ok] = value
                elif p is not None:
                    self.doubtful.append(p)

    async def check(self) -> None:
        """Drop the failed pointers (as a caller whose await raised does), let the client catch
        up with bob and carol, and compare their stores with the promises."""
        self.doubtful.clear()
        gc.collect()
        client = self.c.client
        for name in ("bob", "carol"):
            # the first answer tells the client bob is back (its owed deletes go again), the
            # second is answered after they ran: requests to one node run in order
            await client.worker(name).objects()
            await client.worker(name).objects()
        for name in ("bob", "carol"):
            store = self.c.node(name).store
            promised = {p.id_at_location: v for p, v in self.acked.items() if p.location == name}
            held = {i for i, e in store.entries.items() if e.owner == client.name}
            assert held == set(promised), f"{name} holds {len(held - set(promised))} objects nobody was promised"
            for obj_id, value in promised.items():
                assert torch.equal(store.entries[obj_id].result(), value)
            assert store.usage(client.name) == (len(promised), sum(v.nbytes for v in promised.values()))


async def _awaited(p: fedptr.Pointer) -> list[fedptr.Pointer]:
    await p
    return [p]


async def _run(steps: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
    async with harness.cluster(["bob", "carol"], call_timeout=LONG_S) as c:
        gate = Gate(c.node("bob"))
        history = History(c)
        for fate, actions in steps:
            if fate == "in time":
                for action in actions:
                    history.issue(action)
                await history.settle()
                continue
            # held at bob past the client's verdict, then run there
            gate.closed = True
            c.client.timeout = SHORT_S if fate == "deadline" else LONG_S
            for action in actions:
                history.issue(action)
            await asyncio.sleep(0)  # a broadcast reads the deadline as its task starts
            c.client.timeout = LONG_S
            if fate == "lost":
                while not gate.held and history.issued:
                    await asyncio.sleep(0.01)
                _lost(c.client, "bob")
            await history.settle()
            gate.open()
            await history.check()
        await history.check()


actions = st.lists(
    st.one_of(
        st.tuples(st.just("send")),
        st.tuples(st.just("op"), st.integers(0, 50), st.integers(0, 50)),
        st.tuples(st.just("broadcast")),
        st.tuples(st.just("drop"), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=4,
)
histories = st.lists(st.tuples(st.sampled_from(["in time", "deadline", "lost"]), actions), min_size=1, max_size=5)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # a history is seconds of cluster: shrinking took minutes
)
@given(steps=histories)
@example(steps=[("deadline", [("broadcast",)])])
@example(steps=[("in time", [("send",), ("send",)]), ("lost", [("op", 0, 1), ("send",), ("broadcast",)])])
def test_what_a_failed_request_did_late_is_undone_and_only_that(steps: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
    """The history's property (see the module's docstring)."""
    asyncio.run(_run(steps))


def test_the_history_check_fails_when_a_failed_pointer_deletes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: with a broken rule, "a request that raised made nothing, so its
    pointer's drop deletes nothing", the object bob made late is held with no pointer to it."""
    dropped = Pointer.__del__

    def believes_failed_means_not_made(self: Pointer) -> None:
        done = self.pending_future
        if done is not None and done.done() and not done.cancelled() and done.exception() is not None:
            return
        dropped(self)

    monkeypatch.setattr(Pointer, "__del__", believes_failed_means_not_made)
    for steps in ([("deadline", [("send",)])], [("in time", [("send",), ("send",)]), ("lost", [("op", 0, 1)])]):
        with pytest.raises(AssertionError, match="nobody was promised"):
            asyncio.run(_run(steps))
