"""Sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``).

AllReduce and the pipeline's replicas average them (:func:`average_sparse_grads`) in two
dense sums through their own collectives (the shared-memory ring, nccl): a mask of the rows
any worker touched, then only those rows' values; or, with gloo on the CPU, as DDP does: one
all_reduce of the sparse tensor itself. ``.grad`` stays sparse over exactly
those rows, as in one process, so sparse optimizers such as ``torch.optim.SparseAdam`` work.
Parameter servers keep dense shards; a worker pushes such a gradient as the rows it touched
(:func:`piece_rows`; a gradient that is dense after all goes dense, :func:`dense_grad`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from concord.algorithms.ps_rules import clip_coefficient
from concord.algorithms.row_grads import row_range, row_width


def sparse_grad_params(module: nn.Module) -> set[int]:
    """``id()``s of the parameters whose gradient is sparse: the weights of ``nn.Embedding``
    and ``nn.EmbeddingBag`` modules built with ``sparse=True`` (as DDP finds them)."""
    kinds = (nn.Embedding, nn.EmbeddingBag)
    return {id(m.weight) for m in module.modules() if isinstance(m, kinds) and m.sparse}


def dense_grad(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as a dense tensor (a sparse one densified)."""
    return grad.to_dense() if grad.is_sparse else grad


def piece_rows(
    param: torch.Tensor, grad: torch.Tensor | None, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, rows)``: the rows of ``param``'s sparse gradient ``grad`` (coalesced) that
    overlap elements ``[start, stop)`` of the flattened parameter, on the CPU; ``values`` is
    ``(k, row width)``. No gradient has no rows."""
    width = row_width(param.shape)
    if grad is None:
        return param.new_zeros(0, width, device="cpu"), torch.zeros(0, dtype=torch.long)
    numbers = grad.indices()[0]
    first, end = row_range(start, stop, width)
    bounds = torch.tensor([first, end], dtype=numbers.dtype, device=numbers.device)
    a, b = torch.searchsorted(numbers, bounds).tolist()
    return grad.values()[a:b].reshape(b - a, width).cpu(), numbers[a:b].cpu()


def sparse_rows(dense: torch.Tensor) -> torch.Tensor:
    """``dense`` as a sparse tensor over its rows that are not all zero (coalesced).
    ``dense.to_sparse(1)`` gives the same tensor but took 170 ms for 10k x 64 rows on the
    development VM; this, 2.5 ms."""
    rows = dense.reshape(dense.shape[0], -1).ne(0).any(1).nonzero().squeeze(1)
    return _rows(rows, dense[rows], dense.shape)


def grad_values(grad: torch.Tensor) -> torch.Tensor:
    """What a gradient's norm is taken over: a sparse one's summed values, else itself."""
    return grad.coalesce().values() if grad.is_sparse else grad


def grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of ``grads`` together (sparse ones too), computed as ``clip_grad_norm_``
    computes it: the norm of the per-tensor norms, in their dtype."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(grad_values(g)) for g in grads])
    )


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (its result, its scaling), which
    also takes sparse gradients: torch's raises on them."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = float(grad_norm(grads))
    scale = clip_coefficient([total**2], max_norm)
    for grad in grads:
        grad.mul_(scale)
    return total


def average_sparse_grads(
    params: Sequence[nn.Parameter],
    world: int,
    sum_: Callable[[torch.Tensor], torch.Tensor],
    sum_sparse: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Average the gradients of ``params`` (those of :func:`sparse_grad_params`) over ``world``
    workers; ``.grad`` ends sparse over exactly the rows some worker touched, as one process's
    on the global batch (None where no worker had a gradient). ``sum_`` sums a dense tensor
    over the workers (within the job's timeout) and returns the sum; every worker calls this
    with the same ``params`` in the same order.

    With ``sum_`` alone, two dense sums per parameter: a mask over the rows (and one flag for
    "had a gradient") says which rows any worker touched, then only those rows' values are
    summed. ``sum_sparse`` (gloo on the CPU: it gathers every worker's indices and values, as
    DDP does) instead sums the sparse tensors themselves, after one sum of the flags."""
    locals_ = [_coalesced(p.grad) for p in params]
    if sum_sparse is not None and params:
        present = sum_(torch.tensor([float(g is not None) for g in locals_]))
        for param, local, count in zip(params, locals_, present.tolist()):
            if count:
                summed = sum_sparse((local if local is not None else _no_rows(param)).cpu())
                param.grad = summed.coalesce().div_(world).to(param.device)
        return
    for param, local in zip(params, locals_):
        rows_in = param.shape[0]
        mask = torch.zeros(rows_in + 1, dtype=param.dtype, device=param.device)
        if local is not None:
            mask[local.indices()[0]] = 1
            mask[rows_in] = 1
        mask = sum_(mask)
        if not mask[rows_in]:  # (the same sums on every worker: all decide alike)
            continue
        rows = mask[:rows_in].nonzero().squeeze(1)
        values = param.new_zeros(len(rows), *param.shape[1:])
        if local is not None and local.indices().numel():
            values[torch.searchsorted(rows, local.indices()[0])] = local.values()
        if len(rows):
            values = sum_(values.view(-1)).view(values.shape).div_(world)
        param.grad = _rows(rows, values, param.shape)


def _coalesced(grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return None
    return grad.coalesce() if grad.is_sparse else sparse_rows(grad)


def _rows(rows: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A coalesced sparse tensor of ``shape`` (``rows`` sorted and unique)."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, shape, is_coalesced=True, check_invariants=False
    )


def _no_rows(param: torch.Tensor) -> torch.Tensor:
    """An empty sparse gradient for ``param`` (a worker that did not touch it)."""
    rows = torch.zeros(0, dtype=torch.long, device=param.device)
    return _rows(rows, param.new_zeros(0, *param.shape[1:]), param.shape)
