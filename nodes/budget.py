"""A data owner's privacy budget: its (epsilon, delta), what its releases have spent, on disk.

Accounting is Opacus's RDP accountant (imported when a non-empty history is first evaluated:
at start when the store holds one, else at the first charge): each release is a step of the
(subsampled) Gaussian mechanism with its noise multiplier and sampling rate. A release is
charged *before* it leaves (the new history is written atomically and fsynced first, its
directory too, so that a power cut does not undo the rename; a failed write refuses it), and
refused with BudgetExhaustedError when it would take the owner past epsilon. A node without a budget
releases nothing. The history lives in the node's store directory, so a restart resets nothing;
an unreadable history fails closed (the node refuses to start), and so does one that holds fewer
charges than the audit log (nodes/audit.py) records releases: it was deleted or rolled back.
"""

from __future__ import annotations

import functools
import math
import threading
from pathlib import Path
from typing import Any

import msgpack

from fedptr import limits
from fedptr.errors import BudgetExhaustedError, InvalidArgumentError

from . import audit
from .durable import write_durable

FILE_NAME = "privacy-budget.msgpack"


def no_budget(owner: str) -> BudgetExhaustedError:
    """The refusal of a release by an owner started without a budget: it says how to give one,
    since the first DP release a newcomer tries on a local cluster meets it."""
    return BudgetExhaustedError(
        owner,
        f"{owner!r} has no privacy budget: it releases nothing (start its node with --epsilon E --store DIR, "
        "or epsilon and store in its cluster file)",
    )


class Budget:
    """The budget of data owner `owner`; `epsilon` None means no budget (every release refused)."""

    def __init__(self, owner: str, epsilon: float | None, delta: float, directory: Path | None) -> None:
        if epsilon is not None and directory is None:
            raise ValueError("a privacy budget must be kept on disk: give the node --store")
        self.owner = owner
        self.epsilon = epsilon
        self.delta = delta
        self._path = directory / FILE_NAME if directory is not None else None
        self._history: list[tuple[float, float, int]] = []
        if self._path is not None and self._path.exists():
            self._history = _load(self._path)
        if directory is not None:
            _check_against_audit(self._path, self._history, audit.charged(directory))
        self._spent = _epsilon(self._history, delta)
        self._lock = threading.Lock()  # charges may come from worker threads

    @property
    def spent(self) -> float:
        """Epsilon spent so far, at `delta`."""
        return self._spent

    @property
    def left(self) -> float:
        """Epsilon left (0 without a budget)."""
        return max(0.0, (self.epsilon or 0.0) - self.spent)

    def charge(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Charge `steps` steps of the Gaussian mechanism; returns epsilon spent after them.

        Raises BudgetExhaustedError (charging nothing) when they do not fit, and
        InvalidArgumentError for parameters that describe no Gaussian mechanism or that the
        accountant cannot price (its arithmetic overflows): only what it prices is written.
        Takes about 0.1 s for settings not charged before (their RDP curve): call it off the event
        loop."""
        with self._lock:
            return self._charge(noise_multiplier, sample_rate, steps)

    def _charge(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        if self.epsilon is None:
            raise no_budget(self.owner)
        if not (0 < noise_multiplier < math.inf and 0 < sample_rate <= 1 and steps >= 1):
            # an infinite sigma was priced (0.10 by Opacus) and written, and the history then failed to load
            raise InvalidArgumentError(
                "a DP release needs a finite noise_multiplier > 0, 0 < sample_rate <= 1 and steps >= 1"
            )
        history = [*self._history, (float(noise_multiplier), float(sample_rate), int(steps))]
        after = _epsilon(history, self.delta)
        if not math.isfinite(after):
            raise InvalidArgumentError(
                f"the accountant cannot price {steps} steps of noise multiplier {noise_multiplier:g} "
                f"at sample rate {sample_rate:g}: nothing charged"
            )
        if not after <= self.epsilon:
            raise BudgetExhaustedError(
                self.owner,
                f"this release would bring {self.owner!r} to epsilon {after:.3g} of its {self.epsilon:g} "
                f"(delta {self.delta:g}); {self.left:.3g} left: spend less (fewer steps, a larger noise_multiplier, "
                "a smaller sample_rate); a budget is never reset, but a demo cluster file's is deleted by "
                "`fedptr down NAME --purge`",
            )
        if self._path is not None:
            try:
                write_durable(self._path, msgpack.packb([list(h) for h in history]))
            except OSError:
                # Refused, the release with it. The file may hold this charge all the same (renamed,
                # its directory's fsync failed): it is kept as spent, so that no later history
                # written drops it (spent on disk never goes down). It costs a refused release.
                self._history, self._spent = history, after
                raise
        self._history, self._spent = history, after
        return after


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at `delta` of `history`: Opacus's RDP accountant's `get_epsilon`, with each
    distinct entry's RDP curve priced once (`_rdp`) and summed in the history's order (the same
    float sums, so the same epsilon to the bit)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    try:
        rdp = sum([_rdp(*entry) for entry in history])
        epsilon, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    except ArithmeticError:  # its float arithmetic overflows (sigma 1e300) or divides by 0 (sigma 1e-300)
        return math.inf
    return float(epsilon)


@functools.lru_cache(maxsize=limits.BUDGET_RDP_CACHE_SIZE)
def _rdp(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    """The RDP curve (over the accountant's orders) of `steps` subsampled Gaussian steps: ~0.1 s
    each, and a history repeats a few distinct entries (a node's releases share their settings),
    so it is priced once per distinct entry, not once per charge for every earlier release."""
    # Imported here: `opacus` loads all of Opacus (about 1.5 s and 120 MB), which a node that
    # never releases anything should not pay at start.
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    curve = analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    curve.setflags(write=False)  # shared by every sum that reads it
    return curve


def _check_against_audit(path: Path | None, history: list[tuple[float, float, int]], charged: int) -> None:
    """Fail closed when the audit log records more charged releases than the history holds: the
    history was deleted or rolled back, and starting from it would spend the budget again. Each
    charge adds one entry and is written before the release's audit record, so a crash between
    the two leaves the history longer, never shorter."""
    if charged > len(history):
        raise ValueError(
            f"{path}: the audit log records {charged} charged releases but the privacy budget history "
            f"holds {len(history)} (deleted or rolled back?); refusing to start with a budget that forgot them"
        )


def _load(path: Path) -> list[tuple[float, float, int]]:
    """The charged history; raises ValueError for anything but a list of (sigma, q, steps)."""
    try:
        data = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
    except ValueError as e:
        raise ValueError(f"{path}: not a privacy budget history ({e})") from None
    history: list[tuple[float, float, int]] = []
    if type(data) is not list:
        raise ValueError(f"{path}: not a privacy budget history")
    for item in data:
        ok = type(item) is list and len(item) == 3 and all(isinstance(v, (int, float)) for v in item)
        if not ok or not all(math.isfinite(v) for v in item):
            raise ValueError(f"{path}: not a privacy budget history")
        history.append((float(item[0]), float(item[1]), int(item[2])))
    return history
