"""A stateful model-based test (hypothesis `RuleBasedStateMachine`, issue 19) on the in-process
harness: the real broker and node code on one loop over ipc://, nodes on durable stores.

The rules send, compute, update in place (awaited by several tasks at once), move, get and
drop objects, and inject faults: a node stopped and restarted from its durable store, the
broker restarted, and, while a send, an op, an update or a move is under way (tests/nemesis.py):

* kill: the node dies at one of its storage calls or just before one of its requests or
  replies (or, if the action made fewer, once it is done), saying no goodbye, and restarts
  from what its disk holds;
* stop: it freezes (SIGSTOP) just before one of its requests or replies, until the client gave
  up on the action (LostWorkerError once the broker misses its beats, or InDoubtError), then
  goes on (SIGCONT);
* disk full, EIO: its disk refuses one storage call; the node's fail-stop (which ends the
  process) kills it, and it restarts.

A reference model holds what was acknowledged: each live object's location and value. An
action's outcome is acknowledged (the model applies it), refused (a definite error: the model
does not), or in doubt (LostWorkerError, DeadlineExceeded, InDoubtError): once the node is
back, an object a send or op may have made is either absent or holds its value (and is
dropped), an update is applied once or not at all (what the listing shows is kept), and a
move's InDoubtError is settled with `Client.resolve`. After every step the invariants are
checked against what the nodes list (`Worker.objects()`, whose previews show small tensors'
values):

* every acknowledged write is visible, once: each modelled object is there with its value,
  and no node holds an object the model does not (nothing refused, dropped or handed on
  stays, nothing is applied twice, an in-doubt hand-over left one copy, where resolved). After
  a crash, an object the client deleted without an acknowledgement may come back (README): it
  is deleted again (as the session's end would reclaim it), and must then go;
* nothing refused is applied; all awaiters of one update hear the same outcome;
* once the client's pointers are all dropped, every node is empty.

The in-process kill is a process crash, as in tests/test_crash_points.py: what reached the
kernel stays (no power loss), and the nodes stay in this process (no heartbeat silence of a
real kill -9: a killed node sends nothing, and its restart reclaims its name at once).

CI-sized by default (``MODEL_STEPS`` steps in all); ``MODEL_STEPS=10000`` for a long run.
Seeded (``MODEL_SEED``). A failure prints, as it happens, the step count and the history of its
program. Nothing is shrunk: a fault's outcome depends on timing (an action done before the fault
or not), so a replay may take other paths, and hypothesis then reports that
(FlakyStrategyDefinition, Flaky) after the failure printed.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
import weakref
from collections.abc import Coroutine, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch
from fedptr.nodes import node as node_module
from hypothesis import HealthCheck, Phase, note, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import fedptr
from fedptr import limits
from fedptr import pointer as pointer_module

from . import harness
from .nemesis import EIO, FULL, CrashingDisk, Death, Disks, install

WORKERS = ["bob", "alice"]
NUMEL = 4
STEPS = int(os.environ.get("MODEL_STEPS", "400"))
"""Rule steps in all, over every program hypothesis runs (the CI default: about 60 s)."""
STEPS_PER_PROGRAM = 40
SEED = int(os.environ.get("MODEL_SEED", "19"))
STEP_TIMEOUT_S = 20.0
"""Deadline of one step (s), re-registration included."""
FAULT_STEP_TIMEOUT_S = 60.0
"""Deadline of a step with a fault (s): the action's deadline, a restart and a resolve."""
FAIL_STOP_TIMEOUT_S = 10.0
"""Seconds a node whose disk refused a write may take to fail-stop (its batch's other writes and
its sync come first)."""
RESOLVE_TIMEOUT_S = 20.0
"""Seconds `Client.resolve` may take to tell where an object in doubt is, once the node is back."""
DELETES_TIMEOUT_S = 10.0
"""Seconds the deletes of what the model no longer has may take to land."""
BEAT_S = 0.1
PICK_RANGE = 1 << 10
"""Values `_pick` draws an index from (taken modulo the choices): far more than the objects live."""
WAIT_FOR_TURN_S = 0.002
"""Seconds per drawn turn of a cancelled waiter's `asyncio.wait_for` timeout: shorter than an
update's round trip, so the timeout mostly cuts it while the update is under way."""

