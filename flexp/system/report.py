"""The report's sync-versus-async table for a `report.table=asynchrony` sweep (sweeps/sweep/asynchrony.yaml): per
partition, each arm's accuracy, server steps, client updates, bytes up, and steps and simulated hours to the target,
with how many times sooner than synchronous FedAvg it gets there. Used by flexp.report."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from flexp.compression.report import MB, History, cell, hours_at, hours_of, param, plot_panels, present, total

ASYNCHRONY = "asynchrony"  # report.table of a sync-versus-async sweep
PUBLISHED = "FedBuff (Nguyen et al. 2022) reports 3.3x more efficient than synchronous FL"
NAMES = {"fedavg": "FedAvg", "fedbuff": "FedBuff"}
SETUP = {"dataset.name": "dataset", "model.name": "model", "fl.clients": "K", "fl.local_epochs": "E",
         "fl.batch_size": "B", "fl.lr": "lr", "system.name": "devices", "system.spread": "spread"}


def per_round(row: Mapping[str, object]) -> int:
    """m = max(round(C K), 1): the clients of a synchronous round (and async.concurrency's default)."""
    return max(round(float(row.get("fl.fraction") or 0) * int(float(row.get("fl.clients") or 1))), 1)


def arm_label(row: Mapping[str, object]) -> str:
    """'FedAvg sync, 20 a round' or 'FedBuff, buffer 10 of 20': the arm as the table and legends name it."""
    name = str(row.get("strategy.name") or "fedavg")
    shown = NAMES.get(name, name)
    if not is_async(row):
        return f"{shown} sync, {per_round(row)} a round"
    concurrency = row.get("async.concurrency")
    training = int(float(concurrency)) if present(concurrency) else per_round(row)
    return f"{shown}, buffer {int(float(row['strategy.buffer_size']))} of {training}"


def is_async(row: Mapping[str, object]) -> bool:
    """True for a run of an algorithm with a buffer (it ran on flexp.asynchronous's clock)."""
    return present(row.get("strategy.buffer_size"))


def asynchrony_table(runs: pd.DataFrame, frame: pd.DataFrame, hours: History, traffic: Mapping[str, History],
                     updates: History) -> tuple[pd.DataFrame, int]:
    """One row per partition and arm (of one run more than once, the latest finished run), sync first: final
    accuracy, server steps, client updates aggregated (the `clients` history summed), MB up, steps and simulated
    hours to the target (interpolated as the paper does) and in all, and sync's hours to the target over this
    row's (`faster`); plus the setup each run shares and how many runs it leaves out."""
    keys = ("partition.name", "strategy.name", "strategy.buffer_size", "async.concurrency", "fl.fraction", *SETUP)
    info = pd.DataFrame({"run_id": runs["run_id"].values, **{k: param(runs, k).values for k in keys},
                         "_done": (runs.get("status", pd.Series("", index=runs.index)) == "FINISHED").values,
                         "_start": list(runs.get("start_time", pd.Series(0, index=runs.index)))})
    results = frame.set_index("run_id")
    rows = [arm_row(r, results.loc[r["run_id"]], hours.get(r["run_id"], []), traffic.get(r["run_id"], {}),
                    updates.get(r["run_id"], [])) for r in info.to_dict("records")]
    found = pd.DataFrame(rows)
    table = found.sort_values(["_done", "_start"], kind="stable").drop_duplicates(
        ["partition", "arm"], keep="last").drop(columns=["_done", "_start"])
    table = table.loc[table.sort_values(["partition", "_async"], kind="stable").index].reset_index(drop=True)
    sync = table.loc[~table["_async"]].drop_duplicates("partition").set_index("partition")["hours_to_target"]
    table["faster"] = [ratio(sync.get(p), h) for p, h in zip(table["partition"], table["hours_to_target"])]
    return table.drop(columns="_async"), len(found) - len(table)


def arm_row(info: Mapping[str, object], result: pd.Series, hours: list[tuple[int, float]],
            traffic: Mapping[str, list[tuple[int, float]]], updates: list[tuple[int, float]]) -> dict[str, object]:
    """A run's row of the table (before the ratio to sync), from its params, its results and its histories."""
    reached = result["rounds_to_target_interp"]
    reached = None if reached is None or pd.isna(reached) else float(reached)
    return {"partition": info["partition.name"], "arm": arm_label(info), "final_accuracy": result["final_accuracy"],
            "steps": result["rounds"], "updates": int(total(updates)) if updates else None,
            "mb_up": total(traffic.get("bytes_up", [])) / MB, "steps_to_target": reached,
            "hours_to_target": hours_at(hours, reached), "sim_hours": hours[-1][1] if hours else None,
            **{name: info[key] for key, name in SETUP.items()}, "run_id": info["run_id"],
            "_async": is_async(info), "_done": info["_done"], "_start": info["_start"]}


def ratio(reference: float | None, mine: float | None) -> float | None:
    """reference / mine; None when either is missing (a target not reached) or mine is 0."""
    if reference is None or mine is None or pd.isna(reference) or pd.isna(mine) or not mine:
        return None
    return float(reference) / float(mine)


def setup(table: pd.DataFrame) -> str:
    """'mnist 2nn, K=100, E=1, B=10, lr 0.1, heavy_tailed devices (log-normal spread 1.0)': what every run shares."""
    def one(name: str) -> str:
        values = table[name].dropna().astype(str).unique() if name in table else []
        return values[0] if len(values) == 1 else "varies" if len(values) else "?"
    spread = one("spread")
    spread_note = f" (log-normal spread {spread})" if spread not in ("?", "varies") and float(spread) > 0 else ""
    return (f"{one('dataset')} {one('model')}, K={one('K')}, E={one('E')}, B={one('B')}, lr {one('lr')}, "
            f"{one('devices')} devices{spread_note}")


def asynchrony_markdown(table: pd.DataFrame, target: float | None, left_out: int = 0) -> str:
    """The sync-versus-async table as Markdown under a caption naming the setup, each column and FedBuff's figure."""
    goal = f"{100 * target:g}%" if target else "the target"
    head = (f"| partition | arm | final acc. | server steps | client updates | MB up | steps to {goal} | "
            f"sim. hours to {goal} | sim. hours | × faster to {goal} than sync |\n" + "|---" * 10 + "|\n")

    lines = [f"| {r['partition']} | {r['arm']} | {cell(r['final_accuracy'], '.4f')} | {r['steps']} | "
             f"{cell(r['updates'], ',')} | {cell(r['mb_up'], ',.1f')} | {cell(r['steps_to_target'], '.1f')} | "
             f"{cell(r['hours_to_target'], '.3g')} | {cell(r['sim_hours'], '.3g')} | {cell(r['faster'], '.2f')} |"
             for r in table.to_dict("records")]
    again = f"; {left_out} earlier run(s) of an arm run again on the same partition left out" if left_out else ""
    caption = (f"Synchronous against asynchronous FL on {setup(table)}: final test accuracy, server steps (rounds "
               f"for sync), client updates aggregated, MB sent up, server steps and simulated hours to {goal} "
               f"(interpolated between evaluations; – not reached), simulated hours in all, and sync's simulated "
               f"hours to {goal} over the arm's on the same partition{again}. For comparison, {PUBLISHED}.\n\n")
    return caption + head + "\n".join(lines) + "\n"


def panels_of(table: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """{partition: [(run, arm)]}: one panel per partition, the arms side by side."""
    out: dict[str, list[tuple[str, str]]] = {}
    for r in table.to_dict("records"):
        out.setdefault(str(r["partition"]), []).append((r["run_id"], r["arm"]))
    return out


def asynchrony_files(table: pd.DataFrame, accs: History, hours: History, out: Path, title: str,
                     target: float | None) -> list[Path]:
    """asynchrony.csv and accuracy_vs_hours.png (one panel per partition, one curve per arm)."""
    table.to_csv(out / "asynchrony.csv", index=False)
    plot = plot_panels(panels_of(table), accs, hours_of(hours), "simulated hours", out / "accuracy_vs_hours.png",
                       title, target)
    return [out / "asynchrony.csv", *([plot] if plot is not None else [])]
