"""Aggregates an aggregator worker releases under its privacy policy: the only way anything
derived from private data may reach a client.

The inputs must live on one worker started with ``--aggregator``, one per data owner, from at
least that worker's ``--min-owners`` owners, all of the same shape; see the README's privacy
page for what this protects and what it does not."""

from __future__ import annotations

from collections.abc import Sequence

from fedptr.pointer import Pointer, remote_call


def mean(inputs: Sequence[Pointer]) -> Pointer:
    """The mean of `inputs`, released (gettable) when the policy allows; returns its pointer at once."""
    return remote_call("aggregate_mean", (list(inputs),))


def weighted_mean(inputs: Sequence[Pointer], weights: Sequence[float]) -> Pointer:
    """The mean of `inputs` weighted by `weights` (e.g. sample counts), released likewise."""
    return remote_call("aggregate_weighted_mean", (list(inputs), [float(w) for w in weights]))
