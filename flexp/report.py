"""`python -m flexp.report <sweep id | experiment name>`: a sweep's table and plots, from MLflow into pandas.

Writes outputs/reports/<id>/{table.md, table.csv, accuracy.png, accuracy_vs_bytes.png[, baseline.png]} and,
for a sweep, logs them as artifacts of its parent run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from flexp.metrics import interpolated_rounds_to_target, rounds_to_target
from flexp.paper import paper_rounds

KEYS = ("model.name", "partition.name", "dataset.name", "fl.clients", "fl.fraction", "fl.local_epochs",
        "fl.batch_size", "fl.lr", "fl.rounds", "fl.target_accuracy", "seed", "mode")


def number(text: object) -> float | None:
    """A param string as a number; None for null/None/empty."""
    if text is None or str(text).lower() in ("", "none", "null", "inf"):
        return None
    return float(text)


def batch(text: object) -> int | None:
    """B as logged: 0 and null both mean the full batch (None)."""
    value = number(text)
    return int(value) if value else None


def summarise(histories: Mapping[str, list[tuple[int, float]]], target: float | None) -> dict[str, dict]:
    """Per run id: best and final accuracy, rounds run, rounds-to-target (first round, and interpolated)."""
    out = {}
    for run_id, history in histories.items():
        accs = [a for _, a in history]
        out[run_id] = {
            "best_accuracy": max(accs) if accs else None,
            "final_accuracy": accs[-1] if accs else None,
            "rounds": history[-1][0] if history else 0,
            "rounds_to_target": rounds_to_target(history, target) if target is not None else None,
            "rounds_to_target_interp": interpolated_rounds_to_target(history, target) if target is not None else None,
        }
    return out


def add_speedups(table: pd.DataFrame, reference: Mapping[str, object], varying: list[str]) -> pd.DataFrame:
    """speedup = reference row's rounds-to-target / this row's, the reference sharing every other varying key."""
    table = table.copy()
    ref_keys = [k for k in reference if k in table.columns]
    others = [k for k in varying if k not in ref_keys]
    speed = []
    for _, row in table.iterrows():
        mask = pd.Series(True, index=table.index)
        for key in ref_keys:
            mask &= table[key].map(lambda v, key=key: same(v, reference[key]))
        for key in others:
            mask &= table[key].map(lambda v, key=key, row=row: same(v, row[key]))
        refs = table.loc[mask, "rounds_to_target_interp"].dropna()
        mine = row["rounds_to_target_interp"]
        speed.append(refs.iloc[0] / mine if len(refs) and pd.notna(mine) and mine else None)
    table["speedup"] = speed
    return table


def same(a: object, b: object) -> bool:
    """Equal as config values: numbers by value, and 0/null both as the full batch."""
    try:
        na, nb = number(a), number(b)
        return (na or None) == (nb or None) if na in (0, None) or nb in (0, None) else abs(na - nb) < 1e-9
    except (TypeError, ValueError):
        return str(a) == str(b)


def find_runs(key: str, tracking_uri: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """Runs of a sweep id (children only) or, failing that, of an experiment name; plus the sweep's parent id."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`flexp.sweep_id` = '{key}'")
    if not runs.empty:
        is_parent = runs.get("tags.flexp.sweep_parent", pd.Series(index=runs.index, dtype=object)) == "true"
        parent = runs.loc[is_parent, "run_id"]
        return runs.loc[~is_parent].reset_index(drop=True), (parent.iloc[0] if len(parent) else None)
    experiment = mlflow.get_experiment_by_name(key)
    if experiment is None:
        raise LookupError(f"no sweep id or experiment named {key!r} in {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs([experiment.experiment_id])
    if "tags.flexp.sweep_parent" in runs:
        runs = runs.loc[runs["tags.flexp.sweep_parent"] != "true"]
    return runs.reset_index(drop=True), None


def histories(run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Metric history per run as (step, value), sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {r: sorted((m.step, m.value) for m in client.get_metric_history(r, metric)) for r in run_ids}


def build_table(runs: pd.DataFrame,
                accs: Mapping[str, list[tuple[int, float]]]) -> tuple[pd.DataFrame, list[str], dict]:
    """One row per run (in job order): the config keys that vary, the results, the paper's number; plus the
    varying keys and the sweep's reference setting."""
    swept = [c[len("params."):] for c in runs.columns if c.startswith("params.") and not c.startswith("params.report.")
             and c[len("params."):] not in KEYS and runs[c].nunique(dropna=False) > 1]
    params = {k: runs.get(f"params.{k}") for k in (*KEYS, *sorted(swept)) if f"params.{k}" in runs}
    frame = pd.DataFrame({k: v.values for k, v in params.items()})
    frame.insert(0, "run_id", runs["run_id"].values)
    if "tags.flexp.job_num" in runs:
        frame.insert(1, "job", pd.to_numeric(runs["tags.flexp.job_num"], errors="coerce").values)
    varying = [k for k in params if frame[k].nunique(dropna=False) > 1]
    target = number(frame["fl.target_accuracy"].iloc[0]) if "fl.target_accuracy" in frame else None
    stats = summarise(accs, target)
    for column in ("best_accuracy", "final_accuracy", "rounds", "rounds_to_target", "rounds_to_target_interp"):
        frame[column] = [stats[r][column] for r in frame["run_id"]]
    table_name = runs.get("params.report.table", pd.Series([None])).iloc[0]
    frame["paper"] = [paper_rounds(r.get("model.name", ""), r.get("partition.name", ""),
                                   int(number(r.get("fl.local_epochs")) or 1), batch(r.get("fl.batch_size")),
                                   number(r.get("fl.fraction")) or 0.0, target, table_name)
                      for r in frame.to_dict("records")]
    reference = {k[len("params.report.reference."):]: runs[k].iloc[0]
                 for k in runs.columns if k.startswith("params.report.reference.")}
    frame = add_speedups(frame, reference, varying) if reference else frame.assign(speedup=None)
    if "job" in frame:
        frame = frame.sort_values("job", kind="stable").reset_index(drop=True)
    return frame, varying, reference


def markdown(frame: pd.DataFrame, varying: list[str], target: float | None) -> str:
    """The table as Markdown: varying keys, then results (rounds-to-target as in the paper, interpolated)."""
    shown = frame[[*varying, "best_accuracy", "final_accuracy", "rounds", "rounds_to_target_interp", "speedup",
                   "paper"]].copy()
    if "fl.batch_size" in shown:
        shown["fl.batch_size"] = shown["fl.batch_size"].map(lambda b: shown_value("fl.batch_size", b))
    reached = f"rounds to {target:g}" if target else "rounds to target"
    shown = shown.rename(columns={"rounds_to_target_interp": reached})
    shown = shown[[c for c in shown.columns if shown[c].notna().any() or (c == reached and target)]]
    for key in varying:
        shown[key] = shown[key].map(lambda v: "—" if pd.isna(v) else v)
    for col in ("best_accuracy", "final_accuracy"):
        shown[col] = shown[col].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    for col in [c for c in shown.columns if c.startswith("rounds to")]:
        shown[col] = shown[col].map(lambda v: f"{v:.1f}" if pd.notna(v) else "-")
    if "speedup" in shown:
        shown["speedup"] = shown["speedup"].map(lambda v: f"{v:.1f}x" if pd.notna(v) else "")
    head = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    return head + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in shown.itertuples(index=False))


def shown_value(key: str, value: object) -> str:
    """A config value as a reader expects it: B=0 (full batch) as 'inf'."""
    return "inf" if key == "fl.batch_size" and batch(value) is None else str(value)


def label(row: Mapping[str, object], varying: list[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={shown_value(k, row[k])}" for k in varying) or str(row["run_id"])[:8]


def paper_layout(frame: pd.DataFrame, varying: list[str], reference: Mapping[str, object]) -> str:
    """Like the paper's Table 1: one row per value of the reference key, one column per value of the other key;
    cells 'rounds (speedup) [paper]'. Empty unless exactly two keys vary and one is the reference key."""
    rows_key = next((k for k in reference if k in varying), None)
    if rows_key is None or len(varying) != 2:
        return ""
    cols_key = next(k for k in varying if k != rows_key)

    def cell(r: Mapping[str, object]) -> str:
        rounds = r["rounds_to_target_interp"]
        text = "—" if pd.isna(rounds) else f"{rounds:.1f}"
        if pd.notna(r["speedup"]) and pd.notna(rounds):
            text += f" ({r['speedup']:.1f}x)"
        return text + (f" [{r['paper']}]" if r["paper"] not in ("", None) and pd.notna(r["paper"]) else "")

    cols = list(dict.fromkeys(frame[cols_key]))
    head = f"| {rows_key} | " + " | ".join(f"{cols_key}={shown_value(cols_key, c)}" for c in cols) + " |\n"
    lines = [head, "|---|" + "---|" * len(cols) + "\n"]
    for value in dict.fromkeys(frame[rows_key]):
        cells = []
        for c in cols:
            match = frame[(frame[rows_key] == value) & (frame[cols_key] == c)]
            cells.append(cell(match.iloc[0]) if len(match) else "")
        lines.append(f"| {value} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def plot(frame: pd.DataFrame, varying: list[str], accs: Mapping, traffic: Mapping, baseline: Mapping,
         out: Path) -> list[Path]:
    """accuracy vs round, accuracy vs cumulative bytes, and FL against the centralized baseline if there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, xlabel, xs_of in (("accuracy.png", "round", lambda r: [s for s, _ in accs[r]]),
                                ("accuracy_vs_bytes.png", "bytes communicated (up + down, cumulative)",
                                 lambda r: cumulative_bytes(traffic[r], [s for s, _ in accs[r]]))):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in frame.to_dict("records"):
            ax.plot(xs_of(row["run_id"]), [a for _, a in accs[row["run_id"]]], label=label(row, varying))
        for run_id, history in baseline.items():
            ax.axhline(max(a for _, a in history), color="black", linestyle="--", label=f"baseline best ({run_id[:6]})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        if "bytes" in name:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    if baseline:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in frame.to_dict("records"):
            ax.plot([s for s, _ in accs[row["run_id"]]], [a for _, a in accs[row["run_id"]]],
                    label=f"FedAvg {label(row, varying)}")
        for run_id, history in baseline.items():
            ax.plot([s for s, _ in history], [a for _, a in history], "k--", label=f"centralized ({run_id[:6]})")
        ax.set_xlabel("round (FedAvg) / epoch (centralized)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "baseline.png", dpi=110)
        plt.close(fig)
        paths.append(out / "baseline.png")
    return paths


def cumulative_bytes(traffic: Mapping[str, list[tuple[int, float]]], steps: list[int]) -> list[float]:
    """Cumulative bytes_up + bytes_down at each evaluated step."""
    per_step: dict[int, float] = {}
    for key in ("bytes_up", "bytes_down"):
        for step, value in traffic.get(key, []):
            per_step[step] = per_step.get(step, 0.0) + value
    total, out, marks = 0.0, [], set(steps)
    for step in sorted(per_step):
        total += per_step[step]
        if step in marks:
            out.append(total)
    return out if len(out) == len(steps) else [float(s) for s in steps]


def report(key: str, out_root: Path = Path("outputs/reports"), tracking_uri: str | None = None) -> Path:
    """Build the report for a sweep id or experiment name; return its directory."""
    runs, parent = find_runs(key, tracking_uri)
    is_baseline = runs.get("tags.flexp.mode", pd.Series(index=runs.index, dtype=object)) == "baseline"
    fl_runs, base_runs = runs.loc[~is_baseline].reset_index(drop=True), runs.loc[is_baseline]
    if fl_runs.empty:
        raise LookupError(f"{key!r} has no federated runs")
    accs = histories(list(fl_runs["run_id"]), "test_accuracy")
    traffic = {r: {m: h[r] for m in ("bytes_up", "bytes_down") for h in [histories([r], m)]} for r in accs}
    baseline = histories(list(base_runs["run_id"]), "test_accuracy")
    frame, varying, reference = build_table(fl_runs, accs)
    target = number(frame["fl.target_accuracy"].iloc[0]) if "fl.target_accuracy" in frame else None
    out = out_root / key.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(frame, varying, target)
    layout = paper_layout(frame, varying, reference)
    if layout:
        has_paper = any(v not in ("", None) for v in frame["paper"])
        text = (f"Rounds to {target:g} (paper's interpolation; speedup against {', '.join(reference)} = "
                f"{', '.join(str(v) for v in reference.values())}"
                f"{'; [the paper]' if has_paper else ''}):\n\n{layout}\nAll runs:\n\n{text}")
    (out / "table.md").write_text(f"# {key}\n\n{text}")
    frame.to_csv(out / "table.csv", index=False)
    paths = [out / "table.md", out / "table.csv", *plot(frame, varying, accs, traffic, baseline, out)]
    if parent:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for path in paths:
            client.log_artifact(parent, str(path), "report")
    print(text)
    print(f"wrote {out}" + (f" and logged it to parent run {parent}" if parent else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("key", help="a sweep id (tag flexp.sweep_id) or an MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", default="outputs/reports", type=Path)
    args = parser.parse_args(argv)
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///outputs/mlflow.db")
    try:
        report(args.key, args.out, uri)
    except LookupError as err:
        print(f"flexp.report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
