"""Sharded datasets on an fsspec URL: round trip, per-epoch balanced disjoint shards, hashes."""

from __future__ import annotations

import json

import fsspec
import pytest
import torch

from concord.cli import _Parser
from concord.data import command
from concord.data.dfs import (
    CorruptShardError,
    DFSLoader,
    ShardedFiles,
    load_dataset,
    read_manifest,
    verify_shards,
    write_shards,
)
from concord.data.sources import make_loader
from concord.errors import UsageError


def synthetic(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is x = [i, -i] (float32) and y = i: every sample identifies itself."""
    ids = torch.arange(n)
    return torch.stack([ids, -ids], 1).float(), ids


@pytest.fixture
def memory_url(request):
    safe = "".join(c if c.isalnum() else "-" for c in request.node.name)
    url = f"memory://concord-test/{safe}"
    yield url
    for where in (url, url + "-src"):
        fs, path = fsspec.core.url_to_fs(where)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_round_trip(scheme, tmp_path, memory_url):
    url = f"file://{tmp_path}/ds" if scheme == "file" else memory_url
    x, y = synthetic(11)
    manifest = write_shards((x, y), url, 3, name="syn")
    again = read_manifest(url)
    assert again == manifest
    assert again.counts == [4, 4, 3] and again.num_samples == 11
    assert [(f.name, f.dtype, f.shape) for f in again.fields] == [
        ("x", "float32", (2,)),
        ("y", "int64", ()),
    ]
    assert all(len(s.sha256) == 64 for s in again.shards)
    gx, gy = load_dataset(url)
    assert torch.equal(gx, x) and torch.equal(gy, y)


def epoch_ids(url: str, world: int, epoch: int, seed: int = 3) -> list[list[int]]:
    out = []
    for rank in range(world):
        loader = DFSLoader(ShardedFiles(url, rank, world, seed=seed, prefetch=1), batch_size=3)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        ids = [int(v) for _, y in batches for v in y]
        for x, y in batches:  # the features travel with their label
            assert torch.equal(x[:, 0], y.float()) and torch.equal(x[:, 1], -y.float())
        out.append(ids)
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_epochs_are_disjoint_complete_deterministic_and_change(world, memory_url):
    n = 23
    write_shards(synthetic(n), memory_url, sizes=[7, 1, 0, 5, 4, 6])  # uneven, one empty
    seen = {}
    for epoch in range(3):
        parts = epoch_ids(memory_url, world, epoch)
        flat = [i for part in parts for i in part]
        assert sorted(flat) == list(range(n)), f"epoch {epoch}: not a partition"
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1, f"unbalanced {sizes}"
        assert parts == epoch_ids(memory_url, world, epoch)  # same seed, same answer
        seen[epoch] = parts
    assert seen[0] != seen[1] != seen[2]
    assert {frozenset(p) for p in seen[0]} != {frozenset(p) for p in seen[1]}


def test_worker_reads_only_its_shards(memory_url):
    write_shards(synthetic(40), memory_url, 8)  # 8 shards of 5 samples, each the same size
    nbytes = read_manifest(memory_url).shards[0].nbytes
    files = ShardedFiles(memory_url, 1, 4, seed=0)
    loader = DFSLoader(files, batch_size=4)
    assert sum(len(y) for _, y in loader) == 10
    assert files.bytes_read == 2 * nbytes  # 2 of the 8 shards, nothing else


def test_corrupt_shard_is_named(tmp_path):
    url = f"file://{tmp_path}/ds"
    write_shards(synthetic(12), url, 3)
    path = tmp_path / "ds" / "shard-00001.npz"
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptShardError, match=r"shard-00001\.npz .* is corrupt: sha256"):
        verify_shards(url)
    with pytest.raises(CorruptShardError, match=r"shard-00001\.npz"):
        list(DFSLoader(ShardedFiles(url, 0, 1, prefetch=2), 4))  # raised through the prefetcher
    (tmp_path / "ds" / "shard-00000.npz").unlink()
    with pytest.raises(CorruptShardError, match=r"shard-00000\.npz listed .* is missing"):
        list(ShardedFiles(url, 0, 1, shuffle=False).chunks())


def test_bad_manifest_and_arguments(tmp_path, memory_url):
    with pytest.raises(UsageError, match="no manifest.json under"):
        read_manifest(f"file://{tmp_path}/nothing")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UsageError, match="is not a concord-shards v1 manifest"):
        read_manifest(f"file://{tmp_path}")
    with pytest.raises(UsageError, match="sum to 5"):
        write_shards(synthetic(5), memory_url, sizes=[2, 2])
    with pytest.raises(UsageError, match="--shards must be between 1 and 5"):
        write_shards(synthetic(5), memory_url, 6)


def cli_main(argv: list[str]) -> int:
    """``concord data ...`` through the data subcommand's own parser."""
    parser = _Parser(prog="concord")
    command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError:
        return 2


def test_cli_shard_and_verify_then_train_source(memory_url, capsys):
    src = memory_url + "-src"
    write_shards(synthetic(10), src, 1)
    assert cli_main(["data", "shard", f"dfs:{src}", "--out", memory_url, "--shards", "4"]) == 0
    assert "10 samples in 4 shards" in capsys.readouterr().out
    assert read_manifest(memory_url).counts == [3, 3, 2, 2]
    assert cli_main(["data", "verify", memory_url]) == 0
    assert "all hashes verified" in capsys.readouterr().out
    loader = make_loader(f"dfs:{memory_url}", rank=0, world=2, batch_size=4, seed=0)
    loader.set_epoch(1)
    assert len(loader) == 2 and sum(len(y) for _, y in loader) == 5
    assert cli_main(["data", "shard", "nope", "--out", memory_url, "--shards", "2"]) == 2
