"""Which way an engine trains a round's clients, said once at start and again whenever a round takes another way.

Engines answer `describe(algorithm)` (the path a round will take) and keep `last_path` (the one the last round
took); nothing here knows about MLflow: `watch_path` hands its text to a callback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

log = logging.getLogger("flexp")
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
TEXT_LIMIT = 500  # a path that changes every round still gives a short tag


@dataclass(frozen=True)
class EnginePath:
    """A round's path (`kernel`, `vmap`, `per-client`, `autograd`) and, where it helps, why it is that one."""

    name: str
    why: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.why})" if self.why else self.name


def module_kinds(model: nn.Module, keep: Callable[[nn.Module], bool]) -> str:
    """The class names of `model`'s modules that `keep` selects, sorted and comma-separated."""
    return ", ".join(sorted({type(m).__name__ for m in model.modules() if keep(m)}))


def draws_random_why(model: nn.Module) -> str:
    """'the model draws random numbers: Dropout' (the Dropout-like layers named, when there are any)."""
    kinds = module_kinds(model, lambda m: isinstance(m, DROPOUT))
    return "the model draws random numbers" + (f": {kinds}" if kinds else "")


def buffers_why(model: nn.Module) -> str:
    """'the model has buffers: BatchNorm1d' (the modules that own them named)."""
    kinds = module_kinds(model, lambda m: any(True for _ in m.buffers(recurse=False)))
    return "the model has buffers" + (f": {kinds}" if kinds else "")


def watch_path(requested: str, engine: Any, algorithm: Any,
               report: Callable[[str, str], None]) -> Callable[[int], None]:
    """Log (INFO) the engine `requested` resolved to and the path its rounds take, and `report(engine name, path)`;
    the function returned, called after each round, warns and reports again when that round took another path."""
    path = engine.describe(algorithm)
    resolved = engine.name if requested == engine.name else f"{engine.name} (resolved from {requested})"
    log.info("engine: %s, path: %s", resolved, path)
    report(engine.name, str(path))
    taken, last = [str(path)], path

    def check(round_: int) -> None:
        nonlocal last
        now = engine.last_path
        if now is None or now == last:
            return
        log.warning("round %d: the engine took another path: %s (until then: %s)", round_, now, last)
        taken.append(f"from round {round_}: {now}")
        last = now
        report(engine.name, "; ".join(taken)[:TEXT_LIMIT])

    return check
