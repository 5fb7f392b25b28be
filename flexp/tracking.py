"""MLflow at the edge: one run per job, logged from the main thread only."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from flexp.config import TrackingConfig

log = logging.getLogger(__name__)
PARAM_LIMIT = 6000


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'fl': {'lr': 0.1}} -> {'fl.lr': 0.1}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative paths are relative to the cwd), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


class MlflowTracker:
    """Starts, feeds and ends one MLflow run; artifacts of a sqlite store go beside its database."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None

    def start(self, run_name: str, tags: Mapping[str, str]) -> str:
        """Open the store (creating it if needed) and start the run; return its id."""
        import mlflow

        db = sqlite_path(self.cfg.uri)
        artifact_location = None
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
        mlflow.set_tracking_uri(self.cfg.uri)
        experiment = mlflow.get_experiment_by_name(self.cfg.experiment)
        if experiment is None:
            experiment_id = mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        items = {k: str(v)[:PARAM_LIMIT] for k, v in params.items()}
        keys = sorted(items)
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: items[k] for k in keys[i:i + 100]})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, path: str) -> None:
        import mlflow

        mlflow.log_text(text, path)

    def log_model(self, model: nn.Module) -> None:
        """Log the final model as a pickled PyTorch model (loadable with mlflow.pytorch.load_model)."""
        import mlflow.pytorch
        import torch

        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                         pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        finally:
            quiet.setLevel(level)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        import mlflow

        if self.run_id is not None:
            mlflow.end_run(status=status)
            self.run_id = None
