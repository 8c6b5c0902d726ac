"""The SecAgg+ protocol core (nodes/secagg.py), its real owners and aggregator driven phase by
phase in one process: sums with dropouts at every phase, the noise the sum carries, and an
aggregator that lies (about who dropped, twice, with swapped keys) getting refused and unable to
recover any one owner's input."""

from __future__ import annotations

import math
import secrets
import tempfile
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fedptr.nodes import audit, budget, mechanisms
from fedptr.nodes import secagg as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fedptr.errors import DropoutError, InvalidArgumentError, PermissionDenied


def names(n: int) -> tuple[str, ...]:
    return tuple(f"owner{i:02d}" for i in range(n))


def config(
    n: int,
    *,
    threshold: int,
    degree: int = 0,
    min_survivors: int = 2,
    sigma: float = 0.0,
    dim: int = 16,
    colluders: int = 0,
):
    """A round's config; no colluders unless a test is about them (the dropout tests pick t for
    dropouts alone)."""
    return sa.Config(
        secrets.token_bytes(16), names(n), dim, threshold, min_survivors, 1.0, sigma, degree, colluders=colluders
    )


def inputs(cfg: sa.Config, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for o in cfg.owners:
        v = rng.normal(size=cfg.dim)
        out[o] = v * min(1.0, cfg.clip / np.linalg.norm(v))
    return out


def run(
    cfg: sa.Config,
    values: dict[str, np.ndarray],
    *,
    before_keys: Collection[str] = (),
    before_shares: Collection[str] = (),
    before_input: Collection[str] = (),
    during_unmask: Collection[str] = (),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int, frozenset[str]]:
    """One honest round with the owners named dropping out before the phase named; returns the
    aggregate, the count and the survivors. The owners draw their noise from `rng` (by default
    one seeded with 1)."""
    rng = np.random.default_rng(1) if rng is None else rng
    owners = {o: sa.Owner(o) for o in cfg.owners}
    agg = sa.Aggregator(cfg)
    keys = agg.relay_keys({o: w.advertise() for o, w in owners.items() if o not in before_keys})
    inbox = agg.route_shares({o: owners[o].share_keys(cfg, keys) for o in keys if o not in before_shares})
    request = agg.collect({o: owners[o].masked_input(values[o], inbox[o], rng) for o in inbox if o not in before_input})
    answering = request.survivors - set(during_unmask)  # the silent ones confirm nothing either
    total, count = agg.finish({o: owners[o].unmask(request, answering) for o in answering})
    return total, count, request.survivors


def expected(values: dict[str, np.ndarray], survivors: Collection[str]) -> np.ndarray:
    return sum((values[o] for o in survivors), np.zeros_like(next(iter(values.values()))))


def test_sum_of_all_owners_is_exact_to_quantization() -> None:
    cfg = config(5, threshold=3)
    values = inputs(cfg)
    total, count, survivors = run(cfg, values)
    assert count == 5 and survivors == set(cfg.owners)
    np.testing.assert_allclose(total, expected(values, cfg.owners), atol=1e-7)


@pytest.mark.parametrize("phase", ["before_keys", "before_shares", "before_input", "during_unmask"])
def test_one_dropout_at_each_phase(phase: str) -> None:
    cfg = config(6, threshold=3)
    values = inputs(cfg, seed=2)
    total, count, survivors = run(cfg, values, **{phase: ["owner03"]})  # type: ignore[arg-type]
    # an owner that drops while unmasking still sent its input: it is in the sum
    assert ("owner03" in survivors) == (phase == "during_unmask")
    np.testing.assert_allclose(total, expected(values, survivors), atol=1e-7)
    assert count == len(survivors)


def test_dropouts_in_every_phase_of_one_round_on_a_sparse_graph() -> None:
    """SecAgg+'s sparse graph tolerates k - t dropouts among each owner's neighbours."""
    cfg = config(12, threshold=4, degree=6)
    values = inputs(cfg, seed=3)
    assert cfg.degree == 6 and all(len(cfg.neighbours(o)) == 6 for o in cfg.owners)
    # every third owner on the ring drops: each owner loses at most 2 of its 6 neighbours, k - t
    ring = cfg.ring()
    assert set(cfg.neighbours(ring[0])) == {ring[i] for i in (1, 2, 3, 9, 10, 11)}
    a, b, c, d = ring[0], ring[3], ring[6], ring[9]
    total, _, survivors = run(cfg, values, before_keys=[a], before_shares=[b], before_input=[c], during_unmask=[d])
    assert survivors == set(cfg.owners) - {a, b, c}
    np.testing.assert_allclose(total, expected(values, survivors), atol=1e-7)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 9),
    data=st.data(),
)
def test_any_dropouts_give_the_survivors_sum_or_a_dropout_error(n: int, data: st.DataObject) -> None:
    """Whatever drops when, the round either releases exactly the survivors' sum or fails with
    DropoutError; with the complete graph and at most n - t - 1 dropouts, and at most n - q
    (the quorum's dropout tolerance), it always succeeds."""
    degree = data.draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]), "degree")
    colluders = data.draw(st.integers(0, degree - 1), "colluders")
    threshold = data.draw(st.integers((degree + colluders) // 2 + 1, degree), "threshold")
    cfg = config(n, threshold=threshold, degree=degree, dim=4, colluders=colluders)
    phase = st.sampled_from(["keep", "before_keys", "before_shares", "before_input", "during_unmask"])
    fate = {o: data.draw(phase, o) for o in cfg.owners}
    drops = {
        p: [o for o, f in fate.items() if f == p]
        for p in ("before_keys", "before_shares", "before_input", "during_unmask")
    }
    values = inputs(cfg, seed=n)
    gone = sum(len(v) for v in drops.values())
    try:
        total, _, survivors = run(cfg, values, **drops)  # type: ignore[arg-type]
    except DropoutError as e:
        assert e.workers and (degree < n - 1 or gone > min(n - threshold - 1, n - cfg.quorum))
        return
    np.testing.assert_allclose(total, expected(values, survivors), atol=1e-7)


def test_the_sum_carries_the_noise_the_accountant_charges_for() -> None:
    """m = min_survivors owners, each adding N(0, (sigma C)^2 / m): the sum's noise has standard
    deviation sigma C (1% tolerance on 40,000 coordinates)."""
    cfg = config(4, threshold=2, degree=3, min_survivors=4, sigma=2.0, dim=40_000)
    values = {o: np.zeros(cfg.dim) for o in cfg.owners}
    total, _, _ = run(cfg, values)
    assert abs(float(np.std(total)) - 2.0) < 0.03
    assert abs(float(np.mean(total))) < 0.03


def test_extreme_inputs_do_not_wrap_the_ring() -> None:
    cfg = config(8, threshold=4, dim=3)
    for sign in (1.0, -1.0):
        values = {o: np.array([sign * cfg.clip, 0.0, 0.0]) for o in cfg.owners}
        total, _, _ = run(cfg, values)
        np.testing.assert_allclose(total, [sign * 8 * cfg.clip, 0, 0], atol=1e-6)


def test_an_unclipped_input_is_refused() -> None:
    cfg = config(3, threshold=2)
    with pytest.raises(InvalidArgumentError, match="clipped"):
        sa.encode(np.full(cfg.dim, 1.0), cfg, np.random.default_rng(0))


def test_a_threshold_of_half_the_degree_or_less_is_refused() -> None:
    """With t <= k/2 two disjoint sets of t holders exist, and a lying aggregator could get both
    shares of one owner: such rounds are refused."""
    with pytest.raises(InvalidArgumentError, match="half"):
        config(5, threshold=2, degree=4)
    with pytest.raises(InvalidArgumentError, match="even"):
        config(8, threshold=3, degree=5)


def test_a_threshold_or_collusion_bound_the_colluders_could_defeat_is_refused() -> None:
    """c colluders give both shares, and the aggregator gathers k - t honest shares of the kind
    it is not owed: t must exceed (k + c) / 2. Nor may c reach the degree (no t would do)."""
    assert config(5, threshold=0, colluders=1).threshold == 3  # k = 4: (4 + 1) // 2 + 1
    with pytest.raises(InvalidArgumentError, match="plus the 2 colluders"):
        config(5, threshold=3, colluders=2)
    with pytest.raises(InvalidArgumentError, match="fewer than the degree"):
        config(5, threshold=0, colluders=4)
    with pytest.raises(InvalidArgumentError, match="fewer than the degree"):
        config(5, threshold=0, colluders=-1)


@pytest.mark.parametrize(
    ("n", "c", "q", "k"), [(5, 0, 3, 4), (5, 1, 4, 4), (8, 0, 5, 7), (8, 2, 6, 7), (32, 2, 18, 8), (32, 10, 22, 32 - 1)]
)
def test_the_quorum_exceeds_half_of_n_plus_c_and_the_noise_is_sized_for_it(n: int, c: int, q: int, k: int) -> None:
    """q = floor((n + c) / 2) + 1; m below it is raised to it (fewer survivors cannot confirm an
    unmask request, so the noise shares are sized for at least q); the default degree grows to
    3c + 1 for many colluders."""
    cfg = config(n, threshold=0, colluders=c, sigma=1.0)
    assert (cfg.quorum, cfg.min_survivors, cfg.degree) == (q, q, k)
    assert cfg.threshold == (k + c) // 2 + 1
    assert cfg.noise_std == pytest.approx(1.0 / math.sqrt(q))


@pytest.mark.parametrize(("n", "c"), [(2, 0), (4, 0), (5, 1), (8, 2), (9, 2), (32, 2)])
def test_the_default_collusion_bound_is_a_third_of_the_default_neighbourhood(n: int, c: int) -> None:
    cfg = sa.Config(bytes(16), names(n), 1, 0, 2, 1.0, 1.0)
    assert cfg.colluders == c == (min(n - 1, 8) - 1) // 3 and cfg.degree == min(n - 1, 8)


@settings(max_examples=30, deadline=None)
@given(threshold=st.integers(2, 6), extra=st.integers(0, 4), data=st.data())
def test_shamir_any_t_shares_recover_and_fewer_do_not(threshold: int, extra: int, data: st.DataObject) -> None:
    secret = secrets.token_bytes(32)
    xs = list(range(1, threshold + extra + 1))
    shares = sa.share(secret, xs, threshold)
    chosen = data.draw(st.permutations(xs))[:threshold]
    assert sa.reconstruct({x: shares[x] for x in chosen}) == secret
    fewer = {x: shares[x] for x in chosen[:-1]}
    with pytest.raises(OverflowError):  # a random field element, all but never below 2^256
        sa.reconstruct(fewer)


# --- a lying aggregator ---------------------------------------------------------------------
def masked_round(cfg: sa.Config, values: dict[str, np.ndarray]):
    """Three honest phases; returns the owners, the aggregator and the masked inputs."""
    rng = np.random.default_rng(5)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    agg = sa.Aggregator(cfg)
    keys = agg.relay_keys({o: w.advertise() for o, w in owners.items()})
    inbox = agg.route_shares({o: owners[o].share_keys(cfg, keys) for o in keys})
    masked = {o: owners[o].masked_input(values[o], inbox[o], rng) for o in inbox}
    agg.collect(masked)
    return owners, agg, masked


def test_an_owner_refuses_a_request_that_names_a_peer_in_both_sets() -> None:
    cfg = config(5, threshold=3)
    owners, _, _ = masked_round(cfg, inputs(cfg))
    lie = sa.UnmaskRequest(frozenset(cfg.owners), frozenset({"owner02"}))
    with pytest.raises(PermissionDenied, match=r"owner02.*both"):
        owners["owner00"].unmask(lie, cfg.owners)


def test_an_owner_answers_one_unmask_request_per_round() -> None:
    cfg = config(5, threshold=3)
    owners, _, _ = masked_round(cfg, inputs(cfg))
    all_alive = frozenset(cfg.owners)
    owners["owner00"].unmask(sa.UnmaskRequest(all_alive - {"owner02"}, frozenset({"owner02"})), all_alive)
    with pytest.raises(PermissionDenied, match="not the next step"):
        owners["owner00"].unmask(sa.UnmaskRequest(all_alive, frozenset()), all_alive)


def test_an_owner_refuses_to_unmask_fewer_survivors_than_the_noise_is_sized_for() -> None:
    cfg = config(5, threshold=3, min_survivors=4, sigma=1.0)
    owners, _, _ = masked_round(cfg, inputs(cfg))
    request = sa.UnmaskRequest(frozenset({"owner00", "owner01", "owner02"}), frozenset({"owner03", "owner04"}))
    with pytest.raises(PermissionDenied, match="only 3 survivors"):
        owners["owner00"].unmask(request, request.survivors)


def test_swapped_keys_and_tampered_shares_are_refused() -> None:
    cfg = config(3, threshold=2)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    keys = {o: w.advertise() for o, w in owners.items()}
    impostor = sa.Owner("owner00").advertise()
    with pytest.raises(PermissionDenied, match="own"):
        owners["owner00"].share_keys(cfg, {**keys, "owner00": impostor})
    sent = {o: owners[o].share_keys(cfg, keys) for o in ("owner01", "owner02")}
    blob = bytearray(sent["owner01"]["owner02"])
    blob[0] ^= 1
    with pytest.raises(PermissionDenied, match="do not open"):
        owners["owner02"].masked_input(np.zeros(cfg.dim), {"owner01": bytes(blob)}, np.random.default_rng(0))


def test_an_owner_given_another_rounds_config_cannot_open_the_shares() -> None:
    """The config's digest binds the shares: an aggregator cannot tell owners different noise
    levels or thresholds without the round failing."""
    cfg = config(3, threshold=2, sigma=1.0)
    weaker = sa.Config(cfg.round_id, cfg.owners, cfg.dim, cfg.threshold, cfg.min_survivors, cfg.clip, 0.0, cfg.degree)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    keys = {o: w.advertise() for o, w in owners.items()}
    sent = owners["owner00"].share_keys(cfg, keys)
    owners["owner02"].share_keys(weaker, keys)
    with pytest.raises(PermissionDenied, match="do not open"):
        owners["owner02"].masked_input(np.zeros(cfg.dim), {"owner00": sent["owner02"]}, np.random.default_rng(0))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(told_dropped=st.lists(st.booleans(), min_size=7, max_size=7), threshold=st.integers(4, 6))
def test_an_aggregator_that_splits_its_story_cannot_unmask_one_owner(told_dropped: list[bool], threshold: int) -> None:
    """The aggregator tells some of victim's neighbours it dropped (to get its mask-key shares)
    and the others it survived (to get its self-mask shares), each holder once. It never gets t
    shares of both kinds, and with what it got it cannot strip the victim's masked input down
    to the victim's value. Every owner is taken to confirm its story (as colluders would): this
    is the one-answer defence alone, the consistency check is tested on its own."""
    cfg = config(8, threshold=threshold, dim=8)
    values = inputs(cfg, seed=7)
    owners, _, _ = masked_round(cfg, values)
    victim = "owner00"
    everyone = frozenset(cfg.owners)
    seeds: dict[int, int] = {}
    keys: dict[int, int] = {}
    for holder, dropped in zip(cfg.owners[1:], told_dropped, strict=True):
        request = (
            sa.UnmaskRequest(everyone - {victim}, frozenset({victim}))
            if dropped
            else sa.UnmaskRequest(everyone, frozenset())
        )
        kind, value = owners[holder].unmask(request, everyone)[victim]
        (keys if kind == sa.KEY else seeds)[cfg.index(holder)] = value
    assert min(len(seeds), len(keys)) < cfg.threshold
    # its best try: every share it has of each secret; a short set recovers nothing
    recovered = []
    for points, true in ((seeds, owners[victim]._seed), (keys, sa._raw_private(owners[victim]._mask_key))):
        try:
            recovered.append(sa.reconstruct(points) == true)
        except OverflowError:
            recovered.append(False)
    assert not all(recovered)


def test_an_aggregator_that_withholds_an_owners_pair_shares_cannot_unmask_it() -> None:
    """The aggregator routes every owner's shares honestly except to the victim, which it hands
    none: an owner that holds no neighbour's shares masks with its self mask alone. Then one
    consistent, honest-looking unmask request (everyone survived) gets the victim's neighbours to
    return the shares of its self-mask seed, which strips its input. The victim must refuse to
    mask with fewer than t neighbours (Bonawitz et al. abort below t owners in U2 too): no
    masked input, nothing to strip."""
    cfg = config(8, threshold=0, dim=8)  # complete graph, k = 7, t = 4
    values = inputs(cfg, seed=4)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    agg = sa.Aggregator(cfg)
    keys = agg.relay_keys({o: w.advertise() for o, w in owners.items()})
    inbox = agg.route_shares({o: owners[o].share_keys(cfg, keys) for o in keys})
    victim = "owner00"
    rng = np.random.default_rng(6)
    try:
        y = owners[victim].masked_input(values[victim], {}, rng)
    except DropoutError:
        return
    for o in cfg.owners[1:]:
        owners[o].masked_input(values[o], inbox[o], rng)
    everyone = sa.UnmaskRequest(frozenset(cfg.owners), frozenset())
    points = {cfg.index(o): owners[o].unmask(everyone, cfg.owners)[victim][1] for o in cfg.owners[1:]}
    seed = sa.reconstruct(dict(sorted(points.items())[: cfg.threshold]))
    stripped = (y - sa.prg(seed, cfg)) & np.uint64((1 << cfg.ring_bits) - 1)
    assert not np.allclose(sa.decode(stripped, cfg), values[victim], atol=1e-6)


@pytest.mark.parametrize("given", [0, 3, 4])
def test_an_owner_masks_with_at_least_t_neighbours_or_sends_nothing(given: int) -> None:
    cfg = config(8, threshold=0, dim=8)  # t = 4
    values = inputs(cfg)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    keys = {o: w.advertise() for o, w in owners.items()}
    sent = {o: owners[o].share_keys(cfg, keys) for o in cfg.owners}
    victim = "owner00"
    mine = {u: sent[u][victim] for u in cfg.owners[1 : 1 + given]}
    if given >= cfg.threshold:
        assert owners[victim].masked_input(values[victim], mine, np.random.default_rng(0)).shape == (cfg.dim,)
        return
    with pytest.raises(DropoutError, match=f"{given} of its neighbours.*fewer than {cfg.threshold}") as refused:
        owners[victim].masked_input(values[victim], mine, np.random.default_rng(0))
    assert refused.value.workers == sorted(set(cfg.owners[1:]) - set(mine))


def test_an_aggregator_that_tells_each_owner_a_different_story_cannot_unmask_one_owner() -> None:
    """Each owner w is told that only the victim and w survived and all the others dropped. Each
    answers once, never gives both kinds of share of one peer, and sees at least m survivors;
    yet together the answers would hold the victim's self-mask seed and every neighbour's mask
    key, which strip the victim's masked input down to its value plus its own noise share alone
    (here none), with no owner colluding: before the consistency check, they did. Now each owner
    asks the named survivors what they were told (as nodes/secure.py does, modelled here: each
    confirms only its own story) and answers only a story more than half the owners confirm."""
    cfg = config(8, threshold=0, dim=8)  # the default graph of 8 owners: complete, k = 7, t = 4
    values = inputs(cfg, seed=3)
    owners, _, masked = masked_round(cfg, values)
    victim = "owner00"
    told = {w: sa.UnmaskRequest(frozenset({victim, w}), frozenset(cfg.owners) - {victim, w}) for w in cfg.owners[1:]}
    y = unmasked(cfg, owners, masked, unmask_with_colluders(cfg, owners, told, ()), (), victim)
    assert y is None or not np.allclose(y, values[victim], atol=1e-6)


def unmask_with_colluders(
    cfg: sa.Config, owners: dict[str, sa.Owner], told: dict[str, sa.UnmaskRequest], colluders: Collection[str]
) -> dict[tuple[str, str], dict[int, int]]:
    """The unmask phase against an aggregator that told each honest owner `told[w]`, with
    `colluders` confirming every request and handing over both shares they hold; honest owners
    confirm only the request they were told (as nodes/secure.py's SecAggConfirm answers).
    Returns every share the aggregator gets, by (peer, kind) and holder's x."""
    shares: dict[tuple[str, str], dict[int, int]] = {}
    for w, story in told.items():
        confirmed = [p for p in story.survivors if p in colluders or told.get(p) == story]
        try:
            given = owners[w].unmask(story, confirmed)
        except (PermissionDenied, DropoutError):
            continue
        for peer, (kind, value) in given.items():
            shares.setdefault((peer, kind), {})[cfg.index(w)] = value
    for w in colluders:
        for peer, (seed_share, key_share) in owners[w]._held.items():
            shares.setdefault((peer, sa.SELF), {})[cfg.index(w)] = seed_share
            shares.setdefault((peer, sa.KEY), {})[cfg.index(w)] = key_share
    return shares


def unmasked(
    cfg: sa.Config,
    owners: dict[str, sa.Owner],
    masked: dict[str, np.ndarray],
    shares: dict[tuple[str, str], dict[int, int]],
    colluders: Collection[str],
    victim: str,
) -> np.ndarray | None:
    """The aggregator's best try at `victim`'s input alone: strip its self mask (t shares of its
    seed) and each pair mask (the colluding neighbour's own key, t shares of the neighbour's
    key, or t of the victim's own); None when some mask lacks them."""

    def secret(peer: str, kind: str) -> bytes | None:
        points = shares.get((peer, kind), {})
        if len(points) < cfg.threshold:
            return None
        return sa.reconstruct(dict(sorted(points.items())[: cfg.threshold]))

    seed, own_key = secret(victim, sa.SELF), secret(victim, sa.KEY)
    if seed is None:
        return None
    ring = np.uint64((1 << cfg.ring_bits) - 1)
    y = (masked[victim] - sa.prg(seed, cfg)) & ring
    for h in owners[victim]._held:  # the neighbours it masked with
        if own_key is not None:
            private = X25519PrivateKey.from_private_bytes(own_key)
            y = (y - sa._pair_mask(private, owners[h].public_keys.mask, victim, h, cfg)) & ring
            continue
        key = secret(h, sa.KEY)
        if h in colluders:
            private = owners[h]._mask_key
        elif key is not None:
            private = X25519PrivateKey.from_private_bytes(key)
        else:
            return None
        # the victim added -(h's mask for it)
        y = (y + sa._pair_mask(private, owners[victim].public_keys.mask, h, victim, cfg)) & ring
    return sa.decode(y, cfg)


def test_one_colluding_owner_and_two_stories_cannot_unmask_one_owner() -> None:
    """The red team's attack (a strict xfail under the majority rule): five owners, the complete
    graph, one colluding owner (owner04). The victim and owner01 are told that owner02 and
    owner03 dropped, owner02 and owner03 that owner01 dropped, the victim surviving in both;
    the colluder confirms both. Under the majority rule (3 of 5) each story had a majority and
    the victim's input came back exactly. The round resists c = 1 colluder: t = 3 > (4 + 1) / 2
    and the quorum is 4 of 5, which neither story reaches, so no honest owner answers."""
    cfg = config(5, threshold=0, dim=8, colluders=1)
    assert (cfg.degree, cfg.threshold, cfg.quorum) == (4, 3, 4)
    values = inputs(cfg, seed=4)
    owners, _, masked = masked_round(cfg, values)
    victim, colluder = "owner00", "owner04"
    a, b = {victim, "owner01"}, {"owner02", "owner03"}
    story_a = sa.UnmaskRequest(frozenset(a | {colluder}), frozenset(b))
    story_b = sa.UnmaskRequest(frozenset(b | {colluder, victim}), frozenset({"owner01"}))
    told = {**dict.fromkeys(a, story_a), **dict.fromkeys(b, story_b)}
    shares = unmask_with_colluders(cfg, owners, told, [colluder])
    assert all(len(points) == 1 for points in shares.values())  # the colluder's own, nothing more
    assert unmasked(cfg, owners, masked, shares, [colluder], victim) is None


@st.composite
def attacks(draw: st.DrawFn) -> tuple[sa.Config, frozenset[str], dict[str, sa.UnmaskRequest]]:
    """A round of n owners resisting c colluders (any graph and t the config allows), up to c colluders,
    and a story for each honest owner: its group's owners, the colluders and some others named
    survivors, the rest dropped (the red team's split is one of them)."""
    n = draw(st.integers(3, 11), "n")
    degree = draw(st.sampled_from([n - 1, *range(2, n - 1, 2)]), "k")  # complete or sparse
    c = draw(st.integers(0, degree - 1), "c")
    threshold = draw(st.integers((degree + c) // 2 + 1, degree), "t")
    cfg = config(n, threshold=threshold, degree=degree, dim=4, colluders=c)
    colluders = frozenset(draw(st.sets(st.sampled_from(cfg.owners), max_size=c), "colluders"))
    honest = [o for o in cfg.owners if o not in colluders]
    stories = draw(st.integers(1, 3), "stories")
    group = {o: draw(st.integers(0, stories - 1), o) for o in honest}
    told = {}
    for i in range(stories):
        extra = draw(st.sets(st.sampled_from(cfg.owners)), f"story {i} also names")
        survivors = frozenset({o for o, g in group.items() if g == i} | colluders | extra)
        request = sa.UnmaskRequest(survivors, frozenset(cfg.owners) - survivors)
        told.update((o, request) for o, g in group.items() if g == i)
    return cfg, colluders, told


def an_unmasked_honest_owner(attack: tuple[sa.Config, frozenset[str], dict[str, sa.UnmaskRequest]]) -> str | None:
    """Run the attack; the first honest owner whose input the aggregator recovers, if any."""
    cfg, colluders, told = attack
    values = inputs(cfg, seed=len(cfg.owners))
    owners, _, masked = masked_round(cfg, values)
    shares = unmask_with_colluders(cfg, owners, told, colluders)
    for victim in told:
        got = unmasked(cfg, owners, masked, shares, colluders, victim)
        if got is not None and np.allclose(got, values[victim], atol=1e-6):
            return victim
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attack=attacks())
def test_no_stories_unmask_an_honest_owner_while_at_most_c_collude(
    attack: tuple[sa.Config, frozenset[str], dict[str, sa.UnmaskRequest]],
) -> None:
    """Whatever stories the aggregator tells whom, with at most c colluders, it never holds both
    an honest owner's self-mask seed and the keys to all of its pair masks."""
    assert an_unmasked_honest_owner(attack) is None


@pytest.mark.slow  # ~9 s: outside the fast loop (-m "not slow"), in the full suite
def test_the_majority_rule_the_quorum_replaced_lets_stories_unmask_an_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property test above, under the old rule (more than half of the n owners confirm,
    whatever c), finds an attack that recovers an honest owner's exact input."""
    monkeypatch.setattr(sa.Config, "quorum", property(lambda config: len(config.owners) // 2 + 1))
    found: list[tuple[sa.Config, frozenset[str], dict[str, sa.UnmaskRequest]]] = []

    # a search, not `find`: a round's keys and shares are fresh random draws, so an example run
    # again (as shrinking does) may come out otherwise, which `find` reports as flaky
    @settings(max_examples=2_000, database=None, deadline=None, phases=[Phase.generate])
    @given(attack=attacks())
    def search(attack: tuple[sa.Config, frozenset[str], dict[str, sa.UnmaskRequest]]) -> None:
        if not found and an_unmasked_honest_owner(attack) is not None:
            found.append(attack)

    search()
    assert found, "no attack found under the majority rule"
    cfg, colluders, _ = found[0]
    assert 1 <= len(colluders) <= cfg.colluding


def test_an_owner_refuses_a_round_it_is_not_in() -> None:
    cfg = config(3, threshold=2)
    stranger = sa.Owner("mallory")
    keys = {"mallory": stranger.advertise()}
    with pytest.raises(PermissionDenied, match="not an owner"):
        stranger.share_keys(cfg, keys)


@pytest.mark.parametrize("drop_left_out", [False, True])
def test_an_owner_that_leaves_a_neighbour_out_keeps_the_masks_consistent(drop_left_out: bool) -> None:
    """owner00 could not check owner01's keys and shares without it, while owner01 shares with
    owner00: the pair masks with each other only if both shared, so the sum is right, also when
    owner01 then drops and its mask key is rebuilt."""
    cfg = config(5, threshold=3)
    values = inputs(cfg, seed=11)
    rng = np.random.default_rng(1)
    owners = {o: sa.Owner(o) for o in cfg.owners}
    agg = sa.Aggregator(cfg)
    keys = agg.relay_keys({o: w.advertise() for o, w in owners.items()})
    sent = {o: owners[o].share_keys(cfg, keys) for o in cfg.owners if o != "owner00"}
    sent["owner00"] = owners["owner00"].share_keys(cfg, {o: k for o, k in keys.items() if o != "owner01"})
    inbox = agg.route_shares(sent)
    alive = [o for o in cfg.owners if not (drop_left_out and o == "owner01")]
    request = agg.collect({o: owners[o].masked_input(values[o], inbox[o], rng) for o in alive})
    total, _ = agg.finish({o: owners[o].unmask(request, request.survivors) for o in request.survivors})
    np.testing.assert_allclose(total, expected(values, alive), atol=1e-7)


def test_owners_silent_while_unmasking_count_only_through_the_shares_they_hold() -> None:
    """The minimum of survivors is about inputs (the noise): with 6 survivors of m = 5, two
    owners that do not answer the unmask request still leave 3 shares of everyone's secrets."""
    cfg = config(6, threshold=3, min_survivors=5)
    values = inputs(cfg, seed=13)
    total, count, survivors = run(cfg, values, during_unmask=["owner01", "owner04"])
    assert count == 6 and survivors == set(cfg.owners)
    np.testing.assert_allclose(total, expected(values, cfg.owners), atol=1e-7)


def test_a_lost_budget_history_with_secure_contributions_in_the_audit_log_fails_closed() -> None:
    """A secure contribution is charged like any release: an owner whose history is gone while
    its audit log records one must not start with its budget reset."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        spent = budget.Budget("bob", 5.0, 1e-5, directory).charge(2.0, 1.0, 1)
        audit.AuditLog("bob", directory).record(audit.SECURE_CONTRIBUTION, "client", object=1, epsilon_spent=spent)
        (directory / budget.FILE_NAME).unlink()
        with pytest.raises(ValueError, match=budget.FILE_NAME):
            budget.Budget("bob", 5.0, 1e-5, directory)


# --- the release against M1's ---------------------------------------------------------------
FEDAVG_SIGMA = 2.03
"""The DP-FedAvg example's noise multiplier (epsilon 8 over 10 releases at delta 1e-5), clip 1."""
FEDAVG_DIM = 650
"""Its linear model's parameters (64 x 10 + 10): one update's length."""


def fedavg_updates(n: int) -> dict[str, np.ndarray]:
    """Clipped updates like the example's: mostly small coordinates, and a first one that every
    owner pushes to 0.9 (their sum sits near the ring's reach, n C)."""
    rng = np.random.default_rng(7)
    out = {}
    for o in names(n):
        rest = rng.normal(size=FEDAVG_DIM - 1)
        out[o] = np.concatenate([[0.9], rest * math.sqrt(1 - 0.81) / np.linalg.norm(rest)])
    return out


def release_errors(n: int, min_survivors: int, dropped: Collection[str], trials: int) -> tuple[np.ndarray, np.ndarray]:
    """The released mean's error (minus the survivors' exact mean) per trial and coordinate,
    from SecAgg+ (the whole protocol, `dropped` leaving before their masked input) and from M1
    (`mechanisms.release_mean` on the survivors' contributions), for the same updates."""
    values = fedavg_updates(n)
    survivors = [o for o in names(n) if o not in dropped]
    exact = np.mean([values[o] for o in survivors], axis=0)
    contributions = [mechanisms.Contribution(o, 1.0, FEDAVG_SIGMA) for o in survivors]
    secure, m1 = [], []
    for _ in range(trials):
        cfg = sa.Config(secrets.token_bytes(16), names(n), FEDAVG_DIM, 0, min_survivors, 1.0, FEDAVG_SIGMA)
        total, count, _ = run(cfg, values, before_input=dropped, rng=np.random.default_rng(secrets.randbits(128)))
        assert count == len(survivors)
        secure.append(total / count - exact)
        tensors = [torch.from_numpy(values[o]) for o in survivors]
        m1.append(mechanisms.release_mean(tensors, contributions, frozenset(names(n)), min_survivors).numpy() - exact)
    return np.array(secure), np.array(m1)


def assert_unbiased(errors: np.ndarray) -> None:
    """No coordinate's mean error is beyond `UNBIASED_Z` standard errors, nor the mean over all."""
    trials = errors.shape[0]
    z = errors.mean(0) / (errors.std(0, ddof=1) / math.sqrt(trials))
    assert float(np.abs(z).max()) < UNBIASED_Z, (int(np.abs(z).argmax()), float(np.abs(z).max()))
    assert abs(float(errors.mean())) < UNBIASED_Z * float(errors.std()) / math.sqrt(errors.size)


UNBIASED_Z = 5.5
"""By chance (t with 199 degrees of freedom) one coordinate is beyond it with probability 1.2e-7:
1 in 2,000 for the test's 6 x 650 coordinates; a ring that wraps biases the first by z 7.6."""


@pytest.mark.slow  # 6 x 650 coordinates of whole rounds: 8-30 s per case
@pytest.mark.parametrize(
    ("min_survivors", "dropped", "variance_ratio"),
    [(8, (), 1.0), (7, ("owner07",), 1.0), (7, (), 8 / 7)],
    ids=["8-of-8", "7-of-8-one-dropped", "7-of-8-all-survive"],
)
def test_the_secure_mean_has_m1s_error_distribution(
    min_survivors: int, dropped: tuple[str, ...], variance_ratio: float
) -> None:
    """For the same clipped updates, at the DP-FedAvg example's settings (8 owners, clip 1,
    noise multiplier 2.03): the mean released by SecAgg+ and by M1 are both unbiased in every
    coordinate (quantization, stochastic rounding and the ring's wrap-around included), both
    divide by the survivors and leave a dropped owner's update out, and their errors' variance
    is the same, except that with noise shares sized for 7 survivors and all 8 surviving the
    secure sum carries 8/7 of M1's noise (more privacy than charged). 3% tolerance on the
    variance ratio; its standard error here is about 0.5%."""
    secure, m1 = release_errors(8, min_survivors, dropped, trials=200)
    assert_unbiased(secure)
    assert_unbiased(m1)
    survivors = 8 - len(dropped)
    assert abs(float(m1.var()) / (FEDAVG_SIGMA / survivors) ** 2 - 1) < 0.03
    assert abs(float(secure.var()) / float(m1.var()) - variance_ratio) < 0.03 * variance_ratio
