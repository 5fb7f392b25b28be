"""The sync-versus-async table (report.table=asynchrony) on hand-made runs, and the sweep that declares it."""

import pandas as pd
import pytest

from flexp.report import build_table
from flexp.system.report import asynchrony_files, asynchrony_markdown, asynchrony_table

ARMS = {"sync": {"strategy.name": "fedavg", "strategy.buffer_size": None, "async.concurrency": "None"},
        "fedbuff": {"strategy.name": "fedbuff", "strategy.buffer_size": "10", "async.concurrency": "20"},
        "fedbuff5": {"strategy.name": "fedbuff", "strategy.buffer_size": "5", "async.concurrency": None}}
SHARED = {"dataset.name": "mnist", "model.name": "2nn", "fl.clients": "100", "fl.fraction": "0.2",
          "fl.local_epochs": "1", "fl.batch_size": "10", "fl.lr": "0.1", "fl.target_accuracy": "0.9",
          "system.name": "heavy_tailed", "system.spread": "1.0"}


def runs_of(specs: list[tuple[str, str, str]]) -> pd.DataFrame:
    """An MLflow-like runs frame: one row per (run id, partition, arm), every run finished."""
    rows = [{"run_id": run, "status": "FINISHED", "start_time": i, **{f"params.{k}": v for k, v in SHARED.items()},
             "params.partition.name": partition, **{f"params.{k}": v for k, v in ARMS[arm].items()}}
            for i, (run, partition, arm) in enumerate(specs)]
    return pd.DataFrame(rows)


def table_of(specs: list[tuple[str, str, str]], accs: dict, hours: dict, clients: dict) -> tuple[pd.DataFrame, int]:
    runs = runs_of(specs)
    frame, _, _ = build_table(runs, accs)
    traffic = {r: {"bytes_up": [(s, 1e6) for s, _ in clients[r]]} for r in accs}
    return asynchrony_table(runs, frame, hours, traffic, clients)


def test_each_arm_is_timed_against_sync_on_its_partition(tmp_path):
    """Sync reaches 90% at round 2 (0.2 h); FedBuff at step 4 of 10 clients each (0.05 h): 4x sooner."""
    accs = {"s": [(1, 0.8), (2, 0.9), (3, 0.92)], "b": [(2, 0.7), (4, 0.9), (6, 0.95)]}
    hours = {"s": [(1, 0.1), (2, 0.2), (3, 0.3)], "b": [(s, 0.0125 * s) for s in range(1, 7)]}
    clients = {"s": [(s, 20.0) for s in (1, 2, 3)], "b": [(s, 10.0) for s in range(1, 7)]}
    table, left_out = table_of([("b", "iid", "fedbuff"), ("s", "iid", "sync")], accs, hours, clients)
    assert left_out == 0
    assert table["arm"].tolist() == ["FedAvg sync, 20 a round", "FedBuff, buffer 10 of 20"]
    assert table["updates"].tolist() == [60, 60] and table["steps"].tolist() == [3, 6]
    assert table["mb_up"].tolist() == [3.0, 6.0]
    assert table["hours_to_target"].tolist() == pytest.approx([0.2, 0.05])
    assert table["faster"].tolist() == pytest.approx([1.0, 4.0])
    text = asynchrony_markdown(table, 0.9)
    assert "mnist 2nn, K=100, E=1, B=10, lr 0.1, heavy_tailed devices (log-normal spread 1.0)" in text
    assert "FedBuff (Nguyen et al. 2022) reports 3.3x more efficient than synchronous FL" in text
    assert "| iid | FedBuff, buffer 10 of 20 | 0.9500 | 6 | 60 | 6.0 | 4.0 | 0.05 | 0.075 | 4.00 |" in text
    paths = asynchrony_files(table, accs, hours, tmp_path, "t", 0.9)
    assert [p.name for p in paths] == ["asynchrony.csv", "accuracy_vs_hours.png"]


def test_a_target_not_reached_leaves_the_ratio_blank_per_partition():
    """On shards sync never reaches 90%, so no arm there has a ratio; on iid FedBuff (buffer 5, concurrency by
    default C K) never does, so only sync has one; a run of an arm run again is left out."""
    accs = {"si": [(1, 0.95)], "bi": [(1, 0.5)], "ss": [(1, 0.5)], "bs": [(1, 0.95)], "old": [(1, 0.1)]}
    hours = {r: [(1, 1.0)] for r in accs}
    clients = {r: [(1, 20.0)] for r in accs}
    table, left_out = table_of([("old", "iid", "fedbuff5"), ("si", "iid", "sync"), ("bi", "iid", "fedbuff5"),
                                ("ss", "shards", "sync"), ("bs", "shards", "fedbuff5")], accs, hours, clients)
    assert left_out == 1 and "old" not in table["run_id"].tolist()
    assert table["arm"].tolist() == ["FedAvg sync, 20 a round", "FedBuff, buffer 5 of 20"] * 2
    assert table["faster"].iloc[0] == 1.0 and table["faster"].iloc[1:].isna().all()
    text = asynchrony_markdown(table, 0.9, left_out)
    assert "| shards | FedBuff, buffer 5 of 20 | 0.9500 | 1 | 20 | 1.0 | 1.0 | 1 | 1 | – |" in text
    assert "1 earlier run(s) of an arm run again on the same partition left out" in text


@pytest.mark.parametrize("arm, strategy, rounds, every", [("sync", "fedavg", 100, 5), ("fedbuff", "fedbuff", 200, 10),
                                                          ("fedbuff5", "fedbuff", 400, 20)])
def test_asynchrony_sweep_jobs_keep_their_arms_budget_and_declare_the_table(arm, strategy, rounds, every):
    """Composed in a job's order (the swept overrides before +experiment): the arm's rounds and C=0.2 outlast the
    experiment's, and config validation accepts report.table=asynchrony."""
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import CONF_DIR
    from flexp.config import parse_config
    from flexp.searchpath import SWEEPS_DIR

    preset = ["+experiment=mnist_2nn_iid", "+sweep=asynchrony", f"hydra.searchpath=[file://{SWEEPS_DIR}]"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        swept = compose("config", preset, return_hydra_config=True)
        job = compose("config", ["partition=shards", f"asynchrony={arm}", *preset])
    assert swept.hydra.sweeper.params == {"partition": "iid,shards", "asynchrony": "sync,fedbuff,fedbuff5"}
    config = parse_config(job)
    assert job.report.table == "asynchrony" and config.tracking.experiment == "asynchrony"
    assert (config.fl.rounds, config.fl.eval_every, config.fl.fraction, config.fl.target_accuracy) == (
        rounds, every, 0.2, 0.95)
    assert job.strategy.name == strategy and not config.fl.stop_at_target
    assert config.system.name == "heavy_tailed" and config.system.kwargs["over_select"] == 0.0
    assert (job["async"].concurrency == 20) == (strategy == "fedbuff")


def test_one_arm_is_chosen_on_the_command_line_as_a_sweeps_group():
    """`asynchrony=fedbuff` (no `+`: the sweep already holds the arm) is a group of sweeps/, not an unknown key."""
    from flexp.__main__ import check_group_choices

    check_group_choices(["+experiment=mnist_2nn_iid", "+sweep=asynchrony", "asynchrony=fedbuff,sync", "codec=topk"])
    with pytest.raises(SystemExit):
        check_group_choices(["+sweep=asynchrony", "asynchrony=fedbuf"])
