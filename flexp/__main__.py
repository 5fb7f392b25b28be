"""`python -m flexp [+experiment=NAME] [key=value ...]`: one job, or a sweep with -m."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flexp.config import ConfigError, check_key, parse_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SWEEPS_DIR = CONF_DIR.parent / "sweeps"
GROUPS = ("dataset", "model", "partition", "engine", "tracking", "experiment", "sweep", "strategy")
log = logging.getLogger("flexp")


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit: bad input is no reason for a traceback."""
    print(f"flexp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject `group=option` overrides that name no config file, before Hydra prints a page about it."""
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and "." in name and not arg.startswith(("+", "~", "hydra.")):
            try:
                check_key(name)
            except ConfigError as err:
                fail(str(err))
        if not sep or name not in GROUPS or "(" in value:
            continue
        folder = (SWEEPS_DIR if name == "sweep" else conf_dir) / name
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        for option in value.split(","):
            if option and option not in known:
                fail(f"{name}={option!r}: unknown {name}; choose one of {', '.join(known)}")


def sweep_tags() -> dict[str, str]:
    """Tags tying a job to its Hydra sweep (id: the sweep dir's last two parts) and its overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flexp.sweep import parent_run_id, sweep_id

    hc = HydraConfig.get()
    tags = {"flexp.overrides": " ".join(hc.overrides.task) or "(none)"}
    if hc.mode == RunMode.MULTIRUN:
        tags["flexp.sweep_id"] = sweep_id(hc.sweep.dir)
        tags["flexp.job_num"] = str(hc.job.num)
        if parent := parent_run_id(hc.sweep.dir):
            tags["mlflow.parentRunId"] = parent
    return tags


def with_sweeps_on_search_path(argv: list[str]) -> list[str]:
    """Add sweeps/ to Hydra's config search path (so `+sweep=table1` resolves) unless the user set one.

    It goes beside the other overrides, since Hydra's parser wants them in one run (`-m a=1 --cfg job` both work).
    """
    if any(a.lstrip("+").startswith("hydra.searchpath=") for a in argv):
        return argv
    extra = f"hydra.searchpath=[file://{SWEEPS_DIR}]"
    first = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:first], extra, *argv[first:]]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Validate the composed config at the edge, then run the job."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
        config = parse_config(tree)
    except (ConfigError, OmegaConfBaseException) as err:
        fail(str(err).splitlines()[0])
    from flexp.writer import TrackingError, TrackingWriter

    tracker = TrackingWriter(config.tracking)
    from flexp.data.mnist import DataSourceError
    from flexp.run import execute

    try:
        result = execute(config, tracker, sweep_tags(), OmegaConf.to_yaml(cfg))
    except (ConfigError, TrackingError) as err:
        fail(str(err))
    except DataSourceError as err:
        fail(" | ".join(str(err).splitlines()), code=1)
    except KeyboardInterrupt:
        fail("interrupted: the MLflow run is marked KILLED and keeps the rounds logged so far", code=130)
    finally:
        tracker.close()
    return result.summary().get("best_test_accuracy")


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (kill, a scheduler's stop) like Ctrl-C, so the MLflow run is ended KILLED, not left RUNNING."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    interrupt_on_sigterm()
    check_group_choices(sys.argv[1:])
    sys.argv[1:] = with_sweeps_on_search_path(sys.argv[1:])
    main()
