"""Clients that raise or send NaN, a diverging run, and tracking that fails: the run is never lost."""

import dataclasses
import math
import socket
import time

import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli

import flexp.engine.threads as threads
from flexp.client import LocalSpec
from flexp.config import DatasetConfig, FLConfig, TrackingConfig
from flexp.data import load_dataset
from flexp.fedavg import AllClientsFailed, ClientFailure, Conditions, run_fedavg
from flexp.models import build_model
from flexp.partition import natural
from flexp.strategy.fedavg import FedAvg

SYNTH = DatasetConfig(name="synthetic", users=12, alpha=0.5, beta=0.5, seed=1)
FL = FLConfig(clients=12, fraction=0.5, local_epochs=1, batch_size=10, lr=0.05, rounds=6, eval_every=1,
              target_accuracy=None, stop_at_target=False)


class Recording(FedAvg):
    def __init__(self) -> None:
        self.clients: list[int] = []

    def aggregate(self, round_, global_params, replies):
        self.clients.append(len(replies))
        return super().aggregate(round_, global_params, replies)


@pytest.fixture
def flaky(monkeypatch):
    """Client 3 raises on every other round it is sampled in; client 5 sends NaN weights."""
    calls = {3: 0}
    real = threads.local_sgd

    def local_sgd(model, x, y, task, spec, algorithm, task_loss):
        if task.client == 3:
            calls[3] += 1
            if calls[3] % 2 == 0:
                raise RuntimeError("disk on fire")
        result = real(model, x, y, task, spec, algorithm, task_loss)
        if task.client == 5:
            result = type(result)(result.client, torch.full_like(result.params, math.nan), result.num_samples,
                                  result.loss, result.steps)
        return result

    monkeypatch.setattr(threads, "local_sgd", local_sgd)
    return calls


@pytest.fixture
def failing_first(monkeypatch):
    """Every client update raises, for the first `calls[0]` updates of the run (default: all of them)."""
    calls = [math.inf, 0]
    real = threads.local_sgd

    def local_sgd(model, x, y, task, *rest):
        calls[1] += 1
        if calls[1] <= calls[0]:
            raise RuntimeError(f"GPU {task.client} on fire")
        return real(model, x, y, task, *rest)

    monkeypatch.setattr(threads, "local_sgd", local_sgd)
    return calls


def _run(policy: str, strategy=None, fl: FLConfig = FL, on_round=lambda r: None):
    data = load_dataset(SYNTH)
    torch.manual_seed(0)
    model = build_model("logreg", data.input_shape, data.num_classes)
    engine = threads.ThreadEngine(lambda: build_model("logreg", data.input_shape, data.num_classes), data.train,
                                  LocalSpec(1, 10, fl.lr), workers=2)
    return run_fedavg(model, natural(data.train_groups, 12), data.test, fl, engine, 3, on_round, strategy=strategy,
                      conditions=Conditions(on_client_error=policy))


def test_failed_clients_are_left_out_counted_and_training_goes_on(flaky, caplog):
    recording = Recording()
    result = _run("drop", recording)
    failed = [r.failed_clients for r in result.history]
    assert flaky[3] >= 2 and sum(failed) > 0
    assert [r.clients for r in result.history] == recording.clients
    assert all(r.clients + r.failed_clients == 6 for r in result.history)
    assert bool(torch.isfinite(result.params).all()) and len(result.history) == FL.rounds
    assert "disk on fire" in caplog.text and "NaN or infinite weights" in caplog.text


def test_abort_policy_stops_at_the_first_failed_client(flaky):
    with pytest.raises(ClientFailure, match="client (3|5) failed"):
        _run("abort")


@pytest.mark.parametrize("rounds", [6, 2])
def test_a_run_whose_first_rounds_all_fail_entirely_stops_after_them(failing_first, caplog, rounds):
    logged = []
    with pytest.raises(AllClientsFailed, match=r"first error, round 1, client \d+: RuntimeError: GPU \d+ on fire"):
        _run("drop", fl=dataclasses.replace(FL, rounds=rounds), on_round=logged.append)
    assert [(r.round, r.clients, r.failed_clients) for r in logged] == [(t, 0, 6) for t in range(1, min(3, rounds) + 1)]
    assert caplog.text.count("every client failed; the global model is unchanged") == len(logged)


