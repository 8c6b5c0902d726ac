"""Secure aggregation rounds on a node: the wire side of nodes/secagg.py.

* **An owner** joins a round when its client asks (`SecAggJoin`: which value, which
  aggregator), then answers that aggregator's four phases. Before its masked input leaves it
  clips the value to its own bound, charges its budget one Gaussian mechanism with its own
  noise multiplier, and records the round in its audit log; it refuses a round whose noise is
  below what it charges for or that resists fewer colluders than its client asked (before any
  charge: the quorum and the least threshold follow from them, nodes/secagg.py), and, spending
  nothing, an input it would mask with fewer than t neighbours. A round it joined is forgotten
  after `SECAGG_ROUND_TIMEOUT_S`.
* **The aggregator** drives the phases for a client's `SecureMean`: each phase asks every owner
  still in the round at once and waits at most `SECAGG_PHASE_TIMEOUT_S`, and at most its share
  of the client's deadline (a quarter of it for the first of four phases); an owner that fails,
  refuses or is late has dropped out, with its reason. The round's clip bound and noise are the
  largest the owners ask for. The mean of the survivors is stored as a DP release; too many
  dropouts fail the request with DropoutError.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from fedptr import limits, wire
from fedptr.errors import (
    DeadlineExceeded,
    DropoutError,
    InvalidArgumentError,
    OverloadedError,
    PermissionDenied,
    ProtocolError,
)
from fedptr.tensors import dtype_name

from . import audit, mechanisms, policy, secagg
from .budget import no_budget
from .store import Entry

if TYPE_CHECKING:
    from .node import Node

ROUND_ID_BYTES = 16
M = TypeVar("M", bound=wire.Message)


@dataclass
class _Joined:
    """A round an owner joined: for whom, over what, with which aggregator, and its protocol state."""

    client: str
    obj_id: int
    aggregator: str
    owners: frozenset[str]
    """The owners the client named (`SecAggJoin`): the aggregator's round may name no other."""
    colluders: int
    """The collusion bound the client asked for: the round's config may resist no fewer."""
    protocol: secagg.Owner
    expiry: asyncio.TimerHandle
    told: asyncio.Future[secagg.UnmaskRequest]
    """The unmask request the aggregator sent this owner (the other owners ask for it)."""
    workers: frozenset[str] = frozenset()
    """The owners the broker listed as worker nodes at the join (`SecureRounds._all_workers`)."""


def ring_to_wire(y: np.ndarray, config: secagg.Config) -> wire.RawTensor:
    """Ring elements as a wire tensor: 4 bytes each up to 32 bits, else 8."""
    narrow = config.ring_bits <= 32
    data = y.astype(np.uint32 if narrow else np.uint64).tobytes()
    return wire.RawTensor("int32" if narrow else "int64", (config.dim,), memoryview(data))


def ring_from_wire(raw: wire.RawTensor, config: secagg.Config) -> np.ndarray:
    """The ring elements a masked input carries; ProtocolError for another dtype or shape."""
    narrow = config.ring_bits <= 32
    if raw.dtype != ("int32" if narrow else "int64") or raw.shape != (config.dim,):
        raise ProtocolError(f"a masked input is {config.dim} ring elements, not {raw.dtype}{list(raw.shape)}")
    return np.frombuffer(raw.data, dtype="<u4" if narrow else "<u8").astype(np.uint64) & np.uint64(
        (1 << config.ring_bits) - 1
    )


def _share_bytes(value: int) -> bytes:
    return value.to_bytes(secagg.SHARE_BYTES, "big")


def _share_int(blob: bytes) -> int:
    if len(blob) != secagg.SHARE_BYTES:
        raise ProtocolError(f"a share is {secagg.SHARE_BYTES} bytes, not {len(blob)}")
    return int.from_bytes(blob, "big")


