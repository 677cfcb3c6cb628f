"""Blocks: one parameter tensor that holds several logical matrices.

Each :class:`BlockView` says how to read one logical ``d_out × d_in`` matrix out of the local
parameter tensor (and write it back) and carries that matrix's own :class:`MatrixShard`.
Factories cover Megatron's layouts:

* :func:`fused_qkv` – ``linear_qkv.weight`` interleaves rows per query group as
  ``[q_0 … q_{h-1}, k, v]`` (GQA: ``h = heads / groups``); Q, K and V are separate matrices.
* :func:`swiglu_fc1` – a gated MLP's ``linear_fc1.weight``, ``[gate; up]`` on every TP rank: the
  gate and the up projection are separate matrices.
* :func:`stacked_experts` – a 3-D ``[experts, out, in]`` weight.
* :func:`concatenated_experts` – experts concatenated along one dimension of a 2-D weight.
* :func:`grouped_mlp_experts` – legacy ``GroupedMLP`` weights, stored ``[in, E·out]`` /
  ``[E·in, out]`` and viewed as ``[E, in, out]``: each expert is the transpose of a chunk.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layouts import MatrixShard, TensorParallel, Whole


class BlockView:
    """How to read/write one logical matrix of a parameter tensor.

    ``get(t)`` returns the logical ``[d_out_local, d_in_local]`` matrix (a view when the layout
    allows it, so in-place updates land in ``t``), ``put(t, v)`` writes ``v`` back (a no-op when
    ``v`` already is that view).
    """

    def __init__(self, shard: MatrixShard, *, index=None, rows: Optional[torch.Tensor] = None,
                 view_shape: Optional[Sequence[int]] = None, transpose: bool = False,
                 segments: Optional[Sequence[tuple[int, int]]] = None):
        self.shard = shard
        self.index = index
        self.rows = rows
        self.view_shape = tuple(view_shape) if view_shape is not None else None
        self.transpose = transpose
        #: ``[(a, b), ...]``: the block is ``cat(t[a:b] for ...)`` of a 1-D local tensor (a flat range)
        self.segments = [(int(a), int(b)) for a, b in segments] if segments is not None else None
        self._rows_on: dict = {}

    def _rows(self, device) -> torch.Tensor:
        """The row index on ``device``, copied there once (not a host→device copy per step)."""
        r = self._rows_on.get(device)
        if r is None:
            r = self._rows_on[device] = self.rows.to(device)
        return r

    def get(self, t: torch.Tensor) -> torch.Tensor:
        if self.segments is not None:
            if len(self.segments) == 1:
                a, b = self.segments[0]
                return t[a:b]
            if not self.segments:
                return t[:0]
            return torch.cat([t[a:b] for a, b in self.segments])
        v = t.view(self.view_shape) if self.view_shape is not None else t
        if self.rows is not None:
            v = v.index_select(0, self._rows(v.device))
        elif self.index is not None:
            v = v[self.index]
        return v.mT if self.transpose else v

    def put(self, t: torch.Tensor, v: torch.Tensor) -> None:
        if self.segments is not None and len(self.segments) > 1:
            k = 0
            for a, b in self.segments:
                t[a:b].copy_(v[k:k + b - a])
                k += b - a
            return
        if self.rows is not None:
            tv = t.view(self.view_shape) if self.view_shape is not None else t
            tv.index_copy_(0, self._rows(t.device), v.mT if self.transpose else v)
            return
        target = self.get(t)
        if target.data_ptr() == v.data_ptr() and target.stride() == v.stride() and target.shape == v.shape:
            return
        target.copy_(v)

    @property
    def is_view(self) -> bool:
        return self.rows is None and (self.segments is None or len(self.segments) <= 1)

    def parent_rows(self) -> Optional[list[tuple[int, int]]]:
        """The rows of the local 2-D tensor this block reads, as runs ``[(r0, r1), ...]`` in
        the block's row order — None when the block is not a selection of whole rows."""
        if self.view_shape is not None or self.transpose or self.segments is not None:
            return None
        if self.rows is not None:
            rows = self.rows.tolist()
            if any(b <= a for a, b in zip(rows, rows[1:])):
                return None
            runs: list[list[int]] = []
            for r in rows:
                if runs and runs[-1][1] == r:
                    runs[-1][1] = r + 1
                else:
                    runs.append([r, r + 1])
            return [(a, b) for a, b in runs]
        idx = self.index
        if (isinstance(idx, tuple) and len(idx) == 2 and isinstance(idx[0], slice) and idx[1] == slice(None)
                and idx[0].step in (None, 1)):
            return [(idx[0].start or 0, idx[0].stop)]
        return None


