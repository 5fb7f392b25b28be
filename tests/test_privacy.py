"""Differential privacy as round stages: clipping bounds every update, the noise has the documented std, DP-FedAvg
and DP-SGD reduce to FedAvg and plain local SGD, DP runs do not depend on the engine or worker count, the budget
stop ends at the right round, and what cannot be privatised is refused."""

import math
from dataclasses import replace

import pytest
import torch
from conftest import SMALL
from rounding import assert_same_sgd, chained_reductions, longest_sum, most_steps
from test_api import _execute

from flexp.client import ClientResult, LocalSpec
from flexp.component import Invalid
from flexp.config import DatasetConfig, FLConfig
from flexp.data import load_dataset
from flexp.engine.threads import ThreadEngine
from flexp.engine.vectorized import VectorizedEngine
from flexp.fedavg import run_fedavg
from flexp.job import STOPPED_TAG
from flexp.models import build_model
from flexp.partition import natural
from flexp.privacy import accountant
from flexp.privacy.dp_fedavg import DPFedAvg
from flexp.privacy.dp_sgd import DPSGD
from flexp.rng import client_key, normal
from flexp.stage import Plan, Stage, Staged, with_stages
from flexp.strategy.fedavg import FedAvg

SYNTH = DatasetConfig(name="synthetic", users=8, alpha=0.5, beta=0.5, seed=3)
FL = FLConfig(clients=8, fraction=0.5, local_epochs=2, batch_size=10, lr=0.05, rounds=3, eval_every=3,
              target_accuracy=None, stop_at_target=False)
PLAN = Plan(clients=8, per_round=4, sampling="fixed", rounds=3, seed=2, local_epochs=2, batch_size=10)


def _run(engine_cls, stage=None, **kwargs):
    """FL on the synthetic users with a 2nn, FedAvg inside `stage` (none: plain FedAvg); (result, start weights)."""
    data = load_dataset(SYNTH)
    make = lambda: build_model("2nn", data.input_shape, data.num_classes, hidden=32)  # noqa: E731
    torch.manual_seed(0)
    model = make()
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    engine = engine_cls(make, data.train, LocalSpec(FL.local_epochs, FL.batch_size, FL.lr), **kwargs)
    algorithm = with_stages(FedAvg(), {"privacy": stage} if stage else {})
    try:
        return run_fedavg(model, natural(data.train_groups, 8), data.test, FL, engine, 2, strategy=algorithm), start
    finally:
        engine.close()


def _same_sgd(a, b, start):
    data = load_dataset(SYNTH)
    steps = most_steps(natural(data.train_groups, 8), FL.batch_size, FL.local_epochs, FL.rounds)
    assert_same_sgd(a, b, start, steps, longest_sum("2nn", data.input_shape, FL.batch_size), chained_reductions("2nn"))


def _reply(client, params):
    return ClientResult(client, params, num_samples=10 + client, loss=0.5, steps=3)


def test_every_clipped_update_is_within_the_clip_and_smaller_ones_are_unchanged():
    stage = DPFedAvg(clip=2.0, noise_multiplier=1.0, plan=PLAN)
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5000, generator=generator)
    for client, scale in enumerate([1e-4, 0.01, 0.02, 1.0, 30.0]):
        params = start + torch.randn(5000, generator=generator) * scale
        sent = stage.client(1, start, _reply(client, params))
        delta = sent.params - start.double()
        norm = float(torch.linalg.vector_norm(params.double() - start.double()))
        # the norm of the scaled float64 vector errs by at most ~(n + 2) units of float64 roundoff, relative
        assert float(torch.linalg.vector_norm(delta)) <= 2.0 * (1 + 5002 * 2.0**-53)
        if norm <= 2.0:  # unchanged, but for the rounding of adding the start weights and taking them off again
            exact = params.double() - start.double()
            assert torch.allclose(delta, exact, rtol=0, atol=2 * 2.0**-52 * float(start.abs().max()))
        assert math.isnan(sent.loss) and sent.num_samples == 1  # the client's loss and size do not leave it


@pytest.mark.parametrize("cohort", [None, 1000])
def test_the_noise_on_a_round_of_zero_updates_has_the_documented_std(cohort):
    stage = DPFedAvg(clip=0.5, noise_multiplier=1.3, plan=PLAN, noise_cohort_size=cohort)
    start = torch.zeros(50_000)
    replies = [stage.client(1, start, _reply(c, start.clone())) for c in range(4)]
    (merged,) = stage.server(1, start, replies)
    noise = merged.params.double()
    expected = 1.3 * 0.5 / (cohort or 4)  # noise_multiplier * clip / the cohort the noise is that of
    # the sample std of n Gaussian draws has relative sd 1/sqrt(2n): 6 sd of it, and 6 sd of the mean
    assert abs(float(noise.std()) / expected - 1) < 6 / math.sqrt(2 * noise.numel())
    assert abs(float(noise.mean())) < 6 * expected / math.sqrt(noise.numel())
    assert stage.round_metrics(1)["noise_std"] == pytest.approx(expected)


