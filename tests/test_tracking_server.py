"""A shared MLflow tracking server: a job logs to it over HTTP, and its run and model are read back through it."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import SMALL, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_a_job_logs_to_a_tracking_server_and_its_model_loads_through_it(server, tmp_path):
    import mlflow
    import mlflow.pytorch

    work = tmp_path / "job"
    work.mkdir()
    proc = run_cli([*SMALL, "model=2nn", "model.hidden=16", f"tracking.uri={server}", "tracking.experiment=shared",
                    "tracking.log_model=true"],
                   work)
    assert proc.returncode == 0, proc.stderr
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
    mlflow.set_tracking_uri(server)
    client = mlflow.MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.hidden"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1, 2, 3]
    (logged,) = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model = mlflow.pytorch.load_model(logged.model_uri)
    assert model(torch.zeros(2, 60)).shape == (2, 10)
    assert (tmp_path / "art").is_dir()
