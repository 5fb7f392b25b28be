"""The paper's best-learning-rate selection and the Table 1 layout, on hand-made histories (no MLflow)."""

import pandas as pd
import pytest

from flexp.report import build_table, tables
from flexp.selection import best_rates, rates_table


def runs(rows: list[dict]) -> pd.DataFrame:
    """Rows {"lr": .., "rounds": .., ...} as the per-run frame build_table makes."""
    return pd.DataFrame([{"run_id": f"r{i}", "fl.fraction": r.get("c", "0.1"), "fl.lr": r["lr"],
                          "rounds_to_target_interp": r["rounds"], "best_accuracy": r.get("acc", 0.99)}
                         for i, r in enumerate(rows)])


def test_best_rate_is_the_fewest_rounds_with_ties_to_the_smaller_rate_and_edges_flagged():
    frame = runs([{"lr": "0.1", "rounds": 50.0}, {"lr": "0.215", "rounds": 40.0}, {"lr": "0.464", "rounds": 45.0},
                  {"c": "0.5", "lr": "0.464", "rounds": 30.0}, {"c": "0.5", "lr": "0.215", "rounds": 30.0},
                  {"c": "0.5", "lr": "0.1", "rounds": 31.0}])
    best = best_rates(frame, ["fl.fraction"]).set_index("fl.fraction")
    assert best.loc["0.1", "fl.lr"] == "0.215" and not best.loc["0.1", "lr_edge"]
    assert best.loc["0.5", "fl.lr"] == "0.215" and best.loc["0.5", "rounds_to_target_interp"] == 30.0
    assert best["reached"].all() and best["lrs_tried"].tolist() == [3, 3]
    edge = best_rates(frame.assign(rounds_to_target_interp=[50.0, 60.0, 70.0, 1, 2, 3]), ["fl.fraction"])
    assert edge.set_index("fl.fraction")["fl.lr"].to_dict() == {"0.1": "0.1", "0.5": "0.464"}
    assert edge["lr_edge"].all()


def test_a_cell_no_rate_reached_keeps_its_most_accurate_run_and_shows_a_dash():
    frame = runs([{"lr": "0.1", "rounds": None, "acc": 0.95}, {"lr": "1.0", "rounds": None, "acc": 0.96},
                  {"c": "0.5", "lr": "0.1", "rounds": None, "acc": 0.9}, {"c": "0.5", "lr": "1.0", "rounds": 80.0}])
    best = best_rates(frame, ["fl.fraction"]).set_index("fl.fraction")
    assert not best.loc["0.1", "reached"] and best.loc["0.1", "fl.lr"] == "1.0"
    assert pd.isna(best.loc["0.1", "rounds_to_target_interp"])
    assert best.loc["0.5", "reached"] and best.loc["0.5", "fl.lr"] == "1.0"
    lines = rates_table(frame, ["fl.fraction"]).splitlines()
    assert lines[0] == "| fl.fraction | η=0.1 | η=1 |"
    assert lines[2:] == ["| 0.1 | — | — |", "| 0.5 | — | **80.0** |"]


def test_the_rates_table_marks_pruned_diverged_and_unfinished_rates_and_prefers_a_rerun_that_ended():
    frame = runs([{"lr": "0.1", "rounds": 40.0}, {"lr": "0.215", "rounds": None}, {"lr": "0.464", "rounds": None},
                  {"lr": "0.0464", "rounds": None}, {"lr": "0.0215", "rounds": None}, {"lr": "0.0215", "rounds": None}])
    frame = frame.assign(rounds=[40, 41, 12, 700, 30, 41],
                         stopped=["", "pruned", "diverged", "running", "killed", "pruned"])
    lines = rates_table(frame, ["fl.fraction"]).splitlines()
    assert lines[0] == "| fl.fraction | η=0.0215 | η=0.0464 | η=0.1 | η=0.215 | η=0.464 |"
    assert lines[2] == "| 0.1 | >41 | …700 | **40.0** | >41 | × |"   # the killed run of 0.0215 gives way to its rerun


