"""Issue 10, one test per cause: no acknowledged write is lost, a definite failure leaves the
pointer usable, and disk work never blocks a node's event loop.

The unit tests drive the write-ahead queue, the store and the reply cache directly; the others
run their own cluster with ``--store`` nodes (marked destructive) and kill -9 or SIGSTOP them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import msgpack
import pytest
import pytest_asyncio
import torch
from fedptr.nodes.durable import DurableStore, recover
from fedptr.nodes.replies import ReplyCache, Seen
from fedptr.nodes.store import Entry, Store
from fedptr.nodes.writeahead import WriteAhead

import fedptr
from fedptr import wire
from fedptr.errors import DamagedStoreError
from fedptr.pointer import effect
from fedptr.tensors import to_raw
from tests import nemesis
from tests.conftest import eventually

pytestmark = pytest.mark.slow  # process-level: outside the fast loop (-m "not slow")

T = TypeVar("T")
BEAT_S = 0.1
LIVENESS = 3
CALL_TIMEOUT_S = 5.0


# --- unit tests ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_write_ahead_writes_in_order_in_batches_and_skips_what_a_later_change_undoes(tmp_path: Path) -> None:
    wal = WriteAhead(DurableStore(tmp_path), "bob")
    futures = [wal.save_tensor(i, torch.full((4,), float(i)), "c", "", {}) for i in range(200)]
    futures += [wal.remove(i) for i in range(0, 200, 2)]
    futures.append(wal.save_tensor(7, torch.full((4,), 70.0), "c", "", {}))  # a later value wins
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert wal.batches < len(futures)  # one directory fsync per batch, not per change
    await wal.aclose()
    loaded = DurableStore(tmp_path).load()
    assert sorted(loaded) == list(range(1, 200, 2))
    assert torch.equal(loaded[7].value, torch.full((4,), 70.0))


@pytest.mark.asyncio
async def test_write_ahead_copies_the_tensor_so_a_later_in_place_update_cannot_tear_it(tmp_path: Path) -> None:
    wal = WriteAhead(DurableStore(tmp_path), "bob")
    t = torch.zeros(1 << 16)
    first = wal.save_tensor(1, t, "c", "", {})
    t.add_(1)  # after queueing, before (or while) the thread writes
    await asyncio.wait_for(first, 10)
    await wal.aclose()
    assert torch.equal(DurableStore(tmp_path).load()[1].value, torch.zeros(1 << 16))


class _SlowRemovals(DurableStore):
    """A store whose removals wait for `release`, and say on the loop when one has started."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.loop = asyncio.get_running_loop()
        self.removing: asyncio.Future[None] = self.loop.create_future()
        self.release = threading.Event()

    def remove(self, obj_id: int) -> None:
        self.loop.call_soon_threadsafe(lambda: self.removing.done() or self.removing.set_result(None))
        self.release.wait(10)
        super().remove(obj_id)


@pytest.mark.asyncio
async def test_a_barrier_waits_for_the_removals_queued_before_it(tmp_path: Path) -> None:
    # A listing promises only what a restart keeps: a deletion still in the slow removal lane
    # when the barrier settled came back after kill -9 (the CI failure of the restart test below)
    durable = _SlowRemovals(tmp_path)
    wal = WriteAhead(durable, "bob")
    written = wal.save_tensor(1, torch.ones(4), "c", "", {})
    wal.remove(1)
    barrier = wal.barrier()
    await asyncio.wait_for(durable.removing, 10)
    # the thread settles each lane's batch before it starts the next, and the loop runs
    # callbacks in order: the write has settled by now, the removal has not
    assert written.done() and not barrier.done()
    durable.release.set()
    await asyncio.wait_for(barrier, 10)
    assert DurableStore(tmp_path).load() == {}
    await wal.aclose()


class _FailingRemovals(DurableStore):
    def remove(self, obj_id: int) -> None:
        raise OSError("read-only file system")


