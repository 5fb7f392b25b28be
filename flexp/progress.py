"""Progress over rounds: a tqdm bar on a terminal, one plain line per round otherwise."""

from __future__ import annotations

import sys
from typing import TextIO

from flexp.fedavg import RoundRecord


def describe(record: RoundRecord, unit: str, total: int) -> str:
    """One human line for a round or epoch."""
    parts = [f"{unit} {record.round}/{total}", f"train_loss {record.train_loss:.4f}"]
    if record.test_accuracy is not None:
        parts += [f"test_acc {record.test_accuracy:.4f}", f"test_loss {record.test_loss:.4f}"]
    parts.append(f"{record.round_seconds:.2f}s")
    return "  ".join(parts)


class Progress:
    """Shows each finished round; the bar's postfix carries the latest test accuracy."""

    def __init__(self, total: int, unit: str = "round", stream: TextIO | None = None) -> None:
        self.total, self.unit = total, unit
        self.stream = stream or sys.stdout
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, record: RoundRecord) -> None:
        if self.bar is None:
            print(describe(record, self.unit, self.total), file=self.stream, flush=True)
            return
        if record.test_accuracy is not None:
            self.bar.set_postfix(acc=f"{record.test_accuracy:.4f}", loss=f"{record.train_loss:.3f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
