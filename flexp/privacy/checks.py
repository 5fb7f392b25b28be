"""The arguments every privacy mechanism shares, each refused in one line naming it (flexp.component.Invalid)."""

from __future__ import annotations

import math

from flexp.component import Invalid

ACCOUNTANTS = ("rdp", "pld")


def clip_norm(value: float) -> float:
    """privacy.clip: a finite L2 norm > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise Invalid("clip", value, "must be a finite number > 0 (the L2 norm updates are clipped to)")
    return float(value)


def noise_multiplier(value: float | None) -> float | None:
    """privacy.noise_multiplier: >= 0 (0: clipping alone, no privacy), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise Invalid("noise_multiplier", value, "must be a finite number >= 0 (noise std / clip)")
    return float(value)


def delta(value: float) -> float:
    """privacy.delta: in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise Invalid("delta", value, "must be in (0, 1), well below 1 / the number of users protected")
    return float(value)


def epsilon_value(name: str, value: float | str | None) -> float | None:
    """privacy.target_epsilon or max_epsilon: > 0, `inf` allowed (no noise: clipping alone), or None."""
    if value is None:
        return None
    number = math.inf if isinstance(value, str) and value.lower() in ("inf", "infinity") else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not number > 0:
        raise Invalid(name, value, "must be a number > 0 (or inf)")
    return float(number)


def accountant(value: str) -> str:
    """privacy.accountant: one of dp-accounting's (rdp, pld)."""
    if value not in ACCOUNTANTS:
        raise Invalid("accountant", value, f"must be one of {', '.join(ACCOUNTANTS)}")
    return value