def test_dp_fedavg_without_noise_and_with_a_clip_above_every_norm_is_fedavg():
    base = _execute(["fl.fraction=0.5"])
    private = _execute(["fl.fraction=0.5", "privacy=dp_fedavg", "privacy.noise_multiplier=0", "privacy.clip=1e9"])
    assert private.params["privacy.name"] == "dp_fedavg" and "privacy.noise_multiplier_used" in private.params
    for round_ in (1, 2):
        assert private.metrics[round_]["epsilon"] == math.inf
        assert private.metrics[round_]["test_accuracy"] == base.metrics[round_]["test_accuracy"]


def test_dp_fedavg_gives_fedavg_weights_to_one_float32_rounding():
    import flexp

    smallest = ["dataset=synthetic", "dataset.users=10", "dataset.samples_per_user=60", "model=logreg",
                "fl.clients=10", "fl.fraction=0.5", "fl.local_epochs=1", "fl.batch_size=10", "fl.rounds=1"]
    base = flexp.run(flexp.compose(smallest)).params
    private = flexp.run(flexp.compose([*smallest, "privacy=dp_fedavg", "privacy.noise_multiplier=0",
                                       "privacy.clip=1e9"])).params
    # each client holds 48 samples, so FedAvg's n_k weights are equal: after one round both means are float64 sums
    # of the same weights, and the float32 they round to can differ by one unit in the last place at most (later
    # rounds would train on from weights that differ by that much)
    assert torch.all((private - base).abs() <= base.abs() * 2.0**-23)


@pytest.mark.engines
def test_a_dp_fedavg_run_does_not_depend_on_workers_or_engine():
    def stage():
        return DPFedAvg(clip=0.3, noise_multiplier=0.8, plan=PLAN, adaptive=True, clip_count_stddev=1.0)

    one, start = _run(ThreadEngine, stage(), workers=1)
    two, _ = _run(ThreadEngine, stage(), workers=2)
    vectorized, _ = _run(VectorizedEngine, stage())
    assert torch.equal(one.params, two.params)
    _same_sgd(vectorized.params, two.params, start)
    assert [r.extra["clip"] for r in one.history] == [r.extra["clip"] for r in vectorized.history]
    assert one.history[-1].extra["clip"] != 0.3  # adaptive clipping moved it


@pytest.mark.engines
def test_a_dp_sgd_run_does_not_depend_on_workers_or_engine():
    def stage():
        return DPSGD(clip=0.5, noise_multiplier=0.7, plan=PLAN)

    one, start = _run(ThreadEngine, stage(), workers=1)
    two, _ = _run(ThreadEngine, stage(), workers=2)
    vectorized, _ = _run(VectorizedEngine, stage())
    assert torch.equal(one.params, two.params)
    _same_sgd(vectorized.params, two.params, start)
    assert one.history[-1].extra["epsilon"] == vectorized.history[-1].extra["epsilon"] > 0


@pytest.mark.engines
def test_dp_sgd_without_noise_and_with_a_huge_clip_is_plain_local_sgd():
    plain, start = _run(ThreadEngine, workers=2)
    private, _ = _run(VectorizedEngine, DPSGD(clip=1e9, noise_multiplier=0.0, plan=PLAN))
    _same_sgd(private.params, plain.params, start)
    noised, _ = _run(VectorizedEngine, DPSGD(clip=1e9, noise_multiplier=0.5, plan=PLAN))
    assert not torch.allclose(noised.params, plain.params)


def test_a_dp_sgd_run_says_whose_client_side_takes_the_generic_path():
    tracker = _execute(["fl.rounds=1", "privacy=dp_sgd", "privacy.noise_multiplier=1.1"])
    assert " fedavg dp_sgd z1.1 " in tracker.run_name
    assert tracker.tags["flexp.engine_path"].endswith("does not implement DPSGD (around FedAvg)'s client side: it "
                                                      "declares no StepTerms)")


def test_without_privacy_the_algorithm_is_not_wrapped():
    algorithm = FedAvg()
    assert with_stages(algorithm, {}) is algorithm
    assert isinstance(with_stages(algorithm, {"privacy": DPSGD(plan=PLAN)}), Staged)


def test_the_client_stream_is_the_same_under_vmap_and_alone():
    keys = torch.tensor([client_key(0, 3, c) for c in range(4)])
    counters = torch.tensor([5, 5, 6, 6])
    batched = torch.vmap(lambda k, c: normal(k, c, 1000))(keys, counters)
    for k in range(4):
        assert torch.equal(batched[k], normal(keys[k], counters[k], 1000))
    assert not torch.equal(batched[0], batched[1]) and not torch.equal(batched[1], batched[3])


