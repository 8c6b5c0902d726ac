"""Sensitivity twin: what the twin-world test (tests/test_noninterference.py) exempts, the outputs
of the DP mechanisms, moves between two worlds by at most the sensitivity the accountant assumes.

Two in-process clusters (tests/harness.py) identical except one row of bob's private data, which
hypothesis chooses for each world (adversarial values included: NaN, infinities, the largest
floats, int64 and bool data, labels out of range, a sample whose gradient fails), run one client
program through M1 (`dp.contribute`, `aggregate.mean`), M1 by secure aggregation
(`dp.secure_mean`) and M2 (`dp.train`). Every random draw of a node (DP noise and Poisson
sampling, secure aggregation's X25519 keys, self-mask seeds, Shamir coefficients and noise) comes
from a generator seeded by the node's name, the same in both worlds (`_Seeded`: a test-only patch;
the nodes draw from the OS otherwise). So whatever differs between the worlds comes from the data,
and must stay within what `nodes/mechanisms.py` bounds:

* **M1**: the sum moves by clip(a) - clip(b), of L2 norm at most 2C (replace-one: bob's value is
  a in one world and b in the other; the accountant's add/remove adjacency is C, and replace-one
  is two such steps); the released mean, by that over the count of contributions.
* **Secure mean**: the same, plus bob's stochastic rounding (one ring step, 1/scale, per
  coordinate: its uniforms are the same in both worlds). The aggregator's view of the round (each
  phase's answers: keys, encrypted shares, masked inputs, unmasking shares) is identical except
  bob's masked input, which differs by its encoded value: decoded, by the same bound.
* **M2**, one step: p <- p - lr (g + noise) / (q n) with the same batch and noise in both worlds,
  so the trainable parameters move by lr ||g_a - g_b|| / (q n), and g, a sum of per-sample
  gradients clipped to C, moves by at most C for each world whose canary counts: a canary whose
  computation fails (a label out of range) or whose gradient is not finite contributes zero.
  Buffers and frozen parameters must be identical (DP-SGD never protects them).
* Everything else the client sees (budgets spent and left, errors, listings, shapes) is identical.

`FEDPTR_SENSITIVITY_EXAMPLES` sets the number of examples (CI's default: `EXAMPLES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fedptr.nodes import mechanisms, secagg, secure
from fedptr.nodes.node import NodeConfig
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

import fedptr
from fedptr import dp, wire

from . import harness
from .test_noninterference import SCRATCH, _error

EXAMPLES = int(os.environ.get("FEDPTR_SENSITIVITY_EXAMPLES", "40"))
C = 1.0
"""Every owner's clip bound (``--dp-clip``), and DP-SGD's max_grad_norm."""
SIGMA = 1.0
LR = 1.0
ROWS = 6
"""Samples of bob's dataset: five fixed ones and the canary, which differs between the worlds."""
CLASSES = 3
TOLERANCE = 1e-4
"""Float32 rounding of released values of magnitude about 1 (the noise's), and the secure mean's
rounding step (1/scale: below 1e-8 for these rounds)."""

VALUES: dict[str, Callable[[Any], Any]] = {
    "rows": lambda x: x,
    "canary": lambda x: x[-1],
    "sum": lambda x: x.sum(0),
    "scaled": lambda x: x * 1e30,
    "double": lambda x: x.double(),
    "float": lambda x: x.float(),
}
"""What an owner contributes, as a function of its data (the client's choice)."""

MODELS: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(3, CLASSES),
    "frozen": lambda: nn.Sequential(nn.Linear(3, 3).requires_grad_(False), nn.Tanh(), nn.Linear(3, CLASSES)),
    "layernorm": lambda: nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, CLASSES)),
    "batchnorm": lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, CLASSES)),
    "buffer": lambda: _WithBuffer(),
    "batchnorm-1d": lambda: _Channels(),
    "mixing": lambda: _Mixing(),
}


class _WithBuffer(nn.Module):
    """A model class (it travels as a graph) whose forward writes a buffer from the raw batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, CLASSES)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.copy_(x.detach().float().mean(0))
        return self.lin(x)


class _Channels(nn.Module):
    """BatchNorm over two values per channel: a sample computed alone still trains it, and its
    forward writes the running statistics from that sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 6)
        self.norm = nn.BatchNorm1d(3)
        self.out = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.lin(x).reshape(-1, 3, 2)).flatten(1))


