"""Bad input stops with one line naming the key, exit code 2, and no MLflow run left behind."""

import pytest
from conftest import SMALL, run_cli

CASES = [
    (["fl.fraction=1.5"], "fl.fraction"),
    (["fl.fraction=-0.1"], "fl.fraction"),
    (["fl.local_epochs=0"], "fl.local_epochs"),
    (["fl.lr=0"], "fl.lr"),
    (["fl.lr=-0.5"], "fl.lr"),
    (["fl.lr=fast"], "fl.lr"),
    (["fl.rounds=0"], "fl.rounds"),
    (["fl.batch_size=-3"], "fl.batch_size"),
    (["fl.clients=100000"], "fl.clients"),
    (["model=resnet"], "model"),
    (["model.name=resnet"], "model.name"),
    (["dataset=imagenet"], "dataset"),
    (["partition=sorted"], "partition"),
    (["partition=shards", "partition.num_shards=7"], "partition=shards"),
    (["partition=natural", "fl.clients=4"], "partition=natural"),
    (["mode=central"], "mode"),
    (["model=cnn"], "model.name"),
    (["fl.lrr=0.1"], "fl.lrr"),
    (["+fl.lrr=0.1"], "fl.lrr"),
    (["+learning_rate=0.1"], "learning_rate"),
    (["seeed=1"], "seeed"),
    (["strategy=fedsgd"], "strategy"),
    (["strategy=trimmed_mean", "strategy.trim=0.7"], "strategy.trim"),
    (["attack.name=poison"], "attack.name"),
    (["strategy.mu=0.5"], "strategy.mu"),
    (["strategy=fedprox", "strategy.mu=-1"], "strategy.mu=-1: must be >= 0.0"),
    (["strategy=fedavgm", "strategy.momentum=1.5"], "strategy.momentum=1.5: must be <= 1.0"),
    (["strategy=fedyogi", "strategy.tau=0"], "strategy.tau=0: must be > 0.0"),
    (["strategy=scaffold", "strategy.server_lr=fast"], "strategy.server_lr='fast': must be a finite number"),
    (["strategy=multikrum", "strategy.keep=0"], "strategy.keep=0: must be >= 1"),
    (["strategy=krum", "strategy.byzantine=0.5"], "strategy.byzantine=0.5: must be an integer"),
    (["strategy=krum", "strategy.keep=3"], "strategy.keep: unknown key"),
    (["strategy.name=median"], "strategy.name='median'"),
    (["attack.fraction=1.2"], "attack.fraction"),
    (["data.arrival=sometimes"], "data.arrival"),
    (["data.arrival_start=0"], "data.arrival_start"),
    (["model.hiden=3"], "model.hiden"),
    (["model=custom", "model._target_=no_such.Net"], "model._target_"),
    (["callbacks.fair._target_=no_such.Callback"], "callbacks.fair._target_"),
    (["strategy=custom", "strategy._target_=no_such.Algorithm"], "strategy._target_"),
    (["fl.lr=0.1,0.2"], "fl.lr=0.1,0.2 is a sweep"),
    (["fl.sampling=sometimes"], "fl.sampling"),
    (["fl.sampling=poisson", "fl.fraction=0"], "fl.fraction"),
    (["privacy=laplace"], "privacy"),
    (["privacy.clip=1"], "privacy.clip"),
    (["privacy=dp_fedavg", "privacy.clipp=1"], "privacy.clipp"),
    (["privacy=dp_fedavg", "privacy.clip=0"], "privacy.clip=0"),
    (["privacy=dp_fedavg", "privacy.noise_multiplier=-1"], "privacy.noise_multiplier=-1"),
    (["privacy=dp_fedavg", "privacy.delta=1.5"], "privacy.delta=1.5"),
    (["privacy=dp_fedavg", "privacy.accountant=moments"], "privacy.accountant"),
    (["privacy=dp_fedavg", "privacy.accountant=pld"], "privacy.accountant='pld': accountant pld accounts Poisson"),
    (["privacy=dp_fedavg", "fl.fraction=1", "privacy.delta=1e-5", "privacy.target_epsilon=0.001"],
     "privacy.target_epsilon=0.001: rdp epsilon jumps"),
    (["privacy=dp_fedavg", "privacy.target_epsilon=2", "privacy.noise_multiplier=1"], "privacy.target_epsilon"),
    (["privacy=dp_fedavg", "strategy=median"], "strategy='Median': aggregates individual replies"),
    (["privacy=dp_fedavg", "model=custom", "model._target_=torch.nn.BatchNorm1d", "model.num_features=60"],
     "privacy='dp_fedavg': the model has buffers"),
    (["privacy=dp_sgd", "privacy.target_epsilon=2"], "privacy.target_epsilon"),
    (["engine.device=gpu"], "engine.device='gpu': must be cpu, cuda or cuda:N"),
    (["engine.device=cuda:1"], "engine.device='cuda:1': CUDA is not available"),
    (["compression=quantize", "compression.bits=0"], "compression.bits=0: must be from 1 to 16"),
    (["compression=quantize", "compression.bits=17"], "compression.bits=17: must be from 1 to 16"),
    (["compression=quantize", "compression.rotate=true", "compression.block=1000"], "compression.block=1000"),
    (["compression=topk", "compression.ratio=0"], "compression.ratio=0: must be > 0.0"),
    (["compression=random_mask", "compression.ratio=1.5"], "compression.ratio=1.5: must be <= 1.0"),
    (["compression=sign", "compression.download_bits=20"], "compression.download_bits=20"),
    (["compression=download", "compression.download_bits=0"], "compression.download_bits=0: must be from 1 to 16"),
    (["compression=topk", "compression.plan=x"], "compression.plan: is not a setting"),
    (["compression.bits=8"], "compression.bits"),
    (["system=uniform", "system.deadline=0.001"], "system.deadline=0.001: no client can meet it"),
    (["system=heavy_tailed", "system.spread=-1"], "system.spread=-1"),
    (["system=trace"], "system.path"),
    (["system=trace", "system.path=no_such_trace.csv"], "system.path='no_such_trace.csv': cannot be read"),
    (["fl.sampling=poisson", "fl.fraction=0.3", "system=uniform", "system.over_select=0.3"], "system.over_select"),
    (["strategy=fedbuff", "system=uniform", "strategy.buffer_size=0"], "strategy.buffer_size=0: must be >= 1"),
    (["strategy=fedbuff", "system=uniform", "strategy.staleness=cubic"], "strategy.staleness='cubic': must be one"),
    (["strategy=fedbuff", "system=uniform", "async.concurrency=11"], "async.concurrency=11: must be at most fl.clie"),
    (["strategy=fedbuff", "system=uniform", "async.max_staleness=-1"], "async.max_staleness=-1: must be >= 0"),
    (["strategy=fedbuff"], "system='none': strategy=fedbuff runs on the simulated clock"),
    (["strategy=fedbuff", "system=uniform", "privacy=dp_fedavg"], "privacy='dp_fedavg': is not accounted for"),
    (["strategy=fedbuff", "system=uniform", "system.deadline=5"], "system.deadline=5.0: has no meaning"),
    (["strategy=fedbuff", "system=uniform", "clients.dropout=0.1"], "clients.dropout=0.1: is not simulated"),
    (["async.concurrency=5"], "async.concurrency=5: needs an asynchronous strategy (strategy=fedbuff)"),
    (["async.buffer=5"], "async.buffer: unknown key"),
    (["engine=threads", "engine.address=auto"], "engine.address='auto': is a setting of engine=ray"),
    (["+engine.actor_engine=threads"], "engine.actor_engine='threads': is a setting of engine=ray"),
    (["dataset.users=10000000", "dataset.samples_per_user=null"], "dataset.users=10000000: FedProx's power-law sizes"),
    (["dataset.users=10000", "dataset.samples_per_user=10000000"], "dataset.samples_per_user=10000000: 10000000 samp"),
]


