"""The MLflow UI, rendered by headless Chromium, lists a job's runs and their test_accuracy (bench/mlflow_ui.py)."""

import importlib.util
import shutil

import pytest
from conftest import ROOT, SMALL, run_cli

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="needs Debian's chromium (.ci/run installs it where apt-get can)")


def _ui_module():
    spec = importlib.util.spec_from_file_location("mlflow_ui", ROOT / "bench" / "mlflow_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ui_shows_the_runs_and_their_test_accuracy(store):
    for seed in (0, 1):
        proc = run_cli([*SMALL, f"seed={seed}", "tracking.log_model=false"], store)
        assert proc.returncode == 0, proc.stderr
    result = _ui_module().check(store / "mlflow.db", "flexp", store / "ui.png")
    assert result["runs"] == 2
    assert result["runs_shown"] == 2
    assert result["test_accuracy_shown"]
    assert result["ok"], result
