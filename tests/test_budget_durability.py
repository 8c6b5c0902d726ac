"""Every DP release the client received is covered by its owner's budget as persisted on disk,
after any crash point or disk fault (docs/REDTEAM.md, "Budget durability by property").

The owner bob releases, one kind at a time: a contribution to the aggregator agg (M1's charge),
a DP-SGD run on his data (M2), and his masked input to a secure mean of bob's and alice's
(SecAgg+, which agg releases only with both). A first run of each counts bob's storage calls (his privacy
budget's and his write-ahead's: tests/nemesis.py's per-node disk) and the replies he sends.
Then for every storage call: bob dies there (kill -9), or the disk refuses that call (full, an
I/O error) and goes on; and for every reply: bob dies just before sending it. After each case
bob is restarted from his disk (a node refuses to start with a torn or rolled-back history), and
the history on disk must (a) hold a charge for every release the client received, and spend at
least what the release's reply reported; (b) after a refused budget write, the client got no
release but a typed error; (c) load (never torn) and never spend less than before the case.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
from fedptr.nodes import audit as audit_module
from fedptr.nodes import budget as budget_module
from fedptr.nodes import node as node_module
from fedptr.nodes.node import NodeConfig
from torch import nn

import fedptr
from fedptr import aggregate, dp, limits

from . import harness
from .nemesis import EIO, FULL, CrashingDisk, Death, Disks, install

OWNER = NodeConfig(trust=["agg"], epsilon=1e6, dp_noise_multiplier=5.0)
DATA = {"d": {"x": torch.ones(8, 1), "y": torch.zeros(8, 1)}}
CALL_TIMEOUT_S = 5.0
"""A call to a node killed mid-release fails at once (the restart's notice); this bounds the rest."""
CASE_TIMEOUT_S = 30.0
"""A whole case: the release, the restart, the checks (slow under a loaded machine)."""

Release = Callable[[fedptr.Client], Awaitable[float]]
"""A DP release at bob: returns the epsilon spent its reply reported."""


async def _contribution(client: fedptr.Client) -> float:
    x, _ = await client.worker("bob").search("d")
    value = x.mean(0)
    await value  # written before the charge begins: the storage calls come in one order each run
    _, spent = await dp.contribute(value, "agg")
    return spent.epsilon_spent


async def _dp_sgd(client: fedptr.Client) -> float:
    bob = client.worker("bob")
    x, y = await bob.search("d")
    model = await bob.send(nn.Linear(1, 1))
    assert isinstance(model, fedptr.ModulePointer)
    spent = await dp.train(
        model, x, y, lr=0.1, sample_rate=0.5, steps=2, max_grad_norm=1.0, noise_multiplier=5.0, loss="mse_loss"
    )
    return spent.epsilon_spent


async def _secure_mean(client: fedptr.Client) -> float:
    values = []
    for owner in ("bob", "alice"):
        x, _ = await client.worker(owner).search("d")
        values.append(x.mean(0))
        await values[-1]
    _, release = await dp.secure_mean(values, "agg")
    return release.spent["bob"].epsilon_spent  # the aggregator needs both owners: bob survived


def _history(c: harness.InprocCluster) -> list[tuple[float, float, int]]:
    """bob's charges as his disk holds them (raises ValueError for a torn history)."""
    directory = c.node("bob").config.store_dir
    assert directory is not None
    path = Path(directory) / budget_module.FILE_NAME
    return budget_module._load(path) if path.exists() else []


def _audited(c: harness.InprocCluster) -> int:
    """bob's charged releases as his audit log records them, once every line of it parsed (what
    `fedptr audit` reads: raises ValueError for a torn or garbled record)."""
    directory = c.node("bob").config.store_dir
    assert directory is not None
    audit_module.read(Path(directory))
    return audit_module.charged(Path(directory))


def _spent_of(history: list[tuple[float, float, int]]) -> float:
    return budget_module._epsilon(history, OWNER.delta)


def _owners_and_aggregator(stores: list[str]) -> contextlib.AbstractAsyncContextManager[harness.InprocCluster]:
    """bob and alice (`OWNER`, `DATA` each) and the aggregator "agg", with stores for `stores`."""
    configs = {"bob": OWNER, "alice": OWNER, "agg": NodeConfig(aggregator=True, owners=["bob", "alice"], min_owners=2)}
    return harness.cluster(
        ["bob", "alice", "agg"],
        configs=configs,
        data={"bob": DATA, "alice": DATA},
        stores=stores,
        call_timeout=CALL_TIMEOUT_S,
    )


async def _case(
    c: harness.InprocCluster, disks: Disks, release: Release, death: Death, power_cut: bool = False
) -> tuple[float | None, str]:
    """Run `release` with `death` on bob's disk and replies, restart bob from his disk (after a
    power cut if `power_cut`), and check the property. Returns what the reply reported spent
    (None: no release) and the outcome."""
    bob = c.node("bob")
    death.watch(bob)
    disks.give(bob, death.disk)
    at = death.disk.at
    fault = f"{death.disk.at or death.message}/{death.disk.refuse}{' then a power cut' if power_cut else ''}"
    before = _history(c)
    audited = _audited(c)
    running = asyncio.ensure_future(asyncio.wait_for(release(c.client), CALL_TIMEOUT_S))
    async with asyncio.timeout(CASE_TIMEOUT_S):
        # until answered, or bob died (at a storage call, a reply, or his fail-stop): the call
        # then fails at once when he is restarted
        while not running.done() and not death.dead:
            await asyncio.sleep(limits.POLL_INTERVAL_S)
        refused = death.disk.disarm()
        death.kill()  # nothing more lands from this bob: what the disk holds is what a restart finds
        if power_cut:
            death.disk.power_cut()
        Death.forget(bob)
        try:  # (c) a node refuses to start with a torn history, or one that forgot a release
            await c.restart_node("bob")
        except ValueError as e:
            raise AssertionError(f"{release.__name__} with fault {fault}: bob does not start again: {e}") from e
        error: fedptr.FedptrError | None = None
        try:
            reported: float | None = await running
            outcome = "released"
        except fedptr.FedptrError as e:
            error, reported, outcome = e, None, f"failed ({type(e).__name__})"
    after = _history(c)  # (c) loads: never torn
    where = f"{release.__name__} with fault {fault}: {outcome}"
    try:  # (d) the audit log reads whole, and records every release the client received
        audited_after = _audited(c)
    except ValueError as e:
        raise AssertionError(f"{where}: bob's audit log does not read: {e}") from e
    assert reported is None or audited_after > audited, f"{where}: released, not audited"
    if refused and at in death.disk.in_audit:  # an audit write refused: no release, a typed error
        assert reported is None and isinstance(error, fedptr.RemoteError | fedptr.DropoutError), where
    assert after[: len(before)] == before, f"{where}: the history lost charges: {before} -> {after}"
    if reported is not None:  # (a) a release the client received is charged on disk
        assert len(after) > len(before), f"{where}: released, not charged on disk"
        assert _spent_of(after) >= reported - 1e-9, f"{where}: disk spends {_spent_of(after)}, reply said {reported}"
    # (b) a refused write (the budget's or the write-ahead's) fails the release with a typed
    # error (above: anything else, a timeout too, fails the test), and one that left no charge
    # on disk left no release (a)
    assert not refused or reported is None or len(after) > len(before), where
    if refused and at in death.disk.in_charges:
        # the budget's own write refused: bob says so (a RemoteError, or in a secure mean the
        # DropoutError naming bob and his error)
        assert isinstance(error, fedptr.RemoteError | fedptr.DropoutError) and "OSError" in str(error), where
    assert math.isclose(c.node("bob").budget.spent, _spent_of(after)), where
    return reported, outcome


Case = tuple[Death, bool]
"""A death for bob, and whether the power fails once he is dead."""


def _cases(calls: int, replies: int, only: list[int] | None = None) -> list[Case]:
    """Each storage call (those in `only`, if given) killed, refused (disk full, I/O error) and
    killed followed by a power cut; each reply killed, with and without a power cut; and a power
    cut once the release was answered."""
    points = only if only is not None else list(range(1, calls + 1))
    cases: list[Case] = [(Death(disk=CrashingDisk(at, refuse)), False) for refuse in (FULL, EIO) for at in points]
    cases += [(Death(at=at), cut) for at in points for cut in (False, True)]
    cases += [(Death(message=m), cut) for m in range(1, replies + 1) if only is None for cut in (False, True)]
    return [*cases, (Death(), True)]


async def _enumerate(release: Release, monkeypatch: pytest.MonkeyPatch, only: str = "") -> dict[str, int]:
    """A counting run of `release`, then every case of `_cases` (at the calls of the budget's
    charge only if `only` is "charge", of the audit's record if "audit"); returns how many
    cases had each outcome."""
    deaths: dict[str, Death] = {}
    monkeypatch.setattr(node_module, "fail_stop", lambda node, why: deaths[node].kill())
    # the client's deletes are held back: one would fsync bob's directory after the release,
    # and a power cut right after it would find the charge's rename durable by chance
    monkeypatch.setattr(fedptr.Client, "release", lambda client, location, obj_id: None)
    disks = Disks()
    install(monkeypatch, disks)
    async with _owners_and_aggregator(["bob", "alice"]) as c:
        deaths["bob"] = counting = Death()
        reported, outcome = await _case(c, disks, release, counting)
        assert reported is not None, outcome
        calls, replies, charging = counting.disk.calls, counting.messages, counting.disk.in_charges
        auditing = counting.disk.in_audit
        # the budget's write, fsync and rename at least were seen by the disk, and the audit's write and fsync
        assert len(charging) >= 3 and len(auditing) >= 2 and replies >= 1, (calls, replies, charging, auditing)
        outcomes: dict[str, int] = {}
        cases = _cases(calls, replies, {"charge": charging, "audit": auditing}.get(only))
        for death, cut in cases:
            deaths["bob"] = death
            _, outcome = await _case(c, disks, release, death, cut)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(
        f"{release.__name__}: {calls} storage calls ({charging} the budget's, {auditing} the audit's), "
        f"{replies} replies; {outcomes}"
    )
    return outcomes


@pytest.mark.asyncio
async def test_a_contribution_received_is_charged_on_disk_after_a_fault_at_any_budget_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast loop's share: the budget's own storage calls of a contribution, and a power cut
    once it was answered (which undid the charge's rename on main: no fsync of the directory)."""
    outcomes = await _enumerate(_contribution, monkeypatch, only="charge")
    assert outcomes.get("released") and len(outcomes) > 1, outcomes


@pytest.mark.asyncio
async def test_a_contribution_whose_audit_record_fails_is_not_received_and_the_log_reads_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The audit record's own storage calls of a contribution (its write, its fsync), each
    killed, killed then a power cut, refused (disk full, I/O error): a release the client received
    is in the log, one whose record failed is not received (a typed error), and the log reads
    whole after (on main a refused write left half a line, which `fedptr audit` could not read
    and to which the next record was glued). The slow enumerations draw every release kind's."""
    outcomes = await _enumerate(_contribution, monkeypatch, only="audit")
    assert outcomes.get("released") and len(outcomes) > 1, outcomes


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "release", [_contribution, _dp_sgd, _secure_mean], ids=["contribution", "dp-sgd", "secure-mean"]
)
async def test_every_release_received_is_charged_on_disk_after_any_crash_or_disk_fault(
    release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = await _enumerate(release, monkeypatch)
    assert outcomes.get("released") and len(outcomes) > 1, outcomes


def test_a_charge_refused_after_its_rename_is_never_dropped_by_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory's fsync refused (an I/O error) after the rename: the file holds the refused
    charge. A later, smaller charge written from a history without it would take spent on disk
    down (a DP-SGD run of 5 steps refused, then one of 1 step released: from 5 steps' epsilon to
    1's). The refused charge stays spent."""
    disk = CrashingDisk(4, refuse=EIO)  # the charge's write, fsync, rename, then its directory's fsync
    install(monkeypatch, lambda: disk)
    budget = budget_module.Budget("bob", 1e6, OWNER.delta, tmp_path)
    with pytest.raises(OSError, match="injected at fsync"):
        budget.charge(5.0, 0.5, 5)
    refused = _spent_of(budget_module._load(tmp_path / budget_module.FILE_NAME))
    assert refused > 0  # the rename landed: the file holds the refused charge
    assert budget.charge(5.0, 0.5, 1) >= refused
    assert _spent_of(budget_module._load(tmp_path / budget_module.FILE_NAME)) >= refused


@pytest.mark.asyncio
async def test_a_mean_whose_audit_record_is_refused_is_not_released_nor_left_to_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The aggregator, with a store (its audit log on disk): the disk refuses (ENOSPC) the write of
    the release's record, then of a get's. Each fails at once with a typed error naming the
    OSError, and leaves nothing: no mean to get, the contributions still there to aggregate (on
    main the mean was stored before its record, so the client could get it unaudited, and a get
    whose record failed was never answered)."""
    disks = Disks()
    install(monkeypatch, disks)
    async with _owners_and_aggregator(["bob", "alice", "agg"]) as c:
        contributions = []
        for owner in ("bob", "alice"):
            x, _ = await c.client.worker(owner).search("d")
            contributions.append((await dp.contribute(x.mean(0), "agg"))[0])
        agg = c.node("agg")
        for what in ("release", "get"):
            disk = CrashingDisk()
            disks.give(agg, disk)
            mean = aggregate.mean(contributions)
            if what == "get":
                await mean
            disk.at, disk.refuse = disk.calls + 1, FULL  # the next storage call: the record's write
            refused = mean if what == "release" else mean.get()
            with pytest.raises(fedptr.RemoteError, match="OSError"):
                await asyncio.wait_for(refused, CALL_TIMEOUT_S / 2)  # type: ignore[arg-type]
            assert disk.refused and disk.at in disk.in_audit, what
            if what == "release":  # nothing released (the result holds the op's error), nothing spent
                held = agg.store.entries.get(mean.id_at_location)
                assert held is None or not held.ok, held
                assert all(p.id_at_location in agg.store.entries for p in contributions)
        assert [r["event"] for r in audit_module.read(Path(agg.config.store_dir or ""))] == ["release"]


@pytest.mark.asyncio
async def test_a_dp_sgd_run_whose_audit_record_is_refused_fails_typed_trains_nothing_and_bob_serves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bob's disk refuses (full, then an I/O error) the write of a DP-SGD run's audit record. The
    run fails at once with a `RemoteError` naming the OSError, the worker and the hop (on main: the
    generic "InternalError" of a computation that raised, the model already trained in place on
    bob's data, under no record); the model's weights are untouched; the charge stays spent, on
    disk as in memory (a refused release costs its charge: the history never holds less than
    the log records, and a refund would be one more write to refuse); the log records no run.
    Then bob serves on: the same run, the disk well again, is released and recorded."""
    disks = Disks()
    install(monkeypatch, disks)
    # a training on this loaded 2-core machine took up to 5 s: the calls get a whole case's time
    async with harness.cluster(
        ["bob"], configs={"bob": OWNER}, data={"bob": DATA}, stores=["bob"], call_timeout=CASE_TIMEOUT_S
    ) as c:
        bob = c.node("bob")
        x, y = await c.client.worker("bob").search("d")
        model = await c.client.worker("bob").send(nn.Linear(1, 1))
        assert isinstance(model, fedptr.ModulePointer)

        def run() -> Awaitable[dp.Spent]:
            return dp.train(
                model, x, y, lr=0.1, sample_rate=0.5, steps=2, max_grad_norm=1.0, noise_multiplier=5.0, loss="mse_loss"
            )

        def weights() -> list[torch.Tensor]:
            held = bob.store.entries[model.id_at_location].result()
            return [p.detach().clone() for p in held.parameters()]

        for refusal in (FULL, EIO):
            before = weights()
            disk = CrashingDisk(1, refuse=refusal, only="audit")  # the record's write
            disks.give(bob, disk)
            with pytest.raises(fedptr.RemoteError) as failed:
                await asyncio.wait_for(run(), CASE_TIMEOUT_S)
            assert disk.refused, refusal
            error = failed.value
            assert (error.remote_type, error.worker, error.path) == ("OSError", "bob", ["bob"]), error
            assert all(torch.equal(a, b) for a, b in zip(before, weights(), strict=True)), "trained unrecorded"
            assert math.isclose(bob.budget.spent, _spent_of(_history(c))) and bob.budget.spent > 0
            assert _audited(c) == 0
        disks.give(bob, CrashingDisk())
        spent = await asyncio.wait_for(run(), CASE_TIMEOUT_S)
        assert spent.epsilon_spent > 0 and _audited(c) == 1
        assert math.isclose(bob.budget.spent, _spent_of(_history(c)))
