"""Rounds-to-target, speedups and the sweep report, on hand-made histories and on a real tiny sweep."""

import json
import shlex

import pandas as pd
import pytest
from conftest import SMALL, mlflow_client, run_cli

from flexp.metrics import interpolated_rounds_to_target
from flexp.paper import paper_rounds
from flexp.report import add_speedups, build_table, report, summarise
from flexp.ui import VIEW_TAG


def test_interpolated_rounds_to_target_follows_the_papers_recipe():
    history = [(1, 0.5), (2, 0.8), (3, 0.7), (4, 0.95)]
    assert interpolated_rounds_to_target(history, 0.9) == pytest.approx(3 + 0.1 / 0.15)
    assert interpolated_rounds_to_target(history, 0.8) == 2.0
    assert interpolated_rounds_to_target(history, 0.4) == 1.0
    assert interpolated_rounds_to_target(history, 0.96) is None
    assert interpolated_rounds_to_target([(2, 0.5), (4, 0.9)], 0.7) == pytest.approx(3.0)


def test_summarise_reports_best_final_and_never_reached():
    stats = summarise({"a": [(1, 0.3), (2, 0.6), (3, 0.5)], "b": [(1, 0.2)]}, target=0.55)
    assert stats["a"] == {"best_accuracy": 0.6, "final_accuracy": 0.5, "rounds": 3, "rounds_to_target": 2,
                          "rounds_to_target_interp": pytest.approx(1 + 0.25 / 0.3)}
    assert stats["b"]["rounds_to_target"] is None and stats["b"]["rounds_to_target_interp"] is None


def test_speedups_against_the_reference_row_with_the_same_other_keys():
    table = pd.DataFrame({
        "fl.fraction": ["0.0", "0.1", "0.5", "0.0", "0.1", "0.5"],
        "fl.batch_size": ["0", "0", "0", "10", "10", "10"],
        "rounds_to_target_interp": [100.0, 50.0, None, 30.0, 10.0, 7.5],
    })
    out = add_speedups(table, {"fl.fraction": 0.0}, ["fl.fraction", "fl.batch_size"])
    assert out["speedup"].tolist()[:2] == [1.0, 2.0]
    assert pd.isna(out["speedup"].iloc[2])
    assert out["speedup"].tolist()[3:] == [1.0, 3.0, 4.0]
    unreached = add_speedups(table.assign(rounds_to_target_interp=[None, 5.0, 5.0, 30.0, 10.0, 7.5]),
                             {"fl.fraction": 0.0}, ["fl.fraction", "fl.batch_size"])
    assert unreached["speedup"].iloc[:3].isna().all()


def test_a_swept_strategys_class_is_left_to_its_name_and_a_target_without_one_is_shown():
    runs = pd.DataFrame({"run_id": ["a", "b"], "params.strategy.name": ["fedavg", "fedprox"],
                         "params.strategy._target_": ["flexp.strategy.fedavg.FedAvg", "flexp.strategy.fedprox.FedProx"],
                         "params.strategy.mu": [None, "0.01"], "params.model._target_": ["m.A", "m.B"]})
    frame, varying, _ = build_table(runs, {"a": [(1, 0.5)], "b": [(1, 0.6)]})
    assert varying == ["model._target_", "strategy.mu", "strategy.name"]
    assert frame["best_accuracy"].tolist() == [0.5, 0.6]


def test_paper_numbers_only_where_the_setting_matches():
    assert paper_rounds("2nn", "iid", 1, 10, 0.1, 0.97) == 87
    assert paper_rounds("cnn", "shards", 5, 10, 0.1, 0.99, "table2") == 229
    assert paper_rounds("cnn", "shards", 5, 10, 0.1, 0.99, "table1") == 206
    assert paper_rounds("2nn", "iid", 1, None, 0.5, 0.97) == "—"
    assert paper_rounds("2nn", "iid", 1, 10, 0.1, 0.92) == ""
    assert paper_rounds("logreg", "iid", 1, 10, 0.1, 0.97) == ""


