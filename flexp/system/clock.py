"""The simulated clock of a synchronous round: who reports in time, who is dropped, and how long the round lasts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """A round's outcome on the clock: the clients kept (in the order they reported), those past the deadline,
    those over-selected beyond the first `wanted` to report, and the round's simulated seconds."""

    kept: list[int]
    late: list[int]
    surplus: list[int]
    seconds: float


def schedule(times: Mapping[int, float], wanted: int, deadline: float | None, waiting: bool) -> Schedule:
    """Order the reports by (seconds, client id); drop those after `deadline`; keep the first `wanted`. The round
    ends when the last kept client reports if others were cut, at the deadline if a client is late or never
    reports (`waiting`), else when the slowest reports."""
    order = sorted(times, key=lambda c: (times[c], c))
    late = [c for c in order if deadline is not None and times[c] > deadline]
    on_time = order[:len(order) - len(late)]
    kept, surplus = on_time[:wanted], on_time[wanted:]
    if surplus and kept:
        seconds = times[kept[-1]]
    elif deadline is not None and (late or waiting):
        seconds = deadline
    else:
        seconds = max((times[c] for c in kept), default=0.0)
    return Schedule(kept, late, surplus, float(seconds))
