"""Progress over rounds: a tqdm bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import math
import sys
from typing import TextIO

from flexp.fedavg import RoundRecord


def describe(record: RoundRecord, unit: str, total: int) -> str:
    """One human line for a round or epoch."""
    parts = [f"{unit} {record.round}/{total}"]
    if not math.isnan(record.train_loss):  # a privacy stage withholds the clients' training loss
        parts.append(f"train_loss {record.train_loss:.4f}")
    if record.test_accuracy is not None:
        parts += [f"test_acc {record.test_accuracy:.4f}", f"test_loss {record.test_loss:.4f}"]
    if "epsilon" in record.extra:
        parts.append(f"epsilon {record.extra['epsilon']:.3g}")
    if record.sim_hours is not None:  # the simulated clock, and who it left out
        late = f" ({record.late} late)" if record.late else ""
        parts.append(f"sim {record.sim_hours:.3g}h{late}")
    parts.append(f"{record.round_seconds:.2f}s")
    return "  ".join(parts)


class Progress:
    """Shows each finished round; the bar's postfix carries the latest test accuracy. The bar appears with the first
    round, so the lines logged while the job starts do not cut through it, and a resumed run's bar starts where the
    run stopped."""

    def __init__(self, total: int, unit: str = "round", stream: TextIO | None = None) -> None:
        self.total, self.unit = total, unit
        self.stream = stream or sys.stdout
        self.bar = None

    def update(self, record: RoundRecord) -> None:
        if not self.stream.isatty():
            print(describe(record, self.unit, self.total), file=self.stream, flush=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=record.round - 1, unit=self.unit, file=self.stream,
                            dynamic_ncols=True)
        if record.test_accuracy is not None:
            shown = {"acc": f"{record.test_accuracy:.4f}", "loss": f"{record.train_loss:.3f}"}
            if "epsilon" in record.extra:
                shown["eps"] = f"{record.extra['epsilon']:.3g}"
            if record.sim_hours is not None:
                shown["sim"] = f"{record.sim_hours:.3g}h"
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
