"""concord: distributed deep-learning training behind one switch.

Parameter servers (sync, async, bounded staleness), AllReduce and pipeline parallelism,
launched like torchrun (``concord run -n 4 train.py``).
"""

from concord import data
from concord.algorithms.codecs import PowerSGD
from concord.algorithms.multi_optimizer import MultiOptimizer
from concord.api import Context, distribute, init, shutdown
from concord.errors import ConcordError, PeerTimeoutError, UsageError
from concord.strategies.allreduce import AllReduce
from concord.strategies.base import Distributed, DistributedOptimizer, Strategy
from concord.strategies.pipeline import Pipeline
from concord.strategies.ps import ParameterServer
from concord.trainer import Trainer

__all__ = [
    "AllReduce",
    "ConcordError",
    "Context",
    "Distributed",
    "DistributedOptimizer",
    "MultiOptimizer",
    "ParameterServer",
    "PeerTimeoutError",
    "Pipeline",
    "PowerSGD",
    "Strategy",
    "Trainer",
    "UsageError",
    "data",
    "distribute",
    "init",
    "shutdown",
]
