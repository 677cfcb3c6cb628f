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

**Split (team) Newton–Schulz** (owner mode, ``split=True``; off by default, see
:func:`split_default`). One owner cannot split a matrix: at scale the largest one alone sets the
busiest rank's time (docs/scale.md). With ``split``, a matrix whose *last* sharding level is a
:class:`TensorParallel` split along its **long** side (so the TP pieces already are column blocks of
the wide orientation) may be given to that level's whole group, a *team*, instead of one owner:
nothing is gathered at that level, every member runs
:func:`~megatron_md.ops.split_ns.newton_schulz_split` on its own piece with the level group (no new
process groups), and keeps its piece of the result (outer levels move pieces as before). Which
matrices: :func:`assign_teams` — among those costlier than the group's mean load, the largest
``j`` are split, ``j`` chosen to minimize the group's busiest load (the split ones' per-member cost on
every rank plus the owners' LPT load of the rest); ``j = 0`` (nothing split, the owner path
unchanged) unless splitting strictly lowers it. Bytes of a team of k ranks, per shape batch of b
matrices whose unsplit side is m, NS dtype of e bytes, ``steps`` coefficient triples, on every
member (comm's all-reduce model, each call rounded to whole bytes):
``round(2(k−1)/k · 4 b) + steps · round(2(k−1)/k · b m² e)`` sent and the same received
(one fp32 sum of squares, then one m×m Gram per step). Exact: the Gram is a sum of partial
products, so a split matrix equals its owner result to float rounding (≈1e-6 in fp32), not bitwise.

Unsharded (:class:`Whole`) matrices never communicate; same-shape ones are batched.
"""
from __future__ import annotations

from collections import defaultdict
import os
from typing import Literal, Optional, Sequence

import torch

from ..ops import newton_schulz, ns_flops
from ..ops.split_ns import newton_schulz_split, split_ns_flops
from . import comm
from .layouts import MatrixShard, TensorParallel

NSMode = Literal["owner", "gather"]
NS_MODES = ("owner", "gather")
#: ``MEGATRON_MD_NS_OVERLAP=0`` turns the pipelined owner round off (benchmarks compare both)
OVERLAP_ENV = "MEGATRON_MD_NS_OVERLAP"
#: ``MEGATRON_MD_NS_SPLIT=1`` turns split (team) Newton–Schulz on (the builder's ``--ns-split``)
SPLIT_ENV = "MEGATRON_MD_NS_SPLIT"


def split_default() -> bool:
    """Whether owner Newton–Schulz may split a matrix over a team: off unless ``MEGATRON_MD_NS_SPLIT=1``."""
    return os.environ.get(SPLIT_ENV, "0") == "1"


def split_dim_of(lv: MatrixShard) -> Optional[int]:
    """The dim (−2 rows, −1 columns) along which a matrix's last level ``lv`` splits it, when its
    pieces are column blocks of the wide orientation (a TensorParallel split along the long side,
    either side of a square); None when it cannot be split in place."""
    if isinstance(lv, TensorParallel) and lv.shape[lv.dim] >= lv.shape[1 - lv.dim]:
        return lv.dim - 2
    return None


def team_flops(lv: TensorParallel, steps: int, member: Optional[int] = None) -> int:
    """Split NS FLOPs of one team member (``member``: its group rank; None: the widest block)."""
    m = lv.shape[1 - lv.dim]
    n = max(lv.sizes) if member is None else lv.sizes[member]
    return split_ns_flops(m, n, steps)


def assign_teams(costs: Sequence[int], split_costs: Sequence[Optional[int]], world: int,
                 holders: Sequence[Sequence[int] | None] | None = None) -> list[int]:
    """Owner of each matrix of one level group, or −1 for a matrix split over the whole group.

    ``split_costs[i]``: the busiest member's cost if matrix i is split (None: it cannot be).
    Candidates: splittable matrices costlier than the mean load ``sum(costs) / world``, largest
    first (ties by index). Splitting the first ``j`` of them gives a busiest load of
    ``Σ_{i<j} split_costs[i] + max(LPT loads of the rest)`` (:func:`assign_owners`); the smallest
    ``j`` that minimizes it is taken, so nothing is split unless that strictly lowers the busiest
    load. Deterministic: the same on every rank that passes the same lists.
    """
    n = len(costs)
    mean = sum(costs) / world if world else 0
    cand = sorted((i for i in range(n) if split_costs[i] is not None and split_costs[i] < costs[i]
                   and costs[i] > mean), key=lambda i: (-costs[i], i))

    def plan(j):
        split = set(cand[:j])
        rest = [i for i in range(n) if i not in split]
        own = assign_owners([costs[i] for i in rest], world,
                            None if holders is None else [holders[i] for i in rest])
        load = [0] * world
        for i, o in zip(rest, own):
            load[o] += costs[i]
        owners = [-1] * n
        for i, o in zip(rest, own):
            owners[i] = o
        return sum(split_costs[i] for i in split) + max(load, default=0), owners

    best, owners = plan(0)
    for j in range(1, len(cand) + 1):
        span, own = plan(j)
        if span < best:
            best, owners = span, own
    return owners


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
                  batch: bool = True, overlap: Optional[bool] = None,
                  split: Optional[bool] = None) -> list[torch.Tensor]:
    """Local pieces of NS(logical matrix) for every item (see module docstring). ``overlap``
    (default: :func:`overlap_default`) pipelines the owners' last round (bitwise the same result).
    ``split`` (default: :func:`split_default`, off) lets owner mode give a matrix to a team
    (module docstring, "Split (team) Newton–Schulz"); gather mode ignores it."""
    if overlap is None:
        overlap = overlap_default()
    if split is None:
        split = split_default()
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
        team = {}   # matrix -> its split dim, for matrices split over their last level's group

        def assign(d, lst):
            by_group = defaultdict(list)
            for i in lst:
                if (i, d) not in owner:
                    by_group[id(levels[i][d].level_group)].append(i)
            for idx in by_group.values():
                w = comm.group_size(levels[idx[0]][d].level_group)
                costs = [ns_flops(*items[i][0].shape, steps) for i in idx]
                # the majority-holder rule only where nothing above depends on the choice: an inner
                # level's owner index must be the same on every rank of the next level's group
                holders = [levels[i][d].piece_numels() if d == len(levels[i]) - 1 else None for i in idx]
                if split:
                    last = [d == len(levels[i]) - 1 and split_dim_of(levels[i][d]) is not None for i in idx]
                    sc = [team_flops(levels[i][d], steps) if ok else None for i, ok in zip(idx, last)]
                    owners = assign_teams(costs, sc, w, holders)
                else:
                    owners = assign_owners(costs, w, holders)
                for i, o in zip(idx, owners):
                    owner[(i, d)] = o
                    if o < 0:
                        team[i] = split_dim_of(levels[i][d])
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
                if reached[i] != d or len(levels[i]) <= d or i in team:
                    continue
                lv = levels[i][d]

                def arrived(got, i=i, lv=lv):
                    cur[i] = lv.assemble(got)
                    reached[i] += 1
                ex.gather(cur[i], lv.piece_numels(), owner[(i, d)], lv.level_group, arrived)
            ex.run()
        if piped:
            assign(depth - 1, [i for i in sharded if reached[i] == depth - 1 and len(levels[i]) == depth])
        # teams: every split matrix has reached its last level here (the only rounds left are the
        # last one, which teams skip); blocking all-reduces, in the same order on every rank
        split_out = _run_teams(team, levels, cur, reached, coefficients, dtype, eps, batch) if team else {}
        if piped:
            back = _pipelined_round(items, levels, [i for i in sharded if i not in team], cur, reached,
                                    owner, depth,
                                    lambda mats: _ns_batched(mats, coefficients, dtype, eps) if batch else
                                    [newton_schulz(m, coefficients, dtype=dtype, eps=eps) for m in mats])
        else:
            fulls = {i: cur[i] for i in sharded if reached[i] == len(levels[i])}
            # compute: every owner orthogonalizes what it owns, batched by shape
            own = list(fulls)
            outs = _ns_batched([fulls[i] for i in own], coefficients, dtype, eps) if batch else \
                [newton_schulz(fulls[i], coefficients, dtype=dtype, eps=eps) for i in own]
            back = dict(zip(own, outs))
        back.update(split_out)
        # down: pieces travel back, level by level from the innermost (still in the NS dtype)
        for d in range((depth - 2 if piped else depth - 1), -1, -1):
            ex = comm.PieceExchange()
            for i in sharded:
                if len(levels[i]) <= d or reached[i] < d or (i in team and d == len(levels[i]) - 1):
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


def _pipelined_round(items, levels, sharded, cur, reached, owner, depth, compute) -> dict:
    """The last up round, the owners' Newton–Schulz and the first down round, overlapped.

    Every transfer of the round is posted at once, one exchange per matrix with its own P2P tags
    (so no message waits for another's order). An owner computes its matrices in the same shape
    batches as the unpipelined path — those complete before the round (fewer sharding levels)
    first, then each batch as soon as its pieces have arrived, while the rest are in flight — and
    posts each batch's returns as soon as it is computed. Same batches, same inputs: the result is
    bitwise that of the unpipelined path, and the meter records the same bytes per matrix."""
    d = depth - 1
    last = [i for i in sharded if reached[i] == d and len(levels[i]) == depth]
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


def _run_teams(team, levels, cur, reached, coefficients, dtype, eps, batch) -> dict:
    """The split matrices this rank holds a piece of (it reached their last level): their pieces of
    NS, each team's matrices batched by (group, logical shape, dim, piece sizes) unless ``batch`` is
    off. Batches run in the order of their first matrix index — the same on every member (a team's
    matrices are the same set on all its ranks), so the blocking all-reduces of teams that share
    ranks cannot deadlock (the pending batch with the smallest index always has all its members)."""
    batches: dict = {}
    for i in sorted(team):
        lv = levels[i][-1]
        if reached[i] != len(levels[i]) - 1:
            continue
        key = (id(lv.level_group), lv.shape, lv.dim, tuple(lv.sizes)) if batch else i
        batches.setdefault(key, []).append(i)
    out = {}
    for idx in batches.values():
        lv = levels[idx[0]][-1]
        xs = [cur[i].reshape(lv.local_shape) for i in idx]
        x = xs[0] if len(xs) == 1 else torch.stack(xs)
        y = split_newton_schulz(x, lv.level_group, split_dim=team[idx[0]], coefficients=coefficients,
                                dtype=dtype, eps=eps)
        for k, i in enumerate(idx):
            out[i] = y if len(xs) == 1 else y[k]
    return out


def split_newton_schulz(x_local: torch.Tensor, group, *, split_dim: int, coefficients,
                        dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> torch.Tensor:
    """This rank's block of NS(full), ``full`` split along ``split_dim`` over ``group`` (every member
    calls with its block): :func:`~megatron_md.ops.split_ns.newton_schulz_split` with the group's
    metered all-reduce (``None`` or a group of one: the single-device path)."""
    return newton_schulz_split(x_local, lambda t: comm.all_reduce(t, group), split_dim=split_dim,
                               coefficients=coefficients, dtype=dtype, eps=eps)


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