FAULTS = ("kill", "stop", "disk full", "EIO")
INDEFINITE = (fedptr.LostWorkerError, fedptr.DeadlineExceeded, fedptr.InDoubtError)
"""The errors that leave an action in doubt; every other FedptrError is a refusal."""

DISKS = Disks()
"""Each running node's disk (by its write-ahead thread)."""
RELEASED: set[tuple[str, int]] = set()
"""Every (worker, object id) the client deleted (`Client.release`: unawaited deletes)."""
ALIASES: set[tuple[str, int]] = set()
"""Every (worker, object id) of an alias an in-place update left (its result entry)."""
DEATHS: dict[str, Death] = {}
"""What becomes of each running node (by name): the fail-stop a refused write triggers kills it."""

T = TypeVar("T")
values = st.integers(-8, 8).map(float)


@dataclass
class Obj:
    """What the model says a live pointer leads to."""

    ptr: fedptr.Pointer
    where: str
    value: float


class Model(RuleBasedStateMachine):
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
        DEATHS.clear()
        DISKS.of.clear()
        RELEASED.clear()
        ALIASES.clear()
        for name in WORKERS:
            self._watch(name, Death())
        self.live: dict[int, Obj] = {}
        self.made = 0
        """Objects the model made so far: the key of the newest."""
        self.history: list[str] = []
        self.doing = "the start"
        """The step under way (for the failure report: its note comes only once it is done)."""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = STEP_TIMEOUT_S) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coro

        return self.loop.run_until_complete(bounded())

    def note(self, what: str) -> None:
        """Keep `what` in the history that a failure prints (hypothesis shows the notes of the
        failing program, as well as the program itself)."""
        self.history.append(what)
        note(what)

    def _add(self, ptr: fedptr.Pointer, where: str, value: float, what: str) -> None:
        self.made += 1
        self.live[self.made] = Obj(ptr, where, value)
        self.note(f"#{self.made} = {what} [{where} {ptr.id_at_location}]")

    # --- rules -------------------------------------------------------------------------
    # One rule draws each step's action: hypothesis's swarm testing enables a random subset of
    # the rules per program, and with a few dozen programs whole programs were one fault
    # repeated (and never a send). The weights favour the actions that make state.
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        Model.steps_run += 1
        actions = [self.send] * 4 + [self.op, self.update_in_place] * 3 + [self.move, self.get, self.drop] * 2
        actions += [self.pipeline, self.update_cancelled, self.drop_operand] * 2
        actions += [self.restart_node, self.restart_broker] + [self.fault] * 2
        action = data.draw(st.sampled_from(actions), label="action") if self.live else self.send
        self.doing = action.__name__
        with self.reported():
            action(data)

    steps_run = 0
    """Steps run so far, over every program (for the failure report)."""
    tally: collections.Counter[str] = collections.Counter()
    """What the faults did (and drops whose pointer a reference cycle held), over every program."""

    @contextmanager
    def reported(self) -> Iterator[None]:
        """Print the failure and this program's history when it happens: a fault's outcome
        depends on timing, so hypothesis's replay of a failing program may take another path
        (it then reports FlakyStrategyDefinition or Flaky instead of the failure)."""
        try:
            yield
        except Exception as e:
            history = "\n  ".join(self.history)
            print(
                f"model-based test failed at step {Model.steps_run} in all, in {self.doing}: {e!r}\n"
                f"registrations: {_registrations(self.cluster)}\n"
                f"this program:\n  {history}"
            )
            raise

    def _key(self, data: st.DataObject) -> int:
        return _pick(data, sorted(self.live), "object")

    def send(self, data: st.DataObject) -> None:
        where, value = data.draw(st.sampled_from(WORKERS), label="to"), data.draw(values, label="value")
        ptr = self.run(self.cluster.worker(where).send(torch.full((NUMEL,), value)))
        self._add(ptr, where, value, f"send {value} to {where}")

    def op(self, data: st.DataObject) -> None:
        key, c = self._key(data), data.draw(values, label="c")
        obj = self.live[key]
        ptr = self.run(_awaited(obj.ptr + c))
        self._add(ptr, obj.where, obj.value + c, f"#{key} + {c}")

    def update_in_place(self, data: st.DataObject) -> None:
        key, c = self._key(data), data.draw(values, label="c")
        awaiters = data.draw(st.integers(1, 4), label="awaiters")
        obj = self.live[key]
        obj.ptr.add_(c)
        self.run(_gather(*(_awaited(obj.ptr) for _ in range(awaiters))))
        obj.value += c
        self.note(f"#{key}.add_({c}), awaited by {awaiters} tasks at once")

    def pipeline(self, data: st.DataObject) -> None:
        """Un-awaited ops and in-place updates on one worker, then one await of the last: its
        acknowledgement implies every earlier one's (the node answers in order, once durable).
        Then, if drawn, the node is killed at once (no goodbye, its queue lost): all of them
        must be on its disk."""
        key = self._key(data)
        where = self.live[key].where
        chain = [key]
        for _ in range(data.draw(st.integers(2, 5), label="length")):
            source, c = data.draw(st.sampled_from(chain), label="on"), data.draw(values, label="c")
            obj = self.live[source]
            if data.draw(st.booleans(), label="in place"):
                obj.ptr.add_(c)
                obj.value += c
                last = source
                self.note(f"#{source}.add_({c}), not awaited")
            else:
                self._add(obj.ptr + c, where, obj.value + c, f"#{source} + {c}, not awaited")
                last = self.made
                chain.append(last)
        self.run(_awaited(self.live[last].ptr))
        self.note(f"await #{last} only")
        Model.tally["pipelines acknowledged"] += 1
        if data.draw(st.booleans(), label="then killed"):
            self.run(self._crash(where), FAULT_STEP_TIMEOUT_S)
            self.note(f"kill {where} at once, restart from its disk")
            Model.tally["pipelines killed once acknowledged"] += 1

    async def _crash(self, victim: str) -> None:
        """`victim` dies now (kill -9: nothing it queued reaches disk, no goodbye) and restarts."""
        death = Death()
        self._watch(victim, death)
        death.kill()
        await self.cluster.stop_node(victim)
        await self.cluster.start_node(victim)
        self._watch(victim, Death())
        await _answering(self.cluster)
        await self._undone_deletes(victim)

    def update_cancelled(self, data: st.DataObject) -> None:
        """An in-place update awaited by several tasks, some of them cancelled (a task's cancel,
        or `asyncio.wait_for`'s timeout) while the others await it: the update is applied once
        all the same (the request is shared, not the waiter's), and the others all hear ok."""
        key, c = self._key(data), data.draw(values, label="c")
        awaiters = data.draw(st.integers(1, 4), label="awaiters")
        cancelled = data.draw(st.integers(1, awaiters), label="cancelled")
        how = data.draw(st.sampled_from(["cancel", "wait_for"]), label="how")
        turns = data.draw(st.integers(0, 3), label="after loop turns")
        obj = self.live[key]
        obj.ptr.add_(c)
        heard = self.run(_cancelling(obj.ptr, awaiters, cancelled, how, turns))
        cut = sum(isinstance(h, asyncio.CancelledError | TimeoutError) for h in heard[:cancelled])
        assert cut == sum(h is not None for h in heard[:cancelled]), f"the cut awaiters heard {heard[:cancelled]}"
        assert all(h is None for h in heard[cancelled:]), f"the awaiters left heard {heard[cancelled:]}"
        obj.value += c
        Model.tally[f"waiters cut by {how}" if cut else "waiters not cut (done first)"] += 1
        self.note(f"#{key}.add_({c}), awaited by {awaiters} tasks, {cancelled} of them by {how} after {turns} turns")

    def drop_operand(self, data: st.DataObject) -> None:
        """An op's operand dropped (its delete sent) while the op is in flight, an in-place update
        on it perhaps queued in between: the op saw the operand as it was, in order."""
        key, c = self._key(data), data.draw(values, label="c")
        obj = self.live.pop(key)
        ptr = obj.ptr + c
        value = obj.value + c
        d = data.draw(st.none() | values, label="then add_")
        if d is not None:
            obj.ptr.add_(d)
        held = weakref.ref(obj.ptr)
        del obj
        # its delete goes out now unless the result's pointer keeps its operand (until computed)
        Model.tally["operands dropped in flight" if held() is None else "operands kept by their result"] += 1
        self.run(_awaited(ptr))
        self._add(ptr, ptr.location, value, f"#{key} + {c}, #{key} dropped in flight (add_({d}) first)")

    def move(self, data: st.DataObject) -> None:
        key, dest = self._key(data), data.draw(st.sampled_from(WORKERS), label="dest")
        obj = self.live.pop(key)
        ptr = self.run(obj.ptr.move(dest))
        self._add(ptr, dest, obj.value, f"move #{key} to {dest}")

    def get(self, data: st.DataObject) -> None:
        key = self._key(data)
        obj = self.live.pop(key)
        got = self.run(obj.ptr.get())
        self.note(f"get #{key}")
        assert torch.equal(got, torch.full((NUMEL,), obj.value)), f"{got} != {obj.value}"

    def drop(self, data: st.DataObject) -> None:
        key = self._key(data)
        held = weakref.ref(self.live.pop(key).ptr)  # its collection deletes the object, unawaited
        # freed at once, by reference counting: no reference cycle holds it, not even after an
        # await of it raised (the error's traceback keeps no frame that refers to it)
        assert held() is None, f"#{key}'s pointer is still referenced"
        self.note(f"drop #{key}")

    def restart_node(self, data: st.DataObject) -> None:
        """A node stopped (what it queued reaches disk) and started again from its store."""
        where = data.draw(st.sampled_from(WORKERS), label="node")
        self.run(self._restart_node(where))
        self.note(f"restart {where}")

    async def _restart_node(self, where: str) -> None:
        await self.cluster.restart_node(where)
        self._watch(where, Death())
        await _answering(self.cluster)

    def restart_broker(self, data: st.DataObject) -> None:
        self.run(self._restart_broker())
        self.note("restart the broker")

    async def _restart_broker(self) -> None:
        await self.cluster.restart_broker()
        await _answering(self.cluster)

    # --- faults during an action -------------------------------------------------------
    def _watch(self, name: str, death: Death) -> None:
        """`death` is what becomes of node `name` from now on (its disk included)."""
        node = self.cluster.node(name)
        Death.forget(node)
        death.watch(node)
        DISKS.give(node, death.disk)
        DEATHS[name] = death

    def fault(self, data: st.DataObject) -> None:
        """A fault strikes a node while an action that involves it is under way."""
        kind = data.draw(st.sampled_from(FAULTS), label="fault")
        victim = data.draw(st.sampled_from(WORKERS), label="node")
        at = data.draw(st.integers(1, 8), label="at")
        if kind == "stop":
            death = Death(message=1 + at % 3, freeze=True)
        elif kind != "kill":
            death = Death(disk=CrashingDisk(at, refuse=FULL if kind == "disk full" else EIO))
        elif data.draw(st.booleans(), label="at a storage call"):
            death = Death(at=at)
        else:
            death = Death(message=1 + at % 3)
        what = f"{kind} {victim} at {'message' if death.message else 'storage call'} {death.message or at}"
        self.doing = f"the fault {what}"
        mine = sorted(k for k, o in self.live.items() if o.where == victim)
        action = data.draw(st.sampled_from(["send", "op", "update", "pipeline", "move"]), label="during")
        if not mine and action not in ("send", "move"):
            action = "send"
        if action == "move":
            key = _pick(data, sorted(self.live), "object") if self.live else None
            if key is None:
                action = "send"
        if action == "send":
            value = data.draw(values, label="value")
            self.run(self._send_during(victim, value, death, what), FAULT_STEP_TIMEOUT_S)
        elif action == "move":
            assert key is not None
            self.run(self._move_during(key, death, victim, what), FAULT_STEP_TIMEOUT_S)
        else:
            key, c = _pick(data, mine, "object"), data.draw(values, label="c")
            if action == "op":
                self.run(self._op_during(key, c, death, victim, what), FAULT_STEP_TIMEOUT_S)
            elif action == "pipeline":
                cs = data.draw(st.lists(values, min_size=2, max_size=5), label="chain")
                self.run(self._pipeline_during(key, cs, death, victim, what), FAULT_STEP_TIMEOUT_S)
            else:
                # most with a waiter cancelled (hypothesis draws few awaiters, often one)
                cancelled = data.draw(st.sampled_from([0, 1, 1, 2]), label="cancelled")
                awaiters = cancelled + data.draw(st.integers(1, 3), label="awaiters left")
                self.run(self._update_during(key, c, awaiters, cancelled, death, victim, what), FAULT_STEP_TIMEOUT_S)

    async def _weather(self, victim: str, death: Death, action: asyncio.Future[Any]) -> str:
        """Strike `victim` with `death` during `action`, bring it back, and return what struck."""
        self._watch(victim, death)
        while not action.done() and not death.dead and not death.frozen:
            await asyncio.sleep(limits.POLL_INTERVAL_S)
        if death.frozen:  # stopped until the client gave up on the action (or it completed)
            await asyncio.wait([action])
            death.thaw()
            struck = "stopped"
        elif (
            death.dead
            or not (death.freeze_at_message or death.disk.refuse)  # a kill yet to strike: now
            or (death.disk.refuse and death.disk.disarm())  # a refusal: its fail-stop is certain
        ):
            if death.disk.refused:
                await self._fail_stopped(death)
            struck = "refused, fail-stop" if death.disk.refused else "killed"
            death.kill()
            await self.cluster.stop_node(victim)
            await self.cluster.start_node(victim)
            struck += " while under way" if not action.done() else ""
        else:  # a freeze or a refusal that never came (disarmed: none comes later)
            struck = "did not strike"
        self.doing += f" during {action!r}: {struck}"
        if victim in self.cluster.nodes:
            self._watch(victim, Death())
        await asyncio.wait([action])
        await _answering(self.cluster)
        if struck.startswith(("killed", "refused, fail-stop")):  # it crashed
            await self._undone_deletes(victim)
        Model.tally[struck] += 1
        return struck

    @staticmethod
    async def _fail_stopped(death: Death) -> None:
        """Wait for the fail-stop that a refused write always ends in, from the node's
        write-ahead thread once that write's batch is done. Judged before it came (the disk's
        refusal counted, its fail-stop not yet run), the node was "still serving", given a new
        Death, and the fail-stop then killed that one: the node dead for good, never restarted,
        and every call on it an UnknownWorkerError until the step's deadline (seed 19 at
        10,000 steps, once)."""
        async with asyncio.timeout(FAIL_STOP_TIMEOUT_S):
            while not death.dead:
                await asyncio.sleep(limits.POLL_INTERVAL_S)

    async def _undone_deletes(self, victim: str) -> None:
        """A deletion nothing acknowledged (a dropped pointer's) may be undone by a crash just
        after it (README): the object comes back, owned by this client. Those the client deleted
        come back only: each is deleted again (as the end of the session would reclaim it), and
        must then go. Never the alias an in-place update leaves (deleted once the update
        settled): it is not stored, and if it came back it would stay, and fail the step."""
        modelled = {o.ptr.id_at_location for o in self.live.values() if o.where == victim}
        for obj_id, info in (await self.cluster.worker(victim).objects()).items():
            if obj_id not in modelled and (victim, obj_id) in RELEASED - ALIASES:
                Model.tally["deletes undone by the crash"] += 1
                self.note(f"  #? {obj_id} on {victim} came back ({info.preview}): its delete was undone")
                self.cluster.client.release(victim, obj_id)

    async def _held(self, where: str, obj_id: int) -> fedptr.ObjectInfo | None:
        return (await self.cluster.worker(where).objects()).get(obj_id)

    async def _maybe_made(
        self, ptr: fedptr.Pointer, value: float, error: BaseException, what: str, refused_whole: bool = True
    ) -> None:
        """A send or op that failed: a refusal made nothing, one in doubt made the object with
        its value or nothing. Either way the model drops its pointer. Not `refused_whole`: the
        error may be another op's of its pipeline (a refusal of a later one leaves this one)."""
        info = await self._held(ptr.location, ptr.id_at_location)
        self.note(
            f"{what}: {type(error).__name__} ({'refused' if _refused(error) else 'in doubt'}), "
            f"{'absent' if info is None else info.preview}"
        )
        if _refused(error) and refused_whole:
            assert info is None, f"{what}: refused ({error!r}) but applied: {info}"
        else:
            assert info is None or info.preview == [value] * NUMEL, f"{what}: in doubt, then holds {info.preview}"
        ptr.owned = False  # its delete goes out now (the error's traceback may hold the pointer)
        self.cluster.client.release(ptr.location, ptr.id_at_location)

    async def _send_during(self, victim: str, value: float, death: Death, what: str) -> None:
        ptr = self.cluster.worker(victim).send(torch.full((NUMEL,), value))
        action = asyncio.ensure_future(_awaited(ptr))
        what = f"{what} during send {value} to {victim}: {await self._weather(victim, death, action)}"
        if action.exception() is None:
            self._add(ptr, victim, value, what)
        else:
            await self._maybe_made(ptr, value, action.exception(), what)

    async def _op_during(self, key: int, c: float, death: Death, victim: str, what: str) -> None:
        obj = self.live[key]
        ptr = obj.ptr + c
        action = asyncio.ensure_future(_awaited(ptr))
        what = f"{what} during #{key} + {c}: {await self._weather(victim, death, action)}"
        if action.exception() is None:
            self._add(ptr, obj.where, obj.value + c, what)
        else:
            await self._maybe_made(ptr, obj.value + c, action.exception(), what)

    async def _pipeline_during(self, key: int, cs: list[float], death: Death, victim: str, what: str) -> None:
        """`#key + cs[0] + cs[1] + ...`, each un-awaited, then one await of the last, while the
        fault strikes: acknowledged, all are there; else each is absent or holds its value."""
        obj = self.live[key]
        ptrs, sums = [obj.ptr], [obj.value]
        for c in cs:
            ptrs.append(ptrs[-1] + c)
            sums.append(sums[-1] + c)
        action = asyncio.ensure_future(_awaited(ptrs[-1]))
        what = f"{what} during #{key} + {' + '.join(map(str, cs))}: {await self._weather(victim, death, action)}"
        error = action.exception()
        Model.tally["pipelines under a fault: " + ("acknowledged" if error is None else "failed")] += 1
        for i, (ptr, value) in enumerate(zip(ptrs[1:], sums[1:], strict=True)):
            if error is None:
                self._add(ptr, obj.where, value, f"{what} [{i}]")
            else:
                await self._maybe_made(ptr, value, error, f"{what} [{i}]", refused_whole=False)

    async def _update_during(
        self, key: int, c: float, awaiters: int, cancelled: int, death: Death, victim: str, what: str
    ) -> None:
        """An in-place update awaited by `awaiters` tasks, the first `cancelled` cancelled at
        once, while the fault strikes: the others hear one outcome."""
        obj = self.live[key]
        obj.ptr.add_(c)
        tasks = [asyncio.ensure_future(_awaited(obj.ptr)) for _ in range(awaiters)]
        for t in tasks[:cancelled]:
            t.cancel()
        action = asyncio.gather(*tasks[cancelled:], return_exceptions=True)
        what = (
            f"{what} during #{key}.add_({c}) awaited by {awaiters} ({cancelled} cancelled): "
            f"{await self._weather(victim, death, action)}"
        )
        awaiters -= cancelled
        Model.tally["updates under a fault with waiters cancelled"] += cancelled > 0
        heard = [o for o in action.result() if isinstance(o, BaseException)]
        assert not heard or len(heard) == awaiters, (
            f"{what}: {awaiters - len(heard)} awaiters heard ok, the others {heard}"
        )
        if not heard:
            obj.value += c
            self.note(f"{what}: acknowledged")
            return
        info = await self._held(obj.where, obj.ptr.id_at_location)
        assert info is not None, f"{what}: #{key} ({obj.value} on {obj.where}) was lost"
        allowed = [obj.value] if _refused(heard[0]) else [obj.value, obj.value + c]
        kind = "refused" if _refused(heard[0]) else "in doubt"
        self.note(f"{what}: {type(heard[0]).__name__} ({kind}), holds {info.preview}")
        assert info.preview in [[v] * NUMEL for v in allowed], (
            f"{what}: {kind}, holds {info.preview}, not one of {allowed}"
        )
        assert info.preview is not None
        obj.value = info.preview[0]

    async def _move_during(self, key: int, death: Death, victim: str, what: str) -> None:
        obj = self.live.pop(key)
        dest = victim if obj.where != victim else next(w for w in WORKERS if w != victim)
        action = asyncio.ensure_future(obj.ptr.move(dest))
        what = f"{what} during move #{key} to {dest}: {await self._weather(victim, death, action)}"
        error = action.exception()
        if error is None:
            self._add(action.result(), dest, obj.value, what)
        elif isinstance(error, fedptr.InDoubtError):
            found = await self.cluster.client.resolve(error, timeout=RESOLVE_TIMEOUT_S)
            self._add(found, found.location, obj.value, f"{what}: in doubt, resolved to {found.location}")
        else:
            assert _refused(error), f"{what}: {error!r}"
            self._add(obj.ptr, obj.where, obj.value, f"{what}: refused ({error!r}), stays")

    # --- invariants --------------------------------------------------------------------
    @invariant()
    def every_acknowledged_write_visible_once(self) -> None:
        with self.reported():
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
            with self.reported():
                self.run(_deletes_landed(self.cluster, None))
        finally:
            try:
                self.loop.run_until_complete(self.stack.aclose())
            finally:
                self.loop.close()


