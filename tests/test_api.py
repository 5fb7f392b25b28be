"""The Python API in this process: compose + run, with and without MLflow, with a model class defined right here."""

import subprocess
import threading

import pytest
import torch
from conftest import SMALL

import flexp
from flexp.config import ConfigError
from flexp.metrics import evaluate

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
    cfg = flexp.compose([*SMALL, f"callbacks.fair._target_={FED}"])
    result = flexp.run(cfg)
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
