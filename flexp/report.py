"""`python -m flexp.report KEY [KEY ...]`: the table and plots of one or more sweeps, from MLflow into pandas.

Each KEY is a sweep id or an experiment name; several are merged (blocks of one table run on different days or
machines). Where a setting was run at several learning rates, the paper's selection picks the best per setting.
Writes outputs/reports/<name>/{table.md, table.csv[, cells.csv], accuracy.png, accuracy_vs_bytes.png[,
baseline.png]} and logs them as artifacts of each sweep's parent run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from flexp.compression import report as codec
from flexp.metrics import interpolated_rounds_to_target, rounds_to_target
from flexp.paper import NOT_REACHED, paper_missing, paper_rounds, percent
from flexp.selection import LR, best_rates, cell_keys, is_lr_grid, rates_table, unreached
from flexp.system import report as asynchrony

KEYS = ("model.name", "partition.name", "dataset.name", "fl.clients", "fl.fraction", "fl.local_epochs",
        "fl.batch_size", "fl.lr", "fl.rounds", "fl.target_accuracy", "seed", "mode", "privacy.name")


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


def collect(keys: list[str], tracking_uri: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The runs of several sweep ids or experiment names, merged (each run once); plus the sweeps' parent ids."""
    frames, parents = [], []
    for key in keys:
        runs, parent = find_runs(key, tracking_uri)
        frames.append(runs)
        parents += [parent] if parent else []
    runs = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    return runs.drop_duplicates("run_id").reset_index(drop=True), list(dict.fromkeys(parents))


