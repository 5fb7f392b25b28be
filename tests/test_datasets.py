"""Any dataset: the npz, torchvision and Hugging Face adapters and dataset._target_, on small files written here."""

import pickle
import sys

import numpy as np
import pytest
import torch
from conftest import SMALL, mlflow_client, run_cli
from omegaconf import OmegaConf

from flexp.config import ConfigError, parse_config
from flexp.data import FederatedDataset, load_dataset
from flexp.data.mnist import idx_bytes

IDS = np.array([3, 17, 42])
BASE = [arg for arg in SMALL if not arg.startswith("dataset")]


def images(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def standardised(x_train: np.ndarray, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The expected inputs, by hand in float64: x/255 standardised by the training set's per-channel mean and std."""
    scaled = x_train / 255.0
    mean, std = scaled.mean(axis=axes, keepdims=True), scaled.std(axis=axes, keepdims=True)
    return (x / 255.0 - mean) / std


def assert_inputs(actual: torch.Tensor, expected: np.ndarray) -> None:
    """Five float32 roundings (x/255, mean, std, the subtraction, the division) of values below 4 in magnitude."""
    assert actual.dtype == torch.float32 and tuple(actual.shape) == expected.shape
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=5 * 4 * np.finfo(np.float32).eps)


def arrays(n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    """A tiny image set with natural clients whose ids are not 0..K-1."""
    rng = np.random.default_rng(1)
    return {"x_train": images(n_train, 6, 6), "y_train": rng.integers(0, 4, n_train),
            "x_test": images(n_test, 6, 6, seed=2), "y_test": rng.integers(0, 4, n_test),
            "client_train": np.resize(IDS[::-1], n_train), "client_test": np.resize(IDS, n_test)}


@pytest.fixture(scope="module")
def compose():
    """compose(overrides) -> the parsed ExperimentConfig, through Hydra and flexp's own validation."""
    from hydra import compose, initialize_config_dir

    from flexp.__main__ import forcing_known_keys
    from flexp.searchpath import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda overrides: parse_config(OmegaConf.to_container(
            compose("config", forcing_known_keys([*BASE, *overrides])), resolve=True))


def test_npz_maps_natural_ids_in_sorted_order_and_standardises_images(tmp_path, compose):
    from flexp.job import make_partition

    data = arrays()
    np.savez(tmp_path / "d.npz", **data)
    cfg = compose(["dataset=npz", f"dataset.path={tmp_path / 'd.npz'}", "partition=natural", "fl.clients=3"])
    loaded = load_dataset(cfg.dataset)
    assert (loaded.input_shape, loaded.num_classes) == ((1, 6, 6), int(max(data["y_train"].max(),
                                                                             data["y_test"].max())) + 1)
    assert_inputs(loaded.train.x, standardised(data["x_train"], data["x_train"], (0, 1, 2))[:, None])
    assert_inputs(loaded.test.x, standardised(data["x_train"], data["x_test"], (0, 1, 2))[:, None])
    assert loaded.train.y.tolist() == data["y_train"].tolist()
    assert loaded.client_ids.tolist() == [3, 17, 42]
    assert loaded.test_groups.tolist() == np.searchsorted(IDS, data["client_test"]).tolist()
    parts = make_partition(cfg, loaded)
    for k, part in enumerate(parts):
        assert part.tolist() == np.flatnonzero(data["client_train"] == IDS[k]).tolist()
    with pytest.raises(ConfigError, match="3 natural clients, not 4"):
        make_partition(compose(["dataset=npz", f"dataset.path={tmp_path / 'd.npz'}", "partition=natural",
                                "fl.clients=4"]), loaded)


def _without(name):
    return {k: v for k, v in arrays().items() if k != name}


BAD_NPZ = [
    ({"x_train": None}, "no such file"),
    (_without("y_test"), "has no array 'y_test'"),
    ({**arrays(), "client_trian": np.zeros(30)}, "unknown array 'client_trian'"),
    ({**arrays(), "y_train": np.zeros(29, dtype=np.int64)}, "y_train: has 29 labels, x_train has 30 samples"),
    ({**arrays(), "x_test": images(12, 5, 6)}, "x_test: samples of shape (5, 6), x_train's are (6, 6)"),
    ({**arrays(), "y_train": np.zeros(30)}, "y_train: must be 1-D integer class labels"),
    ({**arrays(), "client_train": np.zeros(3)}, "client_train: must hold one client id per sample"),
    ({**arrays(), "client_test": np.full(12, 5)}, "client_test: ids [5] have no training samples"),
]


@pytest.mark.parametrize("contents, why", BAD_NPZ, ids=[why.split(":")[0] for _, why in BAD_NPZ])
def test_bad_npz_is_one_config_error_naming_the_path_and_the_array(tmp_path, compose, contents, why):
    """A ConfigError from prepare is the CLI's one line and exit 2 (tests/test_bad_config.py)."""
    path = tmp_path / "d.npz"
    if contents.get("x_train") is not None:
        np.savez(path, **contents)
    with pytest.raises(ConfigError) as err:
        load_dataset(compose(["dataset=npz", f"dataset.path={path}"]).dataset)
    assert err.value.key == "dataset.path" and why in str(err.value) and "\n" not in str(err.value)


def test_npz_with_natural_ids_runs_from_the_command_line(tmp_path):
    np.savez(tmp_path / "d.npz", **arrays())
    args = [*BASE, "dataset=npz", "partition=natural", "fl.clients=3", "fl.fraction=1", "fl.rounds=2"]
    proc = run_cli([*args, f"dataset.path={tmp_path / 'd.npz'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = mlflow_client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("flexp").experiment_id])[0]
    assert run.data.params["dataset._target_"] == "flexp.data.npz.load_npz"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "clients")] == [3, 3]


def make_pieces(n: int = 20, width: int = 3, form: str = "dict"):
    """A user's loader (dataset._target_=test_datasets.make_pieces) returning data in each accepted form."""
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n + 5, width)).astype(np.float64), rng.integers(0, 3, n + 5)
    ids = rng.choice([-7, 100, 5], n)
    pieces = (x[:n], y[:n], x[n:], y[n:], ids)
    if form == "dict":
        return dict(zip(("x_train", "y_train", "x_test", "y_test", "client_train"), pieces))
    if form == "tuple":
        return pieces
    if form == "map":
        return (torch.utils.data.TensorDataset(torch.from_numpy(x[:n]), torch.from_numpy(y[:n])),
                list(zip(x[n:], y[n:].tolist())))
    if form == "federated":
        return FederatedDataset.from_arrays(*pieces, name="mine")
    return 5


