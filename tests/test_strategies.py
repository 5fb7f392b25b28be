"""Server strategies on hand-computed examples, their reductions to FedAvg, and robustness to outliers."""

import pytest
import torch
from conftest import SMALL
from omegaconf import OmegaConf

from flexp.aggregate import fedavg
from flexp.client import ClientResult
from flexp.component import builtin, builtin_options
from flexp.strategy import make_strategy
from flexp.strategy.fedavgm import FedAvgM
from flexp.strategy.fedopt import FedAdam, FedYogi, second_moment
from flexp.strategy.krum import krum_scores, multi_krum
from flexp.strategy.median import coordinate_median
from flexp.strategy.trimmed_mean import trimmed_mean

W = torch.tensor([1.0, -2.0])
CLIENTS = [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0]), torch.tensor([4.0, -1.0])]
N = [1, 2, 1]  # average: [1.5, 1.75]


def replies(params, sizes):
    """Client replies carrying these weights and sample counts."""
    return [ClientResult(k, p, n, 0.0) for k, (p, n) in enumerate(zip(params, sizes))]


def test_fedavgm_hand_computed_over_two_rounds():
    s = FedAvgM(server_lr=0.5, momentum=0.9)
    first = s.aggregate(1, W, replies(CLIENTS, N))  # v = w - avg = [-0.5, -3.75]; w - 0.5 v
    assert torch.allclose(first, torch.tensor([1.25, -0.125]))
    second = s.aggregate(2, first, replies(CLIENTS, N))  # delta = [-0.25, -1.875]; v = 0.9 v + delta = [-0.7, -5.25]
    assert torch.allclose(second, torch.tensor([1.25 + 0.35, -0.125 + 2.625]))


def test_fedadam_hand_computed_first_round():
    s = FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    delta = torch.tensor([0.5, 3.75], dtype=torch.float64)
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = W.double() + 0.1 * m / (v.sqrt() + 0.01)
    assert torch.allclose(s.aggregate(1, W, replies(CLIENTS, N)).double(), expected, atol=1e-6)


def test_second_moments_of_adagrad_adam_yogi():
    v, d = torch.tensor([1.0, 4.0]), torch.tensor([2.0, 1.0])
    assert torch.equal(second_moment("adagrad", v, d, 0.9), torch.tensor([5.0, 5.0]))
    assert torch.allclose(second_moment("adam", v, d, 0.9), torch.tensor([0.9 + 0.4, 3.6 + 0.1]))
    assert torch.allclose(second_moment("yogi", v, d, 0.9), torch.tensor([1.0 + 0.4, 4.0 - 0.1]))


@pytest.mark.parametrize("strategy", [FedAvgM(server_lr=1.0, momentum=0.0),
                                      FedAdam(server_lr=0.5, beta1=0.0, beta2=1.0, tau=0.5),
                                      FedYogi(server_lr=0.5, beta1=0.0, beta2=1.0, tau=0.5)])
def test_degenerate_settings_equal_fedavg_exactly(strategy):
    torch.manual_seed(0)
    w = torch.randn(1000)
    for round_ in range(1, 4):
        clients = [w + 0.1 * torch.randn(1000) for _ in range(4)]
        sizes = [600, 300, 450, 50]
        w_next = strategy.aggregate(round_, w, replies(clients, sizes))
        assert torch.equal(w_next, fedavg(clients, sizes))
        w = w_next


def test_median_and_trimmed_mean_hand_computed():
    values = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -5.0]), torch.tensor([100.0, 0.0]),
              torch.tensor([3.0, 1.0])]
    assert torch.equal(coordinate_median(values), torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(values[:3]), torch.tensor([2.0, 0.0]))
    assert torch.equal(trimmed_mean(values, 0.25), torch.tensor([2.5, 0.5]))
    assert torch.allclose(trimmed_mean(values, 0.0), torch.tensor([26.5, 1.5]))
    with pytest.raises(ValueError):
        trimmed_mean(values, 0.5)


def test_krum_scores_and_selection():
    points = [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([50.0])]
    # n=4, f=1: each sums its squared distance to the 1 nearest other client
    assert krum_scores(points, 1).tolist() == [1.0, 1.0, 1.0, 48.0**2]
    assert torch.equal(multi_krum(points, [1, 1, 1, 1], 1, 1), torch.tensor([0.0]))
    assert torch.equal(multi_krum(points, [1, 1, 2, 1], 1, 3), torch.tensor([1.25]))


@pytest.mark.parametrize("name, kwargs", [("median", {}), ("trimmed_mean", {"trim": 0.2}), ("krum", {"byzantine": 2}),
                                          ("multikrum", {"byzantine": 2, "keep": 4})])
def test_robust_strategies_ignore_a_sign_flipped_minority(name, kwargs):
    torch.manual_seed(1)
    honest = [torch.ones(50) + 0.01 * torch.randn(50) for _ in range(8)]
    attackers = [-10 * torch.ones(50) for _ in range(2)]
    strategy = make_strategy(builtin("strategy", name, **kwargs))
    out = strategy.aggregate(1, torch.zeros(50), replies(honest + attackers, [1] * 10))
    assert (out - 1).abs().max() < 0.05
    assert (fedavg(honest + attackers, [1] * 10) - 1).abs().max() > 1.0


def test_each_builtin_file_is_read_as_its_name_and_a_config_without_targets_reads_the_same():
    """conf/strategy/<name>.yaml parses to its own class under <name>; a config written before built-ins carried
    a `_target_` (as an older checkpoint's) takes its file's class and arguments."""
    import flexp
    from flexp.config import parse_config

    tree = OmegaConf.to_container(flexp.compose(SMALL), resolve=True)
    options = builtin_options("strategy")
    assert {"fedavg", "fedprox", "scaffold", "fedadam", "krum", "multikrum"} <= set(options)
    for name, node in options.items():
        declared = parse_config({**tree, "strategy": node}).strategy
        older = parse_config({**tree, "strategy": {k: v for k, v in node.items() if k != "_target_"}}).strategy
        assert declared == older == builtin("strategy", name) and declared.name == name