def histories(run_ids: list[str], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Metric history per run as (step, value), sorted by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {r: sorted((m.step, m.value) for m in client.get_metric_history(r, metric)) for r in run_ids}


def build_table(runs: pd.DataFrame,
                accs: Mapping[str, list[tuple[int, float]]]) -> tuple[pd.DataFrame, list[str], dict]:
    """One row per run (in sweep and job order): the config keys that vary, the results, the paper's number; plus
    the varying keys and the sweep's reference setting. Raises LookupError if the runs have different targets."""
    swept = [c[len("params."):] for c in runs.columns if c.startswith("params.") and not c.startswith("params.report.")
             and c[len("params."):] not in KEYS and runs[c].nunique(dropna=False) > 1]
    params = {k: runs.get(f"params.{k}") for k in (*KEYS, *sorted(swept)) if f"params.{k}" in runs}
    frame = pd.DataFrame({k: v.values for k, v in params.items()})
    frame.insert(0, "run_id", runs["run_id"].values)
    if "tags.flexp.sweep_id" in runs:
        frame.insert(1, "sweep", runs["tags.flexp.sweep_id"].values)
    if "tags.flexp.job_num" in runs:
        frame.insert(2 if "sweep" in frame else 1, "job",
                     pd.to_numeric(runs["tags.flexp.job_num"], errors="coerce").values)
    varying = [k for k in params if frame[k].nunique(dropna=False) > 1]
    varying = [k for k in varying if k in KEYS or not implied(frame, k, [v for v in varying if v in KEYS])]
    varying = [k for k in varying if not named_apart(frame, k, varying)]
    targets = {number(t) for t in frame.get("fl.target_accuracy", pd.Series([None]))}
    if len(targets) > 1:
        raise LookupError(f"the runs have different fl.target_accuracy values {sorted(map(str, targets))}; "
                          "report them separately")
    target = targets.pop()
    stats = summarise(accs, target)
    for column in ("best_accuracy", "final_accuracy", "rounds", "rounds_to_target", "rounds_to_target_interp"):
        frame[column] = [stats[r][column] for r in frame["run_id"]]
    frame["stopped"] = stopped(runs)
    frame = with_paper(frame, target, runs.get("params.report.table", pd.Series([None])).iloc[0])
    reference = {k[len("params.report.reference."):]: runs[k].dropna().iloc[0]
                 for k in runs.columns if k.startswith("params.report.reference.") and runs[k].notna().any()}
    frame = add_speedups(frame, reference, varying) if reference else frame.assign(speedup=None)
    order = [k for k in ("sweep", "job") if k in frame]
    if order:
        frame = frame.sort_values(order, kind="stable").reset_index(drop=True)
    return frame, varying, reference


def stopped(runs: pd.DataFrame) -> list[str]:
    """Per run, why it ended short of its budget without the target: 'pruned' (fl.prune), 'diverged' (a FAILED run of
    a sweep), 'running' or 'killed' (not ended yet, or its process died: resume it), else ''."""
    pruned = runs.get("metrics.stopped_at_round", pd.Series(float("nan"), index=runs.index))
    status = runs.get("status", pd.Series("", index=runs.index))
    unfinished = {"FAILED": "diverged", "RUNNING": "running", "SCHEDULED": "running", "KILLED": "killed"}
    return ["pruned" if pd.notna(p) else unfinished.get(s, "") for p, s in zip(pruned, status)]


def implied(frame: pd.DataFrame, key: str, by: list[str]) -> bool:
    """True if `key` is fixed by the keys `by` (e.g. partition.shards_per_client by partition.name)."""
    return bool(by) and frame.groupby(by, dropna=False)[key].nunique(dropna=False).max() <= 1


def named_apart(frame: pd.DataFrame, key: str, varying: list[str]) -> bool:
    """True for a `<section>._target_` that the varying `<section>.name` tells apart already (strategy=fedavg,fedprox
    logs each built-in's class too)."""
    name = f"{key.removesuffix('._target_')}.name"
    return key.endswith("._target_") and name in varying and implied(frame, key, [name])


def with_paper(frame: pd.DataFrame, target: float | None, table: str | None) -> pd.DataFrame:
    """Adds `paper` (the paper's rounds, NOT_REACHED never reached, '' none) and `paper_note` (why there is none)."""
    papers, notes = [], []
    for r in frame.to_dict("records"):
        setting = (str(r.get("model.name", "")), str(r.get("partition.name", "")),
                   int(number(r.get("fl.local_epochs")) or 1), batch(r.get("fl.batch_size")),
                   number(r.get("fl.fraction")) or 0.0, target, table)
        note = paper_missing(*setting, dataset=str(r.get("dataset.name", "mnist")))
        papers.append("" if note else paper_rounds(*setting))
        notes.append(note)
    return frame.assign(paper=papers, paper_note=notes)


def with_ratio(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds `ratio`: our rounds to target over the paper's, where both are numbers."""
    def ratio(r: Mapping[str, object]) -> float | None:
        paper, ours = r["paper"], r["rounds_to_target_interp"]
        return ours / paper if isinstance(paper, (int, float)) and paper and pd.notna(ours) else None
    return frame.assign(ratio=[ratio(r) for r in frame.to_dict("records")])


def paper_notes(frame: pd.DataFrame) -> str:
    """The reasons the paper column is empty, one line each ('' if it never is)."""
    return "".join(f"\n{note}\n" for note in dict.fromkeys(frame["paper_note"]) if note)


def has_paper(frame: pd.DataFrame) -> bool:
    """True when some row has the paper's number (rounds, or its mark for not reached) beside it."""
    return "paper" in frame and any(p not in ("", None) and pd.notna(p) for p in frame["paper"])


MARKS = {">": ">N: pruned after N rounds, once another rate had reached the target in fewer (fl.prune)",
         "×": "×: diverged", "…": "…N: running (or its process died) after N rounds",
         NOT_REACHED: f"{NOT_REACHED}: not reached in the budget"}


def unreached_marks(frame: pd.DataFrame) -> list[str]:
    """The mark of each run that did not reach the target (see selection.unreached)."""
    missing = frame.loc[frame["rounds_to_target_interp"].isna()]
    if "stopped" not in frame or "rounds" not in frame:
        return [NOT_REACHED] * len(missing)
    return [unreached(r) for _, r in missing.iterrows()]


def marks_legend(marks: list[str]) -> str:
    """What the marks that appear mean, '; '-separated ('' when none does)."""
    return "; ".join(text for mark, text in MARKS.items() if any(m.startswith(mark) for m in marks))


def markdown(frame: pd.DataFrame, varying: list[str], target: float | None) -> str:
    """The table as Markdown: varying keys, then results (rounds-to-target as in the paper, interpolated), the
    paper's number where some run has one, and a legend of the marks for a target not reached."""
    reached = f"rounds to {percent(target)}" if target else "rounds to target"
    shown = frame[[*varying, "best_accuracy", "final_accuracy", "rounds", "rounds_to_target_interp", "speedup",
                   *(["paper"] if has_paper(frame) else [])]].copy()
    if "paper" in shown:
        shown["paper"] = [p if p != "" or not n else "n/a" for p, n in zip(frame["paper"], frame["paper_note"])]
    if "fl.batch_size" in shown:
        shown["fl.batch_size"] = shown["fl.batch_size"].map(lambda b: shown_value("fl.batch_size", b))
    shown = shown.rename(columns={"rounds_to_target_interp": reached})
    shown = shown[[c for c in shown.columns if shown[c].notna().any() or (c == reached and target)]]
    for key in varying:
        shown[key] = shown[key].map(lambda v: "n/a" if pd.isna(v) else v)
    for col in ("best_accuracy", "final_accuracy"):
        shown[col] = shown[col].map(lambda v: f"{v:.4f}" if pd.notna(v) else "")
    if reached in shown:
        marks = iter(unreached_marks(frame))
        shown[reached] = [next(marks) if pd.isna(v) else f"{v:.1f}" for v in shown[reached]]
    if "speedup" in shown:
        shown["speedup"] = shown["speedup"].map(lambda v: f"{v:.1f}x" if pd.notna(v) else "")
    head = "| " + " | ".join(shown.columns) + " |\n|" + "---|" * len(shown.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in shown.itertuples(index=False))
    paper_missed = "paper" in shown and (shown["paper"] == NOT_REACHED).any()
    legend = "; ".join(filter(None, [marks_legend(unreached_marks(frame)) if reached in shown else "",
                                     f"paper {NOT_REACHED}: the paper did not reach it" if paper_missed else ""]))
    return head + body + (f"\n{legend}.\n" if legend else "")


PARTITIONS = {"iid": "IID", "shards": "non-IID"}   # as the paper's column titles
SHORT = {"fl.batch_size": "B", "fl.fraction": "C", "fl.local_epochs": "E", "fl.clients": "K", "fl.lr": "η"}
PAPER_ORDER = ("partition.name", "fl.batch_size", "fl.local_epochs", "fl.fraction")


def shown_value(key: str, value: object) -> str:
    """A config value as a reader expects it: B=0 (full batch) as 'inf'."""
    return "inf" if key == "fl.batch_size" and batch(value) is None else str(value)


def paper_rank(key: str) -> int:
    """Where a key's column goes: the paper's keys first, in its order."""
    return PAPER_ORDER.index(key) if key in PAPER_ORDER else len(PAPER_ORDER)


def column_title(keys: list[str], values: tuple) -> str:
    """A layout column's title, as the paper writes it: 'IID B=inf'."""
    return " ".join(PARTITIONS.get(str(v), str(v)) if k == "partition.name"
                    else f"{SHORT.get(k, k)}={shown_value(k, v)}" for k, v in zip(keys, values))


def column_order(key: str, value: object) -> tuple:
    """Sort key for the paper's column order: IID before non-IID, B=inf first, then larger batches first."""
    if key == "partition.name":
        return (list(PARTITIONS).index(value) if value in PARTITIONS else len(PARTITIONS), str(value))
    if key == "fl.batch_size":
        return (0, 0.0) if batch(value) is None else (1, -float(batch(value)))
    try:
        return (0, float(str(value)))
    except ValueError:
        return (1, str(value))


def label(row: Mapping[str, object], varying: list[str]) -> str:
    """A run's legend entry: the keys that vary as the paper writes them ('IID B=10 C=0.1 η=0.1'), leaving out keys
    a run does not have (a codec's bits beside one with a ratio)."""
    keys = [k for k in varying if str(row[k]) not in ("nan", "None", "n/a", "")]
    return column_title(keys, tuple(row[k] for k in keys)) or str(row["run_id"])[:8]


def paper_layout(frame: pd.DataFrame, keys: list[str], reference: Mapping[str, object]) -> str:
    """Like the paper's Table 1: one row per value of the reference key, one column per setting of the other keys
    (IID B=inf, IID B=10, non-IID B=inf, non-IID B=10); cells 'rounds (speedup) [paper; ours/paper] η rate'.
    Empty unless the reference key and at least one other vary and each row and column meet in one run."""
    rows_key = next((k for k in reference if k in keys), None)
    fixed = [k for k in ("partition.name", "fl.batch_size") if k in frame and k not in keys]   # name the block
    cols_keys = sorted([*fixed, *(k for k in keys if k != rows_key)], key=paper_rank)
    if rows_key is None or not cols_keys or frame.duplicated([rows_key, *cols_keys]).any():
        return ""
    cols = sorted(dict.fromkeys(frame[cols_keys].itertuples(index=False, name=None)),
                  key=lambda c: [column_order(k, v) for k, v in zip(cols_keys, c)])
    rows = sorted(dict.fromkeys(frame[rows_key]), key=lambda v: column_order(rows_key, v))
    lines = [f"| {rows_key.split('.')[-1]} | " + " | ".join(column_title(cols_keys, c) for c in cols) + " |\n",
             "|---|" + "---|" * len(cols) + "\n"]
    for value in rows:
        cells = []
        for c in cols:
            match = frame[(frame[rows_key] == value) & (frame[cols_keys] == list(c)).all(axis=1)]
            cells.append(layout_cell(match.iloc[0]) if len(match) else "")
        lines.append(f"| {value} | " + " | ".join(cells) + " |\n")
    return "".join(lines)


def in_paper_order(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted as the paper orders settings (IID before non-IID, B=inf first, C ascending), stably."""
    order = frame[keys].apply(lambda r: tuple(column_order(k, r[k]) for k in keys), axis=1) if keys else None
    return frame if order is None else frame.iloc[sorted(range(len(frame)), key=lambda i: order.iloc[i])]


def layout_cell(r: Mapping[str, object]) -> str:
    """'87.3 (3.6x) [87; 1.00] η 0.1†': rounds, speedup, the paper's rounds and ours/paper, the chosen rate."""
    rounds = r["rounds_to_target_interp"]
    text = NOT_REACHED if pd.isna(rounds) else f"{rounds:.1f}"
    if pd.notna(r.get("speedup")) and pd.notna(rounds):
        text += f" ({r['speedup']:.1f}x)"
    if r.get("paper") not in ("", None) and pd.notna(r.get("paper")):
        ratio = r.get("ratio")
        text += f" [{r['paper']}" + (f"; {ratio:.2f}]" if ratio is not None and pd.notna(ratio) else "]")
    if "lr_edge" in r and pd.notna(rounds):
        text += f" η {number(r[LR]):g}" + ("†" if r["lr_edge"] else "")
    return text


BLOCK_KEYS = ("partition.name", "fl.batch_size")   # the paper's Table 1 columns


def blocks(frame: pd.DataFrame, varying: list[str]) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """(title, runs, legend keys) per panel: one per partition x B block when several are shown (Table 1's columns,
    in its order), else one panel of every run."""
    keys = [k for k in BLOCK_KEYS if k in varying]
    combos = sorted(dict.fromkeys(frame[keys].itertuples(index=False, name=None)),
                    key=lambda c: [column_order(k, v) for k, v in zip(keys, c)]) if keys else []
    if len(combos) < 2:
        return [("", frame, varying)]
    rest = [k for k in varying if k not in keys]
    return [(column_title(keys, c), frame[(frame[keys] == list(c)).all(axis=1)], rest) for c in combos]


def plot(frame: pd.DataFrame, varying: list[str], accs: Mapping, traffic: Mapping, baseline: Mapping,
         out: Path, title: str, target: float | None) -> list[Path]:
    """accuracy vs round, accuracy vs cumulative bytes, and FL against the centralized baseline if there is one;
    each titled, with a dashed line at the target and the legend outside the axes; one panel per partition x B
    block when there are several (Table 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def decorate(ax: object, panel: str, outside: bool) -> None:
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {percent(target)}")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if panel:
            ax.set_title(panel, fontsize=9)
        beside = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        where = beside if outside else dict(loc="lower right")
        ax.legend(fontsize=7, **where)

    def save(fig: object, name: str, what: str) -> Path:
        fig.suptitle(f"{title}: {what}", fontsize=10)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return out / name

    panels = blocks(frame, varying)
    rows, cols = math.ceil(len(panels) / 2), min(len(panels), 2)
    paths = []
    for name, xlabel, xs_of in (("accuracy.png", "round", lambda r: [s for s, _ in accs[r]]),
                                ("accuracy_vs_bytes.png", "bytes communicated (up + down, cumulative)",
                                 lambda r: cumulative_bytes(traffic[r], [s for s, _ in accs[r]]))):
        fig, axes = plt.subplots(rows, cols, figsize=(7 * cols if cols > 1 else 7, 4.5 * rows), squeeze=False)
        for ax, (panel, runs, keys) in zip(axes.flat, panels):
            for row in runs.to_dict("records"):
                ax.plot(xs_of(row["run_id"]), [a for _, a in accs[row["run_id"]]], label=label(row, keys))
            for run_id, history in baseline.items():
                ax.axhline(max(a for _, a in history), color="black", linestyle=":",
                           label=f"baseline best ({run_id[:6]})")
            ax.set_xlabel(xlabel)
            lengths = [accs[r][-1][0] for r in runs["run_id"] if accs[r]]
            if "bytes" in name or (lengths and max(lengths) > 10 * max(min(lengths), 1)):   # 25 to 4,000 rounds
                ax.set_xscale("log")
            decorate(ax, panel, outside=len(panels) == 1)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        paths.append(save(fig, name, f"test accuracy against {xlabel.split(' (')[0]}"))
    if baseline:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row in frame.to_dict("records"):
            ax.plot([s for s, _ in accs[row["run_id"]]], [a for _, a in accs[row["run_id"]]],
                    label=f"FedAvg {label(row, varying)}")
        for run_id, history in baseline.items():
            ax.plot([s for s, _ in history], [a for _, a in history], "k:", label=f"centralized ({run_id[:6]})")
        ax.set_xlabel("round (FedAvg) / epoch (centralized)")
        decorate(ax, "", outside=True)
        paths.append(save(fig, "baseline.png", "FedAvg against centralized training"))
    return paths


def plot_title(frame: pd.DataFrame, tuned: bool) -> str:
    """What every curve shares, e.g. '2nn on mnist, E=1' (+ ', best η per setting')."""
    first = frame.iloc[0]
    parts = [f"{first.get('model.name', '')} on {first.get('dataset.name', '')}"]
    if "fl.local_epochs" in frame and frame["fl.local_epochs"].nunique() == 1:
        parts.append(f"E={first['fl.local_epochs']}")
    return ", ".join(parts) + (", best η per setting" if tuned else "")


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


PRIVACY = "privacy"   # report.table of a privacy-utility sweep (sweeps/sweep/privacy.yaml)
NON_PRIVATE = "non-private"
SHARED = (("privacy.clip", "clip"), ("privacy.delta_used", "δ"), ("privacy.sampling_accounted", "sampling accounted"),
          ("privacy.accountant_used", "accountant"))


def spent(value: object) -> float:
    """A logged epsilon as a number: MLflow stores inf (no noise) as the largest float; nan when none was logged."""
    value = math.nan if value is None else float(value)
    return math.inf if value >= sys.float_info.max else value


def level(mechanism: str, target: object, noise: float, several: bool) -> str:
    """A run's privacy level: its target epsilon ('8', 'inf'), else its noise multiplier ('z=1.1'); 'non-private'
    without privacy; the mechanism first when the runs use several."""
    if mechanism == "none":
        return NON_PRIVATE
    unset = target is None or pd.isna(target) or str(target).lower() in ("none", "null")
    text = f"z={noise:g}" if unset else f"{float(str(target)):g}"
    return f"{mechanism} {text}" if several else text


def privacy_table(runs: pd.DataFrame, frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per privacy level, the least epsilon first and the non-private run last: the noise multiplier used,
    epsilon spent after the last round, final and best test accuracy, rounds; plus how many runs it leaves out (of a
    level run more than once it keeps the latest finished run)."""
    def param(key: str) -> pd.Series:
        return runs.get(f"params.{key}", pd.Series(None, index=runs.index, dtype=object))

    mechanism = param("privacy.name").fillna("none").astype(str)
    several = mechanism[mechanism != "none"].nunique() > 1
    noise = pd.to_numeric(param("privacy.noise_multiplier_used"), errors="coerce")
    table = pd.DataFrame({
        "run_id": runs["run_id"], "mechanism": mechanism,
        "level": [level(m, t, z, several) for m, t, z in zip(mechanism, param("privacy.target_epsilon"), noise)],
        "noise_multiplier": noise,
        "epsilon": [spent(e) for e in runs.get("metrics.epsilon", pd.Series(math.nan, index=runs.index))],
        "_done": runs.get("status", pd.Series("", index=runs.index)) == "FINISHED",
        "_start": runs.get("start_time", pd.Series(0, index=runs.index)),
    }, index=runs.index).merge(frame[["run_id", "final_accuracy", "best_accuracy", "rounds"]], on="run_id")
    kept = table.sort_values(["_done", "_start"], kind="stable").drop_duplicates("level", keep="last")
    kept = kept.assign(_public=kept["mechanism"] == "none", _eps=kept["epsilon"].fillna(math.inf),
                       _z=-kept["noise_multiplier"].fillna(0.0))
    kept = kept.sort_values(["_public", "mechanism", "_eps", "_z"], kind="stable")
    return kept.drop(columns=[c for c in kept if c.startswith("_")]).reset_index(drop=True), len(table) - len(kept)


def privacy_caption(runs: pd.DataFrame, left_out: int) -> str:
    """The table's caption: what the private runs share (clip, delta, sampling, accountant: its value, or 'varies')
    and how many runs of a level run again it leaves out."""
    private = runs.loc[runs.get("params.privacy.name", pd.Series("none", index=runs.index)).fillna("none") != "none"]
    shared = []
    for key, name in SHARED:
        values = private.get(f"params.{key}", pd.Series(dtype=object)).dropna().unique()
        if len(values) > 1:
            shared.append(f"{name} varies")
        elif len(values):
            shared.append(f"{name} {number(values[0]):.3g}" if key == "privacy.delta_used" else f"{name} {values[0]}")
    again = f"; {left_out} earlier run(s) of a level run again left out" if left_out else ""
    return (f"Privacy against utility, one row per privacy level (target ε; the noise multiplier calibrated to it for "
            f"the planned rounds; ε spent after the last round{'; ' if shared else ''}{', '.join(shared)}{again}):")


def privacy_markdown(table: pd.DataFrame, caption: str) -> str:
    """The privacy-utility table as Markdown under its caption."""
    def eps(value: float) -> str:
        return "—" if pd.isna(value) else "∞" if math.isinf(value) else f"{value:.2f}"

    lines = [f"{caption}\n\n", "| target ε | noise multiplier | ε spent | final accuracy | best accuracy | rounds |\n",
             "|---|---|---|---|---|---|\n"]
    for r in table.to_dict("records"):
        noise = "—" if pd.isna(r["noise_multiplier"]) else f"{r['noise_multiplier']:.3g}"
        lines.append(f"| {r['level']} | {noise} | {eps(r['epsilon'])} | {r['final_accuracy']:.4f} | "
                     f"{r['best_accuracy']:.4f} | {r['rounds']} |\n")
    return "".join(lines)


def level_label(row: Mapping[str, object]) -> str:
    """A privacy level's legend entry: 'ε = 8 (z=0.87)', 'ε = inf (clipping, no noise)', 'non-private'."""
    if row["mechanism"] == "none":
        return NON_PRIVATE
    how = "clipping, no noise" if row["epsilon"] == math.inf else f"z={row['noise_multiplier']:.2g}"
    return f"ε = {row['level']} ({how})"


def epsilon_axes(ax: object, table: pd.DataFrame) -> None:
    """Final accuracy against epsilon spent (log x, each point marked with its noise multiplier); a level without
    noise and the non-private run as horizontal lines."""
    from matplotlib.ticker import NullFormatter

    finite = table.loc[table["epsilon"].between(0, math.inf, inclusive="neither")]
    ax.plot(finite["epsilon"], finite["final_accuracy"], "o-", label="final accuracy")
    for r in finite.to_dict("records"):
        ax.annotate(f"z={r['noise_multiplier']:.2g}", (r["epsilon"], r["final_accuracy"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=7)
    for r in table.loc[~table.index.isin(finite.index)].to_dict("records"):
        public = r["mechanism"] == "none"
        ax.axhline(r["final_accuracy"], color="black" if public else "gray", linestyle=":" if public else "--",
                   label=f"{level_label(r)}: {r['final_accuracy']:.4f}")
    ax.set_xscale("log")
    ax.set_xticks(list(finite["epsilon"]), [f"{e:.3g}" for e in finite["epsilon"]])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε spent (log scale)")
    ax.set_ylabel("final test accuracy")
    ax.legend(fontsize=7, loc="lower right")


def rounds_axes(ax: object, table: pd.DataFrame, accs: Mapping[str, list[tuple[int, float]]]) -> None:
    """Test accuracy against round, one line per privacy level (the non-private run dotted black)."""
    for r in table.to_dict("records"):
        style = dict(color="black", linestyle=":") if r["mechanism"] == "none" else {}
        history = accs[r["run_id"]]
        ax.plot([s for s, _ in history], [a for _, a in history], label=level_label(r), **style)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def plot_privacy(table: pd.DataFrame, accs: Mapping[str, list[tuple[int, float]]], out: Path,
                 title: str) -> list[Path]:
    """accuracy_vs_epsilon.png and accuracy_by_epsilon.png: the privacy-utility trade-off, and how each level trains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, what, draw in (("accuracy_vs_epsilon.png", "final test accuracy against ε",
                              lambda ax: epsilon_axes(ax, table)),
                             ("accuracy_by_epsilon.png", "test accuracy against round per privacy level",
                              lambda ax: rounds_axes(ax, table, accs))):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        draw(ax)
        ax.grid(alpha=0.3, which="both")
        fig.suptitle(f"{title}: {what}", fontsize=10)
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)
    return paths


def declared(runs: pd.DataFrame, key: str) -> str | None:
    """A `report.<key>` the runs' preset declares (the first run's that has one), e.g. report.table."""
    values = runs.get(f"params.report.{key}", pd.Series(dtype=object)).dropna()
    return str(values.iloc[0]) if len(values) else None


def report(keys: str | list[str], out_root: Path = Path("outputs/reports"), tracking_uri: str | None = None,
           name: str | None = None) -> Path:
    """Build the report for one or more sweep ids or experiment names (merged); return its directory."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    runs, parents = collect(keys, tracking_uri)
    is_baseline = runs.get("tags.flexp.mode", pd.Series(index=runs.index, dtype=object)) == "baseline"
    fl_runs, base_runs = runs.loc[~is_baseline].reset_index(drop=True), runs.loc[is_baseline]
    if fl_runs.empty:
        raise LookupError(f"{' '.join(keys)!r} has no federated runs")
    accs = histories(list(fl_runs["run_id"]), "test_accuracy")
    traffic = {r: {m: h[r] for m in ("bytes_up", "bytes_down") for h in [histories([r], m)]} for r in accs}
    hours = {r: h for r, h in histories(list(accs), "sim_hours").items() if h}
    baseline = histories(list(base_runs["run_id"]), "test_accuracy")
    frame, varying, reference = build_table(fl_runs, accs)
    target = number(frame["fl.target_accuracy"].iloc[0]) if "fl.target_accuracy" in frame else None
    name = name or "+".join(keys)
    out = out_root / name.replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    text, shown, shown_keys = tables(frame, varying, reference, target)
    privacy = privacy_table(fl_runs, frame) if declared(fl_runs, "table") == PRIVACY else None
    if privacy is not None:
        text = f"{privacy_markdown(privacy[0], privacy_caption(fl_runs, privacy[1]))}\nAll runs:\n\n{text}"
    codecs, left_out = codec.compression_table(fl_runs, frame, traffic, hours) \
        if declared(fl_runs, "table") == codec.COMPRESSION else (None, 0)
    if codecs is not None:
        text = f"{codec.compression_markdown(codecs, target, left_out)}\nAll runs:\n\n{text}"
    updates = histories(list(accs), "clients") if declared(fl_runs, "table") == asynchrony.ASYNCHRONY else None
    arms, arms_left_out = asynchrony.asynchrony_table(fl_runs, frame, hours, traffic, updates) \
        if updates is not None else (None, 0)
    if arms is not None:
        text = f"{asynchrony.asynchrony_markdown(arms, target, arms_left_out)}\nAll runs:\n\n{text}"
    (out / "table.md").write_text(f"# {name}\n\n{text}")
    frame.to_csv(out / "table.csv", index=False)
    paths = [out / "table.md", out / "table.csv"]
    if shown is not frame:
        shown.to_csv(out / "cells.csv", index=False)
        paths.append(out / "cells.csv")
    paths += plot(shown, shown_keys, accs, traffic, baseline, out, plot_title(frame, shown is not frame), target)
    if privacy is not None:
        privacy[0].to_csv(out / "privacy.csv", index=False)
        paths += [out / "privacy.csv", *plot_privacy(privacy[0], accs, out, plot_title(frame, False))]
    paths += time_plots(frame, varying, codecs, accs, traffic, hours, out, target) if arms is None \
        else asynchrony.asynchrony_files(arms, accs, hours, out, plot_title(frame, False), target)
    if parents:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for parent in parents:
            for path in paths:
                client.log_artifact(parent, str(path), "report")
    print(text)
    print(f"wrote {out}" + (f" and logged it to parent run(s) {', '.join(parents)}" if parents else ""))
    return out


def time_plots(frame: pd.DataFrame, varying: list[str], codecs: pd.DataFrame | None, accs: Mapping,
               traffic: Mapping, hours: Mapping, out: Path, target: float | None) -> list[Path]:
    """Accuracy against simulated hours where runs have a system model; for a codec sweep (codecs) also against MB
    sent up, one panel per partition and deployment (compression.csv holds the table)."""
    title = plot_title(frame, False)
    if codecs is None:
        panels = {"": [(r["run_id"], label(r, varying)) for r in frame.to_dict("records")]}
        made = [codec.plot_panels(panels, accs, codec.hours_of(hours), "simulated hours", out / "accuracy_vs_hours.png",
                                  title, target)]
        return [p for p in made if p is not None]
    codecs.to_csv(out / "compression.csv", index=False)
    panels = codec.panels_of(codecs)
    made = [codec.plot_panels(panels, accs, codec.hours_of(hours), "simulated hours", out / "accuracy_vs_hours.png",
                              title, target),
            codec.plot_panels(panels, accs, codec.mb_up_of(traffic), "MB sent up", out / "accuracy_vs_mb_up.png",
                              title, target)]
    return [out / "compression.csv", *(p for p in made if p is not None)]


def tables(frame: pd.DataFrame, varying: list[str], reference: Mapping[str, object],
           target: float | None) -> tuple[str, pd.DataFrame, list[str]]:
    """The report's Markdown, each table under a caption naming only what it holds; the rows it plots (the best
    rate per setting on a learning-rate grid, else every run) and the keys that label them."""
    reached = f"Rounds to {percent(target)}" if target else "Rounds to target"
    against = (f"speedup against {', '.join(f'{k} = {v}' for k, v in reference.items())} in the same column"
               if reference else "no speedups (the sweep names no report.reference row)")
    cells = sorted(cell_keys(varying), key=paper_rank)
    if is_lr_grid(frame, cells):
        best = with_ratio(add_speedups(best_rates(frame, cells), reference, cells) if reference
                          else best_rates(frame, cells).assign(speedup=None))
        edges = best.loc[best["lr_edge"] & best["reached"]]
        rows = [*(k for k in reference if k not in cells and k in best), *cells]   # C is the rows even if fixed
        none_reached = f"; {NOT_REACHED}: no rate reached the target" if not best["reached"].all() else ""
        layout = paper_layout(best, rows, reference)
        text = (f"{reached}, best learning rate per setting (fewest interpolated rounds; ties to the smaller rate"
                f"{none_reached}); {against}{paper_caption(best)}; η the chosen rate, † at an edge of the rates "
                f"tried:\n\n{layout}") if layout else best_rate_lines(best, reached)
        if len(edges):
            text += "\nBest rate at an edge of the grid (widen it there): " + "; ".join(
                " ".join(filter(None, (column_title(cells, tuple(r[k] for k in cells)), f"η={number(r[LR]):g}")))
                for r in edges.to_dict("records")) + "\n"
        legend = marks_legend(unreached_marks(frame))
        text += (f"\nEvery learning rate tried ({reached.lower()}; bold: chosen{'; ' if legend else ''}{legend}):\n\n"
                 f"{rates_table(in_paper_order(frame, cells), cells, shown_value)}\nAll runs:\n\n"
                 f"{markdown(frame, varying, target)}")
        return text + paper_notes(frame), best, [*cells, LR]
    layout = paper_layout(with_ratio(frame), varying, reference)
    text = markdown(frame, varying, target)
    if layout:
        missed = f"{NOT_REACHED}: not reached; " if frame["rounds_to_target_interp"].isna().any() else ""
        text = (f"{reached}, interpolated between evaluations as the paper does ({missed}{against}"
                f"{paper_caption(frame)}):\n\n{layout}\nAll runs:\n\n{text}")
    return text + paper_notes(frame), frame, varying


def best_rate_lines(best: pd.DataFrame, reached: str) -> str:
    """The best rate of each setting in words, where no table in the paper's layout can be drawn (a rate grid of one
    setting, or of settings without the reference key)."""
    lines = []
    for row in best.to_dict("records"):
        rounds = f"{number(row['rounds_to_target_interp']):.1f} rounds" if row["reached"] else "not reached by any rate"
        lines.append(f"- {reached.lower()}: {rounds}; best rate η={number(row[LR]):g} (of {row['lrs_tried']} tried, "
                     f"best accuracy {number(row['best_accuracy']):.4f})\n")
    return "".join(lines)


def paper_caption(frame: pd.DataFrame) -> str:
    """The caption's part on the paper's numbers in brackets, where some cell has one."""
    if not has_paper(frame):
        return ""
    missed = f" ({NOT_REACHED}: it did not reach the target)" if (frame["paper"] == NOT_REACHED).any() else ""
    return f"; [the paper's rounds{missed}; ours/paper]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexp.report", description=__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="+", metavar="KEY",
                        help="a sweep id (tag flexp.sweep_id) or an MLflow experiment name; several are merged")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///outputs/mlflow.db")
    parser.add_argument("--out", default="outputs/reports", type=Path)
    parser.add_argument("--name", default=None, help="the report's folder under --out (default: the keys joined by +)")
    args = parser.parse_args(argv)
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///outputs/mlflow.db")
    try:
        report(args.keys, args.out, uri, args.name)
    except LookupError as err:
        print(f"flexp.report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