@pytest.mark.parametrize("form", ["dict", "tuple", "map", "federated"])
def test_a_target_callable_takes_its_own_keyword_arguments_and_returns_any_form(compose, form):
    cfg = compose(["dataset=custom", "dataset._target_=test_datasets.make_pieces", "dataset.width=5",
                   f"dataset.form={form}"])
    loaded = load_dataset(cfg.dataset)
    assert loaded.input_shape == (5,) and loaded.train.x.dtype == torch.float32 and len(loaded.train) == 20
    expected = make_pieces(20, 5)
    assert torch.equal(loaded.test.x, torch.from_numpy(expected["x_test"]).float())
    if form != "map":
        assert loaded.client_ids.tolist() == [-7, 5, 100]
        assert loaded.train_groups.tolist() == np.searchsorted([-7, 5, 100], expected["client_train"]).tolist()


@pytest.mark.parametrize("overrides, key, why", [
    (["dataset=custom"], "dataset._target_", "must name a callable"),
    (["dataset=custom", "dataset._target_=nowhere.make"], "dataset._target_", "cannot be imported"),
    (["dataset=custom", "dataset._target_=test_datasets.make_pieces", "dataset.widht=2"], "dataset.widht",
     "takes n, width, form"),
    (["dataset=npz"], "dataset.path", "is missing"),
    (["dataset=npz", "dataset.path=x", "dataset.name=y"], "dataset.name", "unknown key"),
    (["dataset=torchvision", "dataset.nme=CIFAR10"], "dataset.nme", "unknown key"),
    (["dataset=synthetic", "dataset.path=x.npz"], "dataset.path", "unknown key"),
])
def test_dataset_keys_are_checked_against_the_callable_or_the_builtin(compose, overrides, key, why):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert err.value.key == key and why in str(err.value)


def test_a_callable_returning_something_else_is_one_config_error(compose):
    cfg = compose(["dataset=custom", "dataset._target_=test_datasets.make_pieces", "dataset.form=int"])
    with pytest.raises(ConfigError, match=r"^dataset._target_='test_datasets.make_pieces': returned a int"):
        load_dataset(cfg.dataset)


def test_the_command_line_lets_a_target_callables_arguments_through():
    from flexp.__main__ import check_group_choices

    check_group_choices([*BASE, "dataset=custom", "dataset._target_=mypkg.make_data", "dataset.width=8"])


