"""The Python API: compose a config as the command line would, run it in this process, get the history and model.

    import flexp
    cfg = flexp.compose(["model=2nn", "fl.rounds=5"])
    result = flexp.run(cfg)                     # no MLflow: no writer process, no store file
    result.history[-1].test_accuracy, result.model, result.algorithm
    flexp.run(cfg, model=MyNet(), tracking=True)  # any nn.Module (or a callable returning one), logged to MLflow
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import nn

    from flexp.algorithm import Algorithm
    from flexp.config import ExperimentConfig
    from flexp.data import Dataset
    from flexp.fedavg import RoundRecord

log = logging.getLogger("flexp")


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config `python -m flexp OVERRIDES` would run (flexp's conf/ and sweeps/, plus `config_dir` if given).

    Dotted keys are checked as on the command line (a typo raises ConfigError naming it) and set even where the
    chosen option's file leaves them out.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from flexp.__main__ import forcing_known_keys
    from flexp.config import check_key
    from flexp.searchpath import CONF_DIR, with_sweeps_on_search_path

    args = list(overrides)
    for arg in args:
        name, sep, _ = arg.lstrip("+~").partition("=")
        if sep and "." in name and not arg.startswith(("+", "~", "hydra.")):
            check_key(name)
    if config_dir is not None:
        args.append(f"hydra.searchpath=['file://{Path(config_dir).expanduser().resolve()}']")
    args = with_sweeps_on_search_path(forcing_known_keys(args))
    outer = get_gh_backup() if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=args)
    finally:
        if outer is not None:
            restore_gh_from_backup(outer)


@dataclass
class Result:
    """What a run gives back: the round history, the final model and weights, everything logged per round, and
    the algorithm that trained it (`algorithm`: the strategy object with its state after the last round, e.g.
    SCAFFOLD's control variates, or a strategy._target_'s own; None for mode=baseline), and the files logged
    beside the metrics (`texts`, by name: an asynchronous run's staleness.csv)."""

    history: list[RoundRecord]
    model: nn.Module
    params: torch.Tensor
    summary: dict[str, float]
    metrics: dict[int, dict[str, float]]  # {round: every metric logged at it, callbacks' included}
    data: Dataset
    run_id: str | None = None
    algorithm: Algorithm | None = None
    texts: dict[str, str] = field(default_factory=dict)


class InProcessTracker:
    """The Tracker of a Python run: keeps every metric and tag, and forwards to an in-process MLflow tracker when
    given one.

    A model that cannot be logged (it will not pickle) is a warning, not a failed run.
    """

    def __init__(self, mlflow: Any | None = None) -> None:
        self.mlflow = mlflow
        self.run_id: str | None = None
        self.metrics: dict[int, dict[str, float]] = {}
        self.tags: dict[str, str] = {}

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> str:
        if self.mlflow is not None:
            self.run_id = self.mlflow.start(run_name, tags, run_id)
        return self.run_id or "(not tracked)"

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.mlflow is not None:
            self.mlflow.log_params(params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)
        if self.mlflow is not None:
            self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            self.metrics.setdefault(step, {}).update(metrics)
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)

    def log_text(self, text: str, path: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_text(text, path)

    def log_model(self, model: nn.Module) -> None:
        if self.mlflow is None:
            return
        try:
            self.mlflow.log_model(model)
        except Exception as err:
            from flexp.writer import one_line

            warnings.warn(f"the final model ({type(model).__name__}) could not be logged to MLflow ({one_line(err)}); "
                          "the run's metrics are logged and Result.model holds it", stacklevel=4)

    def logged_rounds(self) -> set[int]:
        return set()

    def finish(self, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            self.mlflow.finish(status)


def experiment(cfg: DictConfig | Mapping[str, Any] | ExperimentConfig) -> ExperimentConfig:
    """The validated ExperimentConfig of a composed config, a plain mapping, or one already parsed."""
    from omegaconf import DictConfig, OmegaConf

    from flexp.config import ExperimentConfig, parse_config

    if isinstance(cfg, ExperimentConfig):
        return cfg
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return parse_config(tree)


def with_model(cfg: ExperimentConfig, model: nn.Module | Callable[..., nn.Module]) -> ExperimentConfig:
    """`cfg` training `model` (a module, copied for each replica, or a callable building one) in place of its own."""
    from torch import nn

    from flexp.config import ModelConfig

    kind = type(model) if isinstance(model, nn.Module) else model
    name = getattr(kind, "__name__", "custom")
    name = "custom" if name == "<lambda>" else name
    where = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', name)}"
    raw = {**cfg.raw, "model": {"name": name, "_target_": where}}
    return replace(cfg, model=ModelConfig(name=name, factory=model), raw=raw)


def run(cfg: DictConfig | Mapping[str, Any] | ExperimentConfig, *, tracking: bool = False,
        model: nn.Module | Callable[..., nn.Module] | None = None) -> Result:
    """Run one experiment in this process and return its Result.

    tracking=False logs nothing anywhere (no writer process, no store file); tracking=True logs one MLflow run to
    tracking.uri, from this process. `model` replaces the configured one: an nn.Module (its initial weights are
    used) or a callable returning one (given input_shape and num_classes when it takes them); a class defined in a
    notebook works and is logged with its code (cloudpickle), or a warning says why it could not be.

    The Result holds the history, the final model and weights and, as `result.algorithm`, the algorithm object that
    trained it (the configured strategy, inside its attacker when attack.name is set) with its state after the last
    round: a strategy._target_'s own attributes, FedAvgM's velocity, SCAFFOLD's control variates.
    """
    from omegaconf import DictConfig, OmegaConf

    from flexp.flat import load_flat
    from flexp.job import execute, new_model, prepare

    config = experiment(cfg)
    if model is not None:
        config = with_model(config, model)
    ready = prepare(config)
    inner = rivals = None
    if tracking:
        from flexp.tracking import API_SOURCE, MlflowTracker, quiet_mlflow, rival_lookup

        quiet_mlflow()
        inner = MlflowTracker(config.tracking, source=API_SOURCE)
        rivals = partial(rival_lookup, config.tracking)
    tracker = InProcessTracker(inner)
    text = OmegaConf.to_yaml(cfg) if isinstance(cfg, DictConfig) else OmegaConf.to_yaml(dict(config.raw))
    result = execute(config, tracker, {"flexp.overrides": "(python API)"}, text, ready=ready, rivals=rivals)
    final = load_flat(new_model(config, ready.data).to(ready.device), result.params, result.state)
    return Result(result.history, final, result.params, result.summary(), tracker.metrics, ready.data,
                  tracker.run_id, ready.algorithm, result.texts)


__all__ = ["Result", "compose", "run"]
