"""Round callbacks: the shipped two compute what they claim, and callback metrics reach MLflow at every round."""

import math

import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli

from flexp.callbacks import RoundData
from flexp.callbacks.class_accuracy import ClassAccuracy, per_class_accuracy
from flexp.callbacks.federated_eval import FederatedEvaluation, client_accuracies, fairness
from flexp.config import DatasetConfig
from flexp.data import Split, load_dataset

FED = "flexp.callbacks.federated_eval.FederatedEvaluation"
CLS = "flexp.callbacks.class_accuracy.ClassAccuracy"


def test_jain_index_is_one_for_equal_accuracies_and_one_over_n_when_one_client_has_it_all():
    equal = fairness(torch.full((7,), 0.6))
    assert equal["jain"] == pytest.approx(1.0) and equal["std"] == pytest.approx(0.0)
    assert equal["mean"] == equal["worst10"] == equal["min"] == pytest.approx(0.6)
    assert fairness(torch.tensor([1.0, 0.0, 0.0, 0.0]))["jain"] == pytest.approx(1 / 4)
    assert fairness(torch.tensor([0.5, 1.0]))["jain"] == pytest.approx(1.5 ** 2 / (2 * 1.25))
    assert fairness(torch.zeros(3))["jain"] == 1.0


def test_worst_ten_percent_is_the_mean_of_the_lowest_tenth_of_clients():
    accuracy = torch.arange(1, 21) / 20  # 20 clients: the worst 10% are the two lowest
    out = fairness(accuracy)
    assert out["worst10"] == pytest.approx((0.05 + 0.10) / 2)
    assert out["mean"] == pytest.approx(accuracy.double().mean().item())
    assert out["std"] == pytest.approx(accuracy.double().std(unbiased=False).item())
    assert fairness(accuracy[:5])["worst10"] == pytest.approx(0.05)  # fewer than 10 clients: the single worst


def test_client_accuracies_are_segment_means_and_skip_clients_without_data():
    correct = torch.tensor([True, False, True, True, False, False])
    parts = [torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([], dtype=torch.long), torch.tensor([5, 4])]
    assert client_accuracies(correct, parts).tolist() == [0.5, 1.0, 0.0]


def test_per_class_accuracy_leaves_out_classes_absent_from_the_test_set():
    labels, predicted = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    assert per_class_accuracy(predicted, labels, 4) == {"0": 0.5, "1": 1.0, "2": 0.0}


def test_shipped_callbacks_evaluate_the_model_they_are_given():
    # the "model" reads its prediction off the input: x is one-hot of the predicted class
    predicted = torch.tensor([0, 1, 2, 2, 0, 1])
    labels = torch.tensor([0, 1, 2, 0, 0, 0])
    split = Split(torch.nn.functional.one_hot(predicted, 3).float(), labels)
    data = RoundData(split, split, [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])], 3)
    fed = FederatedEvaluation()(1, None, torch.nn.Identity(), data)
    assert fed["mean"] == pytest.approx((1.0 + 1 / 3) / 2) and fed["min"] == pytest.approx(1 / 3)
    assert ClassAccuracy()(1, None, torch.nn.Identity(), data) == {"0": 0.5, "1": 1.0, "2": 1.0}


def test_callback_metrics_are_logged_at_every_round(store):
    proc = run_cli([*SMALL, "tracking.log_model=false", f"callbacks.fair._target_={FED}",
                    f"+callbacks.per_class._target_={CLS}"], store)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(store)
    run = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])[0]
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    for key in ("fair/mean", "fair/std", "fair/worst10", "fair/jain"):
        assert sorted(history[key]) == [1, 2, 3], key
    test = load_dataset(DatasetConfig("synthetic", users=10, samples_per_user=60)).test
    counts = torch.bincount(test.y, minlength=10)
    for round_ in (1, 2, 3):
        # the class accuracies, weighted by each class's test count, give back the test accuracy
        weighted = sum(history[f"per_class/{c}"][round_] * int(counts[c]) for c in range(10) if counts[c])
        assert math.isclose(weighted / len(test), history["test_accuracy"][round_], abs_tol=1e-9)
        assert 0 < history["fair/jain"][round_] <= 1