class Blocks:
    """A parameter made of several logical matrices; ``views`` in a fixed order."""

    def __init__(self, views: Sequence[BlockView], local_shape: Sequence[int], *, same_columns: bool = False):
        if not views:
            raise ValueError("Blocks: at least one block is required")
        self.views = list(views)
        self.local_shape = tuple(local_shape)
        #: the blocks read the same input columns (Q, K and V of a fused QKV), so a method may give
        #: them one shared column-side state (MD's shared column gains); experts are separate matrices
        self.same_columns = bool(same_columns)

    def __repr__(self):
        return f"Blocks({len(self.views)} × {[v.shard for v in self.views][:3]}…, local={self.local_shape})"

    def check_local(self, x: torch.Tensor, what: str = "tensor") -> None:
        if tuple(x.shape) != self.local_shape:
            raise ValueError(f"{what} of shape {tuple(x.shape)} does not match {self!r}")


def _sub(shape, group, dim):
    return Whole(shape) if group is None else TensorParallel(shape, dim=dim, group=group)


def fused_qkv(*, num_query_groups: int, heads_per_group: int, head_dim: int, d_in: int,
              tp_group=None, tp_size: int = 1) -> Blocks:
    """Q, K, V blocks of a (column-parallel) fused QKV weight.

    ``num_query_groups`` is the *global* count; with ``tp_group`` the local tensor holds
    ``num_query_groups / tp_size`` whole groups (Megatron splits QKV per query group).
    """
    if num_query_groups % tp_size:
        raise ValueError(f"fused_qkv: num_query_groups={num_query_groups} is not divisible by tp_size={tp_size}")
    g_loc = num_query_groups // tp_size
    per = (heads_per_group + 2) * head_dim
    rows_q, rows_k, rows_v = [], [], []
    for g in range(g_loc):
        base = g * per
        rows_q.append(torch.arange(base, base + heads_per_group * head_dim))
        rows_k.append(torch.arange(base + heads_per_group * head_dim, base + (heads_per_group + 1) * head_dim))
        rows_v.append(torch.arange(base + (heads_per_group + 1) * head_dim, base + per))
    out = []
    for rows, n_glob in ((rows_q, num_query_groups * heads_per_group * head_dim),
                         (rows_k, num_query_groups * head_dim), (rows_v, num_query_groups * head_dim)):
        out.append(BlockView(_sub((n_glob, d_in), tp_group, 0), rows=torch.cat(rows)))
    return Blocks(out, (g_loc * per, d_in), same_columns=True)


def swiglu_fc1(ffn_hidden: int, d_in: int, *, tp_group=None, tp_size: int = 1) -> Blocks:
    """Gate and up blocks of a gated MLP's (column-parallel) ``linear_fc1`` weight.

    ``ffn_hidden`` is the *global* FFN width; each TP rank holds ``[gate_r; up_r]`` (Megatron
    splits the gate and the up projection separately over TP, then stacks them per rank)."""
    if ffn_hidden % tp_size:
        raise ValueError(f"swiglu_fc1: ffn_hidden={ffn_hidden} is not divisible by tp_size={tp_size}")
    lo = ffn_hidden // tp_size
    views = [BlockView(_sub((ffn_hidden, d_in), tp_group, 0), index=(slice(h * lo, (h + 1) * lo), slice(None)))
             for h in range(2)]
    return Blocks(views, (2 * lo, d_in))


