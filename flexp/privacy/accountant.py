"""Privacy accounting for DP-FedAvg and local DP-SGD (epsilon, noise calibration, adaptive clipping), as pure
functions over Google's dp-accounting: the maths the DP mechanisms call, kept apart from them."""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

ACCOUNTANTS = ("rdp", "pld")
KINDS = ("poisson", "fixed")
PLD_INTERVAL = 1e-3   # dp-accounting's default is 1e-4: 9x slower for an epsilon larger by < 0.1% at 1, ~2% at 0.06
TOLERANCE = 0.01      # calibrate's epsilon lies in [target * (1 - TOLERANCE), target]
Z_MIN, Z_MAX = 2.0**-10, 2.0**20   # the noise multipliers calibrate searches between


class Unreachable(ValueError):
    """The requested privacy cannot be met (calibrate's target, or a clipped-count noise too small for z)."""


class Unsupported(ValueError):
    """dp-accounting cannot account this (accountant, sampling) pair."""


@dataclass(frozen=True)
class Sampling:
    """How each round's clients (or a local step's samples) are drawn: 'poisson' (each independently with probability
    `rate`) or 'fixed' (`size` of `population` without replacement)."""

    kind: str           # "poisson" | "fixed"
    population: int     # K
    size: int           # m, the expected (poisson) or exact (fixed) number drawn

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sampling kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not _is_int(self.population) or self.population < 1:
            raise ValueError(f"sampling population must be a whole number >= 1, got {self.population!r}")
        if self.kind == "fixed" and not _is_int(self.size):
            raise ValueError(f"fixed sampling size must be a whole number, got {self.size!r}")
        if not 0 < self.size <= self.population:
            raise ValueError(f"sampling rate size/population must be in (0, 1], got {self.size}/{self.population}")

    @property
    def rate(self) -> float:
        """The chance that one user is in a round's (or step's) sample."""
        return self.size / self.population


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling: Sampling, steps: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon spent by `steps` Gaussian mechanism applications (noise std = noise_multiplier * clip), each on a
    subsample drawn as `sampling` says; inf when noise_multiplier == 0; 0 when steps == 0.

    `clip` bounds one user's (or sample's) contribution norm. Poisson sampling is accounted for adding or removing one
    user, where the clipped sum moves by up to clip; fixed-size sampling for replacing one user of a public population,
    where it moves by up to 2 * clip, so such a step goes to dp-accounting as multiplier z / 2 (its GaussianDpEvent is
    s / clip, but its RDP of sampling without replacement reads it as s over that 2 * clip: google/differential-privacy
    #378). A noise multiplier thus means the same noise in both kinds, and fixed-size sampling costs more epsilon.

    'rdp' is dp-accounting's RdpAccountant (its default orders; one step's RDP is computed once and scaled by `steps`,
    as the accountant composes: 20-200 ms the first time for a z and sampling, then ~0.2 ms a call). 'pld' is its
    PLDAccountant at a discretization interval of PLD_INTERVAL: tighter than RDP, pessimistic (it rounds epsilon up),
    and ~0.04 s for 1000 steps at q=0.01, z=1, against 0.35 s at dp-accounting's default 1e-4, for an epsilon larger
    by < 0.1% at epsilon ~1 and ~2% at epsilon ~0.06; a sample of everyone gets dp-accounting's exact Gaussian epsilon
    instead. It accounts Poisson sampling only (Unsupported for fixed-size sampling of part of the population).
    """
    dpa = _dp_accounting()
    _check(noise_multiplier, sampling, steps, delta, accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event, relation = _step(dpa, noise_multiplier, sampling)
    if accountant == "rdp":
        orders, rdp = _rdp_per_step(event, relation)
        return float(dpa.rdp.compute_epsilon(orders, steps * rdp, delta)[0])
    return _pld_epsilon(dpa, event, relation, steps, delta)


def calibrate(target_epsilon: float, sampling: Sampling, steps: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (by bisection, to 1%) whose epsilon after `steps` is <= target: the returned z has
    target*0.99 <= epsilon(z) <= target."""
    if not (isinstance(target_epsilon, numbers.Real) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target epsilon must be a positive number, got {target_epsilon!r}")
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"calibrate needs steps >= 1, got {steps!r}")

    def eps(z: float) -> float:
        return epsilon(z, sampling, steps, delta, accountant)

    lo, hi = _bracket(eps, target_epsilon)
    while eps(hi) < (1 - TOLERANCE) * target_epsilon:
        mid = math.sqrt(lo * hi)
        if not lo < mid < hi or hi / lo < 1 + 1e-9:
            raise Unreachable(
                f"{accountant} epsilon jumps from {eps(lo):.4g} to {eps(hi):.4g} near noise multiplier {hi:.6g}: it "
                f"cannot certify an epsilon in [{(1 - TOLERANCE) * target_epsilon:.4g}, {target_epsilon:.4g}]; "
                f"raise the target{' or use accountant pld' if accountant == 'rdp' else ''}")
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def adaptive_clip(clip: float, below: float, target_quantile: float, clip_lr: float) -> float:
    """Andrew et al. 2021 geometric update: clip * exp(-clip_lr * (below - target_quantile)), `below` the (noised)
    fraction of updates whose norm was <= clip, clamped to [0, 1] first (as TF Privacy does: noise can push it out)."""
    if not (clip > 0 and math.isfinite(clip)):
        raise ValueError(f"clip must be a positive number, got {clip!r}")
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"target quantile must be in [0, 1], got {target_quantile!r}")
    if not clip_lr >= 0:
        raise ValueError(f"clip learning rate must be >= 0, got {clip_lr!r}")
    if math.isnan(below):
        raise ValueError("fraction below the clip is NaN")
    return clip * math.exp(-clip_lr * (min(1.0, max(0.0, below)) - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float, cohort: float) -> float:
    """The noise multiplier left for the update sum when the clipped count shares the budget of one Gaussian of
    multiplier z (Andrew et al. 2021, Thm 1): z_update = (z^-2 - (2 * count_stddev)^-2)^-1/2.

    The count is the sum over the cohort of b_i - 1/2 (b_i = 1 when the update's norm is <= clip), noised with std
    count_stddev: one user moves it by 1/2 when added or removed, so its multiplier is 2 * count_stddev, and the pair
    (update sum / (z_update * clip), count / count_stddev) moves by at most sqrt(z_update^-2 + (2 count_stddev)^-2)
    = 1/z, the single Gaussian of multiplier z that `epsilon` accounts (under replacement both move twice as far, as
    `epsilon` assumes). `cohort` (the expected number of clients) only names the paper's choice, cohort / 20, when
    count_stddev is too small (Unreachable: it must exceed z / 2)."""
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier!r}")
    if not count_stddev >= 0:
        raise ValueError(f"clipped-count stddev must be >= 0, got {count_stddev!r}")
    if not cohort > 0:
        raise ValueError(f"cohort (expected clients per round) must be > 0, got {cohort!r}")
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise Unreachable(
            f"clipped-count stddev {count_stddev:g} is too small for noise multiplier {noise_multiplier:g}: it must "
            f"exceed z/2 = {noise_multiplier / 2:g} (Andrew et al. use cohort/20 = {cohort / 20:g})")
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def require(section: str = "privacy", option: str = "") -> None:
    """Refuse (one-line ConfigError) a privacy option when dp-accounting is not installed, before any run starts."""
    try:
        _dp_accounting()
    except ImportError as err:
        from flexp.config import ConfigError

        raise ConfigError(section, option or None, str(err).removeprefix("privacy ")) from None


