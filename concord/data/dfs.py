"""Datasets as shard files plus a manifest under any fsspec URL (``file://``, ``memory://``, ``s3://``).

Write once::

    concord data shard mnist --out file:///shared/mnist --shards 16

then every worker reads only its own shards::

    files = ShardedFiles("file:///shared/mnist", rank=ctx.rank, world=ctx.world_size, seed=0)
    loader = DFSLoader(files, batch_size=64)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...

Layout: ``manifest.json`` (format, fields with dtype and per-sample shape, and per shard its
file name, sample count, byte size and sha256) and ``shard-00000.npz`` ... (numpy ``.npz``,
loaded with ``allow_pickle=False``; nothing is ever unpickled). Each epoch the shards are laid
end to end in a seeded order and cut into ``world`` parts balanced by sample count, so the
workers' samples are disjoint, cover the dataset, and change from epoch to epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import IterableDataset

from concord.algorithms.assign import ShardSlice, num_batches, part_bounds, shard_slices
from concord.comm.runtime import DEFAULT_TIMEOUT
from concord.data.sampler import shard_indices
from concord.errors import ConcordError, PeerTimeoutError, UsageError

FORMAT = "concord-shards"
VERSION = 1
MANIFEST = "manifest.json"

Batch = tuple[torch.Tensor, ...]


class CorruptShardError(ConcordError):
    """A shard file is missing, does not match its manifest hash, or cannot be parsed."""


@dataclass(frozen=True)
class Field:
    """One tensor per sample: its name, numpy dtype name and per-sample shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardInfo:
    """One shard file as the manifest records it."""

    file: str
    samples: int
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds; ``num_samples`` is the sum of the shards' samples."""

    name: str
    fields: tuple[Field, ...]
    shards: tuple[ShardInfo, ...]

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    def to_json(self) -> str:
        body = {"format": FORMAT, "version": VERSION, "name": self.name}
        body["num_samples"] = self.num_samples
        body["fields"] = [asdict(f) for f in self.fields]
        body["shards"] = [asdict(s) for s in self.shards]
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            body = json.loads(text)
            if body.get("format") != FORMAT or body.get("version") != VERSION:
                raise ValueError(f"format {body.get('format')!r} v{body.get('version')}")
            fields = tuple(
                Field(f["name"], f["dtype"], tuple(int(d) for d in f["shape"]))
                for f in body["fields"]
            )
            shards = tuple(
                ShardInfo(s["file"], int(s["samples"]), int(s["nbytes"]), s["sha256"])
                for s in body["shards"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(
                f"{where} is not a {FORMAT} v{VERSION} manifest ({exc}); "
                "write the dataset with `concord data shard`"
            ) from None
        return cls(name=body.get("name", ""), fields=fields, shards=shards)


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def _tensors(data: Any) -> list[torch.Tensor]:
    tensors = list(getattr(data, "tensors", data))
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("data must be a TensorDataset or a sequence of tensors")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
    return tensors


def split_sizes(num_samples: int, shards: int) -> list[int]:
    """Near-equal shard sizes (differ by at most one) for ``shards`` shards."""
    if not 1 <= shards <= max(num_samples, 1):
        raise UsageError(f"--shards must be between 1 and {num_samples} samples, got {shards}")
    return [len(part_bounds(num_samples, shards, k)) for k in range(shards)]


def encode_shard(arrays: dict[str, np.ndarray]) -> bytes:
    """The ``.npz`` bytes of one shard (uncompressed)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_shards(
    data: Any,
    url: str,
    shards: int | None = None,
    *,
    sizes: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    name: str = "dataset",
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``data`` (a TensorDataset or tensors of equal length) as shard files + manifest.

    Give either ``shards`` (near-equal sizes) or explicit ``sizes`` summing to the dataset
    length. Field names default to ``x, y`` for two tensors, else ``t0, t1, ...``. The
    manifest is written last, so a reader never sees a manifest without its shards.
    """
    tensors = _tensors(data)
    total = len(tensors[0])
    if (shards is None) == (sizes is None):
        raise UsageError("give exactly one of shards=K or sizes=[...]")
    sizes = split_sizes(total, shards) if sizes is None else list(sizes)
    if sum(sizes) != total or any(s < 0 for s in sizes):
        raise UsageError(f"shard sizes {sizes} must be >= 0 and sum to {total} samples")
    if names is None:
        names = ["x", "y"] if len(tensors) == 2 else [f"t{i}" for i in range(len(tensors))]
    if len(names) != len(tensors):
        raise UsageError(f"{len(names)} field names for {len(tensors)} tensors")
    arrays = [t.detach().cpu().contiguous().numpy() for t in tensors]
    fields = tuple(Field(n, str(a.dtype), tuple(a.shape[1:])) for n, a in zip(names, arrays))
    fs, root = _fs(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    infos, start = [], 0
    for k, size in enumerate(sizes):
        blob = encode_shard({n: a[start : start + size] for n, a in zip(names, arrays)})
        start += size
        file = f"shard-{k:05d}.npz"
        fs.pipe_file(f"{root}/{file}", blob)
        infos.append(ShardInfo(file, size, len(blob), hashlib.sha256(blob).hexdigest()))
    manifest = Manifest(name=name, fields=fields, shards=tuple(infos))
    fs.pipe_file(f"{root}/{MANIFEST}", manifest.to_json().encode())
    return manifest


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read and validate ``URL/manifest.json``."""
    fs, root = _fs(url, storage_options)
    path = f"{root}/{MANIFEST}"
    try:
        text = fs.cat_file(path).decode()
    except FileNotFoundError:
        raise UsageError(
            f"no {MANIFEST} under {url}; write one with `concord data shard mnist --out {url}`"
        ) from None
    return Manifest.from_json(text, f"{url}/{MANIFEST}")


def decode_shard(blob: bytes, manifest: Manifest, index: int, where: str) -> Batch:
    """Parse one shard's bytes and check its fields against the manifest."""
    info = manifest.shards[index]
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = [npz[f.name] for f in manifest.fields]
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptShardError(f"shard {info.file} of {where} cannot be parsed: {exc}") from None
    for field, arr in zip(manifest.fields, arrays):
        want = (info.samples, *field.shape)
        if str(arr.dtype) != field.dtype or tuple(arr.shape) != want:
            raise CorruptShardError(
                f"shard {info.file} of {where}: field {field.name} is {arr.dtype}{arr.shape}, "
                f"manifest says {field.dtype}{want}"
            )
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def read_shard(
    fs: Any, root: str, manifest: Manifest, index: int, verify: bool = True, where: str = ""
) -> Batch:
    """Read shard ``index``, check its sha256 against the manifest, and decode it."""
    info = manifest.shards[index]
    where = where or root
    try:
        blob = fs.cat_file(f"{root}/{info.file}")
    except FileNotFoundError:
        raise CorruptShardError(
            f"shard {info.file} listed in the manifest of {where} is missing; "
            "rewrite the dataset with `concord data shard`"
        ) from None
    if verify:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != info.sha256:
            raise CorruptShardError(
                f"shard {info.file} of {where} is corrupt: sha256 {digest[:16]}... "
                f"({len(blob)} bytes) but the manifest says {info.sha256[:16]}... "
                f"({info.nbytes} bytes); rewrite it with `concord data shard`"
            )
    return decode_shard(blob, manifest, index, where)


def verify_shards(url: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Read every shard of ``url`` and check its hash (CorruptShardError on the first bad one)."""
    manifest = read_manifest(url, storage_options)
    fs, root = _fs(url, storage_options)
    for k in range(len(manifest.shards)):
        read_shard(fs, root, manifest, k, where=url)
    return manifest


def _mix(*parts: int) -> int:
    """A 63-bit generator seed from small integers (seed, epoch, shard)."""
    value = 0
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (1 << 63)
    return value


def prefetch(jobs: Iterable[Callable[[], Any]], depth: int, timeout: float, what: str) -> Iterator:
    """Run ``jobs`` in order on a background thread, at most ``depth`` results ahead.

    A job's exception is re-raised in the consumer; a result slower than ``timeout``
    seconds raises PeerTimeoutError naming ``what``. Stopping early stops the thread.
    """
    results: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for job in jobs:
                if not put(("ok", job())):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(("error", exc))
            return
        put(("done", None))

    thread = threading.Thread(target=run, name=f"concord-prefetch-{what}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise PeerTimeoutError(f"{what}: no data within {timeout:g}s") from None
            if status == "done":
                return
            if status == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


class ShardedFiles(IterableDataset):
    """Worker ``rank``'s samples of a sharded dataset at ``url``; only its shards are read.

    Each epoch (``set_epoch``) the shards are ordered by a permutation seeded with
    ``(seed, epoch)`` (identity with ``shuffle=False``), laid end to end, and cut into
    ``world`` contiguous parts balanced by sample count; this worker reads the shards
    overlapping its part (whole ones inside it, at most two partial ones at its edges),
    verifies each shard's sha256, and shuffles each slice. ``prefetch`` shards are read
    ahead on a background thread. Iterating yields samples; ``chunks()`` yields slices.
    """

    def __init__(
        self,
        url: str,
        rank: int,
        world: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        verify: bool = True,
        timeout: float | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        part_bounds(0, world, rank)  # validates rank and world
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.url, self.rank, self.world = url, rank, world
        self.seed, self.shuffle, self.verify = seed, shuffle, verify
        self.depth = prefetch
        self.timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        self.manifest = read_manifest(url, storage_options)
        self._fs, self._root = _fs(url, storage_options)
        self.epoch = 0
        self.bytes_read = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[ShardSlice]:
        """The shard slices this worker reads this epoch, in reading order."""
        k = len(self.manifest.shards)
        order = shard_indices(k, 0, 1, self.seed, self.epoch, self.shuffle, False)
        return shard_slices(self.manifest.counts, order, self.world, self.rank)

    def __len__(self) -> int:
        return len(part_bounds(self.manifest.num_samples, self.world, self.rank))

    def _load(self, piece: ShardSlice) -> Batch:
        tensors = read_shard(
            self._fs, self._root, self.manifest, piece.shard, self.verify, self.url
        )
        self.bytes_read += self.manifest.shards[piece.shard].nbytes
        rows = slice(piece.start, piece.stop)
        if not self.shuffle:
            return tuple(t[rows] for t in tensors)
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, piece.shard))
        perm = torch.randperm(len(piece), generator=gen) + piece.start
        return tuple(t[perm] for t in tensors)

    def chunks(self) -> Iterator[Batch]:
        """This epoch's slices as tensor tuples, read ``prefetch`` shards ahead."""
        jobs = [lambda p=p: self._load(p) for p in self.plan()]
        if self.depth == 0:
            return (job() for job in jobs)
        return prefetch(jobs, self.depth, self.timeout, f"reading shards of {self.url}")

    def __iter__(self) -> Iterator[Batch]:
        for chunk in self.chunks():
            yield from zip(*chunk)


def rebatch(chunks: Iterable[Batch], batch_size: int, drop_last: bool = False) -> Iterator[Batch]:
    """Cut a stream of tensor-tuple chunks into batches of ``batch_size`` rows."""
    pending: list[Batch] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk[0])
        if count < batch_size:
            continue
        joined = tuple(torch.cat(parts) for parts in zip(*pending))
        full = count - count % batch_size
        for start in range(0, full, batch_size):
            yield tuple(t[start : start + batch_size] for t in joined)
        pending = [tuple(t[full:] for t in joined)] if full < count else []
        count -= full
    if count and not drop_last:
        yield tuple(torch.cat(parts) for parts in zip(*pending))


class DFSLoader:
    """Batches of ``(x, y, ...)`` from a ``ShardedFiles``; ``set_epoch(e)`` reshuffles."""

    def __init__(self, files: ShardedFiles, batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.files, self.batch_size, self.drop_last = files, batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.files.set_epoch(epoch)

    @property
    def bytes_read(self) -> int:
        """Shard bytes this worker has read from the file system so far."""
        return self.files.bytes_read

    def __len__(self) -> int:
        n = len(self.files)
        return num_batches(n, self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        return rebatch(self.files.chunks(), self.batch_size, self.drop_last)


def load_dataset(url: str, storage_options: dict[str, Any] | None = None) -> Batch:
    """All samples of the sharded dataset at ``url``, in manifest order, hashes verified."""
    files = ShardedFiles(url, 0, 1, shuffle=False, storage_options=storage_options)
    chunks = list(files.chunks())
    if not chunks:
        return tuple(torch.empty((0, *f.shape)) for f in files.manifest.fields)
    return tuple(torch.cat(parts) for parts in zip(*chunks))
