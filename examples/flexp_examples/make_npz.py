"""A small image dataset with natural clients, written as the npz flexp reads (`dataset=npz partition=natural`).

    python -m flexp_examples.make_npz clients.npz

Images are 1x12x12 uint8: class c lights quadrant c, plus noise. Six clients with ids that are not 0..K-1, of
different sizes, each holding mostly two of the four classes (a non-IID split).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CLIENT_IDS = (3, 17, 42, 99, 256, 1000)
CLASSES = 4
SIZE = 12


def images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, 1, SIZE, SIZE] uint8: noise everywhere, the label's quadrant brighter."""
    x = rng.integers(0, 200, size=(len(labels), 1, SIZE, SIZE))
    half = SIZE // 2
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        x[i, 0, row * half:(row + 1) * half, col * half:(col + 1) * half] += 30
    return x.astype(np.uint8)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """x_train, y_train, client_train, x_test, y_test from a seeded generator."""
    rng = np.random.default_rng(seed)
    labels, owners = [], []
    for k, client in enumerate(CLIENT_IDS):
        n = 20 + 10 * k
        main = [k % CLASSES, (k + 1) % CLASSES]
        labels.append(np.where(rng.random(n) < 0.9, rng.choice(main, n), rng.integers(0, CLASSES, n)))
        owners.append(np.full(n, client))
    y_train = np.concatenate(labels).astype(np.int64)
    y_test = rng.integers(0, CLASSES, 80).astype(np.int64)
    return {"x_train": images(y_train, rng), "y_train": y_train, "client_train": np.concatenate(owners),
            "x_test": images(y_test, rng), "y_test": y_test}


def write_npz(path: str | Path, seed: int = 0) -> Path:
    """Write the dataset to `path` (no pickles) and return it."""
    path = Path(path)
    np.savez(path, **make_arrays(seed))
    return path


if __name__ == "__main__":
    print(write_npz(sys.argv[1] if len(sys.argv) > 1 else "clients.npz"))