def test_tiny_sweep_gives_one_parent_four_children_and_a_four_row_report(store):
    """Its four jobs run at once in joblib's processes, sharing one SQLite store: nothing may be lost."""
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", *SMALL, "fl.rounds=4",
            "fl.target_accuracy=0.3", "fl.clients=5,10", "fl.fraction=0.2,1.0", "+report.reference={fl.fraction: 0.2}"]
    proc = run_cli(args, store, timeout=400)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    parents = [r for r in runs if r.data.tags.get("flexp.sweep_parent") == "true"]
    children = [r for r in runs if r not in parents]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    sweep = parent.data.tags["flexp.sweep_id"]
    assert {c.data.tags["flexp.sweep_id"] for c in children} == {sweep}
    combos = {(c.data.params["fl.clients"], c.data.params["fl.fraction"]) for c in children}
    assert combos == {("5", "0.2"), ("5", "1.0"), ("10", "0.2"), ("10", "1.0")}
    assert all(c.info.status == "FINISHED" for c in children)
    assert len({len(c.data.params) for c in children}) == 1
    for run in children:
        for key in ("test_accuracy", "train_loss", "bytes_up", "round_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    assert {(c.data.tags["mlflow.source.name"], c.data.tags["mlflow.source.type"]) for c in children} == {
        (f"python -m flexp {shlex.join(args)}", "LOCAL")}   # the command, not the writer process's file
    view = json.loads(client.get_experiment_by_name("flexp").tags[VIEW_TAG])
    assert {"params.`fl.clients`", "params.`fl.fraction`", "metrics.`best_test_accuracy`"} <= set(
        json.loads(view["state"])["selectedColumns"])
    assert sorted(c.data.metrics["clients"] for c in children) == [1, 2, 5, 10]

    out = report(sweep, store / "reports", f"sqlite:///{store / 'mlflow.db'}")
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 4
    by_run = {c.info.run_id: c for c in children}
    for row in table.to_dict("records"):
        run = by_run[row["run_id"]]
        assert row["best_accuracy"] == pytest.approx(run.data.metrics["best_test_accuracy"])
        assert row["final_accuracy"] == pytest.approx(run.data.metrics["final_test_accuracy"])
        assert row["rounds"] == 4
        if "rounds_to_target" in run.data.metrics:
            assert row["rounds_to_target"] == run.data.metrics["rounds_to_target"]
        if row["fl.fraction"] == 0.2 and pd.notna(row["rounds_to_target_interp"]):
            assert row["speedup"] == pytest.approx(1.0)
    for name in ("table.md", "accuracy.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/table.md", "report/table.csv", "report/accuracy.png"} <= artifacts


def test_report_by_experiment_plots_fedavg_against_a_centralized_baseline(store):
    for args in (["fl.fraction=0.2"], ["mode=baseline", "baseline.epochs=3"]):
        proc = run_cli([*SMALL, "tracking.log_model=false", "tracking.experiment=cmp", *args], store)
        assert proc.returncode == 0, proc.stderr
    out = report("cmp", store / "reports", f"sqlite:///{store / 'mlflow.db'}")
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 1 and table["fl.fraction"].tolist() == [0.2]
    assert (out / "baseline.png").stat().st_size > 0


def test_submitit_launcher_runs_a_sweep_as_children_of_one_parent(store):
    """The launcher plugin behind hydra/launcher=slurm, run through submitit's local executor."""
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *SMALL,
                    "tracking.log_model=false", "fl.fraction=0.2,0.5"], store, timeout=400)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])
    children = [r for r in runs if r.data.tags.get("flexp.sweep_parent") != "true"]
    assert len(runs) == 3 and len(children) == 2
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    assert all(r.info.status == "FINISHED" for r in runs)


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.cpus_per_task == 4


@pytest.mark.parametrize("block, partition, batch", [("table1_iid_b10", "iid", "10"),
                                                      ("table1_noniid_b10", "shards", "10"),
                                                      ("table1_iid_binf", "iid", "0"),
                                                      ("table1_noniid_binf", "shards", "0")])
