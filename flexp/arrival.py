"""Clients that obtain new data: each holds a growing prefix of its partition, round by round."""

from __future__ import annotations

import math

import torch


def held_fraction(schedule: str, round_: int, start: float, full_at: int, every: int = 1) -> float:
    """Fraction of its partition a client holds in `round_` (1-based).

    linear: from `start` at round 1 up to 1 at round `full_at`; step: the same line, but data arrives only every
    `every` rounds (rounds 1, 1+every, ...); none: everything from the start.
    """
    if schedule == "none" or full_at <= 1:
        return 1.0
    if schedule == "step":
        round_ = 1 + every * ((round_ - 1) // every)
    return min(1.0, start + (1.0 - start) * (round_ - 1) / (full_at - 1))


def held(indices: torch.Tensor, fraction: float) -> torch.Tensor:
    """The first ceil(fraction * n) samples of a client's partition (at least one): what it holds now."""
    return indices[: max(1, math.ceil(fraction * len(indices)))]
