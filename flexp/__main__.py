"""`flexp` / `python -m flexp [+experiment=NAME] [key=value ...]`: one job, or a sweep with -m.

Hydra and everything heavier are imported inside functions, after `cli` has taken over Ctrl-C (flexp.interrupt).
"""

from __future__ import annotations

import os
import shlex
import sys

from flexp import interrupt

if __name__ == "__main__":
    interrupt.install()

import logging  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from flexp.config import ConfigError, ExperimentConfig, check_key, parse_config  # noqa: E402
from flexp.searchpath import CONF_DIR, SWEEPS_DIR, group_options, search_dirs, with_sweeps_on_search_path  # noqa: E402

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from flexp.checkpoint import Checkpoint

GROUPS = (*sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"),  # conf/ groups and
          *sorted(p.name for p in SWEEPS_DIR.iterdir() if p.is_dir()))  # sweeps/ groups (sweep, codec, asynchrony..)
PRESETS = ("experiment", "sweep")
OWN_PRIMARY_FLAGS = ("--config-name", "-cn", "--config-path", "-cp")
MULTIRUN_FLAGS = ("-m", "--multirun")
CFG_FLAGS = ("-c", "--cfg")
VALUE_FLAGS = (*OWN_PRIMARY_FLAGS, *CFG_FLAGS, "--config-dir", "-cd", "--package", "-p", "--info", "-i",
               "--experimental-rerun")
log = logging.getLogger("flexp")


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit: bad input is no reason for a traceback (and an interrupt no error)."""
    kind = "" if code == interrupt.EXIT_CODE else "error: "
    print(f"flexp: {kind}{message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_group_choices(argv: list[str]) -> None:
    """Reject `group=option` overrides that name no config file in any search-path dir, and presets without
    their `+`, before Hydra prints a page about it."""
    dirs = search_dirs(argv)
    flexp_primary = not any(a.partition("=")[0] in OWN_PRIMARY_FLAGS for a in argv)
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        plain = sep and not arg.startswith(("+", "~", "-", "hydra")) and "/" not in name
        if plain and ("." in name or name not in GROUPS):
            try:
                check_key(name)
            except ConfigError as err:
                fail(str(err))
        if not sep or name not in GROUPS or "(" in value:
            continue
        if name in PRESETS and arg == f"{name}={value}" and flexp_primary:
            fail(f"{arg}: presets are added with a plus: +{arg}")
        known = group_options(name, dirs)
        for option in value.split(","):
            if option and option not in known:
                fail(f"{name}={option!r}: unknown {name}; choose one of {', '.join(known)}")


def sweep_overrides(argv: list[str]) -> list[str]:
    """The overrides Hydra reads as several values (`a,b`, `range(..)`, `choice(..)`, `glob(..)`, ...); a list
    `[a,b]`, a quoted `'a,b'` or an interpolation is one value. A flag's own value (`-cd DIR`) is no override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, found = OverridesParser.create(), []
    for before, arg in zip(["", *argv], argv):
        if arg.startswith("-") or "=" not in arg or before in VALUE_FLAGS:
            continue
        try:
            if parser.parse_override(arg).is_sweep_override():
                found.append(arg)
        except HydraException:
            continue
    return found


def asks_for_multirun(argv: list[str], sweeps: list[str]) -> bool:
    """-m, hydra.mode=MULTIRUN, or one +sweep= preset (flexp's set hydra.mode: MULTIRUN) make Hydra run a sweep."""
    return bool(set(MULTIRUN_FLAGS) & set(argv)) or any(
        a == "hydra.mode=MULTIRUN" or (a.lstrip("+").startswith("sweep=") and a not in sweeps) for a in argv)


def shows_config(argv: list[str]) -> bool:
    """--cfg: Hydra prints one job's config and runs nothing."""
    return any(a in CFG_FLAGS or a.startswith("--cfg=") for a in argv)


def check_sweeps(argv: list[str]) -> None:
    """Refuse several values for a key where Hydra runs one job (no -m, or --cfg), before it prints a page."""
    sweeps, shows_one = sweep_overrides(argv), shows_config(argv)
    if sweeps and (shows_one or not asks_for_multirun(argv, sweeps)):
        fix = "--cfg shows one job's config, so give it one value" if shows_one else "add -m to run one job per value"
        fail(f"{sweeps[0]} is a sweep (several values): {fix}")