def _pick(data: st.DataObject, among: list[T], label: str) -> T:
    """One of `among`, drawn with the same constraints whatever its length: what is live after a
    fault depends on timing, and hypothesis takes a draw whose constraints differ from an earlier
    program's at the same place for a flaky strategy (FlakyStrategyDefinition ended a search:
    seed 6, 888 steps, no failure)."""
    return among[data.draw(st.integers(0, PICK_RANGE - 1), label=label) % len(among)]


def _refused(e: BaseException) -> bool:
    """Whether `e` says for sure that nothing was applied (any other error leaves it in doubt)."""
    return isinstance(e, fedptr.FedptrError) and not isinstance(e, INDEFINITE)


def _registrations(cluster: harness.InprocCluster) -> str:
    """Who the broker knows and what each node believes of itself: a node the broker forgot
    that never registers again shows here (its Death, its link's tasks, its session's clock)."""
    now = time.monotonic()  # the loops' clock
    broker = cluster.broker
    known = {} if broker is None else {n.decode(): i.hex() for n, i in broker.table.by_name.items()}
    heard = {} if broker is None else {i.hex(): round(now - t, 2) for i, t in broker.table.heard.items()}
    lines = [f"broker knows {known}, heard (s ago) {heard}"]
    for name in WORKERS:
        node = cluster.nodes.get(name)
        death = DEATHS.get(name)
        fate = "none" if death is None else f"dead={death.dead} frozen={death.frozen} refused={death.disk.refused}"
        if node is None:
            lines.append(f"{name}: not running; death {fate}")
            continue
        session, link = node.link.session, node.link
        tasks = [
            t.get_name() if not t.done() else f"ended {t.exception()!r}" if not t.cancelled() else "cancelled"
            for t in link._tasks
        ]
        lines.append(
            f"{name}: registered={session.registered} reregistrations={session.reregistrations} "
            f"closed={session.closed} registration pending={not session._registration_is_repeat} "
            f"heard/sent {now - session._last_heard:.2f}/{now - session._last_sent:.2f} s ago; "
            f"link tasks {tasks}; death {fate}"
        )
    return "\n  ".join(lines)


