"""The Python API in this process: compose + run, with and without MLflow, with a model class defined right here."""

import logging
import subprocess
import threading
from dataclasses import replace

import pytest
import torch
from conftest import SMALL

import flexp
from flexp.api import InProcessTracker, experiment, with_model
from flexp.config import ConfigError
from flexp.job import execute, prepare
from flexp.metrics import evaluate
from flexp.strategy.fedavg import FedAvg
from flexp.strategy.fedavgm import FedAvgM

FED = "flexp.callbacks.federated_eval.FederatedEvaluation"


def local_mlp_class():
    """A model class defined inside a function, as in a notebook: not importable by name."""

    class LocalMLP(torch.nn.Module):
        def __init__(self, input_shape, num_classes, width=6):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(input_shape[0], width), torch.nn.ReLU(),
                                            torch.nn.Linear(width, num_classes))

        def forward(self, x):
            return self.body(x)

    return LocalMLP


def test_compose_and_run_without_tracking_leave_no_store_and_start_no_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "Popen", None)  # a tracking writer process would fail to start
    cfg = flexp.compose([*SMALL, f"callbacks.fair._target_={FED}", "strategy=fedavgm"])
    result = flexp.run(cfg)
    assert isinstance(result.algorithm, FedAvgM) and result.algorithm.velocity.shape == result.params.shape
    assert [r.round for r in result.history] == [1, 2, 3]
    accuracy, loss = evaluate(result.model, result.data.test)
    assert accuracy == result.history[-1].test_accuracy and loss == pytest.approx(result.history[-1].test_loss)
    assert sorted(result.metrics) == [1, 2, 3] and all("fair/jain" in m for m in result.metrics.values())
    assert result.run_id is None and list(tmp_path.iterdir()) == []


def test_compose_refuses_a_typo_naming_the_key():
    with pytest.raises(ConfigError, match="fl.lrr"):
        flexp.compose([*SMALL, "fl.lrr=0.1"])


def test_a_model_class_defined_in_the_caller_trains_as_an_instance_and_as_a_callable():
    mlp = local_mlp_class()
    cfg = flexp.compose([*SMALL, "fl.rounds=2"])
    for given in (mlp((60,), 10), lambda: mlp((60,), 10, width=4), mlp):
        result = flexp.run(cfg, model=given)
        assert type(result.model) is mlp
        assert evaluate(result.model, result.data.test)[0] == result.history[-1].test_accuracy


def test_tracked_run_logs_a_notebook_model_or_warns_that_it_cannot(tmp_path):
    import mlflow

    cfg = flexp.compose([*SMALL, "fl.rounds=1", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                         "tracking.log_model=true"])
    mlp = local_mlp_class()
    result = flexp.run(cfg, model=mlp, tracking=True)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    loaded = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    x = result.data.test.x[:5]
    assert torch.equal(loaded(x), result.model(x))

    class Locked(mlp):
        def __init__(self, input_shape, num_classes):
            super().__init__(input_shape, num_classes)
            self.lock = threading.Lock()  # cannot be pickled

    with pytest.warns(UserWarning, match="could not be logged to MLflow"):
        result = flexp.run(cfg, model=Locked, tracking=True)
    run = mlflow.tracking.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics


class Recorder(InProcessTracker):
    """The Python API's tracker (it keeps tags and metrics), also keeping the run name and the params."""

    def start(self, run_name, tags, run_id=None):
        self.run_name, self.params = run_name, {}
        return super().start(run_name, tags, run_id)

    def log_params(self, params):
        self.params.update(params)


def _execute(overrides, model=None, algorithm=None):
    """Run SMALL plus `overrides` (with a Python `model` or `algorithm` in place of the configured one) through the
    job, untracked; its Recorder."""
    cfg = experiment(flexp.compose([*SMALL, "fl.rounds=2", *overrides]))
    cfg = with_model(cfg, model) if model is not None else cfg
    ready = prepare(cfg)
    ready = replace(ready, algorithm=algorithm) if algorithm is not None else ready
    tracker = Recorder()
    execute(cfg, tracker, {}, "", ready=ready)
    return tracker


class DropoutMLP(torch.nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(input_shape[0], 8), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)


def _engine_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine: ")]


@pytest.mark.parametrize("overrides, model, line", [
    ([], None, "engine: vectorized (resolved from auto), path: kernel (batched MLP kernel)"),
    (["engine=vectorized"], DropoutMLP,
     "engine: vectorized, path: per-client (the model draws random numbers: Dropout)"),
    (["engine=threads"], DropoutMLP, "engine: threads, path: autograd (one client at a time under its own seed, as "
                                     "the model draws random numbers: Dropout)"),
])
def test_the_log_and_the_tags_say_which_engine_and_path_trained_the_clients(caplog, overrides, model, line):
    caplog.set_level(logging.INFO, logger="flexp")
    tracker = _execute(overrides, model)
    assert _engine_lines(caplog) == [line]
    engine, path = line.removeprefix("engine: ").split(", path: ")
    assert tracker.tags == {"flexp.engine": engine.split()[0], "flexp.engine_path": path}
    assert tracker.params["engine.name"] == (overrides[0].split("=")[1] if overrides else "auto")


def test_a_target_set_over_a_built_in_is_named_in_the_run_name_and_params_and_trains_on_vmap(caplog):
    caplog.set_level(logging.INFO, logger="flexp")
    tracker = _execute(["engine=vectorized", "model._target_=torch.nn.Linear", "model.in_features=60",
                        "model.out_features=10", "strategy._target_=user_algorithm.LocalMomentum"])
    assert " LocalMomentum Linear " in tracker.run_name and "cnn" not in tracker.run_name
    assert "fedavg" not in tracker.run_name
    assert (tracker.params["model.name"], tracker.params["model._target_"]) == ("Linear", "torch.nn.Linear")
    assert (tracker.params["strategy.name"], tracker.params["strategy._target_"]) == \
        ("LocalMomentum", "user_algorithm.LocalMomentum")
    assert _engine_lines(caplog) == ["engine: vectorized, path: vmap (torch.func: the batched MLP kernel takes "
                                     "Flatten/Linear/ReLU models only)"]
    assert tracker.tags["flexp.engine_path"].startswith("vmap (")


class TurnsGeneric(FedAvg):
    """FedAvg whose client loss becomes its own function after round 1: the kernel claims it in round 1 only."""

    def aggregate(self, round_, params, replies):
        self.loss = lambda task_loss, params, cstate: task_loss
        return super().aggregate(round_, params, replies)


def test_a_round_that_takes_another_path_is_a_warning_and_retags_the_run(caplog):
    caplog.set_level(logging.INFO, logger="flexp")
    tracker = _execute(["fl.rounds=3"], algorithm=TurnsGeneric())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    generic = "vmap (torch.func: the batched MLP kernel does not implement TurnsGeneric's client side: it declares " \
              "no StepTerms)"
    assert warnings == [f"round 2: the engine took another path: {generic} (until then: kernel (batched MLP kernel))"]
    assert tracker.tags["flexp.engine_path"] == f"kernel (batched MLP kernel); from round 2: {generic}"
