"""flexp built as an sdist, then a wheel, installed into a bare directory and run from elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, SMALL, mlflow_client

SOURCES = ("pyproject.toml", "README.md", "flexp", "conf", "sweeps")


def user_config_dir(root: Path) -> Path:
    """A user's own config dir: a preset `mine` (SMALL, one round) that picks their own model option `wide`."""
    tree: dict = {"defaults": [{"override /dataset": "synthetic"}, {"override /model": "wide"}]}
    for key, value in (arg.split("=") for arg in SMALL if "." in arg.split("=")[0]):
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    tree["fl"]["rounds"], tree["tracking"] = 1, {"experiment": "mine"}
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "mine.yaml").write_text("# @package _global_\n" + yaml.safe_dump(tree, sort_keys=False))
    (root / "model").mkdir()
    (root / "model" / "wide.yaml").write_text("name: 2nn\nhidden: 17\n")
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An sdist of a copy of the repository, a wheel built from that sdist, and the wheel installed with pip."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree
                                         else {}))
    build = "from setuptools.build_meta import build_sdist; print(build_sdist('dist'))"
    sdist = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, check=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", str(src / "dist" / sdist.stdout.split()[-1]), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "wheels")], check=True, capture_output=True)
    (wheel,) = (tmp / "wheels").glob("flexp-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)], check=True,
                   capture_output=True)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp / "site"), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return SimpleNamespace(wheel=wheel, site=tmp / "site", cwd=cwd, env=env, user=user_config_dir(tmp / "mine"))


def run(installed: SimpleNamespace, command: list[str]) -> subprocess.CompletedProcess[str]:
    """A command in a directory outside the repository, seeing only the installed flexp."""
    proc = subprocess.run(command, cwd=installed.cwd, env=installed.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_the_wheel_holds_every_module_and_config(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {f"flexp/{p.relative_to(ROOT / 'flexp')}" for p in (ROOT / "flexp").rglob("*.py")}
    configs = {f"flexp/{p.relative_to(ROOT)}" for d in ("conf", "sweeps") for p in (ROOT / d).rglob("*.yaml")}
    assert modules - names == set() and configs - names == set()
    assert len(configs) > 30 and "flexp/sweeps/sweep/table1_quick.yaml" in names


def test_installed_flexp_runs_a_users_preset_with_their_model_to_finished(installed):
    where = run(installed, [sys.executable, "-c", "import flexp; print(flexp.__file__)"]).stdout.strip()
    assert Path(where) == installed.site / "flexp" / "__init__.py"
    run(installed, [sys.executable, "-m", "flexp", "--config-dir", str(installed.user), "+experiment=mine"])
    client = mlflow_client(installed.cwd)
    (finished,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert finished.info.status == "FINISHED"
    assert (finished.data.params["model.name"], finished.data.params["fl.rounds"]) == ("2nn", "1")
    assert finished.data.metrics["bytes_up"] == 1 * 4 * (60 * 17 + 17 + 17 * 17 + 17 + 17 * 10 + 10)


def test_the_flexp_command_composes_a_sweep_with_a_users_searchpath(installed):
    flexp = str(installed.site / "bin" / "flexp")
    proc = run(installed, [flexp, f"hydra.searchpath=[file://{installed.user}]", "+experiment=mine",
                           "+sweep=table1_quick", "--cfg", "job"])
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["hidden"], cfg["fl"]["rounds"], cfg["fl"]["target_accuracy"]) == (17, 25, 0.92)


def test_the_flexp_command_starts_its_help_with_flexps_usage(installed):
    proc = run(installed, [str(installed.site / "bin" / "flexp"), "--help", "-cd", str(installed.user)])
    assert proc.stdout.startswith("flexp: ")
    head, hydra_part = proc.stdout.split("== Configuration groups", 1)
    assert "+experiment=" in head and "python -m flexp.report" in head and "resume=" in head
    presets = next(line for line in head.splitlines() if line.startswith("Presets"))
    sweeps = next(line for line in head.splitlines() if line.startswith("Sweeps"))
    assert "mine" in presets and "mnist_2nn_iid" in presets and "table1_quick" in sweeps
    assert "model: 2nn, cnn, custom, logreg, wide" in hydra_part
