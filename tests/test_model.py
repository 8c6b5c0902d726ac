"""A stateful model-based test (hypothesis `RuleBasedStateMachine`, issue 19) on the in-process
harness: the real broker and node code on one loop over ipc://, nodes on durable stores.

The rules send, compute, update in place (awaited by several tasks at once), move, get and
drop objects, and inject faults: a node stopped and restarted from its durable store, and the
broker restarted. A reference model holds what was acknowledged: each live object's location
and value. After every step the invariants are checked against what the nodes list
(`Worker.objects()`, whose previews show small tensors' values):

* every acknowledged write is visible, once: each modelled object is there with its value,
  and no node holds an object the model does not (nothing refused, dropped or handed on
  stays, nothing is applied twice);
* once the client's pointers are all dropped and it leaves, every node is empty.

CI-sized by default (``MODEL_STEPS`` steps in all, about 60 s here); ``MODEL_STEPS=10000``
for a long run. Seeded (``MODEL_SEED``); a failure prints the history of steps (hypothesis
prints the shrunk program that replays it).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch
from hypothesis import HealthCheck, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

import fedptr

from . import harness

WORKERS = ["bob", "alice"]
NUMEL = 4
STEPS = int(os.environ.get("MODEL_STEPS", "400"))
"""Rule steps in all, over every program hypothesis runs (the CI default: about 60 s)."""
STEPS_PER_PROGRAM = 40
SEED = int(os.environ.get("MODEL_SEED", "19"))
STEP_TIMEOUT_S = 20.0
"""Deadline of one step (s), faults and re-registration included."""
BEAT_S = 0.1

T = TypeVar("T")
values = st.integers(-8, 8).map(float)


@dataclass
class Obj:
    """What the model says a live pointer leads to."""

    ptr: fedptr.Pointer
    where: str
    value: float


class Model(RuleBasedStateMachine):
    objects = Bundle("objects")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.cluster: harness.InprocCluster = self.run(
            self.stack.enter_async_context(
                harness.cluster(
                    WORKERS, stores=WORKERS, transport="ipc", heartbeat_s=BEAT_S, call_timeout=STEP_TIMEOUT_S / 2
                )
            )
        )
        self.live: dict[int, Obj] = {}
        self.history: list[str] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(STEP_TIMEOUT_S):
                return await coro

        return self.loop.run_until_complete(bounded())

    def note(self, what: str) -> None:
        """Keep `what` in the history that a failure prints (hypothesis shows the notes of the
        failing program, as well as the program itself)."""
        self.history.append(what)
        note(what)

    def _add(self, ptr: fedptr.Pointer, where: str, value: float) -> int:
        key = id(ptr)
        self.live[key] = Obj(ptr, where, value)
        return key

    # --- rules -------------------------------------------------------------------------
    @rule(target=objects, where=st.sampled_from(WORKERS), value=values)
    def send(self, where: str, value: float) -> int:
        ptr = self.run(self.cluster.worker(where).send(torch.full((NUMEL,), value)))
        self.note(f"send {value} to {where}")
        return self._add(ptr, where, value)

    @rule(target=objects, key=objects, c=values)
    def op(self, key: int, c: float) -> int:
        obj = self.live[key]
        ptr = self.run(_awaited(obj.ptr + c))
        self.note(f"{key} + {c}")
        return self._add(ptr, obj.where, obj.value + c)

    @rule(key=objects, c=values, awaiters=st.integers(1, 4))
    def update_in_place(self, key: int, c: float, awaiters: int) -> None:
        obj = self.live[key]
        obj.ptr.add_(c)
        self.run(_gather(*(_awaited(obj.ptr) for _ in range(awaiters))))
        obj.value += c
        self.note(f"{key}.add_({c}), awaited by {awaiters}")

    @rule(target=objects, key=consumes(objects), dest=st.sampled_from(WORKERS))
    def move(self, key: int, dest: str) -> int:
        obj = self.live.pop(key)
        ptr = self.run(obj.ptr.move(dest))
        self.note(f"move {key} to {dest}")
        return self._add(ptr, dest, obj.value)

    @rule(key=consumes(objects))
    def get(self, key: int) -> None:
        obj = self.live.pop(key)
        got = self.run(obj.ptr.get())
        self.note(f"get {key}")
        assert torch.equal(got, torch.full((NUMEL,), obj.value)), f"{got} != {obj.value}"

    @rule(key=consumes(objects))
    def drop(self, key: int) -> None:
        del self.live[key]  # its pointer's collection deletes the object, unawaited
        self.note(f"drop {key}")

    @rule(where=st.sampled_from(WORKERS))
    def restart_node(self, where: str) -> None:
        """A node stopped (what it queued reaches disk) and started again from its store."""
        self.run(self._restart_node(where))
        self.note(f"restart {where}")

    async def _restart_node(self, where: str) -> None:
        await self.cluster.restart_node(where)
        await self.cluster.all_registered()

    @rule()
    def restart_broker(self) -> None:
        self.run(self._restart_broker())
        self.note("restart the broker")

    async def _restart_broker(self) -> None:
        await self.cluster.restart_broker()
        await self.cluster.all_registered()

    # --- invariants --------------------------------------------------------------------
    @invariant()
    def every_acknowledged_write_visible_once(self) -> None:
        held = self.run(_listings(self.cluster))
        for key, obj in self.live.items():
            info = held[obj.where].pop(obj.ptr.id_at_location, None)
            assert info is not None, f"{key} ({obj.value} on {obj.where}) was lost"
            assert info.preview == [obj.value] * NUMEL, f"{key} holds {info.preview}, {obj.value} expected"
        self.run(_deletes_landed(self.cluster, held))

    def teardown(self) -> None:
        try:
            self.live.clear()
            if not hasattr(self, "cluster"):
                return
            self.run(_deletes_landed(self.cluster, None))
        finally:
            try:
                self.loop.run_until_complete(self.stack.aclose())
            finally:
                self.loop.close()


async def _awaited(p: fedptr.Pointer) -> fedptr.Pointer:
    await p
    return p


async def _gather(*aws: Coroutine[Any, Any, Any]) -> None:
    await asyncio.gather(*aws)


async def _listings(cluster: harness.InprocCluster) -> dict[str, dict[int, fedptr.ObjectInfo]]:
    return {w: dict(await cluster.worker(w).objects()) for w in WORKERS}


async def _deletes_landed(cluster: harness.InprocCluster, extra: dict[str, dict[int, Any]] | None) -> None:
    """The objects the model no longer has (dropped, got, moved away) are gone: deletes travel
    unanswered, so they may land a little after the step. `extra` None: the nodes are empty."""
    while True:
        held = await _listings(cluster)
        left = {w: [i for i in (held[w] if extra is None else extra[w]) if i in held[w]] for w in WORKERS}
        if not any(left.values()):
            return
        await asyncio.sleep(0.02)


@pytest.mark.timeout(3600)
def test_model() -> None:
    """The state machine, `STEPS` steps in all, seeded."""
    programs = max(1, STEPS // STEPS_PER_PROGRAM)
    print(f"model-based test: seed {SEED}, {programs} programs of up to {STEPS_PER_PROGRAM} steps")
    run_state_machine_as_test(
        seed(SEED)(Model),
        settings=settings(
            max_examples=programs,
            stateful_step_count=STEPS_PER_PROGRAM,
            deadline=None,
            derandomize=False,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
        _min_steps=STEPS_PER_PROGRAM // 2,
    )