def _dp_accounting() -> Any:
    """The dp_accounting module, or a one-line ImportError saying how to install it."""
    try:
        import dp_accounting
    except ImportError:
        raise ImportError("privacy needs dp-accounting: pip install 'flexp[privacy]'") from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP orders it cannot evaluate are dropped, each with a line
    return dp_accounting


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(noise_multiplier: float, sampling: Sampling, steps: int, delta: float, accountant: str) -> None:
    """ValueError (one line) for a bad argument, Unsupported for a pair dp-accounting cannot account."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling, got {sampling!r}")
    if not (isinstance(noise_multiplier, numbers.Real) and 0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise multiplier must be a number >= 0, got {noise_multiplier!r}")
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if accountant == "pld" and sampling.kind == "fixed" and sampling.size < sampling.population:
        raise Unsupported("accountant pld accounts Poisson sampling only (dp-accounting has no PLD of sampling "
                          "without replacement): use poisson sampling or accountant rdp")


def _step(dpa: Any, z: float, sampling: Sampling) -> tuple[Any, Any]:
    """One step as a dp-accounting DpEvent, whose multiplier is the noise over the step's L2 sensitivity under the
    relation returned with it; a sample of everyone is no sampling but a plain Gaussian (PLD's REPLACE_ONE would double
    its shift again)."""
    relation = dpa.NeighboringRelation
    if sampling.kind == "poisson":
        gauss = dpa.GaussianDpEvent(z)
        if sampling.rate == 1:
            return gauss, relation.ADD_OR_REMOVE_ONE
        return dpa.PoissonSampledDpEvent(sampling.rate, gauss), relation.ADD_OR_REMOVE_ONE
    gauss = dpa.GaussianDpEvent(z / 2)
    if sampling.size == sampling.population:
        return gauss, relation.ADD_OR_REMOVE_ONE
    return dpa.SampledWithoutReplacementDpEvent(sampling.population, sampling.size, gauss), relation.REPLACE_ONE


def _pld_epsilon(dpa: Any, event: Any, relation: Any, steps: int, delta: float) -> float:
    """PLDAccountant's epsilon; for unsampled steps, whose T-fold composition is one Gaussian of multiplier z/sqrt(T),
    dp-accounting's exact Gaussian epsilon (>= 0.6) instead: the PLD of a small multiplier takes seconds to build."""
    exact = getattr(dpa, "get_epsilon_gaussian", None)
    if exact is not None and isinstance(event, dpa.GaussianDpEvent):
        return float(exact(event.noise_multiplier / math.sqrt(steps), delta))
    pld = dpa.pld.PLDAccountant(relation, value_discretization_interval=PLD_INTERVAL)
    return float(pld.compose(event, steps).get_epsilon(delta))