@pytest.mark.asyncio
async def test_a_barrier_fails_when_a_change_before_it_failed(tmp_path: Path) -> None:
    # a Clear or a listing must not promise a deletion that the disk refused
    wal = WriteAhead(_FailingRemovals(tmp_path), "bob")
    await wal.save_tensor(1, torch.ones(4), "c", "", {})
    removed = wal.remove(1)
    barrier = wal.barrier()
    with pytest.raises(fedptr.RemoteError, match="read-only file system"):
        await asyncio.wait_for(barrier, 10)
    assert removed.done() and removed.exception() is not None
    await asyncio.wait_for(wal.barrier(), 10)  # nothing failed after it
    await wal.aclose()


@pytest.mark.asyncio
async def test_a_result_deleted_while_it_was_computed_is_neither_charged_nor_stored(tmp_path: Path) -> None:
    store = Store("bob", max_bytes=1 << 20, durable=DurableStore(tmp_path))
    pending = Entry.tensor(owner="c")
    store.add(5, pending)
    assert store.discard(5) is pending  # the Delete arrives while the op still runs
    assert store.commit(5, pending, torch.ones(1 << 17)) is None  # the op ends: nothing kept
    assert store.bytes == 0 and 5 not in store.entries
    await store.aclose()
    assert DurableStore(tmp_path).load() == {}


@pytest.mark.asyncio
async def test_a_taken_object_is_kept_on_disk_until_released_and_a_move_record_restores_it_taken(
    tmp_path: Path,
) -> None:
    store = Store("bob", durable=DurableStore(tmp_path))
    entry = Entry.tensor(torch.arange(3.0), "c")
    store.add(1, entry)
    await store.commit(1, entry, torch.arange(3.0))
    store.take(1, "c")
    await store.mark_moving(1, "alice", 99)
    await store.aclose()
    again = Store("bob", durable=DurableStore(tmp_path))  # a crash here: the move is in doubt
    in_doubt = again.restore()
    assert [(i, dest, new) for i, _, dest, new in in_doubt] == [(1, "alice", 99)]
    assert 1 in again.taken and 1 not in again.entries
    await again.put_back(1, in_doubt[0][1])  # alice never got it
    await again.aclose()
    third = Store("bob", durable=DurableStore(tmp_path))
    assert third.restore() == [] and 1 in third.entries
    await third.aclose()


async def _stored_store(directory: Path) -> None:
    """Objects 1 and 2 (tensors) and 3 (a pointer), written as a node writes them."""
    wal = WriteAhead(DurableStore(directory), "bob")
    await wal.save_tensor(1, torch.arange(4.0), "c", "", {})
    await wal.save_tensor(2, torch.ones(1024), "c", "", {})
    await wal.save_pointer(3, "alice", 99, "c")
    await wal.aclose()


def _older(directory: Path) -> None:
    """Object 2 as an older release wrote it: its record without a byte count, its data in 2.bin."""
    (directory / "2.bin").write_bytes(torch.ones(1024).numpy().tobytes())
    (directory / "2.rec").write_bytes(msgpack.packb(["tensor", "float32", [1024], "", 0, "c", "", {}]))


def _torn(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: _torn(d / "2.rec"), "2.rec"),  # torn record (its data follows it in the file)
        (lambda d: (_older(d), _torn(d / "2.bin")), "2.rec"),  # an older release's torn tensor file
        (lambda d: (_older(d), (d / "2.bin").unlink()), "2.rec"),  # an older record without its data
        (lambda d: (d / "3.rec").write_bytes(b"\xc1garbage"), "3.rec"),  # a record that does not parse
        (lambda d: (d / "2.mov").write_bytes(b"\x92"), "2.rec"),  # a move record that does not parse
    ],
)
async def test_a_damaged_store_refuses_to_load_and_names_the_file(
    tmp_path: Path, damage: Callable[[Path], object], named: str
) -> None:
    # issue 19: a torn tensor file or a garbage record was skipped with a warning, and an
    # acknowledged object silently disappeared
    await _stored_store(tmp_path)
    damage(tmp_path)
    with pytest.raises(DamagedStoreError, match=named) as refused:
        DurableStore(tmp_path).load()
    assert str(tmp_path / named) in refused.value.files
    lost = recover(tmp_path)  # the operator's explicit decision
    assert [d.files[0] for d in lost] == [named]
    assert (tmp_path / "damaged" / named).exists()
    assert sorted(DurableStore(tmp_path).load()) == sorted({1, 2, 3} - {int(named.split(".")[0])})
    assert recover(tmp_path) == []


