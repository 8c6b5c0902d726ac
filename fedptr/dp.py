"""Differential privacy from the client's side: ask data owners' nodes to run the mechanisms.

The nodes do the privacy work (nodes/mechanisms.py); these calls only ask and report what each
release cost the owner's budget.

* `contribute` (M1): an owner clips a value derived from its own data and sends it to an
  aggregator as a single-use contribution; `fedptr.aggregate.mean` releases their noised mean.
* `secure_mean` (M1 by secure aggregation): the owners' values are clipped, noised, quantized
  and masked on their own nodes; the aggregator learns only the noised sum (nodes/secagg.py).
* `train` (M2): DP-SGD on an owner's own data, batches sampled by the node; the trained model
  can then be fetched (post-processing).
* `budget`: what an owner has spent and has left.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fedptr import limits, wire
from fedptr.awaiting import awaited
from fedptr.client import Worker
from fedptr.errors import (
    DeadlineExceeded,
    InvalidArgumentError,
    LostWorkerError,
    ProtocolError,
    UnknownWorkerError,
    UnsupportedTypeError,
)
from fedptr.pointer import ModulePointer, Pointer, expect_pointer


@dataclass(frozen=True)
class Spent:
    """A data owner's privacy budget after a release: epsilon spent and left, at its delta."""

    owner: str
    epsilon_spent: float
    epsilon_left: float


def _spent(reply: wire.Message) -> Spent:
    if not isinstance(reply, wire.BudgetReply):
        raise ProtocolError(f"expected a budget reply, got {type(reply).__name__}")
    return Spent(reply.owner, reply.epsilon_spent, reply.epsilon_left)


@awaited
async def contribute(value: Pointer, aggregator: Worker | str) -> tuple[Pointer, Spent]:
    """Make `value` (on its data owner's node, derived from that owner's data alone) a DP
    contribution on `aggregator`, which the owner must trust. Returns the contribution's
    pointer and the owner's budget after the charge.

    Raises PermissionDenied (the value derives from another owner's data, or the owner does not
    trust `aggregator`), BudgetExhaustedError (it would exceed the owner's budget), and the
    errors of any call."""
    expect_pointer(value, "a Pointer to the value to contribute")
    value.check_alive()
    client = value.client
    name = client.as_worker(aggregator).name
    new_id = client.new_id()
    reply = await client.call(value.location, wire.Contribute(value.id_at_location, name, new_id))
    return Pointer(client, name, new_id), _spent(reply)


@dataclass(frozen=True)
class SecureRelease:
    """What a secure mean cost: each surviving owner's budget after its charge, and why each
    other owner dropped out of the round."""

    spent: dict[str, Spent]
    dropped: dict[str, str]