class _Mixing(nn.Module):
    """A hostile client's model (it travels as a graph) whose forward mixes the rows of its batch
    every way the allow-list permits: centred on the batch mean, a running sum, a sort, a maximum
    and a softmax over dimension 0, a layer norm over the batch (through a reshape), attention
    of each row over all of them. Run on a whole batch, each sample's gradient would depend on
    the canary's row; DP-SGD computes each on a batch of one (twentieth red-team round)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(3, 3)
        self.key = nn.Linear(3, 3)
        self.out = nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h - h.mean(0) + torch.cumsum(h, 0) + h.sort(0)[0] + h.amax(0) + h.softmax(0)
        h = functional.layer_norm(h.reshape(1, -1), [h.shape[0] * h.shape[1]]).reshape(h.shape)
        h = (self.query(h) @ self.key(h).t()).softmax(-1) @ h
        return self.out(h)


# --- the nodes' randomness, the same in both worlds ------------------------------------------


class _Seeded:
    """`secrets`' calls, X25519 key generation and `mechanisms.private_generator`, each node's from
    its own generator seeded by its name (`harness.NODE`): the same draws in both worlds, whatever
    order the nodes' work interleaves in. Test only: production draws all of them from the OS."""

    def __init__(self) -> None:
        self._by_node: dict[str, random.Random] = {}

    def _rng(self) -> random.Random:
        name = harness.NODE.get() or "client"
        return self._by_node.setdefault(name, random.Random(name))

    def randbits(self, k: int) -> int:
        return self._rng().getrandbits(k)

    def token_bytes(self, n: int) -> bytes:
        return self._rng().randbytes(n)

    def randbelow(self, n: int) -> int:
        return self._rng().randrange(n)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.randbits(63))

    def key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.token_bytes(32))

    @contextlib.contextmanager
    def patched(self, factory: bool = True) -> Iterator[None]:
        """Patch the nodes' draws; `factory` replaces `mechanisms.private_generator` itself,
        else only the OS seed it reads (tests/test_privacy_state.py checks the factory)."""
        keys = mock.Mock(generate=self.key, from_private_bytes=X25519PrivateKey.from_private_bytes)
        with contextlib.ExitStack() as stack:
            for module in (secagg, secure, dp) if factory else (secagg, secure, dp, mechanisms):
                stack.enter_context(mock.patch.object(module, "secrets", self))
            stack.enter_context(mock.patch.object(secagg, "X25519PrivateKey", keys))
            if factory:
                stack.enter_context(mock.patch.object(mechanisms, "private_generator", self.generator))
            yield


# --- one world -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """Bob's last sample in one world."""

    x: tuple[Any, ...]
    label: int

    def contributes(self, dtype: str) -> bool:
        """Whether DP-SGD can count its gradient: a finite float input and a label in range (else
        the node counts it as zero; otherwise it may or may not, and the bound assumes it does)."""
        finite = dtype.startswith("float") and all(math.isfinite(v) for v in self.x)
        return finite and 0 <= self.label < CLASSES


@dataclass(frozen=True)
class Program:
    """The client's choices, the same in both worlds."""

    dtype: str
    value: str
    model: str
    sample_rate: float


@dataclass
class Seen:
    """What the client observed in one world: `plain` must match exactly, `released` (the DP
    outputs, by name) within the bound, and `view` is the aggregator's view of the secure round."""

    plain: list[Any] = field(default_factory=list)
    released: dict[str, Any] = field(default_factory=dict)
    view: list[tuple[str, str, Any]] = field(default_factory=list)
    config: secagg.Config | None = None
    kept: list[Any] = field(default_factory=list)
    """Every pointer the program made, failed ones too: none is dropped (and deleted in the
    background, racing the listings) before the world ends."""


def _data(dtype: str, canary: Canary) -> dict[str, np.ndarray[Any, Any]]:
    base = np.random.default_rng(0).normal(size=(ROWS - 1, 3))
    x = np.concatenate([base, np.array([canary.x], dtype=np.float64)]) if dtype.startswith("float") else None
    if dtype == "int64":
        x = np.concatenate([np.round(base * 3), np.zeros((1, 3))]).astype(np.int64)
        x[-1] = np.array(canary.x, dtype=np.int64)
    elif dtype == "bool":
        x = np.concatenate([base > 0, np.array([canary.x], dtype=bool)])
    assert x is not None
    y = np.array([0, 1, 2, 0, 1, canary.label], dtype=np.int64)
    return {"x": x.astype(dtype), "y": y}


