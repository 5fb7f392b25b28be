"""`dataset=npz`: one .npz file of x_train, y_train, x_test, y_test and optional client_train/client_test ids."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import numpy as np

from flexp.config import ConfigError
from flexp.data.federated import ARRAYS, DatasetError, FederatedDataset

HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
LOCAL_HEADER = 30  # bytes of a zip member's fixed local header; its name and extra field follow


class Compressed(ValueError):
    """A compressed archive member: it has no bytes on disk to map."""


def load_npz(path: str, mmap: bool = False) -> FederatedDataset:
    """Read the arrays (never pickles) and build the dataset; any problem is one ConfigError naming dataset.path.

    mmap: map the arrays from the file instead of reading them (an uncompressed .npz, np.savez), so a client's
    samples are read from disk when it trains; x_train must then be stored model-ready (float32, or int64 ids)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("dataset.path", path, "no such file")
    try:
        arrays = mapped(file) if mmap else read(file)
    except Compressed as err:
        raise ConfigError("dataset.mmap", True, f"{path}: {err}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError("dataset.path", path, f"is not a readable .npz ({' '.join(str(err).split())})") from None
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
        raise ConfigError("dataset.path", path, f"holds an unknown array {unknown[0]!r}; expected {', '.join(ARRAYS)}")
    missing = [name for name in ARRAYS[:4] if name not in arrays]
    if missing:
        raise ConfigError("dataset.path", path, f"has no array {missing[0]!r} (it holds {', '.join(arrays)})")
    if mmap and arrays["x_train"].dtype not in (np.float32, np.int64):
        raise ConfigError("dataset.mmap", True, f"x_train of {path} is {arrays['x_train'].dtype}: a mapped x_train "
                          "is used as stored, so store it as float32 (or int64 token ids)")
    try:
        return FederatedDataset.from_arrays(**arrays, name=file.stem)
    except DatasetError as err:
        raise ConfigError("dataset.path", path, str(err)) from None


def read(file: Path) -> dict[str, np.ndarray]:
    """Every array of the archive, read into memory."""
    with np.load(file, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def mapped(file: Path) -> dict[str, np.ndarray]:
    """Every array of an uncompressed archive as a copy-on-write memory map of its bytes inside the zip file."""
    out = {}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                raise Compressed(f"array {name!r} is compressed (np.savez_compressed); mapping needs np.savez")
            raw.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", raw.read(4))
            raw.seek(info.header_offset + LOCAL_HEADER + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            if version not in HEADERS:
                raise ValueError(f"array {name!r} has .npy format version {version}")
            shape, fortran, dtype = HEADERS[version](raw)
            if dtype.hasobject:
                raise ValueError(f"array {name!r} holds Python objects")
            order = "F" if fortran else "C"
            out[name] = np.memmap(file, dtype, "c", raw.tell(), shape, order) if np.prod(shape) else \
                np.empty(shape, dtype, order)
    return out
