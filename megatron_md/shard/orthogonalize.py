"""Newton–Schulz on shards: the one consumer of whole matrices.

``orthogonalize(items, ...)`` takes ``(MatrixShard, local tensor)`` pairs and returns the
local pieces of ``NS(full matrix)``. Modes for sharded matrices:

* ``"owner"`` (default): each matrix's pieces are gathered to one owner rank per level of
  sharding (owners balanced by NS cost, largest first, over the level's group), the owner
  runs NS (batched over same-shape matrices it owns) and scatters the pieces back. Pieces
  travel point-to-point at their exact sizes (empty pieces send nothing), and a rank holding
  at least 3/4 of a matrix owns it. Bytes per matrix across the group ≤ 2 × the matrix, independent
  of the group size (0 when one rank holds it all).
* ``"gather"``: every rank all-gathers every matrix and runs NS itself (the baseline:
  (w−1) × the matrix received per rank, and w-fold redundant compute).

Unsharded (:class:`Whole`) matrices never communicate; same-shape ones are batched.
"""
from __future__ import annotations

from collections import defaultdict
import os
from typing import Literal, Optional, Sequence

import torch

from ..ops import newton_schulz, ns_flops
from . import comm
from .layouts import MatrixShard

NSMode = Literal["owner", "gather"]
NS_MODES = ("owner", "gather")
#: ``MEGATRON_MD_NS_OVERLAP=0`` turns the pipelined owner round off (benchmarks compare both)
OVERLAP_ENV = "MEGATRON_MD_NS_OVERLAP"


def overlap_default() -> bool:
    """Whether owner Newton–Schulz pipelines its last round: on unless ``MEGATRON_MD_NS_OVERLAP=0``."""
    return os.environ.get(OVERLAP_ENV, "1") != "0"


def _levels(shard: MatrixShard) -> list[MatrixShard]:
    out, s = [], shard
    while s is not None:
        if comm.group_size(s.level_group) > 1:
            out.append(s)
        s = s.inner
    return out


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() == n:
        return flat
    out = flat.new_zeros(n)
    out[: flat.numel()] = flat
    return out


def _ns_batched(mats: list[torch.Tensor], coefficients, dtype, eps) -> list[torch.Tensor]:
    """NS of each matrix, stacking same-shape matrices into one batched call."""
    out: list = [None] * len(mats)
    by_shape = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[tuple(m.shape)].append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(mats[idx[0]], coefficients, dtype=dtype, eps=eps)
        else:
            res = newton_schulz(torch.stack([mats[i] for i in idx]), coefficients, dtype=dtype, eps=eps)
            for j, i in enumerate(idx):
                out[i] = res[j]
    return out


def assign_owners(costs: Sequence[int], world: int,
                  holders: Sequence[Sequence[int] | None] | None = None) -> list[int]:
    """Owner rank of each matrix: deterministic, the same on every rank.

    A rank that holds at least 3/4 of a matrix (``holders[i][r]`` = its piece size; typical of
    Megatron's ZeRO buffers, where most params sit whole on one rank) owns it, so few bytes
    move; the others are spread by longest-processing-time over ``costs`` (compute balance
    wins when the pieces are comparable).
    """
    load = [0] * world
    owners = [-1] * len(costs)
    if holders is not None:
        for i, sizes in enumerate(holders):
            if sizes is None:
                continue
            total = sum(sizes)
            r = max(range(world), key=lambda r: (sizes[r], -r))
            if total and 4 * sizes[r] >= 3 * total:
                owners[i] = r
                load[r] += costs[i]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        if owners[i] >= 0:
            continue
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _without_trivial_flat(shard: MatrixShard, x: torch.Tensor) -> tuple[MatrixShard, torch.Tensor]:
    """A flat range over a group of one rank holds the whole matrix of the level below (the group's
    ranges tile it): that level's shard and ``x`` viewed in its local shape (a ZeRO-1 shard at DP=1,
    an expert's at expert-DP=1), so Newton–Schulz sees a matrix, not the flattened vector."""
    while shard.inner is not None and comm.group_size(shard.level_group) <= 1 and x.ndim == 1:
        shard = shard.inner
        x = x.view(shard.local_shape)
    return shard, x


