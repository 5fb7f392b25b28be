"""`dataset=huggingface`: a Hugging Face dataset (the optional `datasets` library), from the Hub or save_to_disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flexp.config import ConfigError
from flexp.data.federated import DatasetError, FederatedDataset
from flexp.data.mnist import DataSourceError

HINT = 'dataset=huggingface needs the datasets library: pip install "flexp[huggingface]" (or pip install datasets)'


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError("dataset", "huggingface", HINT) from None
    return datasets


def _open(path: str, config: str | None) -> Any:
    """load_from_disk for a folder written by save_to_disk, else load_dataset (the Hub, with its own cache)."""
    datasets = _datasets()
    folder = Path(path).expanduser()
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        try:
            return datasets.load_from_disk(str(folder))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError("dataset.path", path, f"is not a saved dataset ({' '.join(str(err).split())})") from None
    try:
        return datasets.load_dataset(path, config)
    except FileNotFoundError as err:
        raise ConfigError("dataset.path", path, f"not found ({' '.join(str(err).split())[:200]})") from None
    except (ConnectionError, OSError) as err:
        raise DataSourceError(f"huggingface {path}: {' '.join(str(err).split())[:300]}") from None


def _split(table: Any, path: str, key: str, split: str) -> Any:
    if not hasattr(table, "keys"):
        raise ConfigError("dataset.path", path, "holds one split, not train and test splits")
    if split not in table:
        raise ConfigError(key, split, f"is not a split of the dataset (it has {', '.join(table.keys())})")
    return table[split]


def _columns(part: Any, split: str, columns: dict[str, str | None]) -> dict[str, np.ndarray]:
    """Each named column of one split as one numpy array (images decoded and stacked)."""
    wanted = {key: column for key, column in columns.items() if column is not None}
    for key, column in wanted.items():
        if column not in part.column_names:
            raise ConfigError(f"dataset.{key}", column, f"is not a column of {split} "
                                                        f"(it has {', '.join(part.column_names)})")
    table = part.select_columns(sorted(set(wanted.values()))).with_format("numpy")[:]
    return {key: np.asarray(table[column]) for key, column in wanted.items()}


def load_huggingface(path: str, image_column: str = "image", label_column: str = "label",
                     client_column: str | None = None, train_split: str = "train", test_split: str = "test",
                     config: str | None = None) -> FederatedDataset:
    """The train and test splits' image and label columns as tensors; client_column gives natural clients."""
    table = _open(path, config)
    columns = {"image_column": image_column, "label_column": label_column, "client_column": client_column}
    train = _columns(_split(table, path, "dataset.train_split", train_split), train_split, columns)
    test_part = _split(table, path, "dataset.test_split", test_split)
    has_clients = client_column is not None and client_column in test_part.column_names
    test = _columns(test_part, test_split, {**columns, "client_column": client_column if has_clients else None})
    features = table[train_split].features.get(label_column)
    try:
        return FederatedDataset.from_arrays(
            train["image_column"], train["label_column"], test["image_column"], test["label_column"],
            train.get("client_column"), test.get("client_column"), name=Path(path).name,
            num_classes=getattr(features, "num_classes", None))
    except DatasetError as err:
        raise ConfigError("dataset.path", path, str(err)) from None