class SecureRounds:
    """The secure aggregation handlers of one node (`handlers` for its dispatch table)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._joined: dict[bytes, _Joined] = {}

    def handlers(self) -> dict[type[wire.Message], Callable[[str, bytes, Any, float], None]]:
        return {
            wire.SecureMean: self._mean,
            wire.SecAggJoin: self._join,
            wire.SecAggAdvertise: self._advertise,
            wire.SecAggPeerKeys: self._peer_keys,
            wire.SecAggShare: self._share,
            wire.SecAggMask: self._mask,
            wire.SecAggUnmask: self._unmask,
            wire.SecAggConfirm: self._confirm,
        }

    # --- an owner ----------------------------------------------------------------------
    def _join(self, source: str, rid: bytes, msg: wire.SecAggJoin, budget: float) -> None:
        node = self.node
        if len(msg.round_id) != ROUND_ID_BYTES:
            raise InvalidArgumentError(f"a round id is {ROUND_ID_BYTES} bytes")
        entry = node.store.get(msg.obj_id, source)
        policy.check_own_data(node.policy, entry.taint, "a secure input")
        if node.budget.epsilon is None:
            raise no_budget(node.name)
        if msg.round_id in self._joined:
            raise InvalidArgumentError("this round was joined already")
        if msg.colluders < 0:
            raise InvalidArgumentError("a round resists a collusion bound of at least 0 owners")
        if len(self._joined) >= limits.SECAGG_MAX_ROUNDS:
            raise OverloadedError(node.name, f"{len(self._joined)} secure aggregation rounds already open")
        expiry = asyncio.get_running_loop().call_later(
            limits.SECAGG_ROUND_TIMEOUT_S, self._joined.pop, msg.round_id, None
        )
        told: asyncio.Future[secagg.UnmaskRequest] = asyncio.get_running_loop().create_future()
        joined = self._joined[msg.round_id] = _Joined(
            source,
            msg.obj_id,
            msg.aggregator,
            frozenset(msg.owners),
            msg.colluders,
            secagg.Owner(node.name),
            expiry,
            told,
        )

        async def answer() -> None:
            joined.workers = joined.owners.intersection(await self._workers(budget))
            node.reply(source, rid, wire.Ok())

        node.spawn(answer(), source, rid)

    def _round(self, round_id: bytes, source: str) -> _Joined:
        joined = self._joined.get(round_id)
        if joined is None or joined.aggregator != source:
            raise PermissionDenied(self.node.name, f"{self.node.name!r} joined no such round with {source!r}")
        return joined

    def _advertise(self, source: str, rid: bytes, msg: wire.SecAggAdvertise, budget: float) -> None:
        joined = self._round(msg.round_id, source)
        joined.protocol.advertise()
        self.node.reply(source, rid, self._keys_reply(joined))

    def _keys_reply(self, joined: _Joined) -> wire.SecAggKeys:
        keys, config = joined.protocol.public_keys, self.node.config
        return wire.SecAggKeys(keys.cipher, keys.mask, config.dp_clip, config.dp_noise_multiplier)

    def _peer_keys(self, source: str, rid: bytes, msg: wire.SecAggPeerKeys, budget: float) -> None:
        """Another owner checks the keys the aggregator relayed as ours (public: anyone may ask)."""
        joined = self._joined.get(msg.round_id)
        if joined is None:
            raise PermissionDenied(self.node.name, f"{self.node.name!r} joined no such round")
        self.node.reply(source, rid, self._keys_reply(joined))

    async def _verified(self, relayed: dict[str, secagg.PublicKeys], round_id: bytes, budget: float) -> list[str]:
        """Ask each neighbour for its keys directly (the broker vouches for who answers); raise
        PermissionDenied for relayed keys that are not the neighbour's, and return the
        neighbours that did not answer in time (this owner will not share with them)."""
        # half the aggregator's deadline: a silent neighbour must not make this owner late too
        wait = max(limits.MIN_HOP_BUDGET_S, budget / 2 - limits.HOP_MARGIN_S)
        asks = {v: self.node.link.request_nowait(v, wire.SecAggPeerKeys(round_id), wait) for v in relayed}
        await asyncio.wait(asks.values(), timeout=wait + limits.HOP_MARGIN_S)  # each settles by `wait`
        silent = []
        for v, f in asks.items():
            answer = f.result() if f.done() and f.exception() is None else None
            if not isinstance(answer, wire.SecAggKeys):
                f.cancel()
                silent.append(v)
            elif secagg.PublicKeys(answer.cipher, answer.mask) != relayed[v]:
                raise PermissionDenied(self.node.name, f"the keys relayed as {v!r}'s are not {v!r}'s own")
        return silent

    async def _workers(self, budget: float) -> list[str]:
        """The worker nodes the broker lists (the broker binds worker names to keys)."""
        wait = max(limits.MIN_HOP_BUDGET_S, budget / 2 - limits.HOP_MARGIN_S)  # as `_verified`
        return await self.node.link.list_workers(wait)

    async def _all_workers(self, joined: _Joined, owners: tuple[str, ...], budget: float) -> None:
        """Raise PermissionDenied unless every owner of the round is a worker node, listed at
        the join or now. The client chooses the collusion bound c and, aggregating itself, the
        owners: a client named an owner is a colluder of its own making, counted by no c, that
        adds no noise and, a neighbour, holds this owner's seed and mask-key shares (red18: with
        c = 0 and one such owner, the client stripped bob's input to his value and a noise of
        sigma C / sqrt(2); with more, sigma C / sqrt(m) as small as it likes). Listed at the
        join: a worker that left since is a dropout of the share phase, not a stranger (asked
        then alone, one lost mid-round failed every owner's round, review11)."""
        strangers = set(owners) - joined.workers
        if strangers:  # not workers at the join (or its list failed): perhaps they are now
            strangers -= set(await self._workers(budget))
        if strangers:
            raise PermissionDenied(
                self.node.name, f"{sorted(strangers)} named owners of the round are not worker nodes"
            )

    def _share(self, source: str, rid: bytes, msg: wire.SecAggShare, budget: float) -> None:
        joined = self._round(msg.round_id, source)
        config = secagg.Config(
            msg.round_id,
            tuple(msg.owners),
            msg.dim,
            msg.threshold,
            msg.min_survivors,
            msg.clip,
            msg.noise_multiplier,
            msg.degree,
            msg.ring_bits,
            msg.colluders,
        )  # refuses a threshold the colluders could reach; the quorum follows from n and c here
        if config.colluding < joined.colluders:
            # fewer would lower the quorum and the threshold: two stories could both be confirmed
            raise PermissionDenied(
                self.node.name,
                f"the round resists {config.colluding} colluders; its client asked for {joined.colluders}",
            )
        if joined.aggregator in config.owners:
            # an aggregator that is also an owner confirms any survivor set and holds both shares of
            # its neighbours: with n odd that splits the honest owners into two confirmed stories
            # that together unmask one of them (tests/test_secagg.py, the colluding owner)
            raise PermissionDenied(self.node.name, f"{joined.aggregator!r} is its aggregator, not one of its owners")
        strangers = set(config.owners) - joined.owners
        if strangers:
            # a node of the aggregator's own named an owner would be that colluder too
            raise PermissionDenied(self.node.name, f"its client did not name {sorted(strangers)} owners of this round")
        own = self.node.config
        # the sum's noise, sigma C, must cover this owner's sensitivity times its own sigma
        if config.noise_multiplier * config.clip < own.dp_noise_multiplier * min(own.dp_clip, config.clip):
            raise PermissionDenied(self.node.name, "the round's noise is below what this owner charges for")
        keys = {}
        for name, pair in msg.keys.items():
            if len(pair) != 2:
                raise ProtocolError(f"{name!r}'s keys are not a [cipher, mask] pair")
            keys[name] = secagg.PublicKeys(pair[0], pair[1])
        me = self.node.name
        neighbours = {v: keys[v] for v in config.neighbours(me) if v in keys} if me in config.owners else {}

        async def answer() -> None:
            await self._all_workers(joined, config.owners, budget)
            # the aggregator relays the keys: one that put its own in place of a neighbour's would
            # receive the shares meant for that neighbour, so each is checked with its owner
            for v in await self._verified(neighbours, msg.round_id, budget):
                del keys[v]
            self.node.reply(source, rid, wire.SecAggShares(joined.protocol.share_keys(config, keys)))

        self.node.spawn(answer(), source, rid)

    def _mask(self, source: str, rid: bytes, msg: wire.SecAggMask, budget: float) -> None:
        node = self.node
        joined = self._round(msg.round_id, source)
        entry = node.store.get(joined.obj_id, joined.client)

        async def answer() -> None:
            config = joined.protocol.config
            if config is None:
                raise PermissionDenied(node.name, "the masked input comes after the keys are shared")
            value = await entry.wait()
            if not isinstance(value, torch.Tensor) or entry.location is not None or value.numel() != config.dim:
                raise InvalidArgumentError(f"a secure input is a tensor of {config.dim} numbers held on its owner")
            bound = min(node.config.dp_clip, config.clip)
            clipped = mechanisms.clip(value.detach().reshape(-1), bound).to(torch.float64).numpy()
            # checked at the join, a phase ago: the client may have written another owner's data
            # into the object since (an in-place op), so the copy just read is checked again
            policy.check_own_data(node.policy, entry.taint, "a secure input")
            # masked (its noise and rounding from a generator seeded from the OS for this input
            # alone) before the charge, which the reply still waits for: an input the protocol
            # refuses to send (too few neighbours' shares) spends nothing
            masked = joined.protocol.masked_input(clipped, msg.shares, np.random.default_rng(secrets.randbits(128)))
            spent = await node.scheduler.offload(node.budget.charge, node.config.dp_noise_multiplier, 1.0, 1)
            node.audit.record(
                audit.SECURE_CONTRIBUTION,
                joined.client,
                object=joined.obj_id,
                to=source,
                round=msg.round_id.hex(),
                epsilon_spent=spent,
            )
            node.reply(source, rid, wire.SecAggMasked(ring_to_wire(masked, config), spent, node.budget.left))

        node.spawn(answer(), source, rid)

    def _unmask(self, source: str, rid: bytes, msg: wire.SecAggUnmask, budget: float) -> None:
        joined = self._round(msg.round_id, source)
        if joined.told.done():
            raise PermissionDenied(self.node.name, "this round's unmask request was answered already")
        request = secagg.UnmaskRequest(frozenset(msg.survivors), frozenset(msg.dropped))
        joined.told.set_result(request)  # one request per round, whatever it is
        # kept a phase longer, for the other owners to ask what this one was told
        joined.expiry.cancel()
        joined.expiry = asyncio.get_running_loop().call_later(
            limits.SECAGG_PHASE_TIMEOUT_S, self._joined.pop, msg.round_id, None
        )

        async def answer() -> None:
            confirmed = await self._confirmations(msg, budget)
            given = joined.protocol.unmask(request, confirmed)
            seeds = {v: _share_bytes(s) for v, (kind, s) in given.items() if kind == secagg.SELF}
            keys = {v: _share_bytes(s) for v, (kind, s) in given.items() if kind == secagg.KEY}
            self.node.reply(source, rid, wire.SecAggUnmasked(seeds, keys))

        self.node.spawn(answer(), source, rid)

    async def _confirmations(self, msg: wire.SecAggUnmask, budget: float) -> list[str]:
        """The named survivors that say, directly (the broker vouches for who answers), that the
        aggregator told them `msg` too: an aggregator telling each owner a different story
        could otherwise unmask one owner (nodes/secagg.py)."""
        wait = max(limits.MIN_HOP_BUDGET_S, budget / 2 - limits.HOP_MARGIN_S)  # as `_verified`
        me = self.node.name
        asks = {
            o: self.node.link.request_nowait(o, wire.SecAggConfirm(msg.round_id), wait)
            for o in msg.survivors
            if o != me
        }
        if asks:
            await asyncio.wait(asks.values(), timeout=wait + limits.HOP_MARGIN_S)  # each settles by `wait`
        told = (sorted(msg.survivors), sorted(msg.dropped))
        confirmed = []
        for o, f in asks.items():
            answer = f.result() if f.done() and f.exception() is None else None
            if not f.done():
                f.cancel()
            if isinstance(answer, wire.SecAggUnmask) and (sorted(answer.survivors), sorted(answer.dropped)) == told:
                confirmed.append(o)
        return confirmed

    def _confirm(self, source: str, rid: bytes, msg: wire.SecAggConfirm, budget: float) -> None:
        """Another owner of the round asks which unmask request this one was told (it may not
        have arrived yet: the aggregator sends them all at once)."""
        joined = self._joined.get(msg.round_id)
        config = joined.protocol.config if joined is not None else None
        if joined is None or config is None or source not in config.owners:
            raise PermissionDenied(self.node.name, f"{source!r} shares no such round with {self.node.name!r}")

        async def answer() -> None:
            wait = max(limits.MIN_HOP_BUDGET_S, budget - limits.HOP_MARGIN_S)
            try:
                request = await asyncio.wait_for(asyncio.shield(joined.told), wait)
            except TimeoutError:
                raise DeadlineExceeded(self.node.name, budget) from None
            reply = wire.SecAggUnmask(msg.round_id, sorted(request.survivors), sorted(request.dropped))
            self.node.reply(source, rid, reply)

        self.node.spawn(answer(), source, rid)

    # --- the aggregator ----------------------------------------------------------------
    def _mean(self, source: str, rid: bytes, msg: wire.SecureMean, budget: float) -> None:
        node = self.node
        if not node.policy.aggregator:
            raise PermissionDenied(node.name, f"{node.name!r} is not an aggregator; nothing is released here")
        if len(msg.round_id) != ROUND_ID_BYTES:
            raise InvalidArgumentError(f"a round id is {ROUND_ID_BYTES} bytes")
        if len(set(msg.owners)) != len(msg.owners):
            raise PermissionDenied(node.name, "a secure aggregate takes one input per owner")
        for owner in msg.owners:
            if owner not in node.policy.owners:
                raise PermissionDenied(owner, f"{owner!r} is not on this aggregator's roster of data owners")
        minimum = max(2, node.policy.min_owners)
        if len(msg.owners) < minimum:
            raise PermissionDenied(node.name, f"a release needs inputs of at least {minimum} owners")
        if any(d < 0 for d in msg.shape) or math.prod(msg.shape) == 0:
            raise InvalidArgumentError("a secure aggregate is of non-empty tensors")
        node.spawn(_Round(node, msg, budget, minimum).run(source, rid), source, rid)


class _Round:
    """One round the aggregator drives: the phases, the dropouts and their reasons."""

    def __init__(self, node: Node, msg: wire.SecureMean, budget: float, minimum: int) -> None:
        self.node = node
        self.msg = msg
        self.minimum = minimum
        loop = asyncio.get_running_loop()
        self.end = loop.time() + max(limits.MIN_HOP_BUDGET_S, budget - limits.HOP_MARGIN_S)
        self.budget = budget
        self.dropped: dict[str, str] = {}
        self.phases_left = 4

    async def _phase(
        self, phase: str, requests: dict[str, wire.Message], reply: type[M], minimum: int | None = None
    ) -> dict[str, M]:
        """Ask every owner of `requests` at once; the answers of those that gave `reply` in time,
        at least `minimum` of them (the round's minimum of owners by default)."""
        left = self.end - asyncio.get_running_loop().time()
        if left <= limits.MIN_HOP_BUDGET_S:
            raise DeadlineExceeded(self.node.name, self.budget)
        # a phase waits at most its share of what is left: silent owners in one phase must not
        # leave the next ones no time
        wait = min(limits.SECAGG_PHASE_TIMEOUT_S, left / self.phases_left)
        self.phases_left -= 1
        futures = {o: self.node.link.request_nowait(o, m, wait) for o, m in requests.items()}
        await asyncio.wait(futures.values(), timeout=wait + limits.HOP_MARGIN_S)  # each settles by `wait`
        answers: dict[str, M] = {}
        for owner, f in futures.items():
            if not f.done():
                f.cancel()
                self.dropped[owner] = f"{phase}: no answer in {wait:.3g} s"
            elif f.exception() is not None:
                self.dropped[owner] = f"{phase}: {f.exception()}"
            elif not isinstance(f.result(), reply):
                self.dropped[owner] = f"{phase}: answered {type(f.result()).__name__}"
            else:
                answers[owner] = f.result()  # type: ignore[assignment]
        minimum = self.minimum if minimum is None else minimum
        if len(answers) < minimum:
            raise self._dropout(
                phase, f"{len(answers)} owner{'' if len(answers) == 1 else 's'} left, fewer than {minimum}"
            )
        return answers

    def _dropout(self, phase: str, detail: str) -> DropoutError:
        reasons = f" ({'; '.join(f'{o}: {r}' for o, r in sorted(self.dropped.items()))})" if self.dropped else ""
        # a phase's own error passes here twice (raised by `_phase`, then by `run`): its reasons once
        return DropoutError(sorted(self.dropped), phase, detail if detail.endswith(reasons) else detail + reasons)

    async def run(self, source: str, rid: bytes) -> None:
        msg, node = self.msg, self.node
        keys = await self._phase(
            "advertise", {o: wire.SecAggAdvertise(msg.round_id) for o in msg.owners}, wire.SecAggKeys
        )
        clip = max(k.clip for k in keys.values())
        noise = max(k.clip * k.noise_multiplier for k in keys.values())  # the largest sigma C asked for
        try:
            config = secagg.Config(
                msg.round_id,
                tuple(sorted(keys)),
                math.prod(msg.shape),
                msg.threshold,
                self.minimum,
                clip,
                noise / clip,
                colluders=msg.colluders,
            )
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"no secure aggregation round of {len(keys)} owners: {e}") from None
        # the quorum: fewer survivors could not unmask, so the later phases need as many
        self.minimum = config.min_survivors
        protocol = secagg.Aggregator(config)
        relayed = protocol.relay_keys({o: secagg.PublicKeys(k.cipher, k.mask) for o, k in keys.items()})
        share = wire.SecAggShare(
            msg.round_id,
            list(config.owners),
            config.dim,
            config.threshold,
            config.min_survivors,
            config.degree,
            config.ring_bits,
            config.clip,
            config.noise_multiplier,
            {o: [k.cipher, k.mask] for o, k in relayed.items()},
            config.colluding,
        )
        shares = await self._phase("share keys", dict.fromkeys(relayed, share), wire.SecAggShares)
        try:
            inbox = protocol.route_shares({o: s.shares for o, s in shares.items()})
            masked = await self._phase(
                "masked input", {o: wire.SecAggMask(msg.round_id, inbox[o]) for o in inbox}, wire.SecAggMasked
            )
            inputs = {}
            for o, m in masked.items():
                try:
                    inputs[o] = ring_from_wire(m.tensor, config)
                except ProtocolError as e:
                    self.dropped[o] = f"masked input: {e}"
            request = protocol.collect(inputs)
            ask = wire.SecAggUnmask(msg.round_id, sorted(request.survivors), sorted(request.dropped))
            # the inputs are in: silent owners now count only through the shares they hold
            answers = await self._phase("unmask", dict.fromkeys(request.survivors, ask), wire.SecAggUnmasked, 1)
            given: dict[str, dict[str, tuple[str, int]]] = {}
            for o, a in answers.items():
                given[o] = {v: (secagg.SELF, _share_int(b)) for v, b in a.seed_shares.items()}
                given[o].update({v: (secagg.KEY, _share_int(b)) for v, b in a.key_shares.items()})
            total, count = protocol.finish(given)
        except DropoutError as e:
            raise self._dropout(e.phase, e.detail) from None
        mean = torch.from_numpy(total / count).to(torch.float32).reshape(msg.shape)
        result = Entry.tensor(mean, source)
        result.released = "dp"
        survivors = sorted(request.survivors)
        node.audit.record(
            "release", source, object=msg.result_id, owners=survivors, mechanism="secagg-mean", round=msg.round_id.hex()
        )
        reply = wire.SecureMeanReply(
            list(mean.shape),
            dtype_name(mean.dtype),
            {o: masked[o].epsilon_spent for o in survivors},
            {o: masked[o].epsilon_left for o in survivors},
            {o: r for o, r in self.dropped.items() if o not in request.survivors},
        )
        node.objects.store_new(source, rid, msg.result_id, result, reply)
