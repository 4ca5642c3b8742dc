"""``ParameterServer(max_grad_norm=c)``: clip a sync round's averaged gradient by its global norm.

``torch.nn.utils.clip_grad_norm_`` scales every gradient by ``c / (norm + 1e-6)`` (at most 1),
where ``norm`` spans the whole model. With S shards each server knows only its part of the
averaged gradient, so after averaging a round each server puts its sum of squares in the job's
store (the TCPStore every process of the job already shares), reads every server's, and all
compute the same coefficient from the same numbers in the same order. One server needs no
store. A worker that clips its own gradient before ``step()`` clips it before the average
instead, which differs (see the README).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from concord.algorithms.ps_rules import clip_coefficient
from concord.errors import PeerTimeoutError
from concord.strategies.sparse import grad_values


def clip_by_global_norm(
    grads: dict[str, torch.Tensor], max_norm: float, step: int, norms: NormExchange | None
) -> float:
    """Scale this shard's part ``grads`` of sync step ``step``'s averaged gradient in place by
    ``clip_grad_norm_``'s coefficient for the whole gradient (``norms``: the other shards'
    parts, None with one server); returns the coefficient (1.0: unchanged)."""
    part = math.fsum(float(torch.linalg.vector_norm(grad_values(g))) ** 2 for g in grads.values())
    scale = clip_coefficient(norms.gather(step, part) if norms is not None else [part], max_norm)
    if scale < 1.0:
        for grad in grads.values():
            grad.mul_(scale)
    return scale


class NormExchange:
    """Each server's part of a round's squared gradient norm, shared through the job's store
    (whose own timeout, the job's, bounds every wait; ``timeout`` says it in errors)."""

    def __init__(self, store: Any, prefix: str, rank: int, servers: int, timeout: float) -> None:
        self.store, self.prefix, self.rank, self.servers = store, prefix, rank, servers
        self.timeout = timeout

    def _key(self, version: int, server: int) -> str:
        return f"{self.prefix}grad-norm/{version}/{server}"

    def gather(self, version: int, part: float) -> list[float]:
        """Every server's part for sync step ``version``, in server order, after publishing
        this server's ``part``; PeerTimeoutError naming the servers that did not publish
        theirs within the timeout."""
        self.store.set(self._key(version, self.rank), repr(part))
        keys = [self._key(version, s) for s in range(self.servers)]
        try:  # one round trip: it waits for every key, up to the store's timeout (the job's)
            parts = [float(value) for value in self.store.multi_get(keys)]
        except RuntimeError:  # (torch's DistStoreError is one): name who is missing
            missing = [s for s, key in enumerate(keys) if not self.store.check([key])]
            raise PeerTimeoutError(
                f"server(s) {missing} did not publish their part of the gradient norm "
                f"(max_grad_norm) for sync step {version} within {self.timeout:g}s; "
                "did a server die?"
            ) from None
        if version >= 2:  # every server read step version-2's parts before publishing version-1's
            self.store.delete_key(self._key(version - 2, self.rank))
        return parts