@pytest.mark.asyncio
async def test_what_an_interrupted_write_or_removal_leaves_is_not_damage(tmp_path: Path) -> None:
    await _stored_store(tmp_path)
    (tmp_path / "1.rec").unlink()  # a removal interrupted after the record (it goes first)
    (tmp_path / "7.bin.tmp").write_bytes(b"torn")  # a write interrupted before its rename
    (tmp_path / "8.mov").write_bytes(b"\x92")  # the move record of an object removed since
    assert sorted(DurableStore(tmp_path).load()) == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2.rec", "3.rec"]


@pytest.mark.asyncio
async def test_an_older_releases_store_loads_and_a_rewrite_replaces_its_data_file(tmp_path: Path) -> None:
    await _stored_store(tmp_path)
    _older(tmp_path)
    assert torch.equal(DurableStore(tmp_path).load()[2].value, torch.ones(1024))  # type: ignore[arg-type]
    wal = WriteAhead(DurableStore(tmp_path), "bob")
    await wal.save_tensor(2, torch.zeros(2, 3), "c", "", {})
    await wal.aclose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.rec", "2.rec", "3.rec"]
    assert torch.equal(DurableStore(tmp_path).load()[2].value, torch.zeros(2, 3))  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("rewrite", ["tensor", "pointer"])
async def test_a_power_cut_during_an_older_objects_rewrite_leaves_it_old_or_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rewrite: str
) -> None:
    # review9: the rewrite renamed the new record into place, then unlinked the older release's
    # 2.bin before any fsync of the directory made the rename durable: a power cut that undid
    # the rename (as tests/nemesis.py models one) left the old record without its data, and an
    # acknowledged object was lost to a DamagedStoreError
    disk: list[nemesis.CrashingDisk | None] = [None]  # None: the real disk (setting up, restarting)
    nemesis.install(monkeypatch, lambda: disk[0])
    new = torch.zeros(3) if rewrite == "tensor" else ("alice", 7)
    at = 0
    while True:  # a crash at each storage call of the rewrite, then a power cut
        at += 1
        shutil.rmtree(tmp_path, ignore_errors=True)
        await _stored_store(tmp_path)
        _older(tmp_path)
        store = DurableStore(tmp_path)
        disk[0] = crashing = nemesis.CrashingDisk(at)
        with contextlib.suppress(nemesis.Crashed):
            if rewrite == "tensor":
                store.write_tensor(2, to_raw(torch.zeros(3)).data, "float32", [3], "c", "", {})
            else:
                store.write_pointer(2, "alice", 7, "c")
            store.sync()
        store.close()
        disk[0] = None
        if not crashing.crashed:
            break  # past the rewrite's last call
        crashing.power_cut()
        value = DurableStore(tmp_path).load()[2].value
        was_new = value == new if rewrite == "pointer" else torch.equal(value, new)  # type: ignore[arg-type]
        assert was_new or torch.equal(value, torch.ones(1024)), f"crash at call {at}: {value}"  # type: ignore[arg-type]
    assert at > 4


