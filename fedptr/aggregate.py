"""Releases by an aggregator worker: the DP mean of contributions (mechanism M1).

Each input is a contribution made with `fedptr.dp.contribute`: its data owner clipped it and
charged its privacy budget. The aggregator (started with ``--aggregator`` and a roster of
``--owners``) releases their mean with Gaussian noise, from at least its ``--min-owners``
distinct owners, and consumes them. See docs/PRIVACY.md for what this protects.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedptr.pointer import Pointer, remote_call


def mean(contributions: Sequence[Pointer]) -> Pointer:
    """The noised mean of `contributions` (all on one aggregator), released (gettable) when the
    aggregator's policy allows; returns its pointer at once. Raises, when awaited,
    PermissionDenied for inputs that are not distinct contributions of its roster."""
    return remote_call("aggregate_mean", (list(contributions),))
