"""The real `python -m flexp` on small synthetic data, read back from the MLflow store it wrote."""

import mlflow.pytorch
import pytest
import yaml
from conftest import SMALL, mlflow_client, run_cli
from omegaconf import OmegaConf

from flexp.config import DatasetConfig
from flexp.data import load_dataset
from flexp.metrics import evaluate


def _only_run(cwd, experiment="flexp"):
    client = mlflow_client(cwd)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def test_federated_run_logs_params_history_progress_the_target_and_a_loadable_model(store):
    proc = run_cli([*SMALL, "fl.rounds=4", "model=2nn", "fl.target_accuracy=0.05", "tracking.log_model=true"], store)
    assert proc.returncode == 0, proc.stderr
    assert "round 4/4" in proc.stdout and "test_acc" in proc.stdout
    client, runs = _only_run(store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["fl.clients"] == "10"
    assert run.data.params["model.name"] == "2nn"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4]
    for key in ("test_loss", "train_loss", "round_seconds", "clients", "bytes_up", "bytes_down"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    metrics = run.data.metrics
    assert metrics["final_test_accuracy"] == history[-1].value
    assert metrics["rounds_to_target"] == 1
    assert metrics["best_test_accuracy"] == max(m.value for m in history)
    assert metrics["bytes_up"] == 1 * 4 * (60 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10)
    config_path = client.download_artifacts(run.info.run_id, "config.yaml", str(store))
    assert yaml.safe_load(open(config_path))["fl"]["rounds"] == 4

    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    data = load_dataset(DatasetConfig(name="synthetic", users=10, samples_per_user=60))
    accuracy, _ = evaluate(model, data.test)
    assert accuracy == metrics["final_test_accuracy"]
    assert (store / "outputs").is_dir()


def test_baseline_mode_logs_per_epoch_metrics_and_model(store):
    proc = run_cli([*SMALL, "mode=baseline", "baseline.epochs=3", "baseline.batch_size=20", "tracking.log_model=true"],
                   store)
    assert proc.returncode == 0, proc.stderr
    client, runs = _only_run(store)
    run = runs[0]
    assert run.data.tags["flexp.mode"] == "baseline"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    data = load_dataset(DatasetConfig(name="synthetic", users=10, samples_per_user=60))
    assert evaluate(model, data.test)[0] == history[-1].value
    assert history[-1].value > 0.3


def test_scaffold_with_attackers_and_arriving_data_logs_them_per_round(store):
    proc = run_cli([*SMALL, "strategy=scaffold", "fl.fraction=0.5", "attack.name=sign_flip", "attack.fraction=0.3",
                    "data.arrival=linear", "data.arrival_start=0.5", "data.arrival_full_at=3"], store)
    assert proc.returncode == 0, proc.stderr
    client, (run,) = _only_run(store)
    assert run.data.params["strategy.name"] == "scaffold" and run.data.params["attack.name"] == "sign_flip"
    samples = [m.value for m in client.get_metric_history(run.info.run_id, "samples")]
    malicious = [m.value for m in client.get_metric_history(run.info.run_id, "malicious")]
    assert len(samples) == 3 and samples[0] < samples[2] and sum(malicious) > 0


@pytest.mark.parametrize("preset, strategy, attack", [("mnist_noniid_fedprox", "fedprox", "none"),
                                                      ("mnist_noniid_scaffold", "scaffold", "none"),
                                                      ("mnist_byzantine", "median", "sign_flip")])
def test_strategy_presets_compose(preset, strategy, attack):
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR
    from flexp.config import parse_config

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = parse_config(OmegaConf.to_container(compose("config", [f"+experiment={preset}"]), resolve=True))
    assert (cfg.strategy.name, cfg.attack.name, cfg.dataset.name) == (strategy, attack, "mnist")


@pytest.mark.parametrize("argv", [["-m", "a=1,2"], ["a=1", "--cfg", "job"], ["--cfg", "job", "a=1"], ["-m"], []])
def test_sweeps_search_path_joins_the_other_overrides(argv):
    """Hydra's parser takes overrides in one run only, so the injected one must sit beside them."""
    import argparse

    from flexp.__main__ import with_sweeps_on_search_path

    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("-m", action="store_true")
    parser.add_argument("--cfg")
    parsed = parser.parse_args(with_sweeps_on_search_path(argv))
    assert parsed.overrides[0].startswith("hydra.searchpath=") or parsed.overrides[-1].startswith("hydra.search")
    assert len(parsed.overrides) == 1 + sum("=" in a for a in argv)


def test_a_users_searchpath_keeps_flexps_sweeps_on_it():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from flexp.__main__ import with_sweeps_on_search_path
    from flexp.searchpath import SWEEPS_DIR

    argv = with_sweeps_on_search_path(["-m", "a=1", "hydra.searchpath=[file:///my dir,pkg://mine.conf]", "b=2"])
    (override,) = [a for a in argv if "searchpath" in a]
    entries = OverridesParser.create().parse_override(override).value()
    assert entries == [f"file://{SWEEPS_DIR}", "file:///my dir", "pkg://mine.conf"]
    assert argv[0] == "-m" and {"a=1", "b=2"} < set(argv) and len(argv) == 4


def test_usage_lists_the_presets_and_sweeps_of_every_search_path_dir(tmp_path):
    from flexp.__main__ import usage
    from flexp.searchpath import search_dirs

    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\n")
    text = usage(search_dirs(["--config-dir", str(tmp_path)]))
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    assert "mine, mnist_2nn_iid" in lines["Presets (+experiment=)"]
    assert "table1_quick" in lines["Sweeps (+sweep=, with -m)"]
    assert "+experiment=" in text and "resume=" in text and "python -m flexp.report" in text
    assert "mine" not in usage(search_dirs([]))
