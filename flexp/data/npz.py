"""`dataset=npz`: one .npz file of x_train, y_train, x_test, y_test and optional client_train/client_test ids."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from flexp.config import ConfigError
from flexp.data.federated import ARRAYS, DatasetError, FederatedDataset


def load_npz(path: str) -> FederatedDataset:
    """Read the arrays (never pickles) and build the dataset; any problem is one ConfigError naming dataset.path."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("dataset.path", path, "no such file")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError("dataset.path", path, f"is not a readable .npz ({' '.join(str(err).split())})") from None
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
        raise ConfigError("dataset.path", path, f"holds an unknown array {unknown[0]!r}; expected {', '.join(ARRAYS)}")
    missing = [name for name in ARRAYS[:4] if name not in arrays]
    if missing:
        raise ConfigError("dataset.path", path, f"has no array {missing[0]!r} (it holds {', '.join(arrays)})")
    try:
        return FederatedDataset.from_arrays(**arrays, name=file.stem)
    except DatasetError as err:
        raise ConfigError("dataset.path", path, str(err)) from None