def orthogonalize(items: Sequence[tuple[MatrixShard, torch.Tensor]], *, coefficients,
                  dtype: torch.dtype = torch.float32, mode: NSMode = "owner", eps: float = 1e-7,
                  batch: bool = True, overlap: Optional[bool] = None) -> list[torch.Tensor]:
    """Local pieces of NS(logical matrix) for every item (see module docstring). ``overlap``
    (default: :func:`overlap_default`) pipelines the owners' last round (bitwise the same result)."""
    if overlap is None:
        overlap = overlap_default()
    if mode not in NS_MODES:
        raise ValueError(f"ns_mode={mode!r}: expected one of {NS_MODES}")
    shapes = [x.shape for _, x in items]
    items = [_without_trivial_flat(s, x) for s, x in items]
    results: list = [None] * len(items)
    levels = [_levels(s) for s, _ in items]
    local = [i for i, lv in enumerate(levels) if not lv]
    sharded = [i for i, lv in enumerate(levels) if lv]

    steps = len(coefficients)
    if mode == "gather":
        for i in sharded:
            shard, x = items[i]
            full = _gather_all(levels[i], x)
            y = newton_schulz(full, coefficients, dtype=dtype, eps=eps)
            results[i] = _take_local(levels[i], y).view_as(x)
    else:
        # owners per (level depth, group), balanced over that group's ranks. A level d > 0 is
        # balanced over the matrices that reach this rank's group there (those whose level-(d−1)
        # owner it is — the same set on every rank of the group): balancing it over all matrices
        # would give the same order the same owners at every level (a DP×TP grid would compute on
        # its diagonal only; tools/plan_cluster.py showed TP× imbalance)
        owner = {}

        def assign(d, lst):
            by_group = defaultdict(list)
            for i in lst:
                by_group[id(levels[i][d].level_group)].append(i)
            for idx in by_group.values():
                w = comm.group_size(levels[idx[0]][d].level_group)
                costs = [ns_flops(*items[i][0].shape, steps) for i in idx]
                # the majority-holder rule only where nothing above depends on the choice: an inner
                # level's owner index must be the same on every rank of the next level's group
                holders = [levels[i][d].piece_numels() if d == len(levels[i]) - 1 else None for i in idx]
                for i, o in zip(idx, assign_owners(costs, w, holders)):
                    owner[(i, d)] = o
        # up: pieces travel to the owners, level by level; one batch of point-to-point messages
        # per level and group, in the NS dtype (the cast is elementwise: casting the pieces and
        # then assembling equals assembling and then casting, so the result is unchanged)
        cur = {i: items[i][1].to(dtype) for i in sharded}
        reached = {i: 0 for i in sharded}
        depth = max((len(levels[i]) for i in sharded), default=0)
        piped = overlap and depth > 0   # the last round pipelined with the compute (_pipelined_round)
        for d in range(depth - 1 if piped else depth):
            assign(d, [i for i in sharded if reached[i] == d and len(levels[i]) > d])
            ex = comm.PieceExchange()
            for i in sharded:
                if reached[i] != d or len(levels[i]) <= d:
                    continue
                lv = levels[i][d]

                def arrived(got, i=i, lv=lv):
                    cur[i] = lv.assemble(got)
                    reached[i] += 1
                ex.gather(cur[i], lv.piece_numels(), owner[(i, d)], lv.level_group, arrived)
            ex.run()
        if piped:
            back = _pipelined_round(items, levels, sharded, cur, reached, owner, assign, depth,
                                    lambda mats: _ns_batched(mats, coefficients, dtype, eps) if batch else
                                    [newton_schulz(m, coefficients, dtype=dtype, eps=eps) for m in mats])
        else:
            fulls = {i: cur[i] for i in sharded if reached[i] == len(levels[i])}
            # compute: every owner orthogonalizes what it owns, batched by shape
            own = list(fulls)
            outs = _ns_batched([fulls[i] for i in own], coefficients, dtype, eps) if batch else \
                [newton_schulz(fulls[i], coefficients, dtype=dtype, eps=eps) for i in own]
            back = dict(zip(own, outs))
        # down: pieces travel back, level by level from the innermost (still in the NS dtype)
        for d in range((depth - 2 if piped else depth - 1), -1, -1):
            ex = comm.PieceExchange()
            for i in sharded:
                if len(levels[i]) <= d or reached[i] < d:
                    continue
                lv = levels[i][d]
                pieces = lv.split(back[i]) if reached[i] > d else None

                def returned(piece, i=i, lv=lv):
                    back[i] = piece.view(lv.local_shape)
                ex.scatter(pieces, lv.piece_numels(), cur[i], owner[(i, d)], lv.level_group, returned)
            ex.run()
        for i in sharded:
            x = items[i][1]
            results[i] = back[i].reshape(x.shape).to(x.dtype)
    if local:
        mats = [items[i][1] for i in local]
        outs = _ns_batched(mats, coefficients, dtype, eps) if batch else \
            [newton_schulz(m, coefficients, dtype=dtype, eps=eps) for m in mats]
        for i, o in zip(local, outs):
            results[i] = o
    return [r.reshape(shape) for r, shape in zip(results, shapes)]


