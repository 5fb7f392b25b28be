"""The privacy accountant: epsilon is dp-accounting's own, calibrate meets its target, adaptive clipping tracks the
quantile, and the clipped count leaves the update the rest of one Gaussian's budget."""

import math
import sys
from statistics import NormalDist

import dp_accounting as dpa
import numpy as np
import pytest

from flexp.privacy.accountant import (
    PLD_INTERVAL,
    Sampling,
    Unreachable,
    Unsupported,
    adaptive_clip,
    calibrate,
    epsilon,
    update_noise_multiplier,
)

ADD, REPLACE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, dpa.NeighboringRelation.REPLACE_ONE
POISSON = Sampling("poisson", 1000, 10)
EVERYONE = Sampling("fixed", 100, 100)

# (z, sampling, steps, delta, accountants, the step as dp-accounting's DpEvent, its neighbouring relation): fixed-size
# sampling replaces one user, so the clipped sum moves by 2 * clip and dp-accounting gets z / 2.
CASES = [
    (1.1, POISSON, 500, 1e-5, ("rdp", "pld"), dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.1)), ADD),
    (0.8, Sampling("poisson", 200, 50), 40, 1e-6, ("rdp", "pld"),
     dpa.PoissonSampledDpEvent(0.25, dpa.GaussianDpEvent(0.8)), ADD),
    (1.5, Sampling("fixed", 100, 10), 300, 1e-5, ("rdp",),
     dpa.SampledWithoutReplacementDpEvent(100, 10, dpa.GaussianDpEvent(0.75)), REPLACE),
    (3.0, Sampling("fixed", 50, 5), 20, 1e-3, ("rdp",),
     dpa.SampledWithoutReplacementDpEvent(50, 5, dpa.GaussianDpEvent(1.5)), REPLACE),
    (2.0, Sampling("poisson", 30, 30), 100, 1e-5, ("rdp",), dpa.GaussianDpEvent(2.0), ADD),
    (2.0, EVERYONE, 100, 1e-5, ("rdp",), dpa.GaussianDpEvent(1.0), ADD),
]


@pytest.mark.parametrize(("z", "sampling", "steps", "delta", "accountants", "event", "relation"), CASES)
def test_epsilon_is_dp_accountings_own(z, sampling, steps, delta, accountants, event, relation):
    composed = dpa.SelfComposedDpEvent(event, steps)
    expected = {"rdp": dpa.rdp.RdpAccountant(neighboring_relation=relation),
                "pld": dpa.pld.PLDAccountant(relation, value_discretization_interval=PLD_INTERVAL)}
    for name in accountants:
        want = expected[name].compose(composed).get_epsilon(delta)
        assert epsilon(z, sampling, steps, delta, name) == pytest.approx(want, rel=1e-12), name


def test_a_sample_of_everyone_is_one_gaussian_and_fixed_size_samples_are_accounted_for_replacement():
    for steps in (1, 1000):
        for z in (4.0, 20.0):
            replace = dpa.pld.PLDAccountant(REPLACE, value_discretization_interval=PLD_INTERVAL)
            want = replace.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), steps)).get_epsilon(1e-5)
            exact = epsilon(z, EVERYONE, steps, 1e-5, "pld")
            assert exact <= want <= exact * 1.01 + 2 * PLD_INTERVAL   # the PLD rounds up, by its interval
            assert epsilon(z, EVERYONE, steps, 1e-5, "rdp") >= exact   # RDP is an upper bound
    add = dpa.pld.PLDAccountant(ADD, value_discretization_interval=PLD_INTERVAL).compose(dpa.GaussianDpEvent(2.0))
    exact = epsilon(2.0, Sampling("poisson", 100, 100), 1, 1e-5, "pld")
    assert exact <= add.get_epsilon(1e-5) <= exact * 1.01
    assert exact < epsilon(2.0, EVERYONE, 1, 1e-5, "pld")   # replacing a user moves the sum twice as far