def test_the_budget_stop_ends_before_the_round_that_would_exceed_it():
    sampling = accountant.Sampling("fixed", 10, 5)
    delta = 10 ** -1.1
    spent = [accountant.epsilon(1.5, sampling, r, delta) for r in range(1, 11)]
    budget = (spent[3] + spent[4]) / 2  # round 5 would exceed it
    tracker = _execute(["fl.fraction=0.5", "fl.rounds=10", "privacy=dp_fedavg", "privacy.noise_multiplier=1.5",
                        f"privacy.max_epsilon={budget}"])
    assert sorted(tracker.metrics) == [1, 2, 3, 4]
    assert [tracker.metrics[r]["epsilon"] for r in (1, 2, 3, 4)] == pytest.approx(spent[:4])
    assert tracker.tags[STOPPED_TAG].startswith("privacy budget: round 5 would spend epsilon")


def test_a_calibrated_run_spends_at_most_its_target():
    tracker = _execute(["fl.fraction=0.5", "privacy=dp_fedavg", "privacy.target_epsilon=4"])
    assert 0.99 * 4 <= tracker.metrics[2]["epsilon"] <= 4
    assert " fedavg dp_fedavg eps4 " in tracker.run_name
    assert tracker.params["privacy.noise_multiplier_used"] > 0


def test_poisson_sampling_varies_the_cohort_and_keeps_noising_empty_rounds():
    tracker = _execute(["fl.fraction=0.2", "fl.sampling=poisson", "fl.rounds=2", "privacy=dp_fedavg"])
    assert all(tracker.metrics[r]["epsilon"] > 0 for r in (1, 2))
    from flexp.fedavg import poisson_clients

    sizes = {len(poisson_clients(1000, 0.01, 0, r)) for r in range(1, 30)}
    assert len(sizes) > 3 and all(abs(s - 10) < 6 * math.sqrt(10) for s in sizes)


def test_a_failed_reply_reaches_no_stage():
    algorithm = with_stages(FedAvg(), {"privacy": DPFedAvg(clip=0.01, plan=PLAN)})
    start = torch.zeros(10)
    failed = ClientResult(3, torch.full((10,), 5.0), 10, math.nan, error="RuntimeError: boom")
    assert algorithm.receive(1, start, failed) is failed
    sent = algorithm.receive(1, start, _reply(4, torch.full((10,), 5.0)))
    assert float(torch.linalg.vector_norm(sent.params.double())) <= 0.01 * (1 + 12 * 2.0**-53)


def test_dp_sgd_stops_before_a_round_that_could_exceed_its_budget():
    stage = DPSGD(clip=1.0, noise_multiplier=1.0, plan=PLAN, max_epsilon=12.0)
    start = torch.zeros(4)
    for round_ in range(1, 50):
        if (why := stage.halt(round_)) is not None:
            break
        stage.server(round_, start, [ClientResult(0, start, 40, 0.1, steps=8)])
    else:
        pytest.fail("the budget never stopped it")
    assert stage.client_epsilon(0) <= 12.0 < stage.client_epsilon(0, 8) and round_ > 2
    assert why.startswith(f"privacy budget: round {round_} could spend epsilon")


def test_a_run_without_privacy_does_not_import_dp_accounting(tmp_path):
    import subprocess
    import sys

    overrides = [*SMALL, "fl.rounds=1"]
    code = (f"import sys, flexp; flexp.run(flexp.compose({overrides!r})); "
            "assert 'dp_accounting' not in sys.modules and 'flexp.privacy' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


class Halving(Stage):
    """A user's stage: halves every update on the client's side, and logs how many it halved."""

    def __init__(self, factor: float = 0.5, plan: Plan | None = None) -> None:
        if not 0 < factor <= 1:
            raise Invalid("factor", factor, "must be in (0, 1]")
        self.factor, self.count, self.plan = factor, 0, plan

    def client(self, round_, params, reply):
        self.count += 1
        return replace(reply, params=params + self.factor * (reply.params - params))

    def round_metrics(self, round_):
        return {"halved": self.count}


def test_a_users_stage_is_declared_like_a_built_in_one(capsys):
    from test_bad_config import cli_error

    tracker = _execute(["fl.fraction=0.5", "privacy=custom", "privacy._target_=test_privacy.Halving"])
    assert [tracker.metrics[r]["halved"] for r in (1, 2)] == [5, 10]
    assert tracker.metrics[2]["test_accuracy"] != _execute(["fl.fraction=0.5"]).metrics[2]["test_accuracy"]
    line = cli_error([*SMALL, "privacy=custom", "privacy._target_=test_privacy.Halving", "privacy.factor=2"], capsys)
    assert line == "privacy.factor=2: must be in (0, 1]"
