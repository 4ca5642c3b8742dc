"""Data: the MNIST reader, the per-worker sharded sampler and loader."""

from concord.data.loader import loader
from concord.data.mnist import mnist
from concord.data.sampler import ShardedSampler

__all__ = ["ShardedSampler", "loader", "mnist"]
