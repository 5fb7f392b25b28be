"""The MLflow UI as a new user meets it: rendered by headless Chromium in a fresh profile, a click on the experiment
on the home page lands on its runs table, which shows every run's knobs, and the charts show test_accuracy
(bench/mlflow_ui.py); flexp's experiments carry MLflow's "machine learning" kind."""

import asyncio
import importlib.util
import json
import shutil

import pytest
from conftest import ROOT, SMALL, mlflow_client, run_cli

from flexp.config import TrackingConfig
from flexp.tracking import API_SOURCE, KIND, KIND_TAG, SOURCE_ENV, MlflowTracker, open_experiment
from flexp.ui import VIEW_NAME, injecting, saved_view


def _ui_module():
    spec = importlib.util.spec_from_file_location("mlflow_ui", ROOT / "bench" / "mlflow_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs Debian's chromium (.ci/run installs it where apt-get can)")
def test_a_click_on_the_experiment_opens_its_runs_with_their_knobs_and_test_accuracy(store):
    for fraction in (0.1, 0.3):
        proc = run_cli([*SMALL, f"fl.fraction={fraction}", "tracking.log_model=false"], store)
        assert proc.returncode == 0, proc.stderr
    result = _ui_module().check(store / "mlflow.db", "flexp", store / "ui.png")
    assert result["runs"] == 2
    assert result["landed_on_runs"], result["landed"]
    assert result["runs_shown"] == 2
    shown = result["names_shown"]
    assert sorted(shown) == [f"K10 C{c} E1 B10 fedavg logreg synthetic iid" for c in ("0.1", "0.3")]
    assert all(text.startswith(name[:len("K10 C0.1 E1 B10")]) for name, text in shown.items()), shown
    assert result["assistant_open"] is False
    assert result["test_accuracy_shown"]
    assert result["ok"], result
    assert set(result["view_columns"]) >= {"best_test_accuracy", "final_test_accuracy", "fl.fraction"}  # no target


def test_experiments_get_the_machine_learning_kind_unless_they_have_one(store):
    client = mlflow_client(store)
    client.create_experiment("bare")
    client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    for name in ("bare", "chosen", "new"):
        open_experiment(f"sqlite:///{store / 'mlflow.db'}", name)
    kinds = {name: client.get_experiment_by_name(name).tags.get(KIND_TAG) for name in ("bare", "chosen", "new")}
    assert kinds == {"bare": KIND, "chosen": "genai_development", "new": KIND}


def test_a_runs_source_is_the_command_that_made_it_or_the_python_api(store, monkeypatch):
    """The runs table's Source: MLflow would name the file of the process that logs (flexp's writer)."""
    client = mlflow_client(store)
    cfg = TrackingConfig(uri=f"sqlite:///{store / 'mlflow.db'}", experiment="src")
    monkeypatch.setenv(SOURCE_ENV, "python -m flexp +experiment=mnist_iid fl.lr=0.1")
    sources = []
    for source in (None, API_SOURCE):
        tracker = MlflowTracker(cfg, source)
        run_id = tracker.start("r", {"flexp.overrides": "fl.lr=0.1"})
        tracker.finish()
        tags = client.get_run(run_id).data.tags
        sources.append((tags["mlflow.source.name"], tags["mlflow.source.type"]))
    assert sources == [("python -m flexp +experiment=mnist_iid fl.lr=0.1", "LOCAL"), (API_SOURCE, "LOCAL")]


def test_the_saved_view_shows_the_results_and_each_knob_a_run_set_once():
    first = saved_view(None, "+experiment=mnist_iid +sweep=table1_quick ++fl.fraction=0.1 model=cnn seed=3 "
                             "hydra.launcher.n_jobs=2 tracking.uri=x hydra/launcher=joblib", now_ms=5)
    envelope = json.loads(first)
    assert (envelope["name"], envelope["createdAt"], envelope["updatedAt"]) == (VIEW_NAME, 5, 5)
    assert json.loads(envelope["state"])["selectedColumns"] == [
        "metrics.`best_test_accuracy`", "metrics.`final_test_accuracy`", "metrics.`rounds_to_target_interp`",
        "params.`fl.fraction`", "params.`model.name`", "params.`seed`"]
    assert saved_view(first, "++fl.fraction=0.2 model=2nn", now_ms=6) is None
    assert saved_view(first, "(python API)", now_ms=6) is None   # flexp.run's runs name no overrides
    second = json.loads(saved_view(first, "++fl.fraction=0.2 fl.lr=0.1", now_ms=7))
    assert (second["createdAt"], second["updatedAt"]) == (5, 7)
    assert json.loads(second["state"])["selectedColumns"][-1] == "params.`fl.lr`"


def _served(content_type: bytes, chunks: list[bytes], method: str = "GET") -> tuple[dict, bytes]:
    async def inner(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", b"%d" % sum(map(len, chunks)))]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})

    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(injecting(inner)({"type": "http", "method": method, "path": "/"}, None, send))
    return dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_the_ui_page_sets_the_browser_defaults_before_mlflow_reads_them():
    page = [b"<!doctype html><html><head><meta charset=utf-8>", b"<script defer src=main.js></script></head></html>"]
    headers, body = _served(b"text/html; charset=utf-8", page)
    head = body.split(b"<head>", 1)[1]
    assert head.startswith(b"<script>") and head.index(b"mlflow.workflowType_v1") < head.index(b"main.js")
    assert b'"\\"machine_learning\\""' in head and body.count(b"<script>") == 1
    assert int(headers[b"content-length"]) == len(body)
    assert _served(b"application/javascript", [b"<head>x"]) == ({b"content-type": b"application/javascript",
                                                                 b"content-length": b"7"}, b"<head>x")
