"""Round callbacks: user objects called after each evaluated round, whose returned floats are logged as metrics.

A callback is any callable `callback(round, state, model, data) -> Mapping[str, float]`: `round` is the round
number, `state` the server after it (ServerState: global weights, strategy, history), `model` an nn.Module holding
the global weights, and `data` the RoundData below. Config: `callbacks: {name: {_target_: ..., kwargs}}` or a
list; each metric is logged as `<name>/<key>`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flexp.config import CallbackConfig, ConfigError
from flexp.data import Split

Callback = Callable[[int, Any, nn.Module, "RoundData"], Mapping[str, float]]


@dataclass(frozen=True)
class RoundData:
    """What a callback may evaluate on: the train and test splits and each client's indices into train."""

    train: Split
    test: Split
    partition: Sequence[torch.Tensor]
    num_classes: int


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The model's predicted class for every row of `x`, in large inference batches (eval mode, then restored)."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def build_callbacks(specs: Sequence[CallbackConfig]) -> list[tuple[str, Callback]]:
    """(name, callback) for each configured entry: Hydra's instantiate of its `_target_` with its arguments."""
    from hydra.utils import instantiate

    from flexp.models import first_line, locate

    built = []
    for spec in specs:
        key = f"{spec.key}._target_"
        locate(spec.target, key)
        try:
            callback = instantiate({"_target_": spec.target, **spec.kwargs}, _convert_="all")
        except Exception as err:
            raise ConfigError(key, spec.target, f"failed to build the callback ({first_line(err)})") from None
        if not callable(callback):
            raise ConfigError(key, spec.target, "did not give a callable")
        built.append((spec.name, callback))
    return built


def run_callbacks(callbacks: Sequence[tuple[str, Callback]], round_: int, state: Any, model: nn.Module,
                  data: RoundData) -> dict[str, float]:
    """Every callback's metrics for one round as `<name>/<key>`, non-finite values left out."""
    out: dict[str, float] = {}
    for name, callback in callbacks:
        for key, value in (callback(round_, state, model, data) or {}).items():
            if math.isfinite(float(value)):
                out[f"{name}/{key}"] = float(value)
    return out