def test_a_rate_sweep_of_one_setting_reports_its_best_rate_and_edge():
    frame = runs([{"lr": "0.0464", "rounds": 6.0}, {"lr": "0.1", "rounds": 4.7}]).assign(
        **{"fl.target_accuracy": "0.92", "paper": "", "paper_note": "", "rounds": [6, 5], "final_accuracy": 0.93,
           "speedup": None})
    text, best, _ = tables(frame, ["fl.lr"], {}, 0.92)
    assert best["fl.lr"].tolist() == ["0.1"]
    assert text.startswith("- rounds to 92%: 4.7 rounds; best rate η=0.1 (of 2 tried, best accuracy 0.9900)\n")
    assert "Best rate at an edge of the grid (widen it there): η=0.1\n" in text
    unreached, _, _ = tables(frame.assign(rounds_to_target_interp=None, best_accuracy=[0.91, 0.9]), ["fl.lr"], {}, 0.92)
    assert unreached.startswith("- rounds to 92%: not reached by any rate; best rate η=0.0464 (of 2 tried, best "
                                "accuracy 0.9100)\n")   # a heading over an empty table before


C, BLOCKS = ("0.0", "0.1"), [("iid", "0"), ("iid", "10"), ("shards", "0"), ("shards", "10")]


def grid() -> tuple[pd.DataFrame, dict]:
    """A tiny Table 1 grid in MLflow's search_runs columns: 4 blocks x C in {0, 0.1} x two rates, where the rate
    0.1 reaches 97% in R rounds and 0.2 in R + 5 (C=0 at 0.2: never); R grows with the block and falls with C."""
    rows, accs = [], {}
    for b, (part, bs) in enumerate(BLOCKS):
        for c in C:
            for lr in ("0.1", "0.2"):
                run_id = f"{part}-{bs}-{c}-{lr}"
                rows.append({"run_id": run_id, "params.model.name": "2nn", "params.dataset.name": "mnist",
                             "params.partition.name": part, "params.fl.batch_size": bs, "params.fl.fraction": c,
                             "params.fl.lr": lr, "params.fl.local_epochs": "1", "params.fl.target_accuracy": "0.97",
                             "params.fl.rounds": "500" if bs == "10" else "900",
                             "params.partition.shards_per_client": "2" if part == "shards" else None,
                             "params.report.reference.fl.fraction": "0.0", "tags.flexp.sweep_id": f"s{b}",
                             "tags.flexp.job_num": str(len(rows))})
                rounds = 100 * (b + 1) // (1 if c == "0.0" else 4) + (0 if lr == "0.1" else 5)
                reach = lr == "0.1" or c != "0.0"
                accs[run_id] = [(1, 0.5), (rounds, 0.97 if reach else 0.96)]
    return pd.DataFrame(rows), accs


def test_table1_layout_from_a_tiny_grid_puts_ours_beside_the_papers_in_its_column_order():
    frame, varying, reference = build_table(*grid())
    assert set(varying) == {"partition.name", "fl.batch_size", "fl.fraction", "fl.lr", "fl.rounds"}
    text, best, keys = tables(frame, varying, reference, 0.97)
    assert len(best) == 8 and (best["fl.lr"] == "0.1").all() and keys[-1] == "fl.lr"
    layout = [line for line in text.splitlines() if line.startswith("| fraction")][0:1]
    assert layout == ["| fraction | IID B=inf | IID B=10 | non-IID B=inf | non-IID B=10 |"]
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith(("| 0.0 |", "| 0.1 |"))}
    paper = {"0.0": [1455, 316, 4278, 3275], "0.1": [1474, 87, 1796, 664]}
    for c in C:
        for b, cell in enumerate(rows[f"| {c}"].strip("| ").split(" | ")[1:]):
            ours = 100 * (b + 1) // (1 if c == "0.0" else 4)
            speed = f" ({100 * (b + 1) / ours:.1f}x)" if c == "0.1" else " (1.0x)"
            edge = "†"   # 0.1 is the smallest rate tried
            assert cell == f"{ours:.1f}{speed} [{paper[c][b]}; {ours / paper[c][b]:.2f}] η 0.1{edge}", (c, b)
    assert "Best rate at an edge of the grid" in text
    assert "| partition.name | fl.batch_size | fl.fraction | η=0.1 | η=0.2 |" in text
    assert "IID B=inf C=0.0 η=0.1; IID B=inf C=0.1 η=0.1;" in text
    assert "| iid | inf | 0.0 | **100.0** | — |" in text and "| shards | 10 | 0.1 | **100.0** | 105.0 |" in text
    captions = [line for line in text.splitlines() if line.endswith(":")]
    assert "; [the paper's rounds; ours/paper]; η the chosen rate" in captions[0]
    assert "no rate reached" not in captions[0] and "did not reach" not in captions[0]
    assert captions[1] == "Every learning rate tried (rounds to 97%; bold: chosen; —: not reached in the budget):"
    assert "| - |" not in text and "\n—: not reached in the budget.\n" in text   # the All runs legend