def write_idx(raw, prefix: str, x: np.ndarray, y: np.ndarray, test: str = "t10k") -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for split, (xs, ys) in (("train", (x[:20], y[:20])), (test, (x[20:], y[20:]))):
        (raw / f"{prefix}{split}-images-idx3-ubyte").write_bytes(idx_bytes(xs, 0x803))
        (raw / f"{prefix}{split}-labels-idx1-ubyte").write_bytes(idx_bytes(ys, 0x801))


@pytest.mark.parametrize("name, split, prefix, test", [("FashionMNIST", None, "", "t10k"),
                                                        ("EMNIST", "balanced", "emnist-balanced-", "test")])
def test_torchvision_reads_its_own_raw_files(tmp_path, name, split, prefix, test):
    from flexp.data.vision import load_torchvision

    x, y = images(26, 28, 28), np.arange(26, dtype=np.uint8) % 10
    write_idx(tmp_path / name / "raw", prefix, x, y, test)
    loaded = load_torchvision(name, str(tmp_path), split=split)
    assert (loaded.input_shape, loaded.num_classes, len(loaded.train), len(loaded.test)) == ((1, 28, 28), 10, 20, 6)
    assert_inputs(loaded.test.x, standardised(x[:20], x[20:], (0, 1, 2))[:, None])
    assert loaded.train.y.tolist() == y[:20].tolist()


def test_torchvision_cifar10_pickle_batches_become_channels_first(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    from flexp.data.vision import load_torchvision

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)  # tiny files, not the real md5s
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    x = images(12, 3, 32, 32)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, batch in enumerate(batches):
        rows = x[2 * i: 2 * i + 2]
        (folder / batch).write_bytes(pickle.dumps({"data": rows.reshape(2, -1), "labels": [i, 9 - i]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    loaded = load_torchvision("CIFAR10", str(tmp_path))
    assert (loaded.input_shape, loaded.num_classes, len(loaded.train)) == ((3, 32, 32), 10, 10)
    assert_inputs(loaded.test.x, standardised(x[:10], x[10:], (0, 2, 3)))


def test_torchvision_without_files_or_download_names_the_key(tmp_path):
    from flexp.data.vision import load_torchvision

    for call, key in ((lambda: load_torchvision("FashionMNIST", str(tmp_path), download=False), "dataset.root"),
                      (lambda: load_torchvision("NoSuchSet", str(tmp_path)), "dataset.name"),
                      (lambda: load_torchvision("EMNIST", str(tmp_path)), "dataset.split"),
                      (lambda: load_torchvision("FashionMNIST", str(tmp_path), split="letters"), "dataset.split")):
        with pytest.raises(ConfigError) as err:
            call()
        assert err.value.key == key, str(err.value)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face DatasetDict (image, ClassLabel with 5 classes, writer ids) written with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=5),
                                  "writer": datasets.Value("int64")})
    x, folder = images(26, 8, 8, 3), tmp_path_factory.mktemp("hf") / "saved"
    parts = {"train": slice(0, 20), "test": slice(20, 26)}
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"img": list(x[rows]), "label": (np.arange(26)[rows] % 3).tolist(),
         "writer": np.resize(IDS, 26)[rows].tolist()}, features=features) for split, rows in parts.items()}
    ).save_to_disk(str(folder))
    return folder, x


def test_huggingface_saved_dataset_with_a_client_column(hf_folder):
    from flexp.data.hub import load_huggingface

    folder, x = hf_folder
    loaded = load_huggingface(str(folder), image_column="img", client_column="writer")
    assert (loaded.input_shape, loaded.num_classes, len(loaded.train)) == ((3, 8, 8), 5, 20)
    assert_inputs(loaded.test.x, standardised(x[:20], x[20:], (0, 1, 2)).transpose(0, 3, 1, 2))
    assert loaded.client_ids.tolist() == [3, 17, 42]
    assert loaded.train_groups.tolist() == (np.arange(20) % 3).tolist()
    assert loaded.test_groups.tolist() == (np.arange(20, 26) % 3).tolist()
    with pytest.raises(ConfigError) as err:
        load_huggingface(str(folder))
    assert err.value.key == "dataset.image_column" and "img" in str(err.value)


def test_huggingface_without_the_library_is_a_one_line_hint(monkeypatch, tmp_path):
    from flexp.data.hub import load_huggingface

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match=r"pip install \"flexp\[huggingface\]\""):
        load_huggingface(str(tmp_path))
