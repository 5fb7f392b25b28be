"""examples/flexp_examples, the user package of docs/bring-your-own.md: each piece runs as documented and
does what its paper says (FedNova is FedAvg at equal step counts, FedDyn with alpha=0 is FedAvg, the fairness
callback's values by hand, FedDyn resumes bit for bit from a weights_only checkpoint)."""

import os
import re
import runpy
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, mlflow_client, run_cli

import flexp
from flexp import checkpoint
from flexp.api import experiment
from flexp.client import ClientResult
from flexp.data import Split
from flexp.job import prepare, train
from flexp.strategy import make_strategy
from flexp.strategy.fedavg import FedAvg

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # what PYTHONPATH=examples does for the command line

from flexp_examples.fairness import Fairness  # noqa: E402
from flexp_examples.feddyn import FedDyn  # noqa: E402
from flexp_examples.fednova import FedNova  # noqa: E402
from flexp_examples.make_npz import CLIENT_IDS  # noqa: E402

CNN = ["model=custom", "model._target_=flexp_examples.cnn.SmallCNN"]
FEDNOVA = ["strategy=custom", "strategy._target_=flexp_examples.fednova.FedNova"]
FEDDYN = ["strategy=custom", "strategy._target_=flexp_examples.feddyn.FedDyn"]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """The example dataset, written by its documented command (run in this process)."""
    path = tmp_path_factory.mktemp("examples") / "clients.npz"
    argv, sys.argv = sys.argv, ["make_npz", str(path)]
    try:
        runpy.run_path(str(EXAMPLES / "flexp_examples" / "make_npz.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return path


def on_npz(npz, *overrides, partition="natural"):
    return flexp.compose(["dataset=npz", f"dataset.path={npz}", f"partition={partition}", "fl.clients=6",
                          "model=logreg", "fl.fraction=1", "fl.local_epochs=1", "fl.batch_size=15", "fl.lr=0.05",
                          "fl.rounds=1", "engine=threads", "engine.workers=1", *overrides])


def test_the_cnn_with_batchnorm_and_dropout_learns_the_npz_clients(npz):
    result = flexp.run(on_npz(npz, *CNN, "fl.rounds=3"))
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert {"BatchNorm2d", "Dropout"} <= kinds
    assert result.data.client_ids.tolist() == list(CLIENT_IDS)
    majority = float(torch.bincount(result.data.test.y).max()) / len(result.data.test)
    assert result.history[-1].test_accuracy > majority
    assert result.history[-1].train_loss < result.history[0].train_loss


@pytest.mark.parametrize("overrides, match", [
    (["strategy=custom"], "strategy._target_: must name a callable"),
    ([*FEDDYN, "strategy.alpah=1"], "strategy.alpah: unknown key; flexp_examples.feddyn.FedDyn takes num_clients"),
    ([*FEDDYN, "strategy.alpha=-1"], "strategy.alpha=-1: must be >= 0.0"),
    (["strategy=custom", "strategy._target_=flexp_examples.cnn.SmallCNN"], "is not a flexp.algorithm.Algorithm"),
    (["strategy=fedprox", "strategy.muu=1"], "strategy.muu: unknown key; flexp.strategy.fedprox.FedProx takes mu"),
    (["strategy.mu=1"], "strategy.mu: unknown key; flexp.strategy.fedavg.FedAvg takes no arguments (strategy=fedprox "
                        "takes it)"),
    (["strategy=fedadam", "strategy.name=fedyogi"], "strategy.name='fedyogi': names the built-in "
     "flexp.strategy.fedopt.FedYogi, but strategy._target_ is flexp.strategy.fedopt.FedAdam: choose one with "
     "strategy=fedyogi or strategy=fedadam"),
])
def test_strategy_keys_are_checked_against_the_target_or_the_builtin(overrides, match):
    from flexp.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(match)):
        experiment(flexp.compose(overrides))


def test_a_target_gets_num_clients_and_its_own_arguments_and_must_build_an_algorithm():
    cfg = experiment(flexp.compose([*FEDDYN, "strategy.alpha=0.25", "fl.clients=7"])).strategy
    built = make_strategy(cfg, 7, 0.1, 0)
    assert (cfg.name, built.num_clients, built.alpha) == ("FedDyn", 7, 0.25)
    from flexp.component import Component
    from flexp.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape("strategy._target_='builtins.dict': returned dict, not a flexp")):
        make_strategy(Component("strategy", "x", "builtins.dict"))


def replies(steps, num_samples, params):
    return [ClientResult(k, p, n, 0.0, s) for k, (p, n, s) in enumerate(zip(params, num_samples, steps))]


