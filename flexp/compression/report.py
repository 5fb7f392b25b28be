"""The report's communication and time parts: a codec table (accuracy, bytes each way, simulated hours to the
target) for a `report.table=compression` sweep, and test accuracy against simulated hours for any run with a
system model. Used by flexp.report; pandas and matplotlib come with the dev extra."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

COMPRESSION = "compression"  # report.table of a codec sweep (sweeps/sweep/compression.yaml)
MB = 1e6
History = Mapping[str, list[tuple[int, float]]]
XOf = Callable[[str, list[int]], list[float | None]]  # (run, evaluated rounds) -> an x per round


def param(runs: pd.DataFrame, key: str) -> pd.Series:
    """A logged param per run (None where a run has none)."""
    return runs.get(f"params.{key}", pd.Series([None] * len(runs), index=runs.index))


def codec_label(row: Mapping[str, object]) -> str:
    """'none', 'quantize 8-bit', 'topk 1% EF', 'sign EF', ...: the codec as the table and legends name it."""
    name = row.get("compression.name") or "none"
    if name in ("none", "None"):
        return "none"
    size = (f" {row['compression.bits']}-bit" if present(row.get("compression.bits"))
            else f" {float(row['compression.ratio']):.3g}".rstrip() if present(row.get("compression.ratio")) else "")
    if name in ("topk", "random_mask") and size:
        size = f" {100 * float(row['compression.ratio']):g}%"
    return f"{name}{size}{' EF' if str(row.get('compression.error_feedback')) == 'True' else ''}"


def present(value: object) -> bool:
    return value is not None and str(value) not in ("None", "nan", "")


def deployment_label(row: Mapping[str, object]) -> str:
    """'uniform', 'heavy_tailed +30%' (over-selection), or 'none' without a system model."""
    name = row.get("system.name") or "none"
    over = row.get("system.over_select")
    return f"{name} +{100 * float(over):g}%" if present(over) and float(over) > 0 else str(name)


def hours_at(hours: list[tuple[int, float]], round_: float | None) -> float | None:
    """Cumulative simulated hours at a (fractional, interpolated) round."""
    if round_ is None or not hours or (isinstance(round_, float) and math.isnan(round_)):
        return None
    steps, values = zip(*hours)
    return float(np.interp(round_, [0, *steps], [0.0, *values]))


def total(history: list[tuple[int, float]]) -> float:
    return float(sum(v for _, v in history))


def compression_table(runs: pd.DataFrame, frame: pd.DataFrame, traffic: Mapping[str, History],
                      hours: History) -> tuple[pd.DataFrame, int]:
    """One row per partition, deployment and codec (of one run more than once, the latest finished run): final
    accuracy and its change from no compression in the same partition and deployment, rounds, MB up and down in
    all, how many times fewer bytes up, and the rounds and simulated hours to the target (interpolated as the paper
    does) and in all; plus how many runs it leaves out."""
    keys = ("partition.name", "compression.name", "compression.bits", "compression.ratio",
            "compression.error_feedback", "system.name", "system.over_select")
    info = pd.DataFrame({"run_id": runs["run_id"], **{k: param(runs, k).values for k in keys},
                         "_done": (runs.get("status", pd.Series("", index=runs.index)) == "FINISHED").values,
                         "_start": list(runs.get("start_time", pd.Series(0, index=runs.index)))})
    rows = []
    for r in frame.merge(info, on="run_id", suffixes=("", "_param")).to_dict("records"):
        run = r["run_id"]
        rows.append({"partition": r.get("partition.name_param", r.get("partition.name")),
                     "deployment": deployment_label(r), "codec": codec_label(r),
                     "final_accuracy": r["final_accuracy"], "rounds": r["rounds"],
                     "mb_up": total(traffic[run].get("bytes_up", [])) / MB,
                     "mb_down": total(traffic[run].get("bytes_down", [])) / MB,
                     "rounds_to_target": r["rounds_to_target_interp"],
                     "hours_to_target": hours_at(hours.get(run, []), r["rounds_to_target_interp"]),
                     "sim_hours": hours[run][-1][1] if hours.get(run) else None, "run_id": run,
                     "_done": r["_done"], "_start": r["_start"]})
    found = pd.DataFrame(rows)
    table = found.sort_values(["_done", "_start"], kind="stable").drop_duplicates(
        ["partition", "deployment", "codec"], keep="last").drop(columns=["_done", "_start"])
    reference = table[table["codec"] == "none"].set_index(["partition", "deployment"])
    base = [reference.loc[(p, d)] if (p, d) in reference.index else None
            for p, d in zip(table["partition"], table["deployment"])]
    table["delta_points"] = [round(100 * (a - b["final_accuracy"]), 2) if b is not None else None
                             for a, b in zip(table["final_accuracy"], base)]
    table["up_reduction"] = [b["mb_up"] / up if b is not None and up else None for up, b in zip(table["mb_up"], base)]
    table["compressed"] = table["codec"] != "none"
    order = table.sort_values(["partition", "deployment", "compressed"], kind="stable").index
    return table.loc[order].drop(columns="compressed").reset_index(drop=True), len(found) - len(table)


def cell(value: object, fmt: str) -> str:
    """A table cell: `value` formatted, or – when it is missing (None or NaN: a target not reached)."""
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def compression_markdown(table: pd.DataFrame, target: float | None, left_out: int = 0) -> str:
    """The codec table as Markdown, its caption saying what each column is (and how many runs it leaves out)."""
    goal = f"{100 * target:g}%" if target else "the target"
    head = ("| partition | devices | codec | final acc. | Δ pts | rounds | MB up | × fewer up | MB down | "
            f"rounds to {goal} | sim. hours to {goal} | sim. hours |\n" + "|---" * 12 + "|\n")

    lines = [f"| {r['partition']} | {r['deployment']} | {r['codec']} | {cell(r['final_accuracy'], '.4f')} | "
             f"{cell(r['delta_points'], '+.2f')} | {r['rounds']} | {cell(r['mb_up'], ',.1f')} | "
             f"{cell(r['up_reduction'], '.1f')} | {cell(r['mb_down'], ',.1f')} | "
             f"{cell(r['rounds_to_target'], '.1f')} | {cell(r['hours_to_target'], '.3f')} | "
             f"{cell(r['sim_hours'], '.3f')} |" for r in table.to_dict("records")]
    caption = (f"Codecs at equal rounds: final test accuracy, its change from no compression on the same partition "
               f"and devices (Δ pts), bytes up and down over the run, how many times fewer bytes up than no "
               f"compression, and rounds and simulated hours to {goal} (interpolated between evaluations; – not "
               f"reached){left_out_note(left_out)}.\n\n")
    return caption + head + "\n".join(lines) + "\n"


def hours_of(hours: History) -> XOf:
    """Simulated hours at each evaluated round (None where a round has no sim_hours)."""
    return lambda run, steps: [dict(hours.get(run, [])).get(s) for s in steps]


def mb_up_of(traffic: Mapping[str, History]) -> XOf:
    """Cumulative MB sent up by each evaluated round."""
    def at(run: str, steps: list[int]) -> list[float | None]:
        sums = dict(cumulative(traffic[run].get("bytes_up", [])))
        return [sums[s] / MB if s in sums else None for s in steps]
    return at


def cumulative(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    out, running = [], 0.0
    for step, value in history:
        running += value
        out.append((step, running))
    return out


def panels_of(table: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """{partition, devices: [(run, codec)]}: the codec sweep's panels, each a partition on one deployment."""
    out: dict[str, list[tuple[str, str]]] = {}
    for r in table.to_dict("records"):
        out.setdefault(f"{r['partition']}, {r['deployment']} devices", []).append((r["run_id"], r["codec"]))
    return out


def left_out_note(count: int) -> str:
    return f"; {count} earlier run(s) of a codec run again on the same partition and devices left out" if count else ""


def plot_panels(panels: Mapping[str, list[tuple[str, str]]], accs: History, x_of: XOf, xlabel: str, path: Path,
                title: str, target: float | None) -> Path | None:
    """Test accuracy against `x_of`'s x (log scale), one panel per entry of `panels`, one curve per run in it;
    None when no run has an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: [(run, label, [(x, a) for x, (_, a) in zip(x_of(run, [s for s, _ in accs.get(run, [])]),
                                                              accs.get(run, [])) if x is not None])
                     for run, label in runs] for name, runs in panels.items()}
    curves = {name: [c for c in cs if c[2]] for name, cs in curves.items()}
    curves = {name: cs for name, cs in curves.items() if cs}
    if not curves:
        return None
    cols = min(len(curves), 2)
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    fig.subplots_adjust(hspace=0.35)
    for ax, (name, cs) in zip(axes.flat, curves.items()):
        for _, label, points in cs:
            ax.plot([x for x, _ in points], [a for _, a in points], label=label)
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
        ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: test accuracy against {xlabel}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