async def _outcome(seen: Seen, label: str, make: Callable[[], Any]) -> Any:
    try:
        result = make()
        seen.kept.append(result)
        if asyncio.iscoroutine(result):
            result = await result
            seen.kept.append(result)
        elif isinstance(result, fedptr.Pointer | fedptr.Pending):
            await result
    except fedptr.FedptrError as e:
        seen.plain.append((label, "error", _error(e)))
        return None
    seen.plain.append((label, "ok"))
    return result


async def _release(seen: Seen, label: str, p: fedptr.Pointer | None) -> None:
    """Fetch a DP release: its value goes to `released`, its outcome and metadata to `plain`."""
    if p is None:
        return
    got = await _outcome(seen, f"get {label}", p.get)
    if isinstance(got, torch.Tensor):
        seen.plain.append((label, str(got.dtype), tuple(got.shape)))
        seen.released[label] = got


def _spent(s: Any) -> Any:
    return (s.owner, s.epsilon_spent, s.epsilon_left)


async def _world(program: Program, canary: Canary) -> Seen:
    seen = Seen()
    with tempfile.TemporaryDirectory(prefix="fedptr-sens-", dir=SCRATCH) as tmp, _Seeded().patched():
        owner = {"trust": ["agg"], "epsilon": 1e4, "dp_clip": C, "dp_noise_multiplier": SIGMA}
        configs = {
            "bob": NodeConfig(**owner, store_dir=f"{tmp}/bob"),  # type: ignore[arg-type]
            "alice": NodeConfig(**owner, store_dir=f"{tmp}/alice"),  # type: ignore[arg-type]
            "agg": NodeConfig(aggregator=True, owners=["bob", "alice"], min_owners=2),
        }
        alice_data = _data("float32", Canary((0.5, -0.5, 0.25), 2))
        data = {"bob": {"data": _data(program.dtype, canary)}, "alice": {"data": alice_data}}
        async with harness.cluster(["bob", "alice", "agg"], configs=configs, data=data, call_timeout=30.0) as c:
            bob, alice = c.worker("bob"), c.worker("alice")
            (bx, by), (ax, _) = await bob.search("data"), await alice.search("data")
            value = VALUES[program.value]
            # M1
            contributions = []
            for x in (bx, ax):
                got = await _outcome(seen, "contribute", lambda x=x: dp.contribute(value(x), "agg"))
                if got is not None:
                    contributions.append(got[0])
                    seen.plain.append(("spent", _spent(got[1])))
            mean = await _outcome(seen, "mean", lambda: fedptr.aggregate.mean(contributions))
            await _release(seen, "mean", mean)
            # M1 by secure aggregation, the aggregator's view recorded
            with _recording(seen):
                got = await _outcome(seen, "secure mean", lambda: dp.secure_mean([value(bx), value(ax)], "agg"))
            if got is not None:
                seen.plain.append(("secure spent", sorted(_spent(s) for s in got[1].spent.values()), got[1].dropped))
                await _release(seen, "secure mean", got[0])
            # M2: one DP-SGD step on bob's data
            torch.manual_seed(0)  # the model's initial parameters: the same in both worlds
            model = await _outcome(seen, "send model", lambda: bob.send(MODELS[program.model]()))
            if model is not None:
                spent = await _outcome(
                    seen,
                    "train",
                    lambda: dp.train(
                        model,
                        bx,
                        by,
                        lr=LR,
                        sample_rate=program.sample_rate,
                        steps=1,
                        max_grad_norm=C,
                        noise_multiplier=SIGMA,
                    ),
                )
                if spent is not None:
                    seen.plain.append(("train spent", _spent(spent)))
                got = await _outcome(seen, "get model", model.get)
                if isinstance(got, nn.Module):
                    seen.released["model"] = got
            for name in ("bob", "alice", "agg"):
                infos = (await c.worker(name).objects()).values()
                seen.plain.append(("objects", name, sorted((i.kind, i.shape, i.dtype, repr(i.preview)) for i in infos)))
            for who in (bob, alice):
                seen.plain.append(("budget", _spent(await dp.budget(who))))
    return seen


@contextlib.contextmanager
def _recording(seen: Seen) -> Iterator[None]:
    """Record every answer the aggregator's round gets (`secure._Round._phase`), and its config."""
    phase = secure._Round._phase

    async def recorded(self: Any, name: str, requests: dict[str, wire.Message], *args: Any) -> Any:
        first = next(iter(requests.values()), None)
        if isinstance(first, wire.SecAggShare):
            seen.config = secagg.Config(
                first.round_id, tuple(first.owners), first.dim, first.threshold, first.min_survivors,
                first.clip, first.noise_multiplier, first.degree, first.ring_bits, first.colluders,
            )  # fmt: skip
        answers = await phase(self, name, requests, *args)
        for owner, answer in sorted(answers.items()):
            if isinstance(answer, wire.SecAggMasked):
                assert seen.config is not None
                ring = secure.ring_from_wire(answer.tensor, seen.config)
                seen.view.append((name, owner, (ring, answer.epsilon_spent, answer.epsilon_left)))
            else:
                seen.view.append((name, owner, repr(answer)))
        return answers

    with mock.patch.object(secure._Round, "_phase", recorded):
        yield


