"""Optimizers that step remote parameters where they live, without fetching them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from fedptr.pointer import Pointer


class SGD:
    """Plain SGD on pointers to parameters: ``p -= lr * p.grad`` in place, remotely, under no_grad.

    Parameters may sit on different workers, or at the end of pointer chains."""

    def __init__(self, params: Iterable[Pointer], lr: float) -> None:
        self.params = list(params)
        self.lr = lr

    async def step(self) -> None:
        """Update every parameter by its gradient; returns once all updates are done."""
        await asyncio.gather(*[p.sub_(p.grad, alpha=self.lr) for p in self.params])

    async def zero_grad(self) -> None:
        """Drop every parameter's gradient."""
        await asyncio.gather(*[p.zero_grad() for p in self.params])