@pytest.mark.parametrize(("sampling", "accountant"),
                         [(POISSON, "rdp"), (POISSON, "pld"), (Sampling("fixed", 1000, 10), "rdp"),
                          (EVERYONE, "pld")])
def test_epsilon_falls_with_noise_and_grows_with_steps(sampling, accountant):
    grid = [[epsilon(z, sampling, steps, 1e-5, accountant) for steps in (1, 10, 100, 1000)]
            for z in (0.6, 0.9, 1.4, 2.5)]
    for row in grid:
        assert row == sorted(row) and len(set(row)) == len(row)
    for column in zip(*grid):
        assert list(column) == sorted(column, reverse=True) and len(set(column)) == len(column)
    assert epsilon(0.0, sampling, 10, 1e-5, accountant) == math.inf
    assert epsilon(1.0, sampling, 0, 1e-5, accountant) == 0.0


@pytest.mark.parametrize(("sampling", "steps", "accountant", "targets"),
                         [(POISSON, 1000, "rdp", (0.5, 2.0, 8.0)), (POISSON, 1000, "pld", (0.5, 2.0)),
                          (Sampling("fixed", 1000, 10), 100, "rdp", (2.0,)), (EVERYONE, 50, "pld", (0.3, 3.0))])
def test_calibrate_returns_the_noise_that_spends_99_to_100_percent_of_the_target(sampling, steps, accountant, targets):
    for target in targets:
        z = calibrate(target, sampling, steps, 1e-5, accountant)
        assert 0.99 * target <= epsilon(z, sampling, steps, 1e-5, accountant) <= target
        assert epsilon(z * 0.98, sampling, steps, 1e-5, accountant) > 0.99 * target   # no much smaller z would do


def test_calibrate_says_when_no_noise_meets_the_target():
    for accountant in ("rdp", "pld"):   # everyone, 10^4 rounds, epsilon 1e-4: more than 2^20 times the clip
        with pytest.raises(Unreachable, match="above 1.04858e[+]06") as raised:
            calibrate(1e-4, EVERYONE, 10**4, 1e-5, accountant)
        assert "\n" not in str(raised.value)
    # RDP's conversion to (epsilon, delta) bottoms out near 0.0035 (at delta 1e-5, its largest order 1024), then
    # drops to 0 once the RDP is below delta^2: it never certifies 1e-3, which the PLD does.
    with pytest.raises(Unreachable, match="rdp epsilon jumps from 0.0035"):
        calibrate(1e-3, POISSON, 100, 1e-5, "rdp")
    z = calibrate(1e-3, POISSON, 100, 1e-5, "pld")
    assert 0.99e-3 <= epsilon(z, POISSON, 100, 1e-5, "pld") <= 1e-3


def test_pld_refuses_fixed_size_samples_of_part_of_the_population():
    fixed = Sampling("fixed", 1000, 10)
    for call in (lambda: epsilon(1.0, fixed, 10, 1e-5, "pld"), lambda: calibrate(1.0, fixed, 10, 1e-5, "pld")):
        with pytest.raises(Unsupported, match="poisson sampling or accountant rdp") as raised:
            call()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("call", "names"), [
    (lambda: epsilon(-0.1, POISSON, 10, 1e-5), "noise multiplier"),
    (lambda: epsilon(1.0, POISSON, 10, 0.0), "delta"),
    (lambda: epsilon(1.0, POISSON, 10, 1.0), "delta"),
    (lambda: epsilon(1.0, POISSON, -1, 1e-5), "steps"),
    (lambda: epsilon(1.0, POISSON, 10, 1e-5, "moments"), "accountant"),
    (lambda: Sampling("poisson", 100, 0), "rate"),
    (lambda: Sampling("fixed", 100, 101), "rate"),
    (lambda: Sampling("uniform", 100, 10), "kind"),
    (lambda: calibrate(0.0, POISSON, 10, 1e-5), "target epsilon"),
    (lambda: adaptive_clip(0.0, 0.5, 0.5, 0.2), "clip"),
    (lambda: update_noise_multiplier(1.0, -1.0, 100), "stddev"),
])
def test_bad_arguments_are_one_line_value_errors_naming_the_argument(call, names):
    with pytest.raises(ValueError, match=names) as raised:
        call()
    assert "\n" not in str(raised.value) and not isinstance(raised.value, (Unreachable, Unsupported))


