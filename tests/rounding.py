"""How far two float32 runs of the same SGD steps may drift apart when their kernels round differently.

Engines (and CPUs: AVX2, AVX-512, ARM) sum in different orders, so float32 results agree only to rounding. The bound
below follows from IEEE-754 arithmetic alone, never from what one machine happened to print:

- A sum of N products computed in float32 in any order, with or without FMA, errs by at most lambda*sqrt(N)*u
  relative to the sum of |terms|, u = 2^-24, with probability at least 1 - 2*exp(-lambda^2/2) (Higham and Mary,
  "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019). lambda = 6: < 3e-8.
- One SGD step passes through `chained` such reductions (forward and backward through every layer), each at most
  `longest_sum` terms long (a fan-in, or a weight gradient summed over batch x positions), so each step's update
  is that many times off; over `steps` steps the errors add up, and each of the two runs has its own.

What it does not cover: a ReLU or max-pool tie that the two runs break differently changes a whole gradient entry,
and over tens of steps such flips compound chaotically (one engine's float32 and float64 runs of 30 CNN steps end
~4% apart). So float32 comparisons keep to a few local steps, where a flip moves one sample's gradient at one spot,
and the many-step agreement of the engines is shown in float64, where the same bound is 2^29 times smaller.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
LAMBDA = 6.0


def sgd_rounding_bound(steps: int, longest_sum: int, chained: int, dtype: torch.dtype = torch.float32) -> float:
    """Normwise relative drift two runs of `steps` identical SGD steps can show from rounding alone."""
    return 2 * steps * chained * LAMBDA * math.sqrt(longest_sum) * UNIT_ROUNDOFF[dtype]


def relative_drift(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    """||a - b|| / ||b - start||: the disagreement of two results, relative to how far training moved them."""
    a, b, start = (t.detach().double() for t in (a, b, start))
    return float((a - b).norm() / (b - start).norm())


def assert_same_sgd(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor, steps: int, longest_sum: int,
                    chained: int) -> None:
    """a and b are the same SGD steps from `start`, up to rounding in their dtype."""
    moved, size = float((b - start).detach().double().norm()), float(start.detach().double().norm())
    assert moved > 1e3 * UNIT_ROUNDOFF[b.dtype] * size, "training should move the weights"
    drift = relative_drift(a, b, start)
    bound = sgd_rounding_bound(steps, longest_sum, chained, b.dtype)
    assert drift <= bound, f"relative drift {drift:.3g} exceeds the rounding bound {bound:.3g}"


def chained_reductions(model_name: str) -> int:
    """Reductions one SGD step chains for flexp's models: forward and backward through each weight layer."""
    return 2 * {"logreg": 1, "2nn": 3, "cnn": 4}[model_name]


def longest_sum(model_name: str, input_shape: tuple[int, ...], batch: int) -> int:
    """The longest reduction in one SGD step of flexp's models: a fan-in, or a weight gradient summed over the batch
    (and, for the CNN's first convolution, over every output position)."""
    features = math.prod(input_shape)
    if model_name == "cnn":
        return max(64 * 7 * 7, batch * input_shape[1] * input_shape[2])
    return max(features, batch)


def most_steps(parts: list[torch.Tensor], batch: int | None, epochs: int, rounds: int) -> int:
    """The most local SGD steps any client can take over `rounds` rounds of `epochs` epochs in batches of `batch`."""
    largest = max(len(p) for p in parts)
    return rounds * epochs * -(-largest // (batch or largest))
