"""Newton–Schulz of a matrix split into column blocks ("distributed Gram" NS).

Pure tensor math: the one cross-member operation is a caller-supplied in-place sum ``reduce``
(an all-reduce over the members in the sharded layer, ``megatron_md.shard.orthogonalize``;
the identity for a single block). No torch.distributed here.

The full matrix ``X = [X_1 … X_k]`` is split along ``split_dim`` into blocks, member ``j``
holding ``X_j``. Oriented so that the split dimension becomes the columns (transpose when
``split_dim`` is the rows), the member runs, with the same coefficient triples as
:func:`~megatron_md.ops.newton_schulz.newton_schulz`::

    s   = reduce(Σ X_j²)                  # fp32 sum of squares, one scalar per matrix
    X_j ← X_j / (√s + eps)
    for (a, b, c):
        A   = reduce(X_j X_jᵀ)            # the m×m Gram of the whole matrix
        B   = b A + c A A                 # computed redundantly by every member
        X_j ← a X_j + B X_j               # local

and returns its block of ``NS(X)``. Since ``A = Σ_j X_j X_jᵀ = X Xᵀ`` and the update is
column-wise, this is ``newton_schulz(X)`` up to float summation order (the Gram is a sum of
partial products; ≈1e-6 relative in fp32).

Cost per member and matrix, m = the unsplit side, n_j = its block's width, ``steps`` triples:
``steps · (4 m² n_j + 2 m³)`` FLOPs (:func:`split_ns_flops`), and ``steps + 1`` reductions
(m² elements each in the NS dtype, plus one fp32 scalar). Worth it when the split side is the
long one (m ≤ n): the ``2 m³`` term is replicated on every member and bounds the speed-up.

Warning: every member must call with the same batch shape, coefficients, ``split_dim`` and
dtype (the reductions pair up in call order); blocks may be empty (zero columns).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .newton_schulz import Triple, ns_iterations

Reduce = Callable[[torch.Tensor], torch.Tensor]


def newton_schulz_split(
    x_local: torch.Tensor,
    reduce: Reduce,
    *,
    split_dim: int,
    coefficients: Sequence[Triple],
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
) -> torch.Tensor:
    """This member's block of ``NS(full)``, where ``full`` is split along ``split_dim``.

    ``x_local``: ``[..., rows, cols]`` (leading dims a batch); ``reduce(t)``: sums ``t`` over
    the members in place and returns it. Returns a tensor of ``x_local``'s dtype and shape.
    """
    if x_local.ndim < 2:
        raise ValueError(f"newton_schulz_split needs a matrix (ndim >= 2), got shape {tuple(x_local.shape)}")
    if split_dim not in (-2, -1, x_local.ndim - 2, x_local.ndim - 1):
        raise ValueError(f"split_dim={split_dim!r}: must be one of the last two dims")
    transposed = split_dim in (-2, x_local.ndim - 2)
    out_dtype, shape = x_local.dtype, x_local.shape
    X = x_local.to(dtype)
    if X.ndim > 3:
        X = X.reshape(-1, *shape[-2:])
    # the global Frobenius norm: the sum of squares in fp32 (as vector_norm accumulates), then
    # rounded to the NS dtype like newton_schulz's norm
    sq = X.float().square().sum(dim=(-2, -1), keepdim=True)
    norm = reduce(sq).sqrt().to(dtype)
    X = X.div_(norm + eps) if X.data_ptr() != x_local.data_ptr() else X / (norm + eps)
    if transposed:
        X = X.mT
    # newton_schulz's iterations, with the Gram summed over the members
    X = ns_iterations(X, coefficients, gram=lambda A: reduce(A.contiguous()))
    if transposed:
        X = X.mT
    return X.reshape(shape).to(out_dtype)


def split_ns_flops(m: int, n_local: int, steps: int) -> int:
    """Multiply-add FLOPs of one member's split NS: ``m`` the unsplit side, ``n_local`` its
    block's width (A_j = X_j X_jᵀ: 2 m² n_j; A A: 2 m³, on every member; B X_j: 2 m² n_j)."""
    return steps * (4 * m * m * n_local + 2 * m * m * m)