@pytest.mark.asyncio
@pytest.mark.parametrize("files", ["older", "moving"])
async def test_a_power_cut_during_a_removal_never_leaves_a_record_without_its_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: str
) -> None:
    """Object 2 with a second file, an older release's 2.bin or a move's 2.mov, removed (as after
    a delete, or once its move's destination holds it): a crash at each storage call of the
    removal, then a power cut that brings back any subset of its unsynced unlinks. The store
    loads with 2 whole as it was, or without it: never a record without its data (a store that
    refuses to load) nor a moved object's record without its move record (a second owning
    copy, the destination's being the other)."""
    disk: list[nemesis.CrashingDisk | None] = [None]  # None: the real disk (setting up, loading)
    nemesis.install(monkeypatch, lambda: disk[0])
    at, cases = 0, 0
    while True:
        at += 1
        revivals: list[frozenset[str]] = [frozenset()]
        while revivals:
            revived = revivals.pop()
            shutil.rmtree(tmp_path, ignore_errors=True)
            await _stored_store(tmp_path)
            if files == "older":
                _older(tmp_path)
            else:
                DurableStore(tmp_path).write_move(2, "alice", 7)
            store = DurableStore(tmp_path)
            disk[0] = crashing = nemesis.CrashingDisk(at)
            with contextlib.suppress(nemesis.Crashed):
                store.remove(2)
                store.sync()
            store.close()
            disk[0] = None
            if not crashing.crashed:
                break  # past the removal's last call
            if not revived:  # the first run of this crash point: every subset of its unlinks next
                unlinks = crashing.unsynced_unlinks
                revivals += [
                    frozenset(p for i, p in enumerate(unlinks) if m >> i & 1) for m in range(1, 1 << len(unlinks))
                ]
            crashing.power_cut(revived)
            cases += 1
            where = f"crash at call {at}, unlinks undone {sorted(Path(p).name for p in revived)}"
            try:
                loaded = DurableStore(tmp_path).load()
            except DamagedStoreError as e:
                raise AssertionError(f"{where}: the store does not load: {e}") from e
            if 2 in loaded:
                assert torch.equal(loaded[2].value, torch.ones(1024)), where  # type: ignore[arg-type]
                assert files == "older" or loaded[2].moving == ("alice", 7), f"{where}: {loaded[2].moving}"
        if not crashing.crashed:
            break
    assert at > 3 and cases > at, (at, cases)


def test_reply_cache_is_bounded_in_bytes_and_refuses_replays_of_large_replies() -> None:
    cache = ReplyCache("bob", max_entries=10_000, max_bytes=1 << 20, max_reply_bytes=64 << 10)
    for i in range(1_000):
        key = ("c", i.to_bytes(8, "little"))
        assert cache.begin(key) is Seen.NEW
        cache.finish(key, wire.TensorReply(to_raw(torch.zeros(8 << 10, dtype=torch.uint8))))
    assert cache.nbytes <= 1 << 20
    big = ("c", b"big")
    cache.begin(big)
    cache.finish(big, wire.TensorReply(to_raw(torch.zeros(1 << 20, dtype=torch.uint8))))
    assert isinstance(cache.cached(big), wire.Failure)  # a replay is refused, never run twice
    cache.forget_peer("c")
    assert len(cache) == 0 and cache.nbytes == 0


def test_reply_cache_keeps_no_answer_to_a_peer_that_left() -> None:
    """A request still running, or queued behind its client's computations, when that client's
    session ended is answered after `forget_peer`: no replay can come, so the answer is not kept
    (it was, until 10,000 entries of departed clients' failures filled the cache, issue 19 cause 6)."""
    cache = ReplyCache("bob")
    key = ("gone", b"\1" * 8)
    assert cache.begin(key) is Seen.NEW
    cache.forget_peer("gone")
    cache.finish(key, wire.Failure(wire.FailureCode.NOT_FOUND.value, "", "no object 7", "bob", ["bob"]))
    assert len(cache) == 0
    assert cache.begin(key) is Seen.NEW  # the name registered again: a new session, nothing remembered


def test_reply_cache_record_is_what_the_figures_time_a_request_by() -> None:
    """One record per request: `begin` notes its kind and arrival, `finish` hands that record to
    the node's figures (its latency), and the running count is the figures' ``pending``."""
    cache = ReplyCache("bob")
    key = ("c", b"\2" * 8)
    before = time.monotonic()
    assert cache.begin(key, "Op") is Seen.NEW
    assert cache.running == 1
    started = cache.finish(key, wire.Ok())
    assert started is not None and started[0] == "Op" and before <= started[1] <= time.monotonic()
    assert cache.running == 0
    assert cache.finish(key, wire.Ok()) is None  # answered once: nothing left to time


# --- on a cluster ----------------------------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="function")
async def stored(tmp_path: Path) -> AsyncIterator[fedptr.Cluster]:
    args = {n: ["--store", str(tmp_path / n)] for n in ("bob", "alice")}
    # CURVE off: with it on, a send right after bob's restart can meet a LOST notice for the
    # old incarnation (README limitations); these tests are about the disk, not names
    async with fedptr.local_cluster(
        ["bob", "alice"],
        call_timeout=CALL_TIMEOUT_S,
        heartbeat_s=BEAT_S,
        liveness=LIVENESS,
        node_args=args,
        curve=False,
    ) as c:
        yield c


