"""Bucketed reductions: the row/column/Frobenius sums of many matrices in few collectives.

A step of a row/column method needs, per matrix, a few reductions of O(d_out + d_in) numbers.
Issued one by one that is one collective per matrix and reduction; at hundreds of matrices per
rank the latency of the calls, not their bytes, sets the cost. :class:`Reductions` collects
:class:`~megatron_md.shard.layouts.Plan` s (a local partial, the groups to all-reduce it over in
order, a finishing slice) and :meth:`Reductions.flush` issues **one all-reduce per process
group (and dtype)** of the concatenated partials of every plan that needs that group. A step
then costs one collective per group and per data-dependency round, whatever the number of
matrices. (A plan over DP then TP may be served TP first: sums commute; only fp32 rounding of
the order changes.)

Ordering: the next group is always the first one still owed by the first unfinished plan.
Every rank of a group sees the same matrices in the same order (the optimizers' contract),
hence the same sequence of group *roles* (e.g. TP then DP), so the collectives of different
groups never wait on each other in a cycle.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import comm
from .layouts import MatrixShard, Plan


class Pending:
    """The result of one bucketed reduction, available after :meth:`Reductions.flush`."""

    __slots__ = ("plan", "_value")

    def __init__(self, plan: Plan):
        self.plan = plan
        self._value: Optional[torch.Tensor] = None

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError("Pending.value read before Reductions.flush()")
        return self._value


class Reductions:
    """Collect reductions of many shards; :meth:`flush` completes them all.

    ``r = Reductions(); a = r.row_sum(shard, x, square=True); r.flush(); a.value`` equals
    ``shard.row_sum(x * x)``; several pending reductions share each collective.
    """

    def __init__(self):
        self._pending: list[Pending] = []

    def add(self, plan: Plan) -> Pending:
        p = Pending(plan)
        self._pending.append(p)
        return p

    def row_sum(self, shard: MatrixShard, x: torch.Tensor, square: bool = False) -> Pending:
        return self.add(shard.row_plan(x, square))

    def col_sum(self, shard: MatrixShard, x: torch.Tensor, square: bool = False) -> Pending:
        return self.add(shard.col_plan(x, square))

    def total_sums(self, shard: MatrixShard, xs, square: bool = False) -> Pending:
        return self.add(shard.total_plan(list(xs), square))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        remaining = [list(p.plan.groups) for p in pending]
        while True:
            # the next group: the first one still owed by the first unfinished plan; every plan
            # that owes it joins (sums commute, so a plan's groups may be served in any order)
            first = next((r[0] for r in remaining if r), None)
            if first is None:
                break
            buckets: dict = {}
            for p, r in zip(pending, remaining):
                if any(g is first for g in r):
                    r.remove(first)
                    buckets.setdefault((p.plan.partial.dtype, p.plan.partial.device), []).append(p.plan.partial)
            for parts in buckets.values():
                if len(parts) == 1:
                    comm.all_reduce(parts[0], first)
                    continue
                flat = torch.cat([t.reshape(-1) for t in parts])
                comm.all_reduce(flat, first)
                for t, chunk in zip(parts, flat.split([t.numel() for t in parts])):
                    t.copy_(chunk.view_as(t))
        for p in pending:
            v = p.plan.partial
            p._value = v if p.plan.finish is None else p.plan.finish(v)
