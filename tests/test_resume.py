"""Checkpoint and resume: a run killed with SIGKILL and resumed ends bit-identical to one never interrupted, and
its MLflow history has every round exactly once."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli

from flexp import checkpoint

ROUNDS = 12
ARGS = [*SMALL, "model=2nn", "model.hidden=16", f"fl.rounds={ROUNDS}", "fl.lr=0.05", "tracking.log_model=false"]
STRATEGY = {  # DP-FedAdam with adaptive clipping (its clip and accountant are state); SCAFFOLD with local DP-SGD,
    # top-k with error feedback (the residuals are state) on heavy-tailed devices (the clock is the history's), its
    # per-client state spilled to disk and checkpointed incrementally
    "dp-fedadam": ["strategy=fedadam", "strategy.server_lr=0.05", "fl.fraction=0.5", "privacy=dp_fedavg",
                   "privacy.noise_multiplier=0.5", "privacy.adaptive=true", "privacy.clip_count_stddev=2"],
    "scaffold dp-sgd topk system": ["strategy=scaffold", "privacy=dp_sgd", "privacy.noise_multiplier=0.5",
                                    "fl.fraction=0.3", "compression=topk", "compression.ratio=0.1",
                                    "system=heavy_tailed", "system.over_select=0.4",
                                    "checkpoint.client_state_mb=0.002"]}  # c_i and residuals spill to disk


def _checkpoint_dirs(cwd):
    return [p.parent for p in (cwd / "outputs").rglob(checkpoint.FILE)]


def _run_and_kill(cwd, args, at_round: int) -> None:
    """Start the CLI and SIGKILL it as soon as it reports `at_round` (the writer process then ends the run)."""
    import os

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flexp", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(f"round {at_round}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _wait_for_status(client, run_id, status, timeout=60.0):
    deadline = time.time() + timeout
    while client.get_run(run_id).info.status != status and time.time() < deadline:
        time.sleep(0.2)
    assert client.get_run(run_id).info.status == status


@pytest.mark.parametrize("by, strategy", [("output_dir", "dp-fedadam"), ("run_id", "scaffold dp-sgd topk system")])
def test_sigkill_then_resume_is_bit_identical_with_each_round_logged_once(tmp_path, by, strategy):
    args = [*ARGS, *STRATEGY[strategy]]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    assert run_cli(args, clean).returncode == 0
    (clean_dir,) = _checkpoint_dirs(clean)

    at_round = random.Random(f"flexp-{by}").randint(2, ROUNDS - 3)
    _run_and_kill(killed, args, at_round)
    (killed_dir,) = _checkpoint_dirs(killed)
    saved = checkpoint.load(killed_dir)
    assert at_round <= saved.state.round < ROUNDS
    spill = killed_dir / checkpoint.STATE_DIR / "spill"
    assert bool(list(spill.rglob("*.bin"))) == ("client_state_mb" in " ".join(args))  # the killed run had spilled
    client = mlflow_client(killed)
    _wait_for_status(client, saved.run_id, "KILLED")

    proc = run_cli([f"resume={killed_dir if by == 'output_dir' else saved.run_id}"], killed)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming after round {saved.state.round} of {ROUNDS}" in proc.stdout

    assert torch.equal(checkpoint.load(killed_dir).state.params, checkpoint.load(clean_dir).state.params)
    run = client.get_run(saved.run_id)
    assert run.info.status == "FINISHED"
    states = [checkpoint.load(d).state for d in (killed_dir, clean_dir)]
    stages = [state.strategy.state_dict()["stages"] for state in states]
    assert stages[0]["privacy"] == stages[1]["privacy"] and stages[0]["privacy"]  # the accountant's (adaptive clip's)
    if "compression" in stages[0]:
        residuals = [stage["compression"]["residual"] for stage in stages]
        assert residuals[0].keys() == residuals[1].keys() and residuals[0]
        assert all(torch.equal(residuals[0][c], residuals[1][c]) for c in residuals[0])
        assert [r.sim_hours for r in states[0].history] == [r.sim_hours for r in states[1].history]
        assert sum(r.surplus for r in states[0].history) > 0
        assert not list(spill.rglob("*.bin"))  # working memory, removed once the resumed run ended
        c_i = [state.strategy.state_dict()["algorithm"]["c_i"] for state in states]
        assert c_i[0].keys() == c_i[1].keys() and all(torch.equal(c_i[0][c], c_i[1][c]) for c in c_i[0])
    for key in ("test_accuracy", "train_loss", "round_seconds", "epsilon", *(("sim_hours",) if "system" in strategy
                                                                              else ())):
        assert [m.step for m in client.get_metric_history(saved.run_id, key)] == list(range(1, ROUNDS + 1)), key
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_of_something_that_is_not_a_checkpoint_is_one_line(tmp_path):
    proc = run_cli(["resume=nowhere"], tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume='nowhere'" in lines[0], proc.stderr