def test_the_paper_column_says_why_it_is_empty():
    frame, accs = grid()
    frame = frame.assign(**{"params.fl.target_accuracy": "0.92"})
    table, varying, reference = build_table(frame, accs)
    text, _, _ = tables(table, varying, reference, 0.92)
    layout = [line for line in text.split("Every")[0].splitlines() if line.startswith("| 0.")]
    assert "paper: target 97%, this sweep 92%" in text and len(layout) == 2 and not any("[" in x for x in layout)
    assert text.count("paper: target 97%, this sweep 92%") == 1
    assert "[the paper" not in text and "| paper |" not in text and "n/a" not in text


def test_where_the_paper_did_not_reach_the_target_its_mark_is_ours_and_the_caption_says_so():
    frame, accs = grid()
    frame = frame.loc[frame["params.fl.batch_size"] == "0"].assign(
        **{"params.fl.fraction": lambda f: f["params.fl.fraction"].map({"0.0": "0.5", "0.1": "1.0"}),
           "params.report.reference.fl.fraction": "0.5"})
    table, varying, reference = build_table(frame, accs)
    text, _, _ = tables(table, varying, reference, 0.97)
    assert "; [the paper's rounds (—: it did not reach the target); ours/paper];" in text.splitlines()[0]
    assert "| 0.5 | 100.0 (1.0x) [—] η 0.1† | 300.0 (1.0x) [—] η 0.1† |" in text
    assert text.rstrip().endswith("—: not reached in the budget; paper —: the paper did not reach it.")


def test_runs_with_different_targets_are_not_merged():
    frame, accs = grid()
    frame.loc[0, "params.fl.target_accuracy"] = "0.92"
    with pytest.raises(LookupError, match="different fl.target_accuracy"):
        build_table(frame, accs)


def log_sweep(client, experiment_id: str, sweep: str, partition: str, rounds_by_lr: dict[str, int]) -> str:
    """A sweep as flexp logs it: a parent run and one child per rate, reaching 97% at the given round."""
    parent = client.create_run(experiment_id, tags={"flexp.sweep_id": sweep, "flexp.sweep_parent": "true"})
    for job, (lr, rounds) in enumerate(rounds_by_lr.items()):
        run = client.create_run(experiment_id, tags={"flexp.sweep_id": sweep, "flexp.job_num": str(job),
                                                     "mlflow.parentRunId": parent.info.run_id})
        for key, value in {"model.name": "2nn", "dataset.name": "mnist", "partition.name": partition,
                           "fl.batch_size": "10", "fl.fraction": "0.1", "fl.lr": lr, "fl.local_epochs": "1",
                           "fl.target_accuracy": "0.97", "report.reference.fl.fraction": "0.0"}.items():
            client.log_param(run.info.run_id, key, value)
        for step, acc in ((1, 0.5), (rounds, 0.97)):
            client.log_metric(run.info.run_id, "test_accuracy", acc, step=step)
        client.set_terminated(run.info.run_id)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


def test_report_merges_two_sweeps_of_one_experiment_by_ids_or_by_its_name(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from flexp.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("table1_2nn", artifact_location=(tmp_path / "artifacts").as_uri())
    parents = [log_sweep(client, experiment, "day1", "iid", {"0.1": 80, "0.215": 90}),
               log_sweep(client, experiment, "day2", "shards", {"0.1": 700, "0.0464": 650})]
    assert main(["day1", "day2", "--tracking-uri", uri, "--out", str(tmp_path), "--name", "t1"]) == 0
    text = (tmp_path / "t1" / "table.md").read_text()
    assert "| fraction | IID B=10 | non-IID B=10 |" in text
    assert "| 0.1 | 80.0 [87; 0.92] η 0.1† | 650.0 [664; 0.98] η 0.0464† |" in text
    cells = pd.read_csv(tmp_path / "t1" / "cells.csv")
    assert sorted(cells["fl.lr"]) == [0.0464, 0.1] and len(pd.read_csv(tmp_path / "t1" / "table.csv")) == 4
    for parent in parents:
        assert "report/table.md" in {a.path for a in client.list_artifacts(parent, "report")}
    for name in ("accuracy.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / "t1" / name).stat().st_size > 0
    assert main(["table1_2nn", "day1", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    assert len(pd.read_csv(tmp_path / "table1_2nn+day1" / "table.csv")) == 4
    capsys.readouterr()
    assert main(["day1", "nosuch", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"flexp.report: error: no sweep id or experiment named 'nosuch' in {uri}"
