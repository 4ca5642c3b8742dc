"""Data: the MNIST reader, the per-worker sharded sampler and loader, and data sharing
(shard files on a DFS, a central data store, peer-to-peer exchange)."""

from concord.data.central import CentralLoader, DataClient
from concord.data.dfs import DFSLoader, ShardedFiles, read_manifest, verify_shards, write_shards
from concord.data.loader import loader
from concord.data.mnist import mnist
from concord.data.p2p import P2PLoader
from concord.data.sampler import ShardedSampler
from concord.data.sources import make_loader

__all__ = [
    "CentralLoader",
    "DFSLoader",
    "DataClient",
    "P2PLoader",
    "ShardedFiles",
    "ShardedSampler",
    "loader",
    "make_loader",
    "mnist",
    "read_manifest",
    "verify_shards",
    "write_shards",
]