async def _restart(c: fedptr.Cluster, name: str) -> None:
    """Kill -9 and restart `name`, then wait until it answers: the broker's notice that the old
    incarnation is gone may still be on its way, and would fail a request sent meanwhile."""
    c.signal(name, signal.SIGKILL)
    await c.start_node(name)
    await _answers(c, name)


async def _answers(c: fedptr.Cluster, name: str) -> None:
    """Wait until worker `name` answers a listing (20 s at most)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            await c.client.worker(name).objects()
            return
        except (fedptr.LostWorkerError, fedptr.DeadlineExceeded):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def _sent(c: fedptr.Cluster, name: str, value: torch.Tensor) -> fedptr.Pointer:
    """`value` sent to `name`, again if the first try was cut by a liveness verdict: 64 MiB
    received and fsynced on a loaded 2-core machine can outlast these tests' 0.3 s liveness (an
    object the failed try may have made is reclaimed with the session)."""
    try:
        return await c.client.worker(name).send(value)
    except fedptr.LostWorkerError:
        await _answers(c, name)
        return await c.client.worker(name).send(value)


async def _holds(w: fedptr.Worker, obj_id: int) -> bool:
    try:
        await w.client.call(w.name, wire.Has(obj_id))
        return True
    except fedptr.ObjectNotFoundError:
        return False


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_acknowledged_in_place_updates_survive_kill_9(stored: fedptr.Cluster) -> None:
    bob = stored.client.worker("bob")
    counter = await bob.send(torch.zeros(3))
    for _ in range(5):
        await counter.add_(1)
    big = await bob.send(torch.zeros(1 << 17))  # offloaded to a thread: the slow path too
    await big.add_(2)
    await _restart(stored, "bob")
    assert torch.equal(await (counter + 0).get(), torch.full((3,), 5.0))  # type: ignore[arg-type]
    assert torch.equal(await (big + 0).get(), torch.full((1 << 17,), 2.0))  # type: ignore[arg-type]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_moves_after_the_source_restarts_are_not_answered_with_stale_replies(stored: fedptr.Cluster) -> None:
    bob, alice = stored.client.worker("bob"), stored.client.worker("alice")
    for _ in range(5):
        await (await bob.send(torch.ones(2))).move(alice)
    await _restart(stored, "bob")  # its request ids start over: alice must not replay old replies
    moved = [await (await bob.send(torch.full((2,), float(i)))).move(alice) for i in range(5)]
    for i, p in enumerate(moved):
        assert torch.equal(await (p + 0).get(), torch.full((2,), float(i)))  # type: ignore[arg-type]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_crash_mid_move_leaves_the_object_on_exactly_one_node_under_a_known_id(
    stored: fedptr.Cluster,
) -> None:
    bob, alice = stored.client.worker("bob"), stored.client.worker("alice")
    value = torch.arange(4 << 20, dtype=torch.float32)  # 16 MiB: streamed, and in flight for the crash
    for delay in (0.005, 0.03, 0.06):
        x = await _sent(stored, "bob", value)
        move = asyncio.ensure_future(x.move(alice))
        await asyncio.sleep(delay)
        await _restart(stored, "bob")
        try:
            outcome = await move
        except fedptr.InDoubtError as e:
            outcome = await stored.client.resolve(e, timeout=30)
        except fedptr.FedptrError:
            outcome = x  # a definite failure: it stayed at bob
        holders = [await _holds(bob, x.id_at_location), await _holds(alice, outcome.id_at_location)]
        assert holders.count(True) == 1 or outcome is x, holders
        where = bob if outcome.location == "bob" else alice
        assert await _holds(where, outcome.id_at_location)
        other = (alice, None) if outcome is x else (bob, x.id_at_location)
        if other[1] is not None:
            assert not await _holds(other[0], other[1])
        assert torch.allclose(await outcome.sum().get(), value.sum())  # type: ignore[arg-type]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_failed_pointer_send_and_a_failed_move_leave_the_pointer_usable(stored: fedptr.Cluster) -> None:
    client = stored.client
    x = await client.worker("bob").send(torch.arange(3.0))
    with pytest.raises(fedptr.UnknownWorkerError):
        await x.send(client.worker("nobody"))
    with pytest.raises(fedptr.UnknownWorkerError):
        await x.move(client.worker("nobody"))
    assert x.owned
    assert torch.equal(await (x + 1).get(), torch.arange(3.0) + 1)  # type: ignore[arg-type]
    p = await x.send(client.worker("alice"))  # and it can still be sent for real
    inner = await p.get()
    assert isinstance(inner, fedptr.Pointer)
    assert torch.equal(await inner.get(), torch.arange(3.0))  # type: ignore[arg-type]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_get_that_failed_while_the_node_was_paused_can_be_retried(stored: fedptr.Cluster) -> None:
    client = stored.client
    x = await client.worker("bob").send(torch.arange(4.0))
    stored.signal("bob", signal.SIGSTOP)
    with pytest.raises((fedptr.LostWorkerError, fedptr.DeadlineExceeded)):
        await x.get()
    stored.signal("bob", signal.SIGCONT)
    assert x.owned
    assert await eventually(lambda: _registered(client, "bob"), timeout=10)
    assert torch.equal(await x.get(), torch.arange(4.0))  # type: ignore[arg-type]
    assert not x.owned
    assert await eventually(lambda: _empty(client.worker("bob")))  # the get's second phase deleted it


async def _registered(client: fedptr.Client, name: str) -> bool:
    return name in await client.workers()


async def _empty(w: fedptr.Worker) -> bool:
    return await w.objects() == {}


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_result_deleted_while_computing_does_not_come_back_after_a_restart(stored: fedptr.Cluster) -> None:
    bob = stored.client.worker("bob")
    x = await bob.send(torch.randn(1200, 1200))
    for _ in range(4):
        y = x @ x  # offloaded: still computing when its pointer is dropped
        del y
    await asyncio.sleep(0)
    assert await eventually(lambda: _only(bob, x.id_at_location), timeout=10)
    await _restart(stored, "bob")
    assert await _only(bob, x.id_at_location)


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_an_acknowledged_clear_survives_kill_9(stored: fedptr.Cluster) -> None:
    # unlinks take the write-ahead's slow lane, a few per batch: with a hundred objects the
    # Clear's Ok came back while most of them were still on disk, and came back after a restart
    bob = stored.client.worker("bob")
    for start in range(0, 120, 30):  # in rounds: a burst of writes must not cost bob a heartbeat
        await asyncio.gather(*(bob.send(torch.full((256,), float(i))) for i in range(start, start + 30)))
    await bob.clear()
    await _restart(stored, "bob")  # kill -9 at once: what the Ok promised must be on disk already
    assert await bob.objects() == {}


async def _only(w: fedptr.Worker, obj_id: int) -> bool:
    return list(await w.objects()) == [obj_id]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_delete_storm_does_not_delay_heartbeats(tmp_path: Path) -> None:
    beat, liveness = 0.2, 3
    args = {"bob": ["--store", str(tmp_path / "bob")]}
    async with fedptr.local_cluster(
        ["bob"], call_timeout=CALL_TIMEOUT_S, heartbeat_s=beat, liveness=liveness, node_args=args
    ) as c:
        bob = c.client.worker("bob")
        probe = await bob.send(torch.ones(1))
        async with c.connect(timeout=30, heartbeat_s=beat, liveness=liveness) as hoarder:
            held = []
            for i in range(0, 300, 10):  # 1 MiB each, a few at a time so this process keeps beating
                held += [hoarder.worker("bob").send(torch.full((1 << 18,), float(i + j))) for j in range(10)]
                await asyncio.wait_for(held[-1]._wait(), 30)
            latencies: list[float] = []
            stop = asyncio.Event()

            async def ping() -> None:
                while not stop.is_set():
                    t0 = time.monotonic()
                    await (probe + 1)
                    latencies.append(time.monotonic() - t0)
                    await asyncio.sleep(0.01)

            pinger = asyncio.ensure_future(ping())
            await asyncio.sleep(0.2)
        # the hoarder left: bob unlinks 300 files (600 with records) while the pinger pings
        assert await eventually(lambda: _only(bob, probe.id_at_location), timeout=20)
        await asyncio.sleep(0.3)
        stop.set()
        await pinger  # a LostWorkerError here would mean bob was taken for dead
        assert max(latencies) < beat * liveness, f"bob answered after {max(latencies):.2f} s"
        assert "'bob' is gone" not in c.log("broker")
        assert "registering again" not in c.log("bob")


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_cancelled_waiter_does_not_poison_the_pointer(stored: fedptr.Cluster) -> None:
    bob = stored.client.worker("bob")
    x = await bob.send(torch.ones(600, 600))
    y = x @ x  # offloaded: still computing while a waiter gives up
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(y._wait(), 0.001)
    others = await asyncio.gather(y._wait(), y._wait())  # every other waiter still gets the value
    assert all(p is y for p in others)
    assert torch.equal(await y.sum().get(), torch.tensor(600.0 * 600 * 600))  # type: ignore[arg-type]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_dropped_in_doubt_move_deletes_nothing_and_the_session_reclaims_it(tmp_path: Path) -> None:
    # issue 19: the move's candidates were owning pointers, so dropping the InDoubtError deleted
    # the object wherever the move had left it (the soak lost 5 objects so). Slower beats than
    # `stored`: a stall of this process (gc.collect on a loaded machine) must not make the broker
    # forget the mover, and drop its deletes, which would hide the bug
    beat, liveness = 0.5, 4
    args = {n: ["--store", str(tmp_path / n)] for n in ("bob", "alice")}
    async with fedptr.local_cluster(
        ["bob", "alice"], call_timeout=CALL_TIMEOUT_S, heartbeat_s=beat, liveness=liveness, node_args=args
    ) as c:
        async with c.connect(timeout=CALL_TIMEOUT_S, heartbeat_s=beat, liveness=liveness) as mover:
            bob, alice = mover.worker("bob"), mover.worker("alice")
            x = await bob.send(torch.arange(8.0))
            old_id = x.id_at_location
            c.signal("alice", signal.SIGSTOP)  # the destination stops: the move's answer is lost
            try:
                with pytest.raises(fedptr.InDoubtError) as raised:
                    await x.move(alice)
            finally:
                c.signal("alice", signal.SIGCONT)
            new_id = raised.value.candidates[1].id_at_location

            async def settled() -> bool:  # bob knows where it went, and alice answers again
                try:
                    await _holds(bob, old_id)
                    await _holds(alice, new_id)
                    return True
                except (fedptr.LostWorkerError, fedptr.DeadlineExceeded, fedptr.InDoubtError):
                    return False

            assert await eventually(settled, timeout=20)
            del x, raised  # the caller drops the error and both candidates, unresolved
            gc.collect()
            await asyncio.sleep(0)  # a delete queued by a collected pointer leaves in this turn
            # listings by the mover: each waits behind the deletes it sent before, if any
            listed = [old_id in await bob.objects(), new_id in await alice.objects()]
            assert listed.count(True) == 1, "the moved object was deleted"
        # the mover's session ended: what its unresolved candidates left is reclaimed
        assert await eventually(lambda: _empty(c.client.worker("bob")), timeout=10)
        assert await eventually(lambda: _empty(c.client.worker("alice")), timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, a disk that really fills up (mounting it needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode(errors='replace')}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; returns the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: full
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_write_the_disk_refused_stops_the_node_before_anything_reads_it(small_disk: Path) -> None:
    # issue 19: the in-place update failed to reach a full disk but stayed in memory: the client
    # got a definite error (a retry would apply it twice) while reads saw it, and a restart undid it
    args = {"bob": ["--store", str(small_disk / "bob")]}
    async with fedptr.local_cluster(
        ["bob"], call_timeout=CALL_TIMEOUT_S, heartbeat_s=BEAT_S, liveness=LIVENESS, node_args=args, curve=False
    ) as c:
        bob = c.client.worker("bob")
        x = await bob.send(torch.zeros(1024))
        filler = _fill(small_disk)
        with pytest.raises(fedptr.FedptrError) as failed:
            await x.add_(1)
        if not isinstance(failed.value, (fedptr.LostWorkerError, fedptr.DeadlineExceeded)):
            # a definite failure must mean nothing was applied (a get writes nothing to the disk)
            assert torch.equal(await x.get(), torch.zeros(1024)), f"{failed.value!r}, yet the update was applied"  # type: ignore[arg-type]
        status = await asyncio.wait_for(asyncio.to_thread(c.processes["bob"].wait), 10)
        assert status == 74, c.log("bob")[-2000:]
        assert "a write to the store failed" in c.log("bob")
        filler.unlink()
        await c.start_node("bob")
        assert await eventually(lambda: _registered(c.client, "bob"), timeout=10)
        # the update was never acknowledged, nor applied: the restart serves what the disk holds
        value = await _retried(x.get)
        assert torch.equal(value, torch.zeros(1024))  # type: ignore[arg-type]


async def _retried(call: Callable[[], Awaitable[T]], timeout: float = 20) -> T:
    """`call()` once the worker it goes to answers (a restarted one may not be known yet)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except (fedptr.LostWorkerError, fedptr.DeadlineExceeded, fedptr.UnknownWorkerError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_node_refuses_a_damaged_store_until_the_operator_recovers_it(tmp_path: Path) -> None:
    store = tmp_path / "bob"
    await _stored_store(store)
    _torn(store / "2.rec")
    args = {"bob": ["--store", str(store)]}
    with pytest.raises(fedptr.FedptrError, match=r"damaged.*2\.rec"):
        async with fedptr.local_cluster(["bob"], node_args=args, curve=False):
            pass
    recovered = subprocess.run(
        [sys.executable, "-m", "fedptr.cli", "store", "recover", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert recovered.returncode == 1, recovered.stderr
    assert "lost object 2: 2.rec" in recovered.stdout
    async with fedptr.local_cluster(["bob"], node_args=args, curve=False) as c:
        assert sorted(await c.client.worker("bob").objects()) == [1, 3]


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_entries_of_requests_lost_with_their_node_are_deleted_once_it_is_back(stored: fedptr.Cluster) -> None:
    # issue 19: the result entry of an in-place update, and a send, both failed because bob was
    # declared lost: their deletes went out while the broker had forgotten bob, and once bob
    # came back (processing the requests still in its socket) the entries stayed for good
    bob = stored.client.worker("bob")
    x = await bob.send(torch.zeros(4))
    stored.signal("bob", signal.SIGSTOP)
    try:
        update = effect("add_", (x, 1))  # its result entry is an alias of x
        sent = bob.send(torch.ones(4))
        for lost in (update, sent):
            with pytest.raises((fedptr.LostWorkerError, fedptr.DeadlineExceeded)):
                await lost
        del sent, lost  # the caller drops the pointer of the send that failed
        gc.collect()
        await asyncio.sleep(0)  # the deletes leave now, while the broker has forgotten bob
    finally:
        stored.signal("bob", signal.SIGCONT)
    await _retried(bob.objects)  # bob answers: the deletes it may have missed are sent again
    assert await eventually(lambda: _only(bob, x.id_at_location), timeout=10), await bob.objects()


@pytest.mark.destructive
@pytest.mark.asyncio(loop_scope="function")
async def test_a_pointer_send_in_doubt_names_the_returned_pointer_and_resolves(stored: fedptr.Cluster) -> None:
    # the pointer `send` returned is the send's candidate: it deletes nothing while in doubt
    # (the soak caught a first version raising DataDependentError here instead)
    async with stored.connect(timeout=2.0, heartbeat_s=BEAT_S, liveness=LIVENESS) as sender:
        x = await sender.worker("bob").send(torch.arange(3.0))
        stored.signal("bob", signal.SIGSTOP)  # alice stores the pointer; bob's grant goes unanswered
        try:
            q = x.send(sender.worker("alice"))
            with pytest.raises(fedptr.InDoubtError) as raised:
                await q
        finally:
            stored.signal("bob", signal.SIGCONT)
        assert raised.value.candidates == [x, q] and q.in_doubt and x.in_doubt
        found = await sender.resolve(raised.value, timeout=20)
        assert found in (x, q) and found.owned and not found.in_doubt
        assert [p.owned for p in (x, q)].count(True) == 1
        held = await _retried(lambda: _fetch_chain(found))
        assert torch.equal(held, torch.arange(3.0))


async def _fetch_chain(p: fedptr.Pointer) -> torch.Tensor:
    value = await p.get()
    while isinstance(value, fedptr.Pointer):
        value = await value.get()
    assert isinstance(value, torch.Tensor)
    return value