def check_command_line(argv: list[str]) -> None:
    """Every check on the command line itself, each stopping with one line before Hydra runs."""
    if set(MULTIRUN_FLAGS) & set(argv) and shows_config(argv):
        fail("--cfg shows one job's config: drop -m (Hydra prints one config at a time)")
    check_group_choices(argv)
    check_sweeps(argv)


def forcing_known_keys(argv: list[str]) -> list[str]:
    """`key=value` -> `++key=value` for dotted keys flexp knows (checked before), so a key the chosen group's file
    leaves out (strategy.mu under strategy=fedavg) is set and validated rather than refused by Hydra."""
    out = []
    for arg in argv:
        name, sep, _ = arg.partition("=")
        forced = sep and "." in name and not arg.startswith(("+", "~", "-", "hydra."))
        out.append(f"++{arg}" if forced else arg)
    return out


def sweep_tags() -> dict[str, str]:
    """Tags tying a job to its Hydra sweep (id: the sweep dir's last two parts) and its overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from flexp.sweep import parent_run_id, sweep_id

    hc = HydraConfig.get()
    tags = {"flexp.overrides": " ".join(o.removeprefix("++") for o in hc.overrides.task) or "(none)"}
    if hc.mode == RunMode.MULTIRUN:
        tags["flexp.sweep_id"] = sweep_id(hc.sweep.dir)
        tags["flexp.job_num"] = str(hc.job.num)
        if parent := parent_run_id(hc.sweep.dir):
            tags["mlflow.parentRunId"] = parent
    return tags


def usage(dirs: list[Path]) -> str:
    """flexp's own part of `--help`: the commands, and the presets and sweeps found on the search path."""
    presets, sweeps = (", ".join(group_options(g, dirs)) or "(none)" for g in PRESETS)
    return f"""flexp: federated-learning experiments (FedAvg, McMahan et al. 2017) from Hydra configs, logged to MLflow.

Usage (`flexp` is the same command as `python -m flexp`):
  python -m flexp [group=option] [key=value ...]          one job (e.g. model=2nn fl.rounds=50)
  python -m flexp +experiment=PRESET [key=value ...]      a preset job
  python -m flexp -m +experiment=PRESET +sweep=SWEEP      a sweep: one job per grid point (or a,b,c values)
  python -m flexp resume=<output dir | MLflow run id>     continue a stopped job from its last checkpoint
  python -m flexp.report <sweep id | experiment>          a sweep's table and plots from MLflow
  python -m flexp --cfg job [overrides]                   print the composed config, run nothing
  python -m flexp --help group=option                     this help with that option's keys (compression=topk)

Presets (+experiment=): {presets}
Sweeps (+sweep=, with -m): {sweeps}
Your own configs: --config-dir DIR or hydra.searchpath=[file:///DIR]; DIR/experiment/NAME.yaml is +experiment=NAME,
DIR/model/NAME.yaml is model=NAME.
"""


