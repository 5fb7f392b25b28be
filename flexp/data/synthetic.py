"""Synthetic(alpha, beta) of Li et al. 2020 (FedProx): per-user softmax-regression data, generated from a seed."""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 22  # standard normals drawn at once (32 MiB)


def generate(alpha: float, beta: float, users: int, samples_per_user: int | None, features: int,
             classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (x float32 [N, features], y int64 [N], user int64 [N]); alpha skews models, beta skews inputs.

    Each user's model then inputs are consecutive standard normals of one stream (what rng.normal(loc, 1) draws),
    drawn a chunk of users at a time and written into arrays of the final size: no float64 copy of x, few calls."""
    rng = np.random.default_rng(seed)
    sizes = _sizes(rng, users, samples_per_user)
    std = np.arange(1, features + 1, dtype=np.float64) ** -0.6
    model_means = rng.normal(0, np.sqrt(alpha), users) if alpha else np.zeros(users)
    input_centres = rng.normal(0, np.sqrt(beta), users) if beta else np.zeros(users)
    ends = np.cumsum(sizes)
    x_all = np.empty((int(ends[-1]) if users else 0, features), dtype=np.float32)
    y_all = np.empty(len(x_all), dtype=np.int64)
    model_size = features * classes + classes + features
    for first, last in _chunks(sizes * features + model_size, CHUNK):
        z = rng.standard_normal(int((sizes[first:last] * features).sum()) + model_size * (last - first))
        span = slice(int(ends[first] - sizes[first]), int(ends[last - 1]))
        same = samples_per_user is not None
        x_all[span], y_all[span] = (_equal_users if same else _users)(
            z, sizes[first:last], model_means[first:last], input_centres[first:last], std, classes)
    return x_all, y_all, np.repeat(np.arange(users), sizes).astype(np.int64)


def _sizes(rng: np.random.Generator, users: int, samples_per_user: int | None) -> np.ndarray:
    """Samples per user: FedProx's power law, lognormal(4, 2) + 50, or the same for all."""
    if samples_per_user is None:
        return rng.lognormal(4, 2, users).astype(int) + 50
    return np.full(users, samples_per_user)


def total_samples(users: int, samples_per_user: int | None, seed: int) -> int:
    """How many samples generate() makes for these settings, without making them."""
    return int(_sizes(np.random.default_rng(seed), users, samples_per_user).sum())


def _users(z: np.ndarray, sizes: np.ndarray, means: np.ndarray, centres: np.ndarray, std: np.ndarray,
           classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of consecutive users from their standard normals z, one user at a time."""
    features = len(std)
    xs, ys, at = [], [], 0
    for n, mean, centre in zip(sizes.tolist(), means.tolist(), centres.tolist()):
        weights = mean + z[at:at + features * classes].reshape(features, classes)
        at += features * classes
        bias = mean + z[at:at + classes]
        at += classes
        x = (centre + z[at:at + features]) + z[at + features:at + features + n * features].reshape(n, features) * std
        at += features + n * features
        xs.append(x)
        ys.append(np.argmax(x @ weights + bias, axis=1))
    return np.concatenate(xs), np.concatenate(ys)


def _equal_users(z: np.ndarray, sizes: np.ndarray, means: np.ndarray, centres: np.ndarray, std: np.ndarray,
                 classes: int) -> tuple[np.ndarray, np.ndarray]:
    """What _users returns for users of one size, with one batched product instead of a loop."""
    users, n, features = len(sizes), int(sizes[0]), len(std)
    rows = z.reshape(users, -1)
    weights = means[:, None, None] + rows[:, :features * classes].reshape(users, features, classes)
    bias = means[:, None] + rows[:, features * classes:features * classes + classes]
    at = features * classes + classes
    centre = centres[:, None] + rows[:, at:at + features]
    x = centre[:, None, :] + rows[:, at + features:].reshape(users, n, features) * std
    y = np.argmax(np.matmul(x, weights) + bias[:, None, :], axis=2)
    return x.reshape(-1, features), y.reshape(-1)


def _chunks(need: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive user ranges [first, last) whose draws add up to about `limit` (at least one user each)."""
    ends = np.cumsum(need)
    bounds, first = [], 0
    while first < len(need):
        last = max(first + 1, int(np.searchsorted(ends, (ends[first - 1] if first else 0) + limit, side="right")))
        bounds.append((first, last))
        first = last
    return bounds


def split_per_user(users: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last `test_fraction` of each user's samples (at least one) as test; return (train, test) indices,
    user by user in id order, ascending within a user."""
    order = np.argsort(users, kind="stable")
    _, first, counts = np.unique(users[order], return_index=True, return_counts=True)
    test_sizes = np.maximum(1, np.round(counts * test_fraction).astype(np.int64))
    rank = np.arange(len(order)) - np.repeat(first, counts)
    train = rank < np.repeat(counts - test_sizes, counts)
    return order[train], order[~train]
