"""Pruning a learning-rate grid: a run stops once another rate of its setting reached the target in fewer rounds.

The paper picks, per setting, the rate with the fewest (interpolated) rounds to the target. A run that has done r
rounds without reaching the target crosses it after round r, so once r is at least a finished rival's rounds it
can no longer be picked, and stopping it there changes no selection. What is left of it (its curve up to r) is
kept and shown as stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CELL_TAG = "flexp.cell"
NOT_SETTING = ("fl.lr", "fl.rounds", "fl.prune", "resume")     # the tuned rate, the budget, and how a run is run
NOT_SETTING_PREFIXES = ("tracking.", "checkpoint.", "engine.", "report.")


def cell_id(params: Mapping[str, Any]) -> str:
    """A short id of a run's setting: every flattened config key but the rate, the budget and where it is logged."""
    setting = {k: str(v) for k, v in params.items()
               if k not in NOT_SETTING and not k.startswith(NOT_SETTING_PREFIXES)}
    return hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Rival:
    """The best finished run of a setting: its interpolated rounds to the target and its rate."""

    rounds: float
    lr: float


class Pruner:
    """Says when a run should stop because a finished rival of its setting already reached the target sooner.

    `rivals()` returns the best finished rival or None; it is asked at the first round and then at most every
    `every_s` seconds (it queries the tracking store), and the answer is compared with every round in between.
    """

    def __init__(self, rivals: Callable[[], Rival | None], every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rivals, self.every_s, self.clock = rivals, every_s, clock
        self.best: Rival | None = None
        self.asked: float | None = None

    def verdict(self, rounds_done: int, reached: bool) -> str | None:
        """Why the run should stop after `rounds_done` rounds (None: go on); a run that reached never stops here."""
        if reached:
            return None
        now = self.clock()
        if self.asked is None or now - self.asked >= self.every_s:
            self.asked, found = now, self.rivals()
            if found is not None and (self.best is None or found.rounds < self.best.rounds):
                self.best = found
        if self.best is not None and rounds_done >= self.best.rounds:
            return (f"stopped after round {rounds_done}: fl.lr={self.best.lr:g} of the same setting reached the "
                    f"target in {self.best.rounds:.1f} rounds (fl.prune)")
        return None


def stop_rule(pruner: Pruner, target: float) -> Callable[[Sequence[Any]], str | None]:
    """A run_fedavg `stop` for round records: the pruner's verdict on the rounds done and the best accuracy so far."""

    def stop(history: Sequence[Any]) -> str | None:
        if not history:
            return None
        best = max((r.test_accuracy for r in history if r.test_accuracy is not None), default=float("-inf"))
        return pruner.verdict(history[-1].round, best >= target)

    return stop