def test_a_round_in_which_every_client_fails_is_logged_and_training_goes_on(failing_first, caplog):
    failing_first[0] = 6  # round 1's six clients
    result = _run("drop")
    assert [(r.clients, r.failed_clients) for r in result.history] == [(0, 6)] + [(6, 0)] * (FL.rounds - 1)
    assert math.isnan(result.history[0].train_loss) and result.history[0].test_accuracy is not None
    assert "round 1: every client failed; the global model is unchanged" in caplog.text


def test_every_client_failing_from_the_start_ends_the_run_failed_in_one_line(store):
    proc = run_cli([*SMALL, "fl.lr=1e300", "fl.rounds=10", "tracking.log_model=false"], store)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flexp: error: every client failed in each of rounds 1-3, so the run stopped "
                               "(first error, round 1, client "), lines[0]
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    assert run.info.status == "FAILED"
    history = client.get_metric_history(run.info.run_id, "failed_clients")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 1.0), (3, 1.0)]


def test_divergence_ends_the_run_failed_in_one_line_and_keeps_the_last_good_checkpoint(store):
    proc = run_cli([*SMALL, "fl.lr=1e37", "fl.rounds=4"], store)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "diverged" in lines[0] and "last good checkpoint" in lines[0], proc.stderr
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    assert run.info.status == "FAILED"
    from flexp import checkpoint

    (saved,) = [checkpoint.load(p.parent) for p in (store / "outputs").rglob(checkpoint.FILE)]
    assert bool(torch.isfinite(saved.state.params).all()) and saved.state.round >= 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_one_line_at_start(store):
    proc = run_cli([*SMALL, f"tracking.uri=http://127.0.0.1:{_closed_port()}"], store, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "tracking.uri=http://127.0.0.1" in lines[0], proc.stderr


def test_tracking_that_dies_mid_run_does_not_stop_training(tmp_path, caplog):
    from flexp.writer import TrackingWriter

    writer = TrackingWriter(TrackingConfig(uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="t", log_model=False))
    writer.resume_hint = "To log the rest later: python -m flexp resume=DIR"
    run_id = writer.start("r", {})
    writer.log_metrics({"loss": 1.0}, step=1)
    client = mlflow_client(tmp_path).__class__(f"sqlite:///{tmp_path / 'm.db'}")
    deadline = time.time() + 30
    while not client.get_metric_history(run_id, "loss") and time.time() < deadline:
        time.sleep(0.1)
    writer.proc.kill()
    writer.proc.wait()
    for step in range(2, 5):
        writer.log_metrics({"loss": 1.0}, step=step)
    writer.finish()
    assert writer.failure is not None
    assert "resume=DIR" in caplog.text and "nothing logged so far is lost" in caplog.text
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1]


def test_a_diverged_job_in_a_sweep_ends_failed_and_the_sweep_goes_on(store):
    """A learning-rate grid's too-large rates diverge; the other rates of the sweep must still run."""
    proc = run_cli(["-m", *SMALL, "tracking.log_model=false", "fl.lr=1e37,0.1", "fl.rounds=2"], store)
    assert proc.returncode == 0, proc.stderr
    assert "the run diverged (lower fl.lr?); the sweep goes on" in proc.stderr
    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    status = {r.data.params["fl.lr"]: r.info.status for r in runs if r.data.tags.get("flexp.sweep_parent") != "true"}
    assert status == {"1e+37": "FAILED", "0.1": "FINISHED"}


def test_an_algorithm_whose_server_step_raises_stops_the_run_in_one_line():
    from flexp.algorithm import Algorithm
    from flexp.fedavg import ServerStepFailed

    class Broken(Algorithm):
        def aggregate(self, round_, params, replies):
            raise ValueError("my aggregate\nis wrong")

    with pytest.raises(ServerStepFailed, match=r"^round 1: Broken.aggregate raised ValueError: my aggregate is wrong$"):
        _run("drop", strategy=Broken())
