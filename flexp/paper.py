"""Rounds-to-target reported by McMahan et al. 2017 (MNIST), so reports can put the paper's number beside ours."""

from __future__ import annotations

IID, NONIID = "iid", "shards"
INF = None

# (model, partition, E, B, C) -> rounds; B=None is the paper's B=inf. Table 1: 2NN E=1 to 97%, CNN E=5 to 99%.
TABLE1: dict[tuple[str, str, int, int | None, float], int | None] = {}
_T1 = {
    ("2nn", 1): {IID: {INF: [1455, 1474, 1658, None, None], 10: [316, 87, 77, 75, 70]},
                 NONIID: {INF: [4278, 1796, 1528, None, None], 10: [3275, 664, 619, 443, 380]}},
    ("cnn", 5): {IID: {INF: [387, 339, 337, 164, 246], 10: [50, 18, 18, 18, 16]},
                 NONIID: {INF: [1181, 1100, 978, 1067, None], 10: [956, 206, 200, 261, 97]}},
}
for (_model, _e), _parts in _T1.items():
    for _part, _cols in _parts.items():
        for _b, _rounds in _cols.items():
            for _c, _r in zip((0.0, 0.1, 0.2, 0.5, 1.0), _rounds):
                TABLE1[(_model, _part, _e, _b, _c)] = _r

# Table 2: the CNN at C=0.1 to 99%; (E, B) -> (IID, non-IID) rounds.
TABLE2: dict[tuple[str, str, int, int | None, float], int | None] = {}
for (_e, _b), (_iid, _non) in {
    (1, INF): (626, 483), (5, INF): (179, 1000), (1, 50): (65, 600), (20, INF): (234, 672), (1, 10): (34, 350),
    (5, 50): (29, 334), (20, 50): (32, 426), (5, 10): (20, 229), (20, 10): (18, 173),
}.items():
    TABLE2[("cnn", IID, _e, _b, 0.1)] = _iid
    TABLE2[("cnn", NONIID, _e, _b, 0.1)] = _non

TARGETS = {"2nn": 0.97, "cnn": 0.99}
NOT_REACHED = "—"   # the paper's mark for a target not reached; flexp's tables use it for their runs too


TABLES = {"table1": TABLE1, "table2": TABLE2}


def paper_rounds(model: str, partition: str, epochs: int, batch: int | None, fraction: float,
                 target: float | None, table: str | None = None) -> int | str:
    """The paper's rounds for this setting (NOT_REACHED where it never reached the target), or '' if it has none."""
    if target is None or abs(target - TARGETS.get(model, -1)) > 1e-9:
        return ""
    key = (model, partition, epochs, batch, round(fraction, 3))
    for name in ([table] if table in TABLES else TABLES):
        table_ = TABLES[name]
        if key in table_:
            return table_[key] if table_[key] is not None else NOT_REACHED
    return ""


def percent(accuracy: float) -> str:
    """0.97 -> '97%'."""
    return f"{accuracy * 100:g}%"


def paper_missing(model: str, partition: str, epochs: int, batch: int | None, fraction: float,
                  target: float | None, table: str | None = None, dataset: str = "mnist") -> str:
    """Why the paper has no number for this setting, e.g. 'paper: target 97%, this sweep 92%'; '' when it has one."""
    if dataset != "mnist" or model not in TARGETS:
        return f"paper: MNIST 2NN and CNN only, this sweep {dataset} {model}"
    if target is None or abs(target - TARGETS[model]) > 1e-9:
        return f"paper: target {percent(TARGETS[model])}, this sweep " + (percent(target) if target else "none")
    if paper_rounds(model, partition, epochs, batch, fraction, target, table) == "":
        b = "inf" if batch is None else batch
        return f"paper: no {model} cell with partition={partition} E={epochs} B={b} C={fraction:g}"
    return ""