# One case per place the CLI can stop: the command line, Hydra's composition, validation, data-dependent checks
# after the data loaded (the writer process already started), and a _target_ that cannot be imported.
THROUGH_THE_CLI = [["model=resnet"], ["+learning_rate=0.1"], ["fl.lr=fast"], ["partition=natural", "fl.clients=4"],
                   ["model=custom", "model._target_=no_such.Net"]]


@pytest.mark.parametrize("overrides", THROUGH_THE_CLI, ids=" ".join)
def test_bad_value_exits_2_with_one_line_naming_the_key(store, overrides):
    key = dict((tuple(c[0]), c[1]) for c in CASES)[tuple(overrides)]
    proc = run_cli([*SMALL, *overrides], store, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flexp: error: ")
    assert key in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    db = store / "mlflow.db"
    if db.exists():
        import sqlite3

        with sqlite3.connect(db) as con:
            assert con.execute("select count(*) from runs").fetchone()[0] == 0


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `python -m flexp ARGV` stops with, found in-process along the CLI's own path (argv checks,
    composition, validation, then everything prepare() builds before a run starts)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from flexp.__main__ import check_command_line
    from flexp.api import compose
    from flexp.config import ConfigError, parse_config
    from flexp.job import prepare

    try:
        check_command_line(argv)
        try:
            cfg = parse_config(OmegaConf.to_container(compose(argv), resolve=True))
        except OmegaConfBaseException as err:
            return str(err).splitlines()[0]
        prepare(cfg)
    except SystemExit:
        return capsys.readouterr().err.strip()
    except ConfigError as err:
        return str(err)
    pytest.fail(f"{argv} was accepted")


