"""Checkpoints of a federated run: everything needed to continue it bit for bit, written atomically."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexp.fedavg import RoundRecord, ServerState

FILE = "checkpoint.pt"


@dataclass
class Checkpoint:
    """The server after `state.round` rounds, the RNGs, the MLflow run id and the config the run was started with."""

    state: ServerState
    run_id: str | None
    config: Mapping[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)


def rng_states() -> dict[str, Any]:
    """The global torch, NumPy and Python RNG states."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng(states: Mapping[str, Any]) -> None:
    """Put back what rng_states() took."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        np.random.set_state(states["numpy"])
    if "python" in states:
        random.setstate(states["python"])


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write directory/checkpoint.pt via a temp file, fsync and rename: a crash leaves the old one or the new one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(directory: Path) -> Checkpoint:
    """Read directory/checkpoint.pt (a file this program wrote: it holds pickled flexp objects)."""
    return torch.load(directory / FILE, weights_only=False)


def history_rounds(history: list[RoundRecord]) -> list[int]:
    """The rounds a history holds, in order."""
    return [r.round for r in history]
