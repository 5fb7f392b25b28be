"""Hydra multirun <-> MLflow: one parent run per sweep, created before the jobs start and ended after they finish.

The parent's id is written into the sweep directory, so jobs in other processes (joblib) find it there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("flexp")
PARENT_FILE = "mlflow_parent_run_id"


def sweep_id(sweep_dir: str | Path) -> str:
    """A sweep's id: the last two parts of its output dir (date_time), unique per sweep."""
    return "_".join(Path(sweep_dir).parts[-2:])


def parent_run_id(sweep_dir: str | Path) -> str | None:
    """The parent run id a sweep's callback left in its directory, if any."""
    path = Path(sweep_dir) / PARENT_FILE
    return path.read_text().strip() if path.exists() else None


class ParentRunCallback(Callback):
    """Creates the sweep's parent MLflow run on multirun start and ends it on multirun end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from flexp import interrupt
        from flexp.tracking import open_experiment, retrying

        interrupt.keep_run()  # the parent run is ended KILLED by an interrupt (end_parent), not left RUNNING

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tracking = config.tracking
        client, experiment_id = open_experiment(tracking.uri, tracking.experiment)
        swept = config.hydra.sweeper.get("params")
        params = OmegaConf.to_container(swept, resolve=True) if swept is not None else {}
        overrides = [o.removeprefix("++") for o in config.hydra.overrides.task]
        run = retrying(client.create_run)(experiment_id, run_name=f"sweep-{sweep_id(sweep_dir)}", tags={
            "flexp.sweep_id": sweep_id(sweep_dir), "flexp.sweep_parent": "true",
            "flexp.sweep_params": json.dumps(params), "flexp.overrides": " ".join(overrides) or "(none)"})
        (sweep_dir / PARENT_FILE).write_text(run.info.run_id)
        log.info("sweep %s: parent MLflow run %s", sweep_id(sweep_dir), run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        end_parent(config.hydra.sweep.dir, config.tracking.uri, config.tracking.experiment, "FINISHED")
        log.info("sweep %s done: python -m flexp.report %s", sweep_id(config.hydra.sweep.dir),
                 sweep_id(config.hydra.sweep.dir))


def end_parent(sweep_dir: str | Path, uri: str, experiment: str, status: str) -> None:
    """End the sweep's parent run (if it has one) with `status`."""
    from flexp.tracking import open_experiment, retrying

    run_id = parent_run_id(sweep_dir)
    if run_id:
        client, _ = open_experiment(uri, experiment)
        retrying(client.set_terminated)(run_id, status)