def main(cfg: DictConfig) -> float | None:
    """Hydra's task function: validate the composed config at the edge, then run the job."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
        config = parse_config(tree)
    except (ConfigError, OmegaConfBaseException) as err:
        fail(str(err).splitlines()[0])
    from flexp.writer import TrackingError, TrackingWriter

    output_dir, resume = job_output_dir(), None
    if config.resume is not None:
        try:
            config, resume, output_dir = resumed(config)
        except ConfigError as err:
            fail(str(err))
    tracker = TrackingWriter(config.tracking)
    tracker.resume_hint = f"To log the rest later: python -m flexp resume={output_dir}"
    from flexp.data.mnist import DataSourceError
    from flexp.fedavg import AllClientsFailed, ClientFailure, Diverged, ServerStepFailed
    from flexp.job import execute
    from flexp.tracking import rival_lookup

    try:
        result = execute(config, tracker, sweep_tags(), OmegaConf.to_yaml(cfg), output_dir, resume,
                         rivals=partial(rival_lookup, config.tracking))
    except (ConfigError, TrackingError) as err:
        fail(str(err))
    except Diverged as err:
        if in_multirun():    # a learning-rate grid's too-large rates diverge: that run is FAILED, the sweep goes on
            print(f"flexp: warning: {err}; the sweep goes on", file=sys.stderr, flush=True)
            return None
        fail(f"{err} The last good checkpoint is in {output_dir}.", code=1)
    except (DataSourceError, AllClientsFailed, ClientFailure, ServerStepFailed) as err:
        fail(" | ".join(str(err).splitlines()), code=1)
    except KeyboardInterrupt:
        if in_multirun():
            end_sweep_killed(config)
        fail(interrupted(output_dir, tracker.asked), code=interrupt.EXIT_CODE)
    finally:
        tracker.close()
    return result.summary().get("best_test_accuracy")


def interrupted(output_dir: Path, started: bool) -> str:
    """What an interrupt left behind, and how to go on from it."""
    from flexp import checkpoint

    if (output_dir / checkpoint.FILE).is_file():
        return (f"interrupted: the MLflow run is marked KILLED and keeps the rounds logged so far; continue it with "
                f"python -m flexp resume={output_dir}")
    if started:
        return "interrupted before the first round ended: the MLflow run is marked KILLED"
    return interrupt.NOTHING_LOGGED


def end_sweep_killed(config: ExperimentConfig) -> None:
    """An interrupted sweep stops here: its parent run ends KILLED, not left RUNNING."""
    from hydra.core.hydra_config import HydraConfig

    from flexp.sweep import end_parent

    end_parent(HydraConfig.get().sweep.dir, config.tracking.uri, config.tracking.experiment, "KILLED")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (a sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def job_output_dir() -> Path:
    """This job's Hydra output directory, where its checkpoint lives."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def resumed(config: ExperimentConfig) -> tuple[ExperimentConfig, Checkpoint, Path]:
    """(the original config, its checkpoint, its output dir) for resume=<output dir | MLflow run id>."""
    from flexp import checkpoint

    directory = Path(config.resume).expanduser()
    if directory.name == checkpoint.FILE and directory.is_file():
        directory = directory.parent
    if not (directory / checkpoint.FILE).is_file():
        directory = output_dir_of_run(config.resume, config)
    try:
        saved = checkpoint.load(directory)
    except Exception as err:
        raise ConfigError("resume", config.resume, f"cannot read {directory / checkpoint.FILE}: {err}") from None
    return parse_config(saved.config), saved, directory


def output_dir_of_run(run_id: str, config: ExperimentConfig) -> Path:
    """The output dir an MLflow run was started from (its flexp.output_dir tag), if it holds a checkpoint."""
    from flexp import checkpoint

    why = f"is neither a directory with {checkpoint.FILE} nor a run id in {config.tracking.uri}"
    try:
        from mlflow.tracking import MlflowClient

        from flexp.tracking import quiet_mlflow

        quiet_mlflow()
        run = MlflowClient(tracking_uri=config.tracking.uri).get_run(run_id)
    except Exception:
        raise ConfigError("resume", run_id, why) from None
    directory = Path(run.data.tags.get("flexp.output_dir", ""))
    if not run.data.tags.get("flexp.output_dir") or not (directory / checkpoint.FILE).is_file():
        raise ConfigError("resume", run_id, f"run {run_id} has no checkpoint (looked in {directory})")
    return directory


def command_line(argv: list[str]) -> str:
    """The command as the user typed it, quoted for a shell: `python -m flexp ARGS` or `flexp ARGS`."""
    program = "python -m flexp" if Path(argv[0]).name == "__main__.py" else Path(argv[0]).name
    return " ".join([program, *map(shlex.quote, argv[1:])])


def cli() -> None:
    """The `flexp` command and `python -m flexp`: take over Ctrl-C and SIGTERM, check the command line in one line
    each, then run Hydra."""
    interrupt.install()
    try:
        run_cli(sys.argv[1:])
    except KeyboardInterrupt:
        fail(interrupt.NOTHING_LOGGED, code=interrupt.EXIT_CODE)


def run_cli(argv: list[str]) -> None:
    """The command line's checks, then Hydra's main (one job, or a sweep with -m)."""
    import hydra

    from flexp.tracking import SOURCE_ENV

    check_command_line(argv)
    warn_resume_overrides(argv)
    if "--help" in argv or "-h" in argv:
        print(usage(search_dirs(argv)))
    os.environ[SOURCE_ENV] = command_line(sys.argv)   # each run's MLflow Source, in whichever process logs it
    sys.argv[1:] = with_sweeps_on_search_path(forcing_known_keys(argv))
    interrupt.check()
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(main)()


def warn_resume_overrides(argv: list[str]) -> None:
    """resume= continues a run with the config it started with: say so when other overrides would be ignored."""
    if not any(a.startswith("resume=") for a in argv):
        return
    ignored = [a for a in argv if "=" in a and not a.startswith(("resume=", "hydra", "-"))]
    if ignored:
        print(f"flexp: warning: resume= continues the run with its own config; ignored: {' '.join(ignored)}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    cli()