def flat_blocks(blocks: Blocks, start: int, end: int, group) -> Blocks:
    """The elements ``[start, end)`` of the row-major flattening of ``blocks``' local 2-D tensor,
    as held by one rank of ``group`` (ZeRO-1), with every block a
    :class:`~megatron_md.shard.FlatRange` of its own layout (see module docstring). The
    ranges of the group's ranks must tile the tensor, as for a plain FlatRange."""
    from .layouts import FlatRange

    if len(blocks.local_shape) != 2:
        raise ValueError(f"flat_blocks: {blocks!r} is not a 2-D tensor of row blocks")
    m, n = blocks.local_shape
    if not (0 <= start <= end <= m * n):
        raise ValueError(f"flat_blocks: [{start}, {end}) is not inside [0, {m * n}) of {blocks!r}")
    views = []
    for b, v in enumerate(blocks.views):
        runs = v.parent_rows()
        if runs is None or not isinstance(v.shard, (Whole, TensorParallel)):
            raise ValueError(f"flat_blocks: block {b} of {blocks!r} is not a selection of whole rows of a "
                             f"2-D layout; it cannot be cut into a flat range")
        b_start = b_end = 0
        segments = []
        for r0, r1 in runs:
            lo, hi = r0 * n, r1 * n
            b_start += min(max(start - lo, 0), hi - lo)
            b_end += min(max(end - lo, 0), hi - lo)
            a, z = max(lo, start), min(hi, end)
            if z > a:
                if segments and segments[-1][1] == a - start:
                    segments[-1] = (segments[-1][0], z - start)
                else:
                    segments.append((a - start, z - start))
        views.append(BlockView(FlatRange(b_start, b_end, group, v.shard), segments=segments))
    return Blocks(views, (end - start,), same_columns=blocks.same_columns)


def stacked_experts(num_experts: int, d_out: int, d_in: int, *, tp_group=None, tp_dim: int = 0) -> Blocks:
    """A 3-D ``[experts, out, in]`` weight (local experts; with expert-TP, local shards)."""
    shard = lambda: _sub((d_out, d_in), tp_group, tp_dim)  # noqa: E731
    probe = shard()
    views = [BlockView(shard(), index=e) for e in range(num_experts)]
    return Blocks(views, (num_experts, *probe.local_shape))


def concatenated_experts(num_experts: int, d_out: int, d_in: int, dim: int, *, tp_group=None,
                         tp_dim: int = 0) -> Blocks:
    """Experts concatenated along ``dim`` of a 2-D weight (``[E·out, in]`` or ``[out, E·in]``)."""
    probe = _sub((d_out, d_in), tp_group, tp_dim)
    lo, li = probe.local_shape
    views = []
    for e in range(num_experts):
        idx = (slice(e * lo, (e + 1) * lo), slice(None)) if dim == 0 else (slice(None), slice(e * li, (e + 1) * li))
        views.append(BlockView(_sub((d_out, d_in), tp_group, tp_dim), index=idx))
    shape = (num_experts * lo, li) if dim == 0 else (lo, num_experts * li)
    return Blocks(views, shape)


def grouped_mlp_experts(num_experts: int, d_out: int, d_in: int, *, stored_shape: Sequence[int],
                        tp_group=None, tp_dim: int = 0) -> Blocks:
    """Legacy GroupedMLP weight: memory viewed as ``[E, d_in_local, d_out_local]``; expert ``e``'s
    logical ``d_out × d_in`` matrix is the transpose of chunk ``e``."""
    probe = _sub((d_out, d_in), tp_group, tp_dim)
    lo, li = probe.local_shape
    views = [BlockView(_sub((d_out, d_in), tp_group, tp_dim), index=e, view_shape=(num_experts, li, lo),
                       transpose=True) for e in range(num_experts)]
    return Blocks(views, stored_shape)
