"""Optimizers that step remote parameters where they live, without fetching them.

They take torch's arguments and follow torch's update rules. `step` and `zero_grad` queue their
remote updates at once and return a `fedptr.pointer.Pending` handle: awaiting it waits until
the updates are done and raises their error, and an error nobody awaited is raised by the next
await or get on that worker. Optimizer state (momentum buffers, Adam's moments) lives on the
workers beside the parameters; the step count lives here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedptr.errors import InvalidArgumentError, UsageError
from fedptr.pointer import Pending, Pointer, effect

Params = Iterable[Pointer] | Iterable[Mapping[str, Any]]
"""Pointers to parameters, or torch-style parameter groups: dicts with ``"params"`` and options."""


class Optimizer:
    """Base of the remote optimizers: parameter groups, per-parameter state, `zero_grad`."""

    def __init__(self, params: Params, **defaults: Any) -> None:
        items = list(params)
        if not items:
            raise InvalidArgumentError("the optimizer got an empty parameter list")
        raw_groups = items if isinstance(items[0], Mapping) else [{"params": items}]
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        """Each group's ``"params"`` (pointers) and options, as in torch."""
        for group in raw_groups:
            if not isinstance(group, Mapping):
                raise InvalidArgumentError("give pointers or parameter groups (dicts), not a mix")
            merged = {**self.defaults, **group, "params": list(group["params"])}
            if not all(isinstance(p, Pointer) for p in merged["params"]):
                raise InvalidArgumentError("an optimizer steps Pointers to parameters")
            self.param_groups.append(merged)
        self.state: dict[Pointer, dict[str, Any]] = {}
        """Per parameter: its state (pointers to tensors on the parameter's worker, and counts)."""

    @property
    def params(self) -> list[Pointer]:
        """Every parameter, over all groups."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> Pending:
        """Drop every parameter's gradient (or fill it with zeros if not `set_to_none`); queued at once."""
        if set_to_none:
            return Pending.gather([p.zero_grad() for p in self.params])
        return Pending.gather([effect("zero_", (p.grad,)) for p in self.params])

    def step(self) -> Pending:
        """Queue one update of every parameter by its gradient and return its handle. Raises
        UsageError while a plan is recorded if the step would make or count client-side state."""
        return Pending.gather([self._update(p, group) for group in self.param_groups for p in group["params"]])

    def _update(self, p: Pointer, group: dict[str, Any]) -> Pending:
        raise NotImplementedError


class SGD(Optimizer):
    """``torch.optim.SGD`` on remote parameters: ``p -= lr * g`` in place, under no_grad, with
    optional momentum (its buffer lives on the parameter's worker), dampening, Nesterov
    momentum, weight decay and `maximize`.

    Parameters may sit on different workers, or at the end of pointer chains."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise InvalidArgumentError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise InvalidArgumentError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )

    @property
    def lr(self) -> float:
        """The first group's learning rate."""
        lr: float = self.param_groups[0]["lr"]
        return lr

    def _update(self, p: Pointer, group: dict[str, Any]) -> Pending:
        g = p.grad
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum:
            state = self.state.setdefault(p, {})
            buf = state.get("momentum_buffer")
            if buf is None and p.client.recording is not None:
                raise UsageError("take one SGD step outside the plan first: its momentum buffer must exist")
            if buf is None:
                buf = state["momentum_buffer"] = g.detach().clone()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - group["dampening"])
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
        return effect("add_" if group["maximize"] else "sub_", (p, g), {"alpha": group["lr"]})


class Adam(Optimizer):
    """``torch.optim.Adam`` on remote parameters, with its update rule (bias-corrected first
    and second moments, optional L2 `weight_decay` and `amsgrad`). The moments live on each
    parameter's worker; the step count lives here."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise InvalidArgumentError("lr, eps and weight_decay must be >= 0 and betas in [0, 1)")
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize
        )

    def _update(self, p: Pointer, group: dict[str, Any]) -> Pending:
        if p.client.recording is not None:
            raise UsageError("Adam's bias correction counts steps on the client: a plan cannot record it")
        beta1, beta2 = group["betas"]
        g = p.grad
        if group["maximize"]:
            g = -g
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        state = self.state.setdefault(p, {})
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)  # type: ignore[arg-type]
            state["exp_avg_sq"] = torch.zeros_like(p)  # type: ignore[arg-type]
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p)  # type: ignore[arg-type]
        state["step"] += 1
        step = state["step"]
        exp_avg: Pointer = state["exp_avg"]
        exp_avg_sq: Pointer = state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = exp_avg_sq
        if group["amsgrad"]:
            best: Pointer = state["max_exp_avg_sq"]
            second = best.copy_(best.maximum(exp_avg_sq))
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        denom = (second.sqrt() / math.sqrt(bias2)).add(group["eps"])
        return effect("addcdiv_", (p, exp_avg, denom), {"value": -group["lr"] / bias1})
