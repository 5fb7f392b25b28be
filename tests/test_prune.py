"""fl.prune: a rate stops once a finished rate of its setting reached the target sooner, and no selection changes."""

import math

import pandas as pd
import pytest
from conftest import SMALL

import flexp
from flexp.config import ConfigError
from flexp.prune import Pruner, Rival, cell_id


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pruner_stops_only_once_the_rounds_done_reach_the_best_rival_and_asks_the_store_at_most_every_interval():
    answers, clock = [None, Rival(12.5, 0.1), Rival(30.0, 0.2), Rival(8.0, 0.0464)], Clock()
    asked = []

    def rivals():
        asked.append(clock.now)
        return answers[len(asked) - 1]

    pruner = Pruner(rivals, every_s=5.0, clock=clock)
    assert pruner.verdict(1, reached=False) is None                       # no rival yet
    clock.now = 4.9
    assert pruner.verdict(13, reached=False) is None and asked == [0.0]   # not asked again within 5 s
    clock.now = 5.0
    assert pruner.verdict(12, reached=False) is None                      # 12 rounds: could still cross before 12.5
    clock.now = 6.0
    assert "fl.lr=0.1" in pruner.verdict(13, reached=False)              # cached rival, asked no more
    assert pruner.verdict(100, reached=True) is None and asked == [0.0, 5.0]
    clock.now = 10.0
    assert pruner.verdict(9, reached=False) is None                       # a worse rival does not replace the best
    clock.now = 15.0
    assert "8.0 rounds" in pruner.verdict(9, reached=False) and len(asked) == 4


def test_the_setting_id_ignores_the_rate_budget_and_bookkeeping_but_not_the_setting():
    base = {"fl.lr": 0.1, "fl.rounds": 100, "fl.fraction": 0.1, "tracking.experiment": "a", "engine.name": "auto",
            "checkpoint.every": 1, "fl.prune": True}
    same = {**base, "fl.lr": 0.215, "fl.rounds": 3000, "tracking.experiment": "b", "engine.name": "threads"}
    assert cell_id(base) == cell_id(same) != cell_id({**base, "fl.fraction": 0.2})


def test_a_pruned_rate_stops_at_the_rivals_rounds_and_the_report_marks_it(tmp_path):
    from flexp.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [*SMALL, f"tracking.uri={uri}", "tracking.experiment=grid", "fl.rounds=15", "fl.target_accuracy=0.85",
            "fl.stop_at_target=true", "fl.prune=true"]
    fast = flexp.run(flexp.compose([*base, "fl.lr=0.1"]), tracking=True)
    best = fast.summary["rounds_to_target_interp"]
    assert "stopped_at_round" not in fast.summary and best < 4
    slow = flexp.run(flexp.compose([*base, "fl.lr=0.02"]), tracking=True)
    assert slow.history[-1].round == math.ceil(best) and "rounds_to_target" not in slow.summary
    assert slow.summary["stopped_at_round"] == math.ceil(best)
    other = flexp.run(flexp.compose([*base, "fl.lr=0.02", "fl.fraction=0.5"]), tracking=True)
    assert "stopped_at_round" not in other.summary and other.history[-1].round > math.ceil(best)

    assert main(["grid", "--tracking-uri", uri, "--out", str(tmp_path), "--name", "r"]) == 0
    text = (tmp_path / "r" / "table.md").read_text()
    assert f"| >{math.ceil(best)} | **{best:.1f}** |" in text   # rates ascending: 0.02 pruned, 0.1 chosen
    all_runs = text[text.index("All runs"):]
    assert f"| {math.ceil(best)} | >{math.ceil(best)} |" in all_runs and "\n>N: pruned after N rounds" in all_runs
    cells = pd.read_csv(tmp_path / "r" / "cells.csv")
    assert sorted(cells["fl.lr"]) == [0.02, 0.1]   # fraction 0.5 is its own setting with one rate


def test_prune_without_a_target_or_a_store_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="fl.prune=True: needs fl.target_accuracy"):
        flexp.run(flexp.compose([*SMALL, "fl.prune=true"]))
    with pytest.raises(ConfigError, match="fl.prune=True: needs a tracking store"):
        flexp.run(flexp.compose([*SMALL, "fl.prune=true", "fl.target_accuracy=0.5"]))