@awaited
async def secure_mean(
    values: Sequence[Pointer], aggregator: Worker | str, *, colluders: int | None = None, threshold: int = 0
) -> tuple[Pointer, SecureRelease]:
    """The DP mean of `values` (one per data owner, each on its owner's node and derived from
    that owner's data alone, all of one shape), released on `aggregator` by secure aggregation
    (SecAgg+): each owner clips its value to its own bound, adds its share of the noise, charges
    its budget and masks it; the aggregator sees only the noised sum. Owners that drop out are
    left out of the mean, as long as at least the aggregator's ``--min-owners`` remain, and a
    quorum floor((n + c) / 2) + 1 of the n owners in the round answer the unmask phase.
    `colluders` (c) is how many owners may collude with the aggregator without it learning any
    other owner's value (None: `limits.secagg_default_colluders`, a third of the default
    neighbourhood; each owner refuses a round that resists fewer). `threshold` is how many of an
    owner's neighbours must answer to unmask it (0: the least that resists c colluders, just over
    half of the k neighbours plus c). Returns the mean's pointer (gettable) and what it cost.

    An owner that is gone before the round begins (lost, unknown, or silent past the deadline
    when asked to join) drops out like one that leaves mid-round.

    Raises InvalidArgumentError for a negative `colluders`, or one the round's owners cannot
    resist (c reaching the neighbour degree, a threshold at most (k + c) / 2), DropoutError (naming
    the owners) when too many dropped, PermissionDenied for owners
    off the aggregator's roster or values derived from other owners' data, BudgetExhaustedError
    (from the owner) when it has no budget, and the errors of any call."""
    if not values:
        raise InvalidArgumentError("a secure mean takes at least one value")
    for v in values:
        expect_pointer(v, "a Pointer per data owner")
    owners = [v.location for v in values]
    if len(set(owners)) != len(owners):
        raise InvalidArgumentError("a secure mean takes one value per data owner")
    shape = values[0].shape
    if any(v.shape != shape for v in values):
        raise InvalidArgumentError("the values of a secure mean must all have the same shape")
    for v in values:
        v.check_alive()
    c = limits.secagg_default_colluders(len(owners)) if colluders is None else int(colluders)
    if c < 0:
        raise InvalidArgumentError(f"a secure mean resists a collusion bound of at least 0 owners, not {c}")
    name = aggregator if isinstance(aggregator, str) else aggregator.name
    client = values[0].client
    round_id = secrets.token_bytes(16)
    joins = [client.call(v.location, wire.SecAggJoin(round_id, v.id_at_location, name, owners, c)) for v in values]
    joined = await asyncio.gather(*joins, return_exceptions=True)
    dropped: dict[str, str] = {}
    for owner, outcome in zip(owners, joined, strict=True):
        if isinstance(outcome, (LostWorkerError, UnknownWorkerError, DeadlineExceeded)):
            dropped[owner] = f"join: {outcome}"  # gone before the round began: it drops out
        elif isinstance(outcome, BaseException):
            raise outcome
    result_id = client.new_id()
    ask = wire.SecureMean(result_id, round_id, [o for o in owners if o not in dropped], list(shape), c, int(threshold))
    reply = await client.call(name, ask)
    if not isinstance(reply, wire.SecureMeanReply):
        raise ProtocolError(f"expected a secure mean reply, got {type(reply).__name__}")
    spent = {o: Spent(o, float(e), float(reply.epsilon_left.get(o, 0.0))) for o, e in reply.epsilon_spent.items()}
    dropped.update((o, str(r)) for o, r in reply.dropped.items())
    return Pointer(client, name, result_id), SecureRelease(spent, dropped)


@awaited
async def train(
    model: ModulePointer,
    x: Pointer,
    y: Pointer,
    *,
    lr: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    noise_multiplier: float,
    loss: str = "cross_entropy",
) -> Spent:
    """Train `model` with DP-SGD for `steps` steps on the private data `x`, `y` of the node it is
    on (pointers from `Worker.search`). The node samples every batch itself (Poisson, rate
    `sample_rate`), clips per-sample gradients of `loss` (``"cross_entropy"`` or ``"mse_loss"``)
    to `max_grad_norm`, adds Gaussian noise of `noise_multiplier * max_grad_norm`, and charges
    each step to the owner's budget before it runs. The model can then be fetched.

    Raises BudgetExhaustedError (charging nothing) when the steps do not fit the budget,
    PermissionDenied when `x`, `y` are not that node's data or the model derives from private
    data already, InvalidArgumentError for parameters that describe no DP-SGD run."""
    expect_pointer(model, "a ModulePointer (bob.send(model))")
    expect_pointer(x, "a Pointer to the owner's data (x, y = await bob.search(tag))")
    expect_pointer(y, "a Pointer to the owner's data (x, y = await bob.search(tag))")
    model.check_alive()
    msg = wire.DPTrain(
        model.id_at_location,
        x.id_at_location,
        y.id_at_location,
        loss,
        float(lr),
        float(sample_rate),
        int(steps),
        float(max_grad_norm),
        float(noise_multiplier),
    )
    return _spent(await model.client.call(model.location, msg))


@awaited
async def budget(worker: Worker) -> Spent:
    """What data owner `worker` has spent of its privacy budget, and has left."""
    if not isinstance(worker, Worker):  # a bare name has no client to ask through
        raise UnsupportedTypeError(f"expected a Worker (client.worker('bob')), not {type(worker).__name__} {worker!r}")
    return _spent(await worker.client.call(worker.name, wire.Budget()))
