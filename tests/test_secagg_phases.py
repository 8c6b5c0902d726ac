"""SecAgg+'s phases, attacked by a client driving the protocol itself (red-team round 19, branch red18).

A client may name itself the aggregator of a round (`SecAggJoin`): the owners then answer its
phases on the wire, which is the protocol's untrusted-aggregator model (docs/PRIVACY.md, Secure
aggregation). Here a second client of the same attacker plays a co-owner of bob's round: a
colluder of the client's own making, which holds bob's shares and adds no noise.

On the in-process harness (the real broker, nodes and clients); the phases are driven through the
wire with the protocol code of `nodes/secagg.py`, as an attacker's own code would drive them.
"""

from __future__ import annotations

import secrets
import tempfile
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fedptr.nodes import secagg as sa
from fedptr.nodes import secure
from fedptr.nodes.node import NodeConfig

from fedptr import dp, envelope, wire
from fedptr.errors import PermissionDenied

from . import harness

SIGMA, CLIP = 1.0, 1.0
X = np.full(2000, 0.01, dtype=np.float32)
"""Bob's private x, within the clip bound (norm 0.45): his input is his value; enough numbers to
measure the noise on them."""


def _share(round_: sa.Config, owners: list[str], keys: dict[str, list[bytes]]) -> wire.SecAggShare:
    """The aggregator's share-phase request for `round_` (no dropouts), relaying `keys`."""
    return wire.SecAggShare(
        round_.round_id,
        owners,
        round_.dim,
        round_.threshold,
        round_.min_survivors,
        round_.degree,
        round_.ring_bits,
        CLIP,
        SIGMA,
        keys,
        0,
    )


def _answering(client: Any, keys: sa.PublicKeys) -> None:
    """`client` answers what an owner asks a neighbour of its round: its keys (`SecAggPeerKeys`).
    A client's own code may answer any request the broker routes to it (the broker routes
    requests to clients too; the client library refuses them, in its session only)."""
    link = client._link
    link.session.role = envelope.ROLE_WORKER  # as the broker registered it: a client

    def handler(source: str, rid: bytes, request: Any) -> None:
        if isinstance(request.message, wire.SecAggPeerKeys):
            link.reply(source, rid, wire.SecAggKeys(keys.cipher, keys.mask, CLIP, SIGMA))

    link.handler = handler


async def _sybil_round() -> np.ndarray | None:
    """Client A aggregates a round of bob and client B (c = 0, which A chooses). B holds bob's
    seed and mask-key shares (t = 1 of k = 1) and adds no noise, so A strips bob's masked input
    to his value plus his noise share, sigma C / sqrt(2): below the sigma C he is charged for.
    Returns what A recovered, or None when bob refused the round before sharing a key."""
    with tempfile.TemporaryDirectory(prefix="fedptr-red18-") as tmp:
        config = NodeConfig(epsilon=1e4, dp_clip=CLIP, dp_noise_multiplier=SIGMA, store_dir=f"{tmp}/bob")
        data = {"bob": {"data": {"x": X}}}
        cluster = harness.cluster(["bob"], configs={"bob": config}, data=data, call_timeout=30.0)
        async with cluster as c, c.connect() as b:
            a = c.client
            (bx,) = await c.worker("bob").search("data")
            value = bx * 1
            sybil = sa.Owner(b.name)
            _answering(b, sybil.public_keys)
            owners = sorted(["bob", b.name])
            round_id = secrets.token_bytes(secure.ROUND_ID_BYTES)
            await a.call("bob", wire.SecAggJoin(round_id, value.id_at_location, a.name, owners, 0))
            advertised = await a.call("bob", wire.SecAggAdvertise(round_id))
            assert isinstance(advertised, wire.SecAggKeys)
            bob_keys = sa.PublicKeys(advertised.cipher, advertised.mask)
            sybil.advertise()
            round_ = sa.Config(round_id, tuple(owners), X.size, 0, 2, CLIP, SIGMA, colluders=0)
            keys = {"bob": bob_keys, b.name: sybil.public_keys}
            share = _share(round_, owners, {o: [k.cipher, k.mask] for o, k in keys.items()})
            try:
                shared = await a.call("bob", share)
            except PermissionDenied as e:
                assert "are not worker nodes" in str(e), e
                assert (await dp.budget(c.worker("bob"))).epsilon_spent == 0.0
                return None
            assert isinstance(shared, wire.SecAggShares)
            to_bob = sybil.share_keys(round_, keys)
            masked = await a.call("bob", wire.SecAggMask(round_id, {b.name: to_bob["bob"]}))
            assert isinstance(masked, wire.SecAggMasked)
            sybil.masked_input(np.zeros(X.size), {"bob": shared.shares[b.name]}, np.random.default_rng(0))
            seed_share, key_share = sybil._held["bob"]
            x = round_.index(b.name)
            seed = sa.reconstruct({x: seed_share})
            bob_key = X25519PrivateKey.from_private_bytes(sa.reconstruct({x: key_share}))
            y = secure.ring_from_wire(masked.tensor, round_)
            y = y - sa.prg(seed, round_) - sa._pair_mask(bob_key, sybil.public_keys.mask, "bob", b.name, round_)
            return sa.decode(y & sa._mask(round_), round_)