async def _awaited(p: fedptr.Pointer) -> fedptr.Pointer:
    await p
    return p


async def _gather(*aws: Coroutine[Any, Any, Any]) -> None:
    await asyncio.gather(*aws)


async def _cancelling(
    ptr: fedptr.Pointer, awaiters: int, cancelled: int, how: str, turns: int
) -> list[BaseException | None]:
    """`awaiters` tasks await `ptr`; the first `cancelled` are cut after `turns` loop turns (a
    cancel, or a `wait_for` that times out then). What each heard: None (ok) or its error."""

    async def waiter(cut: bool) -> None:
        if cut and how == "wait_for":
            await asyncio.wait_for(_awaited(ptr), timeout=turns * WAIT_FOR_TURN_S)
        else:
            await ptr

    tasks = [asyncio.ensure_future(waiter(i < cancelled)) for i in range(awaiters)]
    if how == "cancel":
        for _ in range(turns):
            await asyncio.sleep(0)
        for t in tasks[:cancelled]:
            t.cancel()
    await asyncio.wait(tasks)
    return [t.exception() if not t.cancelled() else asyncio.CancelledError() for t in tasks]


async def _answering(cluster: harness.InprocCluster) -> None:
    """Wait until every node is registered and answers: the broker's notice that a restarted
    worker's old connection is gone can reach the client just after the new one registered,
    failing a request sent in that instant with LostWorkerError (README limitations), as the
    process tests wait too. A listing changes nothing, so asking again is safe."""
    await cluster.all_registered()
    for w in WORKERS:
        while True:
            try:
                await cluster.worker(w).objects()
                break
            except (fedptr.LostWorkerError, fedptr.UnknownWorkerError):
                await asyncio.sleep(BEAT_S)


