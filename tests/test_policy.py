"""The privacy policy's rules (nodes/policy.py) as pure functions: no process, socket, cluster or
event loop. Stored operands are stand-ins with the two attributes the rules read (a taint and
whether they are read-only data); the properties run on arbitrary taints and allow-listed ops."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from fedptr.nodes import policy
from fedptr.nodes.policy import ANALYST, Taint
from hypothesis import given
from hypothesis import strategies as st

from fedptr import wire
from fedptr.errors import OpNotAllowedError, PermissionDenied
from fedptr.ops import ALLOWED, MUTATING


@dataclass(eq=False)
class Held:
    """A stored operand as the rule sees it (nodes/store.py's Entry has these attributes)."""

    taint: Taint = field(default_factory=Taint)
    readonly: str = ""
    contribution: object | None = None


OWNERS = ["alice", "bob", "carol"]
WORKERS = ["alice", "bob", "carol", "dave", ANALYST]
PLAIN = sorted(ALLOWED - policy.TAINT_RULES)
"""Operations with no rule of their own: the result derives from the operands, nothing else."""

origins = st.dictionaries(st.sampled_from(OWNERS), st.frozensets(st.sampled_from(WORKERS)), max_size=3)
taints = origins.map(Taint)
operand_lists = st.lists(st.builds(Held, taints), min_size=1, max_size=4)


def snapshot(held: list[Held]) -> list[dict[str, frozenset[str]]]:
    return [dict(h.taint.origins) for h in held]


def grew(before: dict[str, frozenset[str]], after: dict[str, frozenset[str]]) -> bool:
    """Whether `after` restricts at least as much as `before`: every owner still there, trusting no more."""
    return all(o in after and after[o] <= trusted for o, trusted in before.items())


@given(st.sampled_from(PLAIN), operand_lists)
def test_a_result_is_public_only_if_every_operand_is(op: str, operands: list[Held]) -> None:
    before = snapshot(operands)
    result = policy.result_taint(op, operands, operands[0])
    assert bool(result) == any(h.taint for h in operands)
    assert set(result.origins) == {o for h in operands for o in h.taint.origins}
    for owner, trusted in result.origins.items():  # each owner trusts what every part says it trusts
        said = [h.taint.origins[owner] for h in operands if owner in h.taint.origins]
        assert trusted == frozenset.intersection(*said)
    assert all(result is not h.taint for h in operands)  # a fresh storage has a taint of its own
    assert snapshot(operands) == before  # reading changes no operand's taint


@given(st.sampled_from(sorted(policy.ALIASING)), operand_lists)
def test_an_aliasing_result_shares_its_targets_taint_and_takes_in_every_operand(op: str, operands: list[Held]) -> None:
    target = operands[0]
    before = snapshot(operands)
    result = policy.result_taint(op, operands, target)
    assert result is target.taint  # one Taint object: a write through any alias taints them all
    assert set(result.origins) == {o for h in operands for o in h.taint.origins}
    assert all(grew(b, h.taint.origins) for b, h in zip(before, operands, strict=True))


def test_an_aliasing_result_of_a_public_target_shares_its_still_empty_taint() -> None:
    target = Held()
    result = policy.result_taint("add_", [target, Held()], target)
    assert result is target.taint and not result
    policy.result_taint("add_", [target, Held(Taint({"alice": frozenset()}))], target)
    assert result.owners == ["alice"]  # the alias made earlier sees the later write


@given(st.sampled_from(sorted(MUTATING)), operand_lists, st.sampled_from(OWNERS))
def test_a_write_to_read_only_data_is_refused_naming_its_owner(op: str, operands: list[Held], owner: str) -> None:
    target = Held(Taint({owner: frozenset()}), readonly=owner)
    before = snapshot(operands)
    with pytest.raises(PermissionDenied) as refused:
        policy.result_taint(op, [target, *operands], target, 7)
    assert refused.value.owner == owner
    assert "object 7" in str(refused.value)
    assert snapshot(operands) == before and target.taint.owners == [owner]


@pytest.mark.parametrize("op", sorted(policy.ALIASING - MUTATING))
def test_reading_a_part_of_read_only_data_is_no_write(op: str) -> None:
    model = Held(Taint({"alice": frozenset()}), readonly="alice")
    assert policy.result_taint(op, [model], model) is model.taint


def test_a_forward_that_may_write_a_models_state_taints_the_model_or_is_refused() -> None:
    private_x = Held(Taint({"alice": frozenset({"bob"})}))
    model = Held()
    out = policy.result_taint("forward", [model, private_x], model, writes_state=True)
    assert model.taint.owners == ["alice"]  # its running statistics now derive from alice's data
    assert out is not model.taint and out.owners == ["alice"]
    stateless = Held()
    policy.result_taint("forward", [stateless, private_x], stateless, writes_state=False)
    assert not stateless.taint
    frozen = Held(Taint({"carol": frozenset()}), readonly="carol")
    with pytest.raises(PermissionDenied) as refused:
        policy.result_taint("forward", [frozen, private_x], frozen, writes_state=True)
    assert refused.value.owner == "carol"


@given(taints, st.lists(st.builds(Held, taints, st.sampled_from(["", "alice"])), max_size=5))
def test_a_backward_taints_everything_that_may_get_a_gradient_but_read_only_data(
    loss_taint: Taint, holders: list[Held]
) -> None:
    loss = Held(loss_taint)
    before = snapshot(holders)
    result = policy.result_taint("backward", [loss], loss, gradients=holders)
    assert result is not loss.taint
    for h, b in zip(holders, before, strict=True):
        if h.readonly or not loss_taint:
            assert h.taint.origins == b  # read-only data is never written; a public loss taints nothing
        else:
            assert set(h.taint.origins) == set(b) | set(loss_taint.origins)
            assert grew(b, h.taint.origins)


def test_a_public_backward_never_reads_what_it_might_taint() -> None:
    def nothing_to_read() -> list[Held]:
        raise AssertionError("the holders were read for a backward on public operands")

    class Lazy:
        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(nothing_to_read())

    policy.result_taint("backward", [Held()], None, gradients=Lazy())  # type: ignore[arg-type]


@given(taints)
def test_exact_release_needs_every_owner_to_trust_the_analyst(taint: Taint) -> None:
    everyone_open = all(ANALYST in trusted for trusted in taint.origins.values())
    if not taint:
        assert policy.release_kind(taint, "") == "public"
        assert policy.release_kind(taint, "dp") == "dp"
    elif everyone_open:
        assert policy.release_kind(taint, "") == "exact"
    else:
        with pytest.raises(PermissionDenied) as refused:
            policy.release_kind(taint, "dp")  # a model's "dp" mark releases no one's raw data
        assert ANALYST not in taint.origins[refused.value.owner]


@given(taints, st.sampled_from(WORKERS[:-1]))
def test_a_move_goes_only_where_every_owner_trusts(taint: Taint, dest: str) -> None:
    allowed = all(dest == o or dest in t or ANALYST in t for o, t in taint.origins.items())
    if allowed:
        policy.check_move(taint, dest)
    else:
        with pytest.raises(PermissionDenied):
            policy.check_move(taint, dest)


def ref(i: int) -> wire.Ref:
    return wire.Ref(i)


def is_ref(v: object) -> bool:
    return type(v) is wire.Ref


@pytest.mark.parametrize(
    ("op", "args", "kwargs"),
    [
        ("add", [ref(1), ref(2)], {"out": ref(3)}),  # torch's out= writes an argument the rule cannot see
        ("F.relu", [ref(1)], {"inplace": True}),
        ("add_", [2.0, ref(1)], {}),  # an aliasing op's target is its first positional argument
        ("add_", [ref(1)], {"self": ref(2)}),
        ("setitem", [], {}),
    ],
)
def test_a_call_whose_writes_the_rule_cannot_see_is_refused(op: str, args: list, kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(OpNotAllowedError):
        policy.check_call(op, args, kwargs, is_ref)


def test_a_call_that_writes_only_its_target_passes() -> None:
    policy.check_call("add_", [ref(1), ref(2)], {"alpha": 2}, is_ref)
    policy.check_call("F.relu", [ref(1)], {"inplace": False}, is_ref)
    policy.check_call("add", [ref(1), ref(2)], {"out": None}, is_ref)


@given(taints)
def test_an_owner_contributes_and_joins_rounds_with_its_own_data_only(taint: Taint) -> None:
    mine = policy.PolicyConfig("alice", trust=frozenset({"agg"}))
    others = [o for o in taint.owners if o != "alice"]
    if others:
        with pytest.raises(PermissionDenied) as refused:
            policy.check_contribution(mine, taint, "agg")
        assert refused.value.owner == others[0]
        with pytest.raises(PermissionDenied):
            policy.check_own_data(mine, taint, "a secure input")
    else:
        policy.check_contribution(mine, taint, "agg")
        policy.check_own_data(mine, taint, "a secure input")
        with pytest.raises(PermissionDenied):
            policy.check_contribution(mine, taint, "eve")  # an aggregator the owner does not trust


def test_an_aggregator_takes_contributions_from_its_roster_only() -> None:
    agg = policy.PolicyConfig("agg", aggregator=True, owners=frozenset({"alice", "bob"}))
    policy.check_contributor(agg, "alice")
    with pytest.raises(PermissionDenied):
        policy.check_contributor(agg, "eve")
    with pytest.raises(PermissionDenied):
        policy.check_contributor(policy.PolicyConfig("bob", owners=frozenset({"alice"})), "alice")  # not an aggregator


def test_an_aggregate_takes_distinct_contributions_on_an_aggregator_only() -> None:
    agg = policy.PolicyConfig("agg", aggregator=True, owners=frozenset({"alice", "bob"}))
    a, b = Held(contribution="a"), Held(contribution="b")
    policy.check_aggregator(agg)
    policy.check_aggregate(agg, [a, b])
    with pytest.raises(PermissionDenied):
        policy.check_aggregate(agg, [a, a])  # the same contribution twice
    with pytest.raises(PermissionDenied):
        policy.check_aggregate(agg, [a, Held()])  # a plain tensor is no contribution
    with pytest.raises(PermissionDenied):
        policy.check_aggregator(policy.PolicyConfig("bob"))


def test_dp_sgd_trains_a_clean_model_on_the_nodes_own_data_only() -> None:
    me = policy.PolicyConfig("alice")
    own = Held(Taint({"alice": frozenset()}), readonly="alice")
    datasets = [[1, 2], [3, 4]]  # the ids of two tags: (x, y) each
    policy.check_dp_train(me, Held(), [own, own], (1, 2), datasets)
    policy.check_dp_train(me, Held(), [own, own], (3, 3), datasets)  # targets that are the inputs
    with pytest.raises(PermissionDenied):
        policy.check_dp_train(me, Held(), [own, Held()], (1, 2), datasets)  # a tensor the client sent
    with pytest.raises(PermissionDenied, match="one dataset"):
        policy.check_dp_train(me, Held(), [own, own], (1, 4), datasets)  # x of one dataset, y of another
    with pytest.raises(PermissionDenied) as refused:
        policy.check_dp_train(me, Held(Taint({"bob": frozenset()})), [own, own], (1, 2), datasets)
    assert refused.value.owner == "bob"