def _pipelined_round(items, levels, sharded, cur, reached, owner, assign, depth, compute) -> dict:
    """The last up round, the owners' Newton–Schulz and the first down round, overlapped.

    Every transfer of the round is posted at once, one exchange per matrix with its own P2P tags
    (so no message waits for another's order). An owner computes its matrices in the same shape
    batches as the unpipelined path — those complete before the round (fewer sharding levels)
    first, then each batch as soon as its pieces have arrived, while the rest are in flight — and
    posts each batch's returns as soon as it is computed. Same batches, same inputs: the result is
    bitwise that of the unpipelined path, and the meter records the same bytes per matrix."""
    d = depth - 1
    last = [i for i in sharded if reached[i] == d and len(levels[i]) == depth]
    assign(d, last)
    up, down = {}, []
    for i in last:
        lv = levels[i][d]
        ex = comm.PieceExchange(tag=2 * i + 1)

        def arrived(got, i=i, lv=lv):
            cur[i] = lv.assemble(got)
            reached[i] += 1
        ex.gather(cur[i], lv.piece_numels(), owner[(i, d)], lv.level_group, arrived)
        ex.post()
        up[i] = ex
    back: dict = {}

    def returned_to(i, lv):
        def returned(piece):
            back[i] = piece.view(lv.local_shape)
        return returned

    mine_now = [i for i in sharded if reached[i] == len(levels[i])]
    arriving = [i for i in last if comm.group_rank(levels[i][d].level_group) == owner[(i, d)]]
    for i in last:   # the returns of what others own: receives posted now
        if i not in arriving:
            lv = levels[i][d]
            ex = comm.PieceExchange(tag=2 * i + 2)
            ex.scatter(None, lv.piece_numels(), cur[i], owner[(i, d)], lv.level_group, returned_to(i, lv))
            ex.post()
            down.append(ex)
    # the unpipelined path's batches: this rank's matrices in index order, grouped by shape
    mine = sorted(mine_now + arriving)
    by_shape: dict = defaultdict(list)
    for i in mine:
        by_shape[tuple(items[i][0].shape)].append(i)
    batches = list(by_shape.values())
    pending = set(arriving)
    batches.sort(key=lambda b: any(i in pending for i in b))   # stable: ready batches first
    for b in batches:
        for i in b:
            if i in pending:
                up[i].finish()
        outs = compute([cur[i] for i in b])
        for i, out in zip(b, outs):
            if i in pending:
                lv = levels[i][d]
                ex = comm.PieceExchange(tag=2 * i + 2)
                ex.scatter(lv.split(out), lv.piece_numels(), cur[i], owner[(i, d)], lv.level_group,
                           returned_to(i, lv))
                ex.post()
                down.append(ex)
            else:
                back[i] = out
    for i in last:
        if i not in pending:
            up[i].finish()   # this rank's sends of the round
    for ex in down:
        ex.finish()
    return back


def gather_full(shard: MatrixShard, x: torch.Tensor) -> torch.Tensor:
    """The whole logical matrix ``shard.shape`` on every rank of the shard's groups, from this
    rank's local piece ``x`` (all-gathers, level by level; no communication for a whole matrix).
    For diagnostics that need the full matrix (e.g. a sampled Newton–Schulz), not the step."""
    return _gather_all(_levels(shard), x).reshape(shard.shape)


def _gather_all(levels: list[MatrixShard], x: torch.Tensor) -> torch.Tensor:
    cur = x
    for lv in levels:
        numels = lv.piece_numels()
        cur = lv.assemble(comm.all_gather(_pad(cur, max(numels)), lv.level_group))
    return cur


def _take_local(levels: list[MatrixShard], full: torch.Tensor) -> torch.Tensor:
    cur = full
    for lv in reversed(levels):
        cur = lv.take_local(cur)
    return cur
