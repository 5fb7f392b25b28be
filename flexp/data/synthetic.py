"""Synthetic(alpha, beta) of Li et al. 2020 (FedProx): per-user softmax-regression data, generated from a seed."""

from __future__ import annotations

import numpy as np


def generate(alpha: float, beta: float, users: int, samples_per_user: int | None, features: int,
             classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (x float32 [N, features], y int64 [N], user int64 [N]); alpha skews models, beta skews inputs."""
    rng = np.random.default_rng(seed)
    if samples_per_user is None:
        sizes = rng.lognormal(4, 2, users).astype(int) + 50
    else:
        sizes = np.full(users, samples_per_user)
    std = np.arange(1, features + 1, dtype=np.float64) ** -0.6
    model_means = rng.normal(0, np.sqrt(alpha), users) if alpha else np.zeros(users)
    input_centres = rng.normal(0, np.sqrt(beta), users) if beta else np.zeros(users)
    xs, ys = [], []
    for user in range(users):
        weights = rng.normal(model_means[user], 1, (features, classes))
        bias = rng.normal(model_means[user], 1, classes)
        centre = rng.normal(input_centres[user], 1, features)
        x = centre + rng.standard_normal((sizes[user], features)) * std
        xs.append(x)
        ys.append(np.argmax(x @ weights + bias, axis=1))
    user_of = np.repeat(np.arange(users), sizes)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64), user_of.astype(np.int64)


def split_per_user(users: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last `test_fraction` of each user's samples (at least one) as test; return (train, test) indices."""
    train, test = [], []
    for user in np.unique(users):
        mine = np.flatnonzero(users == user)
        cut = len(mine) - max(1, int(round(len(mine) * test_fraction)))
        train.append(mine[:cut])
        test.append(mine[cut:])
    return np.concatenate(train), np.concatenate(test)