def test_fednova_by_hand_and_at_equal_steps_fedavgs_weighted_mean():
    x = torch.zeros(1, dtype=torch.float64)
    ys = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([6.0], dtype=torch.float64)]
    # p = (1/2, 1/2), d = (1/1, 6/3), tau_eff = 2: x + 2 (1/2 + 2/2) = 3, where FedAvg's mean is 3.5
    assert FedNova().aggregate(1, x, replies([1, 3], [1, 1], ys)).item() == 3.0
    ys = [torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    sizes = [3, 10, 7, 1]
    nova, avg = FedNova().aggregate(1, x, replies([4] * 4, sizes, ys)), FedAvg().aggregate(1, x, replies([4] * 4,
                                                                                                     sizes, ys))
    scale = max(float(y.abs().max()) for y in ys)
    assert torch.allclose(nova, avg, rtol=0, atol=8 * len(ys) * 2.0**-53 * scale)  # a few float64 roundings each


def ulp(t):
    return torch.nextafter(t.abs(), torch.tensor(float("inf"))) - t.abs()


def test_fednova_runs_as_fedavg_when_clients_take_equal_steps_and_not_otherwise(npz):
    equal = on_npz(npz, partition="iid")
    assert {len(p) for p in prepare(experiment(equal)).partition} == {45}  # 270 samples, 3 steps each
    avg, nova = flexp.run(equal).params, flexp.run(on_npz(npz, *FEDNOVA, partition="iid")).params
    # both are one float32 rounding of float64 sums that differ by far less than a float32 ulp
    assert ((nova - avg).abs() <= torch.maximum(ulp(avg), ulp(nova))).all()
    natural = flexp.run(on_npz(npz)).params, flexp.run(on_npz(npz, *FEDNOVA)).params
    assert (natural[0] - natural[1]).abs().max() > 1e3 * float(ulp(natural[0]).max())


def test_feddyn_with_alpha_0_is_fedavg_and_its_server_state_by_hand(npz):
    avg = flexp.run(on_npz(npz)).params
    assert torch.equal(flexp.run(on_npz(npz, *FEDDYN, "strategy.alpha=0")).params, avg)
    assert not torch.allclose(flexp.run(on_npz(npz, *FEDDYN, "strategy.alpha=0.5")).params, avg)
    dyn = FedDyn(num_clients=4, alpha=0.5)
    x = torch.zeros(1, dtype=torch.float64)
    new = dyn.aggregate(1, x, replies([1, 1], [1, 3], [torch.tensor([1.0]).double(), torch.tensor([3.0]).double()]))
    # h = -alpha/K (1 + 3) = -0.5; mean (1 + 9)/4 = 2.5; x = 2.5 + 0.5/0.5; g_k = -alpha (y_k - x)
    assert (new.item(), dyn.h.item(), dyn.grad[0].item(), dyn.grad[1].item()) == (3.5, -0.5, -0.5, -1.5)


class Threshold(torch.nn.Module):
    """Predicts class 1 where the first feature is positive."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), x[:, 0]], 1)


def test_the_fairness_callback_by_hand():
    from flexp.callbacks import RoundData

    x = torch.tensor([[1.0], [-1.0], [1.0], [1.0], [-1.0], [1.0]])
    y = torch.tensor([1, 0, 0, 1, 0, 0])  # predicted 1, 0, 1, 1, 0, 1
    parts = [torch.tensor([0, 1, 2]), torch.tensor([3, 4]), torch.tensor([5]), torch.tensor([], dtype=torch.long)]
    data = RoundData(Split(x, y), Split(x, y), parts, 2)
    got = Fairness()(1, None, Threshold(), data)
    # accuracies 2/3, 1, 0 (the empty client left out): mean 5/9, variance (1 + 16 + 25) / 81 / 3
    assert got["worst"] == 0.0 and got["variance"] == pytest.approx(14 / 81, rel=1e-12)


def test_feddyn_resumes_from_a_weights_only_checkpoint_bit_for_bit(tmp_path):
    cfg = experiment(flexp.compose([*SMALL, "fl.rounds=4", "fl.fraction=0.5", "engine=threads", *FEDDYN,
                                    "strategy.alpha=0.1"]))

    def save_round_2(state):
        if state.round == 2:
            checkpoint.save(tmp_path, checkpoint.Checkpoint(state, "run", cfg.raw, checkpoint.rng_states()))

    whole = train(cfg, prepare(cfg), lambda r: None, None, save_round_2)
    stored = checkpoint.read_stores(torch.load(tmp_path / checkpoint.FILE, weights_only=True)["strategy"], tmp_path)
    assert set(stored) == {"h", "grad"} and 5 <= len(stored["grad"]) <= 10  # 5 of 10 clients a round, 2 rounds
    saved = checkpoint.load(tmp_path)
    assert isinstance(saved.state.strategy, FedDyn) and torch.equal(saved.state.strategy.h, stored["h"])
    resumed = train(cfg, prepare(cfg), lambda r: None, saved.state)
    assert torch.equal(resumed.params, whole.params)
    fresh = make_strategy(cfg.strategy, cfg.fl.clients, cfg.fl.lr, cfg.seed)
    forgetful = train(cfg, prepare(cfg), lambda r: None, replace(checkpoint.load(tmp_path).state, strategy=fresh))
    assert not torch.equal(forgetful.params, whole.params), "FedDyn's state made no difference to the test"


def test_the_documented_command_with_a_user_config_dir(npz, tmp_path, monkeypatch):
    (tmp_path / "conf" / "strategy").mkdir(parents=True)
    (tmp_path / "conf" / "strategy" / "feddyn.yaml").write_text("_target_: flexp_examples.feddyn.FedDyn\nalpha: 0.05\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")]))
    fair = "callbacks.fair._target_=flexp_examples.fairness.Fairness"
    proc = run_cli(["--config-dir", str(tmp_path / "conf"), "strategy=feddyn", "dataset=npz", f"dataset.path={npz}",
                    "partition=natural", "fl.clients=6", *CNN, fair, "fl.rounds=2", "fl.local_epochs=1",
                    "tracking.log_model=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])[0]
    assert run.data.params["strategy.alpha"] == "0.05" and "FedDyn" in run.info.run_name
    worst = client.get_metric_history(run.info.run_id, "fair/worst")
    assert [m.step for m in worst] == [1, 2] and all(0 <= m.value <= 1 for m in worst)
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "test_accuracy")]).all()