async def test_a_client_named_co_owner_is_refused_before_any_key_is_shared() -> None:
    """A round whose owners include a peer that is not a worker node (a client, which may
    collude with the client that aggregates and adds no noise) is refused by bob before he
    shares a key, his budget untouched. Before the fix bob's input left with noise
    sigma C / sqrt(m), m the owners named: an attacker naming many clients as owners, each
    a neighbour of bob, shrinks it as it likes."""
    recovered = await _sybil_round()
    assert recovered is None, (
        f"the client recovered bob's input with noise of std {np.std(recovered - X):.3g} (mean error "
        f"{np.mean(recovered - X):.2g}): sigma C / sqrt 2 = {SIGMA * CLIP / 2**0.5:.3g}, below the "
        f"sigma C = {SIGMA * CLIP} bob is charged for"
    )


async def test_an_owner_gone_after_the_advertise_phase_drops_out_of_the_round() -> None:
    """dave, a worker and an owner of the round, stops after the advertise phase: the broker no
    longer lists him when bob answers the share phase. He is a dropout (bob shares with carol
    and erin only), not a reason to refuse the round: before the fix bob refused it as naming "not worker
    nodes", and one owner lost mid-round failed every owner's round (review11). (Four owners:
    bob keeps t = 2 neighbours of his 3.)"""
    owners = ["bob", "carol", "dave", "erin"]
    with tempfile.TemporaryDirectory(prefix="fedptr-review11-") as tmp:
        configs = {
            o: NodeConfig(epsilon=1e4, dp_clip=CLIP, dp_noise_multiplier=SIGMA, store_dir=f"{tmp}/{o}") for o in owners
        }
        data = {o: {"data": {"x": X}} for o in owners}
        async with harness.cluster(owners, configs=configs, data=data, call_timeout=30.0) as c:
            a = c.client
            round_id = secrets.token_bytes(secure.ROUND_ID_BYTES)
            keys = {}
            for o in owners:
                (x,) = await c.worker(o).search("data")
                value = x * 1
                await a.call(o, wire.SecAggJoin(round_id, value.id_at_location, a.name, owners, 0))
            for o in owners:
                advertised = await a.call(o, wire.SecAggAdvertise(round_id))
                assert isinstance(advertised, wire.SecAggKeys)
                keys[o] = [advertised.cipher, advertised.mask]
            await c.stop_node("dave")
            assert c.broker is not None and b"dave" not in c.broker.table.by_name
            round_ = sa.Config(round_id, tuple(owners), X.size, 0, 2, CLIP, SIGMA, colluders=0)
            share = _share(round_, owners, keys)
            shared = await a.call("bob", share)
            assert isinstance(shared, wire.SecAggShares)
            assert sorted(shared.shares) == ["carol", "erin"], sorted(shared.shares)