@pytest.mark.parametrize("overrides, key", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_every_bad_value_is_refused_naming_its_key(overrides, key, capsys):
    line = cli_error([*SMALL, *overrides], capsys)
    assert key in line and len(line.splitlines()) == 1, line


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The command line's checks on argv, in-process: they must exit 2 with one stderr line; returns that line."""
    from flexp.__main__ import check_command_line

    with pytest.raises(SystemExit) as stop:
        check_command_line(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("flexp: error: "), err
    return err.strip()


@pytest.mark.parametrize("arg", ["experiment=mnist_iid", "sweep=table1_quick"])
def test_a_preset_without_its_plus_is_one_line_saying_so(arg, capsys):
    assert one_error_line([*SMALL, arg], capsys).endswith(f"{arg}: presets are added with a plus: +{arg}")


SWEEPS_WITHOUT_M = [["fl.lr=0.1,0.2"], ["model=2nn,cnn"], ["++fl.lr=range(1,3)"], ["seed=choice(1,2)"],
                    ["+sweep=table1_quick,table2"], ["+experiment=mnist_iid", "fl.rounds=1,2", "-cd", "x"]]


@pytest.mark.parametrize("argv", SWEEPS_WITHOUT_M, ids=" ".join)
def test_a_sweep_without_m_is_one_line_saying_to_add_it(argv, capsys):
    sweep = next(a for a in argv if "," in a)
    assert one_error_line(argv, capsys) == (f"flexp: error: {sweep} is a sweep (several values): "
                                            "add -m to run one job per value")


def test_a_sweep_beside_cfg_is_one_line_asking_for_one_value(capsys):
    assert one_error_line(["--cfg", "job", "+sweep=table1_quick", "fl.lr=0.1,0.2"], capsys).endswith(
        "fl.lr=0.1,0.2 is a sweep (several values): --cfg shows one job's config, so give it one value")


ONE_VALUE_OR_MULTIRUN = [["-m", "fl.lr=0.1,0.2"], ["--multirun", "model=2nn,cnn"], ["seed=range(3)", "-m"],
                         ["+sweep=table1_quick", "fl.lr=0.1,0.2"], ["hydra.mode=MULTIRUN", "fl.lr=0.1,0.2"],
                         ["hydra.searchpath=[file:///a,file:///b]"], ["tracking.experiment='a,b'"],
                         ["dataset.root=${oc.env:FLEXP_DATA,/tmp}"], ["-cd", "a=1,2", "fl.lr=0.1"]]


@pytest.mark.parametrize("argv", ONE_VALUE_OR_MULTIRUN, ids=" ".join)
def test_commas_that_are_one_value_or_under_multirun_pass(argv, capsys):
    from flexp.__main__ import check_sweeps

    check_sweeps(argv)
    assert capsys.readouterr().err == ""


@pytest.fixture
def user_dir(tmp_path):
    """A user's config dir with one model option and one sweep preset."""
    for group, name in (("model", "wide"), ("sweep", "mine")):
        (tmp_path / group).mkdir()
        (tmp_path / group / f"{name}.yaml").write_text("name: 2nn\n")
    return tmp_path


@pytest.mark.parametrize("where", ["--config-dir", "hydra.searchpath"])
def test_unknown_options_are_listed_from_every_search_path_dir(user_dir, where, capsys):
    from flexp.__main__ import check_group_choices

    dirs = ["-cd", str(user_dir)] if where == "--config-dir" else [f"hydra.searchpath=[file://{user_dir}]"]
    check_group_choices([*dirs, "model=wide", "+sweep=mine,table1"])
    assert one_error_line([*dirs, "model=wide,resnet"], capsys).endswith(
        "model='resnet': unknown model; choose one of 2nn, cnn, custom, logreg, wide")
    from flexp.searchpath import SWEEPS_DIR

    sweeps = sorted(["mine", *(p.stem for p in (SWEEPS_DIR / "sweep").glob("*.yaml"))])
    assert f"choose one of {', '.join(sweeps)}" in one_error_line([*dirs, "+sweep=x"], capsys)


def test_multirun_with_cfg_is_one_line_not_hydras_traceback(monkeypatch, capsys):
    from flexp.__main__ import cli

    monkeypatch.setattr("sys.argv", ["flexp", "-m", "+sweep=table1_quick", "--cfg", "job"])
    with pytest.raises(SystemExit) as stop:
        cli()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "drop -m" in err, err


def test_overrides_beside_resume_are_said_to_be_ignored(capsys):
    from flexp.__main__ import warn_resume_overrides

    warn_resume_overrides(["resume=outputs/runs/x", "fl.rounds=4", "hydra.run.dir=y"])
    assert capsys.readouterr().err.strip() == ("flexp: warning: resume= continues the run with its own config; "
                                               "ignored: fl.rounds=4")
    warn_resume_overrides(["resume=outputs/runs/x"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("overrides", [["strategy=fedbuff"], ["async.concurrency=5"],
                                       ["strategy=fedbuff", "system=uniform", "privacy=dp_fedavg"]], ids=" ".join)
def test_what_the_async_loop_cannot_run_is_refused_before_the_data_loads(overrides, monkeypatch, capsys):
    """No data-loading log line comes before the error line: the refusal needs only the config and the strategy."""
    import flexp.job

    monkeypatch.setattr(flexp.job, "load_dataset", lambda *a, **k: pytest.fail("the data loaded before the refusal"))
    line = cli_error([*SMALL, *overrides], capsys)
    assert line.split("=")[0] in ("system", "async.concurrency", "privacy"), line
