"""The configured task loss (`loss._target_`, cross-entropy by default) and extra test metrics (`metrics`).

A loss follows torch.nn.functional's convention, loss(output, target, reduction="mean" | "none" | "sum"); other
keys under `loss` are its keyword arguments. A metric is metric(outputs, targets) -> float on the whole test set
(outputs of every test sample, in order), logged as test_<name> on evaluated rounds beside test_accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch.nn.functional as F

from flexp.config import CallbackConfig, ConfigError

Metric = Callable[..., Any]


def build_loss(spec: CallbackConfig | None) -> Callable[..., Any]:
    """The task loss function (the function itself when it has no arguments, so kernels can recognise it)."""
    if spec is None:
        return F.cross_entropy
    return target_function(spec, "loss")


def build_metrics(specs: Sequence[CallbackConfig]) -> list[tuple[str, Metric]]:
    """(name, metric function) for each configured metric."""
    return [(spec.name, target_function(spec, "metric")) for spec in specs]


def target_function(spec: CallbackConfig, what: str) -> Callable[..., Any]:
    """The callable `spec.target` names, with `spec.kwargs` bound; a ConfigError when it is not callable."""
    from flexp.models import locate

    key = f"{spec.key}._target_"
    fn = locate(spec.target, key)
    if not callable(fn):
        raise ConfigError(key, spec.target, f"is not callable (a {what} is a function)")
    return partial(fn, **spec.kwargs) if spec.kwargs else fn
