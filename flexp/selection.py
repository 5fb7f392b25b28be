"""The paper's learning-rate selection: per setting (a cell), the rate that reaches the target in the fewest rounds."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from flexp.paper import NOT_REACHED

LR = "fl.lr"
NOT_CELL = (LR, "fl.rounds", "fl.eval_every")   # the tuned rate and the budget: they do not name a setting


def rate(value: object) -> float:
    """A logged learning rate as a number."""
    return float(str(value))


def cell_keys(varying: list[str]) -> list[str]:
    """The varying keys that name a setting (everything but the rate and the round budget)."""
    return [k for k in varying if k not in NOT_CELL]


def is_lr_grid(frame: pd.DataFrame, cells: list[str]) -> bool:
    """True when some cell was run at more than one learning rate."""
    if LR not in frame or frame[LR].nunique() < 2:
        return False
    groups = frame.groupby(cells, dropna=False, sort=False)[LR] if cells else [(None, frame[LR])]
    return any(lrs.nunique() > 1 for _, lrs in groups)


def best_rates(frame: pd.DataFrame, cells: list[str]) -> pd.DataFrame:
    """One row per cell (in first-seen order): the run with the fewest interpolated rounds to target, ties to the
    smaller rate; a cell no rate brought to the target keeps its most accurate run, with `reached` False.
    Adds `lrs_tried` and `lr_edge` (the chosen rate is the smallest or largest tried, so the grid may be too narrow)."""
    rows = []
    groups = frame.groupby(cells, dropna=False, sort=False) if cells else [((), frame)]
    for _, runs in groups:
        runs = runs.assign(_lr=runs[LR].map(rate), _r=pd.to_numeric(runs["rounds_to_target_interp"]))
        reached = runs.dropna(subset=["_r"])
        if len(reached):
            best = reached.assign(_r=reached["_r"].round(6)).sort_values(["_r", "_lr"], kind="stable").iloc[0]
        else:
            best = runs.assign(_a=-runs["best_accuracy"].fillna(-1.0)).sort_values(["_a", "_lr"], kind="stable")
            best = best.drop(columns="_a").iloc[0]
        lrs = sorted(runs["_lr"].unique())
        rows.append({**best.drop(["_lr", "_r"]).to_dict(), "reached": bool(len(reached)),
                     "lrs_tried": len(lrs), "lr_edge": best["_lr"] in (lrs[0], lrs[-1])})
    return pd.DataFrame(rows)


def settled(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one rate, the one that says most first: reached, then ended (pruned, diverged, budget), then running;
    a block run again after a crash leaves both its dead and its new runs in the store."""
    reached = pd.to_numeric(runs["rounds_to_target_interp"]).notna()
    ended = ~runs.get("stopped", pd.Series("", index=runs.index)).isin(["running", "killed"])
    rank = (~reached).astype(int) * 2 + (~ended).astype(int)
    return runs.assign(_rank=rank.values).sort_values("_rank", kind="stable").drop(columns="_rank")


def unreached(run: pd.Series) -> str:
    """A rate that did not reach the target: '>N' pruned after N rounds, '×' diverged, '…N' running (or its process
    died: resume it) after N rounds, NOT_REACHED ('—') not in its budget."""
    why = run.get("stopped", "")
    if why in ("running", "killed"):
        return f"…{int(run['rounds'])}"
    return f">{int(run['rounds'])}" if why == "pruned" else "×" if why == "diverged" else NOT_REACHED


def rates_table(frame: pd.DataFrame, cells: list[str], fmt: Callable[[str, object], str] = lambda k, v: str(v)) -> str:
    """Markdown: one row per cell, one column per learning rate tried, rounds to target (or `unreached`'s mark),
    the chosen rate's entry in bold. `fmt(key, value)` shows a cell key's value."""
    best = set(best_rates(frame, cells)["run_id"])
    lrs = sorted({rate(v) for v in frame[LR]})
    head = "| " + " | ".join([*cells, *(f"η={lr:g}" for lr in lrs)]) + " |\n|" + "---|" * (len(cells) + len(lrs))
    lines = [head + "\n"]
    groups = frame.groupby(cells, dropna=False, sort=False) if cells else [((), frame)]
    for key, runs in groups:
        key = key if isinstance(key, tuple) else (key,)
        entries = []
        for lr in lrs:
            match = runs[runs[LR].map(rate) == lr]
            if not len(match):
                entries.append("")
                continue
            run = settled(match).iloc[0]
            r = run["rounds_to_target_interp"]
            text = f"{r:.1f}" if pd.notna(r) else unreached(run)
            entries.append(f"**{text}**" if run["run_id"] in best and pd.notna(r) else text)
        lines.append("| " + " | ".join([*(fmt(k, v) for k, v in zip(cells, key)), *entries]) + " |\n")
    return "".join(lines)