def test_table1_blocks_sweep_the_five_fractions_on_a_learning_rate_grid_of_resolution_cube_root_ten(
        block, partition, batch):
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR
    from flexp.searchpath import SWEEPS_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", ["+experiment=mnist_2nn_iid", f"+sweep={block}", f"hydra.searchpath=[file://{SWEEPS_DIR}]"],
                      return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert (params.partition, params["++fl.batch_size"]) == (partition, batch)
    assert params["++fl.fraction"] == "0.0,0.1,0.2,0.5,1.0"
    lrs = sorted(float(v) for v in params["++fl.lr"].split(","))   # listed likeliest best first, for pruning
    assert len(lrs) >= 3
    for low, high in zip(lrs, lrs[1:]):   # rates written to 3 significant figures: each ratio within 0.5%
        assert high / low == pytest.approx(10 ** (1 / 3), rel=0.005)
    assert cfg.fl.target_accuracy == 0.97 and cfg.fl.stop_at_target and cfg.fl.eval_every == 1 and cfg.fl.prune
    assert cfg.tracking.experiment == "table1_2nn" and cfg.fl.local_epochs == 1 and cfg.model.name == "2nn"


def test_privacy_report_has_a_row_per_level_least_epsilon_first_and_the_non_private_run_last(tmp_path):
    """Tiny DP-FedAvg runs at two targets (one run twice), without noise, and without privacy, in one experiment whose
    preset declares report.table=privacy, as sweeps/sweep/privacy.yaml does."""
    import flexp
    from flexp.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [*SMALL, f"tracking.uri={uri}", "tracking.experiment=dp", "+report.table=privacy", "fl.sampling=poisson",
            "fl.fraction=0.5", "fl.eval_every=2"]
    dp = [*base, "privacy=dp_fedavg"]
    runs = {level: flexp.run(flexp.compose(overrides), tracking=True) for level, overrides in [
        ("8", [*dp, "privacy.target_epsilon=8"]), ("2", [*dp, "privacy.target_epsilon=2"]),
        ("inf", [*dp, "privacy.target_epsilon=inf"]), ("non-private", base)]}
    again = flexp.run(flexp.compose([*dp, "privacy.target_epsilon=2", "seed=1"]), tracking=True)
    runs["2"] = again   # a level run again: the report keeps the latest

    assert main(["dp", "--tracking-uri", uri, "--out", str(tmp_path), "--name", "r"]) == 0
    table = pd.read_csv(tmp_path / "r" / "privacy.csv", dtype={"level": str})
    assert table["level"].tolist() == ["2", "8", "inf", "non-private"]
    for row in table.to_dict("records"):
        result = runs[row["level"]]
        assert row["run_id"] == result.run_id
        accs = [r.test_accuracy for r in result.history if r.test_accuracy is not None]
        assert [row["final_accuracy"], row["best_accuracy"]] == pytest.approx([accs[-1], max(accs)])
        assert row["rounds"] == result.history[-1].round
        last = result.metrics[result.history[-1].round]
        if row["level"] == "non-private":
            assert "epsilon" not in last and pd.isna(row["epsilon"]) and pd.isna(row["noise_multiplier"])
        else:
            assert row["epsilon"] == pytest.approx(last["epsilon"])   # inf too
            assert (row["noise_multiplier"] == 0) == (row["level"] == "inf")
    assert 0 < table["epsilon"].iloc[0] <= 2 < table["epsilon"].iloc[1] <= 8
    text = (tmp_path / "r" / "table.md").read_text()
    assert text.index("| target ε | noise multiplier | ε spent |") < text.index("All runs")
    assert "1 earlier run(s) of a level run again left out" in text and "| inf | 0 | ∞ |" in text
    for name in ("accuracy_vs_epsilon.png", "accuracy_by_epsilon.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0


def _sweep_preset(sweep, *variants):
    """`+experiment=mnist_2nn_iid +sweep=<sweep>` composed as the multirun sees it (with its hydra node), then with
    each list of `variants`' overrides added, as one of its jobs or a run beside it."""
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR
    from flexp.searchpath import SWEEPS_DIR

    preset = ["+experiment=mnist_2nn_iid", f"+sweep={sweep}", f"hydra.searchpath=[file://{SWEEPS_DIR}]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return [compose("config", preset, return_hydra_config=True),
                *(compose("config", [*preset, *extra]) for extra in variants)]


def test_privacy_sweep_runs_dp_fedavg_at_each_target_and_its_non_private_run_composes_from_the_same_preset():
    from flexp.config import parse_config

    private, public = _sweep_preset("privacy", ["privacy=none"])
    assert private.hydra.sweeper.params["++privacy.target_epsilon"] == "1,2,4,8,inf"
    assert private.privacy.name == "dp_fedavg" and private.report.table == "privacy"
    fl = private.fl
    assert (fl.clients, fl.sampling, fl.fraction, fl.rounds) == (1000, "poisson", 0.1, 100)
    assert not fl.stop_at_target and fl.eval_every == 5
    config = parse_config(public)   # nothing of dp_fedavg is left on privacy=none
    assert config.privacy is None and config.tracking.experiment == "privacy" and config.fl.clients == 1000


def test_compression_report_lists_each_codecs_bytes_and_simulated_hours_beside_no_compression(tmp_path):
    """Tiny runs without compression, with 8-bit quantization and with top-k, on uniform devices, in one experiment
    whose preset declares report.table=compression (as sweeps/sweep/compression.yaml does)."""
    import flexp
    from flexp.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [*SMALL, f"tracking.uri={uri}", "tracking.experiment=codecs", "+report.table=compression",
            "fl.fraction=0.5", "fl.eval_every=1", "fl.target_accuracy=0.5", "system=uniform"]
    runs = {codec: flexp.run(flexp.compose([*base, *overrides]), tracking=True) for codec, overrides in [
        ("none", ["fl.rounds=2"]), ("quantize 8-bit", ["compression=quantize"]),
        ("topk 10% EF", ["compression=topk", "compression.ratio=0.1"]), ("none", [])]}  # none again: the latest kept

    assert main(["codecs", "--tracking-uri", uri, "--out", str(tmp_path), "--name", "r"]) == 0
    table = pd.read_csv(tmp_path / "r" / "compression.csv").set_index("codec")
    assert sorted(table.index) == sorted(runs)
    for codec, result in runs.items():
        row = table.loc[codec]
        assert row["mb_up"] == pytest.approx(sum(r.bytes_up for r in result.history) / 1e6)
        assert row["mb_down"] == pytest.approx(sum(r.bytes_down for r in result.history) / 1e6)
        assert row["sim_hours"] == pytest.approx(result.history[-1].sim_hours)
        assert row["up_reduction"] == pytest.approx(table.loc["none", "mb_up"] / row["mb_up"])
        if pd.notna(row["rounds_to_target"]):   # hours interpolated at the interpolated round, within its bracket
            hours = [0.0, *(r.sim_hours for r in result.history)]
            at = int(row["rounds_to_target"])
            assert hours[at] <= row["hours_to_target"] <= hours[min(at + 1, len(hours) - 1)]
    assert table.loc["quantize 8-bit", "up_reduction"] > 3.9 and table.loc["none", "delta_points"] == 0
    text = (tmp_path / "r" / "table.md").read_text()
    assert text.index("| partition | devices | codec |") < text.index("All runs")
    assert "1 earlier run(s) of a codec run again on the same partition and devices left out" in text
    for name in ("accuracy_vs_hours.png", "accuracy_vs_mb_up.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0


def test_compression_sweep_crosses_partitions_codecs_and_deployments():
    from flexp.config import parse_config

    swept, *jobs = _sweep_preset("compression", ["+codec=topk_no_ef", "+deployment=heavy_tailed"],
                                 ["+codec=none", "+deployment=uniform"])
    one, plain = (parse_config(job) for job in jobs)
    params = swept.hydra.sweeper.params
    assert params["partition"] == "iid,shards" and params["+deployment"] == "uniform,heavy_tailed"
    assert params["+codec"] == "none,quantize8,quantize4,topk,topk_no_ef,sign"
    assert swept.report.table == "compression" and not swept.fl.stop_at_target
    assert one.compression.name == "topk" and one.compression.kwargs["error_feedback"] is False
    assert one.system.name == "heavy_tailed" and one.system.kwargs["over_select"] == 0.3
    assert plain.compression is None and plain.system.kwargs["spread"] == 0.0
