"""MLflow at the edge: one run per job, logged from the main thread only."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from flexp.config import TrackingConfig

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)
PARAM_LIMIT = 6000
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"  # MLflow 3: "Machine learning", not GenAI
SOURCE_ENV = "FLEXP_COMMAND"   # the command line, set by the CLI and inherited by the writer and launcher processes
API_SOURCE = "flexp.run (Python API)"
T = TypeVar("T")


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


def retrying(fn: Callable[..., T], attempts: int = 12, first_wait: float = 0.05) -> Callable[..., T]:
    """Wrap a store call to retry while SQLite reports the database locked (parallel sweep jobs share one file)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        wait = first_wait
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow wraps SQLAlchemy's OperationalError in varying types
                if "locked" not in str(err).lower() or attempt == attempts - 1:
                    raise
                time.sleep(wait * (1 + random.random()))
                wait = min(wait * 2, 2.0)
        raise AssertionError("unreachable")

    return call


def quiet_mlflow() -> None:
    """Import MLflow and keep its INFO chatter (database migrations) off the terminal."""
    import mlflow  # noqa: F401  (it configures its logger on import)

    logging.getLogger("mlflow").setLevel(logging.WARNING)


def source_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's Source of a run (its runs table shows it): the command that made it, `source` or else $FLEXP_COMMAND;
    MLflow would name the file of the process that logs it (flexp's writer). Empty when neither is known."""
    source = source or os.environ.get(SOURCE_ENV)
    return {"mlflow.source.name": source[:8000], "mlflow.source.type": "LOCAL"} if source else {}


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking server, fail fast (ConnectionError) if nothing listens, instead of MLflow's retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"cannot reach the tracking server at {url.hostname}:{port} ({err})") from None


def open_experiment(uri: str, experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment id) for `experiment` in the store at `uri`, creating both if needed.

    A sqlite store's artifacts go beside its database (<db dir>/mlartifacts) rather than into the cwd. An
    experiment without an `mlflow.experimentKind` tag gets KIND (a kind the user set stays).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    db = sqlite_path(uri)
    artifact_location = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = retrying(client.get_experiment_by_name)(experiment)
    if found is not None:
        if KIND_TAG not in found.tags:
            retrying(client.set_experiment_tag)(found.experiment_id, KIND_TAG, KIND)
        return client, found.experiment_id
    try:
        return client, retrying(client.create_experiment)(experiment, artifact_location=artifact_location,
                                                          tags={KIND_TAG: KIND})
    except Exception:  # another job created it first
        found = retrying(client.get_experiment_by_name)(experiment)
        if found is None:
            raise
        return client, found.experiment_id


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative paths are relative to the cwd), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


class MlflowTracker:
    """Starts, feeds and ends one MLflow run; artifacts of a sqlite store go beside its database."""

    def __init__(self, cfg: TrackingConfig, source: str | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def warm_up(self) -> None:
        """Import MLflow and open the store ahead of `start`; a failure here is raised again by `start`."""
        try:
            _, self.experiment_id = open_experiment(self.cfg.uri, self.cfg.experiment)
        except Exception:
            self.experiment_id = None

    def start(self, run_name: str, tags: Mapping[str, str], run_id: str | None = None) -> str:
        """Open the store (creating it if needed) and start the run, or reopen `run_id`; return its id."""
        import mlflow

        if self.experiment_id is None:
            _, self.experiment_id = open_experiment(self.cfg.uri, self.cfg.experiment)
        if run_id is not None:
            run = retrying(mlflow.start_run)(run_id=run_id)
        else:
            run = retrying(mlflow.start_run)(experiment_id=self.experiment_id, run_name=run_name,
                                             tags={**source_tags(self.source), **tags})
            self.show_knobs(tags.get("flexp.overrides", ""))
        self.run_id = run.info.run_id
        return self.run_id

    def show_knobs(self, overrides: str) -> None:
        """Add this run's knobs to the experiment's saved view (flexp.ui); a store that refuses it costs no run."""
        from mlflow.tracking import MlflowClient

        from flexp.ui import VIEW_TAG, saved_view

        client = MlflowClient(tracking_uri=self.cfg.uri)
        try:
            experiment = retrying(client.get_experiment)(self.experiment_id)
            value = saved_view(experiment.tags.get(VIEW_TAG), overrides, int(time.time() * 1000))
            if value is not None:
                retrying(client.set_experiment_tag)(self.experiment_id, VIEW_TAG, value)
        except Exception as err:  # the view is a convenience; the run goes on without it
            log.warning("could not update the experiment's saved view %s: %s", VIEW_TAG, err)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        items = {k: str(v)[:PARAM_LIMIT] for k, v in params.items()}
        keys = sorted(items)
        for i in range(0, len(keys), 100):
            retrying(mlflow.log_params)({k: items[k] for k in keys[i:i + 100]})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        retrying(mlflow.set_tags)({k: str(v)[:PARAM_LIMIT] for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        retrying(mlflow.log_metrics)({k: float(v) for k, v in metrics.items()}, step=step)

    def log_text(self, text: str, path: str) -> None:
        import mlflow

        retrying(mlflow.log_text)(text, path)

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

    def logged_rounds(self) -> set[int]:
        """The steps the run already has round metrics for (so a resumed run logs each round once)."""
        from mlflow.tracking import MlflowClient

        history = retrying(MlflowClient(tracking_uri=self.cfg.uri).get_metric_history)(self.run_id, "round_seconds")
        return {m.step for m in history}

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        import mlflow

        if self.run_id is not None:
            retrying(mlflow.end_run)(status=status)
            self.run_id = None


def rival_lookup(cfg: TrackingConfig, cell: str) -> Callable[[], Any]:
    """A function returning the best FINISHED run of setting `cell` in cfg.experiment that reached the target (its
    interpolated rounds and rate, as a prune.Rival), or None; for fl.prune."""
    from flexp.prune import CELL_TAG, Rival

    state: dict[str, Any] = {}

    def best() -> Rival | None:
        if "client" not in state:
            state["client"], state["experiment"] = open_experiment(cfg.uri, cfg.experiment)
        runs = retrying(state["client"].search_runs)(
            [state["experiment"]], max_results=1, order_by=["metrics.rounds_to_target_interp ASC"],
            filter_string=(f"tags.`{CELL_TAG}` = '{cell}' and attributes.status = 'FINISHED' "
                           "and metrics.rounds_to_target_interp > 0"))
        if not runs:
            return None
        run = runs[0]
        return Rival(float(run.data.metrics["rounds_to_target_interp"]), float(run.data.params["fl.lr"]))

    return best
