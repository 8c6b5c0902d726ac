"""Differential-privacy releases: a data owner's contributions (M1) and DP-SGD (M2), its
budget, and an aggregator's release of the noised mean of contributions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedptr import wire
from fedptr.errors import FedptrError, InvalidArgumentError
from fedptr.failures import failure_from_error, with_hop
from fedptr.tensors import dtype_name, from_raw, to_raw

from . import audit, mechanisms, policy
from .store import Entry, all_written

if TYPE_CHECKING:
    from .node import Node


class Release:
    """The DP handlers of one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.name = node.name
        self.config = node.config
        self.store = node.store
        self.policy = node.policy
        self.budget = node.budget
        self.audit = node.audit
        self.scheduler = node.scheduler

    def contribute(self, source: str, rid: bytes, msg: wire.Contribute, budget: float) -> None:
        """M1 at a data owner: clip, charge, and send a single-use contribution to an aggregator."""
        entry = self.store.get(msg.obj_id, source)
        policy.check_contribution(self.policy, entry.taint, msg.aggregator)

        async def answer() -> None:
            value = await entry.wait()
            if not isinstance(value, torch.Tensor) or entry.location is not None:
                raise InvalidArgumentError("a contribution is a tensor held on its owner's node")
            clipped = mechanisms.clip(value, self.config.dp_clip)
            # a release of this contribution alone would leave its dtype's range: refused from
            # public figures before the charge, not charged and refused at the aggregator
            clip, sigma = self.config.dp_clip, self.config.dp_noise_multiplier
            mechanisms.check_range(sigma * clip, clip, clipped.dtype)
            # checked again on the copy just read: a write pipelined behind this request (an
            # `add_` of another owner's data moved here) may have run since the check on arrival,
            # and its taint, decided as it arrived, is on the entry by now
            policy.check_own_data(self.policy, entry.taint, "a contribution")
            spent = await self.scheduler.offload(self.budget.charge, self.config.dp_noise_multiplier, 1.0, 1)
            self.audit.record(audit.CONTRIBUTION, source, object=msg.obj_id, to=msg.aggregator, epsilon_spent=spent)
            put = wire.PutContribution(
                msg.new_id, to_raw(clipped), self.config.dp_clip, self.config.dp_noise_multiplier, source
            )
            try:
                await self.node.forward(msg.aggregator, put, budget)
            except FedptrError as e:
                raise with_hop(e, self.name) from None
            self.node.reply(source, rid, wire.BudgetReply(self.name, spent, self.budget.left))

        self.node.spawn(answer(), source, rid)

    def put_contribution(self, source: str, rid: bytes, msg: wire.PutContribution, budget: float) -> None:
        """M1 at the aggregator: keep a contribution of a roster owner, read-only and single-use."""
        policy.check_contributor(self.policy, source)
        if not (msg.clip > 0 and msg.noise_multiplier > 0):
            raise InvalidArgumentError("a contribution needs a clip bound and a noise multiplier above 0")
        value = from_raw(msg.tensor)
        entry = Entry.tensor(value, msg.owner, policy.Taint({source: frozenset({self.name})}))
        entry.readonly = source
        entry.contribution = mechanisms.Contribution(source, msg.clip, msg.noise_multiplier)
        self.node.objects.store_new(source, rid, msg.obj_id, entry, wire.Ok(list(value.shape), msg.tensor.dtype))

    def dp_train(self, source: str, rid: bytes, msg: wire.DPTrain, budget: float) -> None:
        """M2: DP-SGD on this node's own data; every step is charged before it runs."""
        model_entry = self.store.get(msg.model_id, source)
        data = [self.store.get(i) for i in (msg.x_id, msg.y_id)]
        policy.check_dp_train(self.policy, model_entry, data, (msg.x_id, msg.y_id), self.store.tags.values())

        async def answer() -> None:
            try:
                model = await model_entry.wait()
                x, y = data[0].result(), data[1].result()
                if not isinstance(model, torch.nn.Module) or len(x) != len(y):
                    raise InvalidArgumentError("DP-SGD takes a model and inputs and targets of one length")
                mechanisms.check_run(msg, len(x))
                mechanisms.check_per_sample(model)
                spent = await self.scheduler.offload(self._charge, model, x, y, msg, data[0].taint)
                # recorded before the model is trained: a record the disk refuses fails the run
                # typed (the OSError by name) with the model untouched; the charge stays spent
                # (the history never holds less than the log records, and a refund would be one
                # more write the disk may refuse)
                self.audit.record(audit.DP_TRAIN, source, object=msg.model_id, steps=msg.steps, epsilon_spent=spent)
            except Exception as e:
                self.node.reply_error(source, rid, e)
                return
            # from here the model changes in place: a run that fails part way (an error no check
            # foresaw) leaves it holding the noised steps it took, charged and recorded, a DP
            # release as a whole run's is (its gets audited as one)
            model_entry.released = "dp"
            reply: wire.Message = wire.BudgetReply(self.name, spent, self.budget.left)
            try:
                await self.scheduler.offload(mechanisms.dp_sgd, model, x, y, msg)
            except Exception as e:
                reply = failure_from_error(e, self.name)
            durable = self.store.persist(msg.model_id, model_entry, model)
            self.node.reply_durable(durable, source, rid, reply)

        self.node.compute_later(answer(), source, rid)  # it trains the model in place: later requests wait

    def _charge(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        config: wire.DPTrain,
        taint: policy.Taint,
    ) -> float:
        """On a worker thread: check the run from shapes alone, then charge every step (the
        training follows once the charge is recorded)."""
        try:
            mechanisms.check_model(model, x, y, config)
        except Exception:
            raise policy.refuse_op(taint, "dp_train", []) from None
        # charged at the rate the sampler realises, which may exceed the one asked (by < 2^-53)
        return self.budget.charge(config.noise_multiplier, mechanisms.realised_rate(config.sample_rate), config.steps)

    def report_budget(self, source: str, rid: bytes, msg: wire.Budget, budget: float) -> None:
        self.node.reply(source, rid, wire.BudgetReply(self.name, self.budget.spent, self.budget.left))

    def aggregate(self, source: str, rid: bytes, msg: wire.Op, entries: dict[int, Entry]) -> None:
        """M1 at the aggregator: the noised mean of single-use contributions, released."""
        policy.check_aggregator(self.policy)
        refs = msg.args[0] if len(msg.args) == 1 and type(msg.args[0]) is list else None
        if msg.op != "aggregate_mean" or refs is None or msg.kwargs or not all(type(r) is wire.Ref for r in refs):
            raise InvalidArgumentError("aggregate_mean takes one list of contributions")
        chosen = [entries[r.obj_id] for r in refs]  # type: ignore[union-attr]
        policy.check_aggregate(self.policy, chosen)
        values = [e.result() for e in chosen]
        contributions = [e.contribution for e in chosen if e.contribution is not None]
        mean = mechanisms.release_mean(values, contributions, self.policy.owners, self.policy.min_owners)
        owners = sorted(c.owner for c in contributions)
        # audited before anything changes: a record the disk refuses fails the release, which
        # leaves no mean to get and the contributions unspent
        self.audit.record("release", source, object=msg.result_id, owners=owners, mechanism="dp-mean")
        for r in refs:
            self.store.discard(r.obj_id)  # type: ignore[union-attr]  # single use
        result = Entry.tensor(mean, source)
        result.released = "dp"
        self.store.add(msg.result_id, result)
        # the reply waits for the contributions' removal too: an acknowledged release has used them up
        durable = all_written([self.store.commit(msg.result_id, result, mean), self.store.barrier()])
        self.node.reply_durable(durable, source, rid, wire.Ok(list(mean.shape), dtype_name(mean.dtype)))