# --- the property ----------------------------------------------------------------------------


def _norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().to(torch.float64) - b.detach().to(torch.float64)).norm())


def _check(program: Program, a: Canary, b: Canary, seen_a: Seen, seen_b: Seen) -> None:
    for i, (x, y) in enumerate(zip(seen_a.plain, seen_b.plain, strict=True)):
        assert x == y, f"observation {i} differs between the worlds:\n  {x!r:.400}\n  {y!r:.400}"
    assert seen_a.released.keys() == seen_b.released.keys()
    # M1: the sum moves by at most 2C (replace-one), the mean by that over the count of 2
    for label in ("mean", "secure mean"):
        if label in seen_a.released:
            moved = _norm(seen_a.released[label], seen_b.released[label])
            assert moved <= 2 * C / 2 + TOLERANCE, f"{label} moved {moved} between the worlds, more than 2C / 2"
    # the aggregator's view: identical but for bob's masked input, which moves as its clipped value
    assert len(seen_a.view) == len(seen_b.view)
    for (phase, owner, x), (_, _, y) in zip(seen_a.view, seen_b.view, strict=True):
        if phase == "masked input" and owner == "bob":
            assert seen_a.config is not None
            mask = np.uint64((1 << seen_a.config.ring_bits) - 1)
            moved = float(np.linalg.norm(secagg.decode((x[0] - y[0]) & mask, seen_a.config)))
            assert moved <= 2 * C + TOLERANCE, f"bob's masked input moved {moved}, more than 2C"
            assert x[1:] == y[1:]
        elif phase == "masked input":
            assert np.array_equal(x[0], y[0]) and x[1:] == y[1:], f"{owner}'s masked input differs"
        else:
            assert x == y, f"the aggregator's {phase} answer from {owner} differs:\n  {x!r:.300}\n  {y!r:.300}"
    # M2: one step moves the trainable parameters by lr/(q n) times C per counting canary; the rest not
    if "model" in seen_a.released:
        trained = {n for n, p in MODELS[program.model]().named_parameters() if p.requires_grad}
        state_a, state_b = seen_a.released["model"].state_dict(), seen_b.released["model"].state_dict()
        assert state_a.keys() == state_b.keys()
        moved = 0.0
        for key in state_a:
            if key in trained:
                moved += _norm(state_a[key], state_b[key]) ** 2
            else:
                assert torch.equal(state_a[key], state_b[key]), f"{key} (not DP-trained) differs between the worlds"
        counting = a.contributes(program.dtype) + b.contributes(program.dtype)
        bound = LR * C * counting / (program.sample_rate * ROWS)
        assert math.sqrt(moved) <= bound + TOLERANCE, f"one step moved the model {math.sqrt(moved)}, more than {bound}"


_floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([3.4e38, -3.4e38, 1e30])


@st.composite
def _canaries(draw: st.DrawFn, dtype: str) -> Canary:
    if dtype == "int64":
        x: Any = draw(st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 3))
    elif dtype == "bool":
        x = draw(st.tuples(*[st.booleans()] * 3))
    else:
        x = draw(st.tuples(*[_floats] * 3))
    return Canary(x, draw(st.integers(-2, CLASSES + 1)))


@st.composite
def _twins(draw: st.DrawFn) -> tuple[Program, Canary, Canary]:
    program = Program(
        draw(st.sampled_from(["float32", "float32", "float64", "int64", "bool"])),
        draw(st.sampled_from(sorted(VALUES))),
        draw(st.sampled_from(sorted(MODELS))),
        draw(st.sampled_from([1.0, 0.5])),
    )
    return program, draw(_canaries(program.dtype)), draw(_canaries(program.dtype))


@pytest.mark.timeout(1200)
@pytest.mark.slow  # EXAMPLES pairs of clusters with budgets and stores: about 30 to 45 s
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(twins=_twins())
def test_dp_outputs_move_by_at_most_the_sensitivity(twins: tuple[Program, Canary, Canary]) -> None:
    program, a, b = twins
    _check(program, a, b, asyncio.run(_world(program, a)), asyncio.run(_world(program, b)))
