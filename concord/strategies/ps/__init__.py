"""Parameter servers: sync, async (push gradients or parameter changes), bounded staleness.

``concord run -n 4 --servers 2 train.py`` starts the servers
(``python -m concord.strategies.ps.server``); the training script only says
``concord.distribute(model, opt, concord.ParameterServer(mode="sync"))``.
"""

from concord.strategies.ps.config import ParameterServer

__all__ = ["ParameterServer"]