def test_without_dp_accounting_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(ImportError, match=r"^privacy needs dp-accounting: pip install 'flexp\[privacy\]'$"):
        epsilon(1.2345, POISSON, 7, 1e-5)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("count_noise", [False, True])
def test_adaptive_clip_converges_to_the_target_quantile_of_the_norms(target, count_noise):
    rng, cohort, clip = np.random.default_rng(7), 100, 0.05
    for _ in range(300):   # norms ~ lognormal(0, 1); the paper's count noise: std cohort/20 on the count
        norms = rng.lognormal(0.0, 1.0, cohort)
        below = np.mean(norms <= clip) + (rng.normal(0.0, cohort / 20) / cohort if count_noise else 0.0)
        clip = adaptive_clip(clip, below, target, 0.2)
    quantile = NormalDist().inv_cdf
    assert math.exp(quantile(target - 0.05)) <= clip <= math.exp(quantile(target + 0.05))


def test_adaptive_clip_step_is_geometric_and_bounded():
    assert adaptive_clip(2.0, 0.5, 0.5, 0.2) == 2.0
    assert adaptive_clip(2.0, 0.9, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.2 * 0.4))
    assert adaptive_clip(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))
    assert adaptive_clip(2.0, 1.7, 0.5, 0.2) == adaptive_clip(2.0, 1.0, 0.5, 0.2)   # noise can push it past 1
    assert adaptive_clip(2.0, -0.3, 0.5, 0.2) == adaptive_clip(2.0, 0.0, 0.5, 0.2)


def test_update_noise_multiplier_leaves_the_update_the_rest_of_one_gaussians_budget():
    # Andrew et al. 2021, Thm 1: z_update = (z^-2 - (2 sigma_b)^-2)^-1/2, at the paper's sigma_b = cohort / 20
    assert update_noise_multiplier(1.0, 5.0, 100) == pytest.approx((1 - 10.0**-2) ** -0.5)
    assert update_noise_multiplier(0.5, 0.5, 10) == pytest.approx(3**-0.5)
    assert update_noise_multiplier(0.0, 5.0, 100) == 0.0
    clip = 2.5
    for z, count_stddev in [(0.7, 1.0), (1.0, 5.0), (3.0, 1.6)]:
        z_update = update_noise_multiplier(z, count_stddev, 100)
        # one user adds (update, bit - 1/2), |update| <= clip: over the two noises' stds that moves by at most 1/z
        for norm in (clip, 0.3 * clip):
            for bit in (0, 1):
                moved = math.hypot(norm / (z_update * clip), (bit - 0.5) / count_stddev)
                assert moved <= 1 / z * (1 + 1e-12)
                assert moved == pytest.approx(1 / z) or norm < clip
        # the two Gaussians compose to the one of multiplier z
        both = dpa.rdp.RdpAccountant().compose(dpa.GaussianDpEvent(z_update)).compose(
            dpa.GaussianDpEvent(2 * count_stddev))
        assert both.get_epsilon(1e-5) == pytest.approx(epsilon(z, Sampling("poisson", 100, 100), 1, 1e-5), rel=1e-9)


def test_update_noise_multiplier_says_when_the_count_noise_is_too_small():
    for count_stddev in (1.0, 1.5):
        with pytest.raises(Unreachable, match=r"must exceed z/2 = 1\.5 \(Andrew et al\. use cohort/20 = 5\)"):
            update_noise_multiplier(3.0, count_stddev, 100)