@lru_cache(maxsize=256)
def _rdp_per_step(event: Any, relation: Any) -> tuple[Any, Any]:
    """RdpAccountant's orders and RDP of one step of `event` (its attributes, unchanged since dp-accounting 0.1): it
    composes k steps as k times these, and the tests check the result against its own composition."""
    rdp = _dp_accounting().rdp.RdpAccountant(neighboring_relation=relation).compose(event)
    return rdp._orders, rdp._rdp


def _bracket(eps: Any, target: float) -> tuple[float, float]:
    """Noise multipliers lo < hi, a factor 2 apart, with eps(lo) > target >= eps(hi)."""
    z = 1.0
    if eps(z) > target:
        while eps(z) > target:
            if z >= Z_MAX:
                raise Unreachable(f"target epsilon {target:g} needs a noise multiplier above {Z_MAX:g} (epsilon "
                                  f"there: {eps(z):.4g}): raise the target or delta, or sample fewer or less often")
            z *= 2
        return z / 2, z
    while eps(z) <= target:
        if z <= Z_MIN:
            raise Unreachable(f"target epsilon {target:g} is met even at noise multiplier {Z_MIN:g} "
                              f"(epsilon {eps(z):.4g}): there is nothing to calibrate")
        z /= 2
    return z, z * 2
