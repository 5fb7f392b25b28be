"""Ctrl-C and SIGTERM stop a job at every moment: in-process at each kind of point (this process signals itself
from a model, a dataset, a callback or the tracker), and through the real CLI under CPU load with SIGINT inherited
as ignored (a background job of a shell script), the case where Ctrl-C used to be lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, mlflow_client
from torch import nn

from flexp import checkpoint, interrupt
from flexp.api import compose, experiment
from flexp.job import execute

CALLS: Counter[str] = Counter()
BASE = [a for a in SMALL if not a.startswith("model=")]
TESTS = Path(__file__).resolve().parent
LOADING = [*(a for a in SMALL if not a.startswith("dataset")), "dataset=custom",
           "dataset._target_=test_interrupt.signalling_data"]


def signal_self_once(where: str, at: int) -> None:
    """Send this process SIGINT on the `at`-th call from `where` (counted across threads and model replicas)."""
    CALLS[where] += 1
    if CALLS[where] == at:
        os.kill(os.getpid(), signal.SIGINT)


class Signalling(nn.Module):
    """A small classifier (no MLP kernel claims it) that signals from its training or evaluation forward."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, mode: str = "train", at: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(input_shape[0], num_classes)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.mode, self.at = mode, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training == (self.mode == "train"):
            signal_self_once(self.mode, self.at)
        return self.fc(self.drop(x)).tanh()


def signalling_data(at: int = 1) -> dict[str, np.ndarray]:
    """A dataset._target_ that signals while it loads."""
    signal_self_once("data", at)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    return {"x_train": x[:160], "y_train": y[:160], "x_test": x[160:], "y_test": y[160:]}


class SignallingCallback:
    """A callback that signals after round `at`."""

    def __init__(self, at: int = 2) -> None:
        self.at = at

    def __call__(self, round_: int, *args: object) -> dict[str, float]:
        if round_ == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return {}


class Recorder:
    """A Tracker that keeps what it was told; with `signal_at`, it signals when that round is logged."""

    def __init__(self, signal_at: int | None = None) -> None:
        self.signal_at, self.rounds, self.status, self.summary = signal_at, [], None, {}

    def start(self, run_name, tags, run_id=None):
        return "run"

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        if step is None:
            self.summary = dict(metrics)
        if step is not None and "test_accuracy" in metrics:
            self.rounds.append(step)
            if step == self.signal_at:
                os.kill(os.getpid(), signal.SIGINT)

    def log_text(self, text, path):
        pass

    def log_model(self, model):
        pass

    def set_tags(self, tags):
        pass

    def logged_rounds(self):
        return set()

    def finish(self, status="FINISHED"):
        self.status = status


@pytest.fixture
def flexp_handlers():
    """flexp's SIGINT/SIGTERM handlers in this process for one test, pytest's back afterwards."""
    before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    CALLS.clear()
    interrupt.install()
    interrupt.keep_run()  # as once a run is asked for (before, a signal exits the process at once)
    yield
    interrupt.reset()
    for s, handler in before.items():
        signal.signal(s, handler)


TRAIN = ["fl.fraction=0.5", "fl.rounds=6", "model=custom", "model._target_=test_interrupt.Signalling"]
# (overrides, rounds logged before the job stops): 5 clients x 5 steps a round, so forward 30 is in round 2
POINTS = {
    "training, threads": ([*TRAIN, "engine=threads", "+model.at=30"], [1]),
    "training, vmap": ([*TRAIN, "engine=vectorized", "+model.at=8"], [1]),  # one forward a lockstep step
    "training, per-client (Dropout)": ([*TRAIN, "engine=vectorized", "+model.at=30", "+model.dropout=0.1"], [1]),
    "evaluation": ([*TRAIN, "+model.mode=eval", "+model.at=2"], [1, 2]),
    "callback": ([*TRAIN, "+callbacks.stop._target_=test_interrupt.SignallingCallback"], [1, 2]),
    "tracking": ([*TRAIN], [1, 2]),
}


@pytest.mark.parametrize("point", POINTS)
def test_a_signal_at_any_point_of_a_round_ends_the_run_killed_keeping_its_rounds(flexp_handlers, tmp_path, point):
    overrides, kept = POINTS[point]
    cfg = experiment(compose([*BASE, *overrides, "engine.workers=2"]))
    tracker = Recorder(signal_at=2 if point == "tracking" else None)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, tracker, {}, "", output_dir=tmp_path)
    assert tracker.status == "KILLED"
    assert tracker.rounds == kept
    assert tracker.summary["final_test_accuracy"] > 0   # the runs table's accuracy of a stopped run: its last round
    saved = checkpoint.load(tmp_path)
    assert [r.round for r in saved.state.history] == kept  # resumable from exactly what was logged


def test_a_signal_while_the_data_loads_stops_before_any_run(flexp_handlers, tmp_path):
    cfg = experiment(compose(LOADING))
    tracker = Recorder()
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, tracker, {}, "", output_dir=tmp_path)
    assert tracker.status is None and not (tmp_path / checkpoint.FILE).exists()


def test_a_client_error_raised_while_a_stop_is_pending_is_an_interrupt_not_a_dropped_client(flexp_handlers):
    """torch can hand a KeyboardInterrupt back as a RuntimeError: the engines' per-client error handling must not
    drop it as a failed client."""
    from flexp.client import ClientTask, LocalSpec
    from flexp.data import Split
    from flexp.engine.threads import ThreadEngine

    class Raising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and x.shape[0] > 2:
                os.kill(os.getpid(), signal.SIGINT)
                raise RuntimeError("KeyboardInterrupt: <EMPTY MESSAGE>")
            return self.fc(x)

    train = Split(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    engine = ThreadEngine(Raising, train, LocalSpec(1, 5, 0.1), workers=1)
    with pytest.raises(KeyboardInterrupt):
        engine.run_round(torch.zeros(8), [ClientTask(0, torch.arange(20), seed=1)])


def busy() -> subprocess.Popen:
    """A CPU-bound process beside the job: the load under which the interrupt used to be lost."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def start_job(store: Path, args: list[str]) -> subprocess.Popen:
    """`python -m flexp ARGS` with SIGINT ignored on entry, as a shell script's background job inherits it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "flexp", *args], cwd=store, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


@pytest.mark.parametrize("signum, sweep", [("SIGINT", []), ("SIGTERM", ["-m", "fl.lr=0.1,0.2"])])
def test_the_cli_stops_on_a_signal_under_load_with_exit_130_and_a_killed_run(store, signum, sweep):
    load = busy()
    try:
        proc = start_job(store, [*sweep, *SMALL, "fl.rounds=100000"])
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("round 3/"):
                proc.send_signal(getattr(signal, signum))
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        load.kill()
    assert proc.returncode == 130, rest
    assert "interrupted: the MLflow run is marked KILLED" in rest and "Traceback" not in rest
    assert "resume=" in rest
    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"] * (1 + bool(sweep)), "".join(seen)  # a sweep's parent too
    (run,) = [r for r in runs if "flexp.sweep_parent" not in r.data.tags]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps[:3] == [1, 2, 3] and steps == list(range(1, len(steps) + 1))


def test_the_cli_stops_on_a_signal_before_the_run_starts(store):
    proc = start_job(store, LOADING)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted before the run started" in out and "Traceback" not in out
