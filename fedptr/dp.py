"""Differential privacy from the client's side: ask data owners' nodes to run the mechanisms.

The nodes do the privacy work (nodes/mechanisms.py); these calls only ask and report what each
release cost the owner's budget.

* `contribute` (M1): an owner clips a value derived from its own data and sends it to an
  aggregator as a single-use contribution; `fedptr.aggregate.mean` releases their noised mean.
* `train` (M2): DP-SGD on an owner's own data, batches sampled by the node; the trained model
  can then be fetched (post-processing).
* `budget`: what an owner has spent and has left.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedptr import wire
from fedptr.client import Worker
from fedptr.errors import ProtocolError, UnsupportedTypeError
from fedptr.pointer import ModulePointer, Pointer


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


async def contribute(value: Pointer, aggregator: Worker | str) -> tuple[Pointer, Spent]:
    """Make `value` (on its data owner's node, derived from that owner's data alone) a DP
    contribution on `aggregator`, which the owner must trust. Returns the contribution's
    pointer and the owner's budget after the charge.

    Raises PermissionDenied (the value derives from another owner's data, or the owner does not
    trust `aggregator`), BudgetExhaustedError (it would exceed the owner's budget), and the
    errors of any call."""
    value.check_alive()
    client = value.client
    name = client.as_worker(aggregator).name
    new_id = client.new_id()
    reply = await client.call(value.location, wire.Contribute(value.id_at_location, name, new_id))
    return Pointer(client, name, new_id), _spent(reply)


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


async def budget(worker: Worker) -> Spent:
    """What data owner `worker` has spent of its privacy budget, and has left."""
    if not isinstance(worker, Worker):  # a bare name has no client to ask through
        raise UnsupportedTypeError(f"expected a Worker (client.worker('bob')), not {type(worker).__name__} {worker!r}")
    return _spent(await worker.client.call(worker.name, wire.Budget()))
