"""FedAvg in Apple's pfl-research (pfl 0.6.0, PyTorch backend) on the data bench/peers.py exports, timed per round:
bench/peers.py runs it in the peers' venv as `python bench/peers/pfl_round.py --data FILE --out FILE`, where --data is
the torch.save'd dict it exports (train/test tensors, the clients' index tensors, the initial model pickled whole,
the settings) and --out gets JSON with pfl's version, the startup time and, per central iteration, its wall time, the
central evaluation's part of it and the test accuracy after it. The setup follows pfl's own PyTorch image
benchmark: a FederatedDataset of the clients (pfl's minimize-reuse user sampler), a PyTorchModel with plain SGD
locally and SGD at learning rate 1 centrally, FederatedAveraging weighted by data points on a single-process
SimulatedBackend, and pfl's CentralEvaluationCallback over the whole test set (batches of 1,000) after every
iteration; no DP, torch's default thread count.
"""

# ruff: noqa: E402  (the clock starts before torch and pfl are imported: startup_s includes their import)
from __future__ import annotations

import time

START = time.perf_counter()

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.central_evaluation import CentralEvaluationCallback
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.pytorch import PyTorchTensorDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.version import __version__ as PFL_VERSION
from torch import nn

EVAL_BATCH = 1000


class Classifier(nn.Module):
    """The exported network with the `loss` and `metrics` pfl's PyTorchModel calls (as pfl's benchmark models)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exported network's logits."""
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        """Mean cross-entropy of a batch."""
        self.train(not eval)
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Weighted]:
        """Summed cross-entropy and correct predictions, each weighted by the batch's size."""
        self.train(not eval)
        logits = self(x)
        return {"loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), len(x)),
                "accuracy": Weighted((logits.argmax(-1) == y).sum().item(), len(x))}


class TimedCentralEvaluation(CentralEvaluationCallback):
    """pfl's central evaluation after every central iteration, each iteration and its evaluation timed. (Stock, it
    scores the initial model in on_train_begin and skips iteration 0, so the first update's model goes unscored.)"""

    def __init__(self, dataset: PyTorchTensorDataset, eval_params: NNEvalHyperParams) -> None:
        super().__init__(dataset, model_eval_params=eval_params)
        self.first_start = self.started = 0.0
        self.rounds: list[dict[str, float]] = []

    def on_train_begin(self, *, model: PyTorchModel) -> Metrics:
        """The first iteration starts now."""
        self.first_start = self.started = time.perf_counter()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics: Metrics, model: PyTorchModel, *,
                                central_iteration: int) -> tuple[bool, Metrics]:
        """Evaluate the new central model and record the iteration that made it."""
        trained = time.perf_counter()
        _, metrics = self._eval(model)
        end = time.perf_counter()
        accuracy = metrics[self._format_fn("accuracy")].overall_value
        self.rounds.append(dict(round=central_iteration + 1, round_s=end - self.started, train_s=trained - self.started,
                                eval_s=end - trained, accuracy=float(accuracy)))
        self.started = end
        return False, metrics


def load(path: str) -> dict[str, Any]:
    """The exported dict, its `parts` as a list of index tensors."""
    return torch.load(path, weights_only=False)


def federated_train(x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor], seed: int) -> FederatedDataset:
    """The clients as pfl users (user k: train rows parts[k], reshuffled each time k is drawn), drawn by pfl's
    minimize-reuse sampler over a seeded permutation: distinct users within a round, each once per K/cohort rounds."""

    def make_user(k: int) -> PyTorchTensorDataset:
        """User k's data in a fresh order."""
        idx = parts[k][torch.randperm(len(parts[k]))]
        return PyTorchTensorDataset((x[idx], y[idx]), user_id=str(k), train_kwargs={"eval": False},
                                    eval_kwargs={"eval": True})

    order = np.random.RandomState(seed).permutation(len(parts)).tolist()
    return FederatedDataset(make_user, get_user_sampler("minimize_reuse", order))


def run(data: dict[str, Any]) -> TimedCentralEvaluation:
    """FedAvg for settings["rounds"] central iterations; the evaluation callback holding the timings."""
    s = data["settings"]
    torch.manual_seed(s["seed"])
    np.random.seed(s["seed"])
    module = Classifier(data["model"])
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    train = federated_train(data["train_x"], data["train_y"], data["parts"], s["seed"])
    backend = SimulatedBackend(training_data=train, val_data=train, postprocessors=[WeightByDatapoints()])
    eval_params = NNEvalHyperParams(local_batch_size=EVAL_BATCH)
    test = PyTorchTensorDataset((data["test_x"], data["test_y"]), eval_kwargs={"eval": True})
    timer = TimedCentralEvaluation(test, eval_params)
    # evaluation_frequency is pfl's per-user evaluation before and after local training (not the central one); at
    # `rounds` it runs on iteration 0 only, as it always does.
    params = NNAlgorithmParams(central_num_iterations=s["rounds"], evaluation_frequency=s["rounds"],
                               train_cohort_size=int(s["fraction"] * s["clients"]), val_cohort_size=0)
    train_params = NNTrainHyperParams(local_learning_rate=s["lr"], local_num_epochs=s["local_epochs"],
                                      local_batch_size=s["batch_size"])
    FederatedAveraging().run(algorithm_params=params, backend=backend, model=model, model_train_params=train_params,
                             model_eval_params=eval_params, callbacks=[timer], send_metrics_to_platform=False)
    return timer


def main() -> None:
    """Run, then write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="the dict bench/peers.py exports (torch.save)")
    parser.add_argument("--out", required=True, help="where the JSON goes")
    args = parser.parse_args()
    timer = run(load(args.data))
    Path(args.out).write_text(json.dumps(dict(peer="pfl", version=PFL_VERSION, threads=torch.get_num_threads(),
                                              startup_s=timer.first_start - START, rounds=timer.rounds), indent=2))


if __name__ == "__main__":
    main()