async def _listings(cluster: harness.InprocCluster) -> dict[str, dict[int, fedptr.ObjectInfo]]:
    return {w: dict(await cluster.worker(w).objects()) for w in WORKERS}


async def _deletes_landed(cluster: harness.InprocCluster, extra: dict[str, dict[int, Any]] | None) -> None:
    """The objects the model no longer has (dropped, got, moved away) are gone: deletes travel
    unanswered, so they may land a little after the step. `extra` None: the nodes are empty."""
    deadline = asyncio.get_running_loop().time() + DELETES_TIMEOUT_S
    while True:
        held = await _listings(cluster)
        left = {w: [held[w][i] for i in (held[w] if extra is None else extra[w]) if i in held[w]] for w in WORKERS}
        if not any(left.values()):
            return
        stay = {w: [(info.obj_id, info.kind, info.preview) for info in infos] for w, infos in left.items()}
        assert asyncio.get_running_loop().time() < deadline, f"objects the model does not have stay: {stay}"
        await asyncio.sleep(limits.POLL_INTERVAL_S)


@pytest.mark.timeout(3600)
@pytest.mark.slow  # a model-based search (~6-8 s at CI's size): outside the fast loop, in the full suite
def test_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The state machine, `STEPS` steps in all, seeded."""
    install(monkeypatch, DISKS)
    # a refused write's fail-stop ends the process: here, it kills the node (cut off, restarted)
    monkeypatch.setattr(node_module, "fail_stop", lambda node, why: DEATHS[node].kill())
    monkeypatch.setattr(limits, "RESOLVE_RETRY_S", 0.05)  # an in-doubt send or move settles sooner
    release = fedptr.Client.release

    def recorded(client: fedptr.Client, location: str, obj_id: int) -> None:
        RELEASED.add((location, obj_id))
        release(client, location, obj_id)

    monkeypatch.setattr(fedptr.Client, "release", recorded)
    keep = pointer_module._Keep.__init__

    def alias(holder: pointer_module._Keep, kept: fedptr.Pointer) -> None:  # the alias an update leaves
        ALIASES.add((kept.location, kept.id_at_location))
        keep(holder, kept)

    monkeypatch.setattr(pointer_module._Keep, "__init__", alias)
    programs = max(1, STEPS // STEPS_PER_PROGRAM)
    print(f"model-based test: seed {SEED}, {programs} programs of up to {STEPS_PER_PROGRAM} steps")
    Model.steps_run = 0
    Model.tally.clear()
    started = time.monotonic()
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
            phases=[Phase.generate],  # no shrinking: a replay under faults takes other paths
        ),
        _min_steps=STEPS_PER_PROGRAM // 2,
    )
    print(f"model-based test: {Model.steps_run} steps in {time.monotonic() - started:.0f} s; {dict(Model.tally)}")
    # each action of round two (branch model2) was drawn and went through
    missing = [what for least, whats in DRAWN.items() if least <= STEPS for what in whats if not Model.tally[what]]
    assert not missing, f"never drawn, or never went through: {missing}"


DRAWN = {
    400: (  # the CI default
        "pipelines acknowledged",
        "pipelines killed once acknowledged",
        "pipelines under a fault: failed",
        "waiters cut by cancel",
        "waiters cut by wait_for",
        "operands dropped in flight",
    ),
    # rarer: a fault strikes one step in 15, during one of 5 actions (a pipeline under a fault
    # is seldom acknowledged: 0 or 1 in 2,000 steps, so that is counted, not required)
    2000: ("updates under a fault with waiters cancelled",),
}
"""From how many steps on each outcome must have been counted in `Model.tally`."""
