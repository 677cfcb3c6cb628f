"""Per-rank, per-step cost of every optimizer at a megatron-core layout — on paper.

:func:`plan` takes a :class:`~megatron_md.planning.model.ModelSpec` and a :class:`Layout` and
returns, for every rank of every pipeline stage, what one optimizer step does there:
Newton–Schulz FLOPs, elementwise work, optimizer state bytes, and — per metering tag and
collective kind (``shard.comm.METER``'s keys) and per process group — the calls and the bytes
sent and received; then, with :class:`Hardware` numbers, the predicted optimizer time and its
share of the step.

The product's own decisions are imported, not re-derived:

* parameter roles: :func:`megatron_md.megatron.routing.role_of` on the real names (and MD's
  embedding/head recipe rule, ``md_recipe_roles``' regexes);
* TP dimension of each matrix: ``routing._tp_dim_from_name``; the Q/K/V block decomposition of
  a fused QKV: :func:`megatron_md.shard.fused_qkv` (SwiGLU's fc1 with ``split_fc1``:
  :func:`megatron_md.shard.blocks.swiglu_fc1`), cut into ZeRO-1 pieces by
  :func:`megatron_md.shard.blocks.flat_blocks`; which methods split it: ``builder._PER_BLOCK``;
  MD's MoE router group (``--md-router``'s default, ``builder.router_overrides``);
* owners: :func:`megatron_md.shard.orthogonalize.assign_owners` with the costs
  :func:`megatron_md.ops.ns_flops` and the levels / majority-holder rule of ``orthogonalize``
  (layer-wise DP: ``hybrid._cost``); with ``Layout.ns_split`` (``--ns-split``) the teams of
  :func:`megatron_md.shard.orthogonalize.assign_teams` (a matrix split over its TP group: each member
  :func:`megatron_md.ops.split_ns.split_ns_flops`, one fp32 norm all-reduce and one m×m Gram
  all-reduce per NS step per shape batch, no owner transfers at the TP level);
* what each method's step reduces, over how many flushes, its NS steps, state and elementwise
  passes: :func:`megatron_md.planning.trace.trace_method` (the real class, traced);
* the byte count of each collective: the counting model of :mod:`megatron_md.shard.comm`.

Re-implemented (checked against real runs by tests/megatron/test_plan_cluster.py): megatron-core's
gradient-buffer geometry (the ZeRO-1 ranges: reverse registration order, params padded to 64
elements, buckets to lcm(DP, 128)), the layout of each collective over the ranks.

Not modelled: Megatron's own collectives (gradient reduce-scatter / all-reduce, parameter
all-gather, MoE all-to-all: the same for every optimizer, part of the step time), overlap of
optimizer communication with compute (the product pipelines the owners' last round with their
Newton–Schulz; the model adds the two, an upper bound),
kernel launch overheads, the Adam partner beyond its elementwise passes. FSDP (``dp_mode="fsdp"``:
the driver's ``--use-torch-fsdp2``) is every parameter's rows split over the data-parallel group by
``torch.chunk`` (:func:`fsdp_pieces`), each rank's rows a row-aligned flat range, as
:mod:`megatron_md.megatron.fsdp` binds them: the same flat-range math as ZeRO-1 with other cut points
(every matrix spread over all DP ranks instead of mostly whole on one). Times are sums of compute, memory traffic and (bandwidth + latency) per collective.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal, Optional

import numpy as np
import torch

from ..megatron.builder import _OUTPUT_LAYER, _PER_BLOCK, _WORD_EMBEDDING, router_overrides
from ..megatron.config import MDConfig
from ..megatron.hybrid import BROADCAST_BUCKET_NUMEL, _cost as layerwise_cost
from ..megatron.routing import RoutingOptions, _tp_dim_from_name, is_router, role_of
from ..ops import ns_flops
from ..shard import fused_qkv
from ..shard.blocks import flat_blocks, swiglu_fc1
from ..ops.split_ns import split_ns_flops
from ..shard.orthogonalize import assign_owners, assign_teams
from .model import ModelSpec, Param, stage_params
from .trace import MethodTrace, Reduction, trace_method

DPMode = Literal["ddp", "zero1", "layer-wise", "fsdp"]
OPTIMIZERS = ("adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon")


@dataclass(frozen=True)
class Layout:
    """A megatron-core parallel layout and the optimizer's distribution settings."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: Optional[int] = None       # expert TP (megatron-core's default: = TP)
    dp: int = 1
    dp_mode: DPMode = "ddp"
    ns_mode: Literal["owner", "gather"] = "owner"
    ns_dtype: Literal["bf16", "fp32"] = "bf16"
    split_qkv: bool = True          # --split-qkv (Q, K, V as separate matrices for the per-block methods)
    split_fc1: bool = False         # --split-fc1 (SwiGLU's gate and up halves as separate matrices)
    ns_split: bool = False          # --ns-split (owner NS may split a matrix over its TP group)
    global_batch: int = 1024        # sequences
    seq: int = 4096
    bucket_size: Optional[int] = None   # DDP bucket size in elements (None: one bucket per buffer)
    vocab_divisible_by: int = 128

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_dp(self) -> int:
        n = self.tp * self.dp
        if n % (self.ep * self.expert_tp):
            raise ValueError(f"TP {self.tp} × DP {self.dp} is not divisible by EP {self.ep} × ETP {self.expert_tp}")
        return n // (self.ep * self.expert_tp)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def flat(self) -> bool:
        return self.dp_mode in ("zero1", "fsdp")


@dataclass(frozen=True)
class Hardware:
    """Per-GPU numbers (defaults: NVIDIA H100 SXM, NVLink 4, one 400 Gb/s NDR NIC per GPU)."""

    name: str = "H100 SXM"
    bf16_tflops: float = 989.0      # dense bf16 tensor-core peak
    fp32_tflops: float = 67.0       # fp32 without TF32 (the product's fp32 NS)
    matmul_fraction: float = 0.6    # achieved fraction of peak on NS-sized GEMMs
    hbm_gbs: float = 3350.0 * 0.8   # achieved HBM bandwidth (elementwise passes)
    nvlink_gbs: float = 450.0 * 0.8  # per direction, achieved
    ib_gbs: float = 50.0 * 0.8
    nvlink_latency_us: float = 10.0
    ib_latency_us: float = 20.0
    gpus_per_node: int = 8
    mfu: float = 0.40               # model FLOPs utilization of the training step (6·N·tokens)


#: bytes moved per element and elementwise pass (two fp32 reads and one write)
BYTES_PER_PASS = 12


# ------------------------------------------------------------------------------ matrices
@dataclass
class Mat:
    """One logical matrix (or, ``blocks`` > 1, a parameter split into several) of one stage."""

    name: str
    role: str                   # matrix / head / embedding
    expert: bool
    kind: str                   # "plain" or "qkv<b>"
    shape: tuple                # logical (d_out, d_in)
    local: tuple                # TP-local (rows, cols)
    tp_dim: Optional[int]       # None: not split over the (expert) TP group
    param: int                  # index of its parameter in the stage list
    pieces: Optional[np.ndarray] = None   # ZeRO-1: elements of ``local`` held by each DP rank
    sphere: str = "frobenius"   # "rows": MD's MoE router group (``builder.router_overrides``)


def _blocks_of(p: Param, spec: ModelSpec, tp_w: int, split: bool, pieces: Optional[np.ndarray],
               split_fc1: bool = False) -> list[tuple[str, tuple, tuple, Optional[int], Optional[np.ndarray]]]:
    """(kind, logical shape, local shape, tp dim, ZeRO pieces) of each logical matrix of a matrix
    param; a fused QKV's blocks as :func:`~megatron_md.shard.fused_qkv` makes them and, under ZeRO-1,
    each rank's piece of each block as :func:`~megatron_md.shard.blocks.flat_blocks` cuts it."""
    dim = _tp_dim_from_name(p.name)
    if not (p.tp_partitioned and tp_w > 1):
        dim = None
    blocks, prefix = None, ""
    if p.name.endswith("linear_qkv.weight") and split:
        blocks, prefix = fused_qkv(num_query_groups=spec.query_groups, heads_per_group=spec.heads // spec.query_groups,
                                   head_dim=spec.head_dim, d_in=p.shape[1], tp_size=tp_w), "qkv"
    elif p.name.endswith("linear_fc1.weight") and split_fc1 and spec.swiglu and not p.expert:
        blocks, prefix = swiglu_fc1(p.shape[0] // 2 * tp_w, p.shape[1], tp_size=tp_w), "fc1"
    if blocks is not None:
        per_block = None
        if pieces is not None:
            per_block = np.zeros((len(blocks.views), len(pieces)), dtype=np.int64)
            ends = np.cumsum(pieces)
            for r in np.nonzero(pieces)[0]:
                fb = flat_blocks(blocks, int(ends[r] - pieces[r]), int(ends[r]), None)
                for b, v in enumerate(fb.views):
                    per_block[b, r] = v.shard.end - v.shard.start
        return [(f"{prefix}{b}", (v.shard.shape[0], v.shard.shape[1]),
                 (sum(b1 - b0 for b0, b1 in v.parent_rows()), v.shard.shape[1]), dim,
                 None if per_block is None else per_block[b]) for b, v in enumerate(blocks.views)]
    local = tuple(p.shape)
    full = list(local)
    if dim is not None:
        full[dim] *= tp_w
    return [("plain", tuple(full), local, dim, pieces)]


def roles_of(params: list[Param], optimizer: str, *, tied: bool, md_embedding_unit_norm=True,
             md_head_gains=True, router_on_matrix=False) -> list[str]:
    """The role of each parameter, as the builder decides (routing rules, then MD's recipe)."""
    matrix = optimizer not in ("adam", "sf-adamw")
    md_router = optimizer in ("adam-md", "muon-md") and MDConfig(optimizer=optimizer).md_router
    opts = RoutingOptions(router_on_matrix=router_on_matrix or md_router)
    out = []
    for p in params:
        t = torch.empty(p.shape, device="meta")
        t.allreduce = not p.expert
        t.is_embedding_or_output_parameter = "embedding" in p.name or p.name.startswith("output_layer")
        role = role_of(p.name, t, opts) if matrix else "adam"
        if optimizer in ("adam-md", "muon-md"):
            if md_embedding_unit_norm and (_WORD_EMBEDDING.search(p.name) or (tied and _OUTPUT_LAYER.search(p.name))):
                role = "embedding"
            elif md_head_gains and not tied and _OUTPUT_LAYER.search(p.name):
                role = "head"
        out.append(role)
    return out


def fsdp_pieces(shape: tuple, dp: int) -> np.ndarray:
    """Elements of a (TP-local) parameter of ``shape`` that each of ``dp`` ranks holds under torch
    FSDP2: its rows split by ``torch.chunk`` (⌈m/dp⌉ rows per rank, trailing ranks fewer or none)."""
    m, n = int(shape[0]), math.prod(shape[1:])
    chunk = -(-m // dp) if m else 0
    starts = [min(r * chunk, m) for r in range(dp)]
    return np.array([(min(s0 + chunk, m) - s0) * n for s0 in starts], dtype=np.int64)


def zero_pieces(numels: list[int], dp: int, *, bucket_size=None, shared=None) -> list[np.ndarray]:
    """Elements of each parameter (registration order) held by each DP rank under ZeRO-1:
    megatron-core 0.16's ``_ParamAndGradBuffer`` geometry (reverse order, starts padded to 64,
    bucket ends to lcm(DP, 128), shared embeddings in their own bucket) and
    ``DistributedOptimizer``'s equal split of every bucket."""
    shared = shared or [False] * len(numels)
    pad = lambda x, m: -(-x // m) * m  # noqa: E731
    div = math.lcm(dp, 128)
    index, buckets = {}, []
    start = bstart = 0
    nb = 0
    bucket_params = 0
    end = 0
    for i in reversed(range(len(numels))):
        start = pad(start, 64)
        if shared[i] and bucket_params:
            bend = pad(start, div)
            buckets.append((bstart, bend))
            bstart = start = bend
            bucket_params = 0
        end = start + numels[i]
        index[i] = (start, end, len(buckets))
        bucket_params += 1
        if (bucket_size is not None and end - bstart >= bucket_size) or shared[i]:
            bend = pad(end, div)
            buckets.append((bstart, bend))
            bstart = start = bend
            bucket_params = 0
        else:
            start = end
    if bucket_params:
        buckets.append((bstart, pad(end, div)))
    out = []
    for i in range(len(numels)):
        s, e, b = index[i]
        b0, b1 = buckets[b]
        chunk = (b1 - b0) // dp
        pieces = np.zeros(dp, dtype=np.int64)
        if e > s:
            for r in range((s - b0) // chunk, (e - 1 - b0) // chunk + 1):
                ws, we = b0 + r * chunk, b0 + (r + 1) * chunk
                pieces[r] = max(0, min(we, e) - max(ws, s))
        out.append(pieces)
    return out


# ------------------------------------------------------------------------------- results
@dataclass
class Traffic:
    """Per rank of a stage: calls / bytes sent / bytes received, keyed (tag, kind, group)."""

    n: int
    calls: dict = field(default_factory=dict)
    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)
    rounds: dict = field(default_factory=dict)   # latency-bearing rounds per group

    def _arr(self, d, key):
        if key not in d:
            d[key] = np.zeros(self.n, dtype=np.int64)
        return d[key]

    def add(self, key, ranks, calls, sent, received):
        self._arr(self.calls, key)[ranks] += calls
        self._arr(self.sent, key)[ranks] += sent
        self._arr(self.received, key)[ranks] += received

    def add_round(self, group, ranks, k=1):
        self._arr(self.rounds, group)[ranks] += k


@dataclass
class StagePlan:
    stage: int
    n: int                       # ranks in the stage (TP × DP)
    ns_flops: np.ndarray         # per rank
    elem_flops: np.ndarray       # per rank (passes × elements)
    state_bytes: np.ndarray      # per rank: the optimizer's state (matrix method + Adam partner)
    traffic: Traffic
    unique_ns_flops: int         # NS FLOPs of one copy of this stage's matrices (all EP ranks' experts)


class _Ranks:
    """Stage rank g = t + TP·r (dense: TP index t, DP index r) = et + ETP·(e + EP·er) (experts)."""

    def __init__(self, lay: Layout, expert: bool):
        self.n = lay.tp * lay.dp
        g = np.arange(self.n)
        if expert:
            self.tw, self.dw = lay.expert_tp, lay.expert_dp
            self.t, self.r = g % self.tw, g // (self.tw * lay.ep)
        else:
            self.tw, self.dw = lay.tp, lay.dp
            self.t, self.r = g % self.tw, g // self.tw
        self.tg, self.dg = ("etp", "edp") if expert else ("tp", "dp")


def _levels(m: Mat, lay: Layout, R: _Ranks) -> list[tuple[str, int]]:
    """(group, size) of each sharding level, outermost first (as ``orthogonalize._levels``)."""
    out = []
    if m.pieces is not None and R.dw > 1:
        out.append((R.dg, R.dw))
    if m.tp_dim is not None and R.tw > 1:
        out.append((R.tg, R.tw))
    return out


def _level_pieces(m: Mat, level: str, R: _Ranks) -> list[int]:
    if level in ("dp", "edp"):
        return [int(x) for x in m.pieces]
    rows, cols = m.local
    return [rows * cols] * R.tw


def _team_flops(m: Mat, R: _Ranks, steps: int) -> Optional[int]:
    """A team member's split NS FLOPs (``orthogonalize.team_flops``) when the matrix's last level is
    TP along its long side (``orthogonalize.split_dim_of``); None when it cannot be split."""
    if m.tp_dim is None or R.tw <= 1 or m.shape[m.tp_dim] < m.shape[1 - m.tp_dim]:
        return None
    return split_ns_flops(m.shape[1 - m.tp_dim], m.local[m.tp_dim], steps)


def _exchange(mats: list[Mat], flops: list[int], lay: Layout, R: _Ranks, tr: Traffic, ns: np.ndarray,
              tag: str, es: int, members: Optional[list[np.ndarray]] = None, calls: Optional[list[int]] = None,
              split: Optional[list] = None, steps: int = 0) -> None:
    """Owner-mode NS of ``mats`` (one ``orthogonalize`` call): owners per (level, group) as the
    product assigns them, a gather and a scatter record per matrix and level on every rank that
    takes part, and the NS FLOPs on the final owner. ``members[i]``: the ranks that step matrix i
    (layer-wise: the DP owner's TP group; default: every rank); ``calls[i]``: which ``orthogonalize``
    call matrix i belongs to (layer-wise: one per DP owner, each assigning its own owners).
    ``split[i]`` (``--ns-split``): matrix i's per-member split cost, None if it cannot be split;
    a team matrix (owner −1 at its TP level) has no transfers there, its FLOPs on every member and
    its all-reduces per shape batch (``orthogonalize._run_teams``)."""
    levels = [_levels(m, lay, R) for m in mats]
    allr = np.ones(R.n, dtype=bool)
    members = members or [allr] * len(mats)
    sharded = [i for i, lv in enumerate(levels) if lv]
    for i, lv in enumerate(levels):
        if not lv:
            ns[members[i]] += flops[i]
    if not sharded:
        return
    # owners per (depth, group): one assign_owners per group, the same on every rank of it; a
    # level d > 0 over the matrices that reach the group (the same level-(d−1) owner)
    owner = {}
    calls = calls or [0] * len(mats)
    for d in range(max(len(levels[i]) for i in sharded)):
        by_key = defaultdict(list)
        for i in sharded:
            if len(levels[i]) > d:
                by_key[(calls[i], levels[i][d][0], owner[(i, d - 1)] if d else -1)].append(i)
        for (_, g, _), lst in by_key.items():
            w = dict(levels[lst[0]])[g]
            costs = [flops[i] for i in lst]
            holders = [_level_pieces(mats[i], g, R) if d == len(levels[i]) - 1 else None for i in lst]
            if split is not None:
                sc = [split[i] if d == len(levels[i]) - 1 and g == R.tg else None for i in lst]
                owners = assign_teams(costs, sc, w, holders)
            else:
                owners = assign_owners(costs, w, holders)
            for i, o in zip(lst, owners):
                owner[(i, d)] = o
    batches: dict = {}
    for i in sharded:
        part = members[i].copy()
        for d, (g, w) in enumerate(levels[i]):
            idx = R.r if g in ("dp", "edp") else R.t
            pieces = np.asarray(_level_pieces(mats[i], g, R), dtype=np.int64)
            o = owner[(i, d)]
            if o < 0:   # a team: the ranks that reached this level (one outer owner's group) split it
                m = mats[i]
                key = (calls[i], g, owner[(i, d - 1)] if d else -1, m.shape, m.tp_dim)
                batches.setdefault(key, [part, 0, m.shape[1 - m.tp_dim], w])[1] += 1
                ns[part] += split[i]
                part = None
                break
            me_owner = part & (idx == o)
            others = part & (idx != o)
            recv = int(pieces.sum() - pieces[o]) * es
            tr.add((tag, "gather", g), part, 1, np.where(others, pieces[idx] * es, 0)[part], 0)
            tr.add((tag, "gather", g), me_owner, 0, 0, recv)
            tr.add((tag, "scatter", g), part, 1, 0, np.where(others, pieces[idx] * es, 0)[part])
            tr.add((tag, "scatter", g), me_owner, 0, recv, 0)
            tr.add_round(g, part, 2)
            part = me_owner
        if part is not None:
            ns[part] += flops[i]
    for (_, g, _, _, _), (part, b, m, k) in batches.items():
        f = 2 * (k - 1) / k
        nbytes = int(round(f * 4 * b)) + steps * int(round(f * b * m * m * es))
        tr.add((tag, "all_reduce", g), part, steps + 1, nbytes, nbytes)
        tr.add_round(g, part, steps + 1)


def _gather_mode(mats, flops, lay, R, tr, ns, tag, members=None):
    allr = np.ones(R.n, dtype=bool)
    for i, m in enumerate(mats):
        part = (members or [allr] * len(mats))[i]
        for g, w in _levels(m, lay, R):
            pieces = _level_pieces(m, g, R)
            b = (w - 1) * max(pieces) * 4
            tr.add((tag, "all_gather", g), part, 1, b, b)
            tr.add_round(g, part, 1)
        ns[part] += flops[i]


def _reductions(mats: list[Mat], trace: MethodTrace, lay: Layout, R: _Ranks, tr: Traffic, tag: str,
                members: Optional[list[np.ndarray]] = None) -> None:
    """Every flush of the traced program: one all-reduce per live group of the partials of every
    matrix that owes it (``shard.Reductions.flush``); byte count as ``comm.all_reduce``'s."""
    allr = np.ones(R.n, dtype=bool)
    members = members or [allr] * len(mats)
    programs = {"frobenius": trace.flushes}
    if any(m.sphere != "frobenius" for m in mats):
        programs["rows"] = trace_method(trace.name, sphere="rows").flushes
        if len(programs["rows"]) != len(trace.flushes):
            raise NotImplementedError(f"{trace.name}: the rows-sphere group flushes differently")
    for f, flush in enumerate(trace.flushes):
        numel = defaultdict(lambda: np.zeros(R.n, dtype=np.int64))
        for i, m in enumerate(mats):
            kind = "plain" if m.kind.startswith("fc1") else m.kind
            for red in programs[m.sphere][f]:
                if red.matrix != kind:
                    continue
                for g, w in _reduce_groups(m, red.kind, R):
                    size = {"row": m.local[0], "col": m.local[1], "total": red.values}[red.kind]
                    numel[(g, w)][members[i]] += size
        for (g, w), n in numel.items():
            on = n > 0
            b = np.rint(2 * (w - 1) / w * n[on] * 4).astype(np.int64)
            tr.add((tag, "all_reduce", g), on, 1, b, b)
            tr.add_round(g, on, 1)


def _reduce_groups(m: Mat, kind: str, R: _Ranks) -> list[tuple[str, int]]:
    out = []
    if m.pieces is not None and R.dw > 1:
        out.append((R.dg, R.dw))
    if m.tp_dim is not None and R.tw > 1:
        if kind == "total" or (kind == "row" and m.tp_dim == 1) or (kind == "col" and m.tp_dim == 0):
            out.append((R.tg, R.tw))
    return out


def _adamw_passes() -> int:
    from .trace import _Passes
    p = torch.nn.Parameter(torch.randn(24, 40))
    opt = torch.optim.AdamW([p], lr=1e-3, foreach=True)
    p.grad = torch.randn(24, 40)
    opt.step()
    with _Passes(p.numel()) as c:
        opt.step()
    return c.count


_ADAMW_PASSES: list = []


def adamw_passes() -> int:
    """Elementwise passes of torch's AdamW step (the Adam partner), measured like the methods'."""
    if not _ADAMW_PASSES:
        _ADAMW_PASSES.append(_adamw_passes())
    return _ADAMW_PASSES[0]


def plan_stage(spec: ModelSpec, lay: Layout, optimizer: str, stage: int) -> StagePlan:
    """Every rank of pipeline stage ``stage`` (all its virtual chunks)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    matrix = optimizer not in ("adam", "sf-adamw")
    split = lay.split_qkv and optimizer in _PER_BLOCK
    md_router = optimizer in ("adam-md", "muon-md") and MDConfig(optimizer=optimizer).md_router
    tr_main = trace_method(optimizer) if matrix else None
    n = lay.tp * lay.dp
    ns = np.zeros(n, dtype=np.int64)
    elem = np.zeros(n, dtype=np.float64)
    state = np.zeros(n, dtype=np.float64)
    traffic = Traffic(n)
    unique = [0]
    es = 2 if lay.ns_dtype == "bf16" else 4
    chunks = [stage_params(spec, tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.expert_tp, stage=stage, vpp=lay.vpp,
                           chunk=c, vocab_divisible_by=lay.vocab_divisible_by) for c in range(lay.vpp)]
    params = [p for c in chunks for p in c]
    roles = roles_of(params, optimizer, tied=spec.tied)
    # ZeRO-1 pieces: one buffer per chunk and kind (dense / expert)
    pieces: dict = {}
    if lay.flat:
        k = 0
        for c in chunks:
            for expert in (False, True):
                idx = [k + j for j, p in enumerate(c) if p.expert == expert]
                if not idx:
                    continue
                w = lay.expert_dp if expert else lay.dp
                if lay.dp_mode == "fsdp":
                    got = [fsdp_pieces(params[i].shape, w) for i in idx]
                else:
                    got = zero_pieces([math.prod(params[i].shape) for i in idx], w, bucket_size=lay.bucket_size,
                                      shared=[params[i].shared_embedding for i in idx])
                pieces.update(zip(idx, got))
            k += len(c)
    adam_passes = adamw_passes()
    for expert in (False, True):
        R = _Ranks(lay, expert)
        tag_idx = [i for i, p in enumerate(params) if p.expert == expert]
        if not tag_idx:
            continue
        # the Adam partner: elementwise over its local elements (ZeRO: its shard)
        for i in tag_idx:
            if roles[i] != "adam":
                continue
            k = pieces[i][R.r] if i in pieces else math.prod(params[i].shape)
            elem += adam_passes * k
            state += 8 * k
        if not matrix:
            continue
        mats: list[Mat] = []
        for i in tag_idx:
            if roles[i] == "adam":
                continue
            sphere = dict(router_overrides(optimizer)).get("sphere", "frobenius") \
                if md_router and is_router(params[i].name) else "frobenius"
            for kind, shape, local, dim, pc in _blocks_of(params[i], spec, R.tw, split and roles[i] == "matrix",
                                                          pieces.get(i), split and lay.split_fc1):
                mats.append(Mat(params[i].name, roles[i], expert, kind, shape, local, dim, i, pc, sphere))
        hidden = [m for m in mats if m.role == "matrix"]
        tag = type_name(optimizer)
        members = calls = None
        if lay.dp_mode == "layer-wise" and R.dw > 1:
            members, calls = _layerwise(hidden, params, R, traffic)
        _method(hidden, tr_main, lay, R, traffic, ns, elem, state, tag, es, members, calls)
        if tr_main.ns_steps:
            unique[0] += sum(ns_flops(*m.shape, tr_main.ns_steps) for m in hidden) * (lay.ep if expert else 1)
        heads = [m for m in mats if m.role == "head"]
        if heads:
            _method(heads, trace_method("adam-md", sphere="rows"), lay, R, traffic, ns, elem, state,
                    "AdamMD", es, None, None)
        embs = [m for m in mats if m.role == "embedding"]
        if embs:  # MD's unit-norm embedding rows after the partner's step: one row-sum flush (untagged)
            rows = MethodTrace("rows", ((Reduction("plain", "row"),),), 0, 0.0, 0.0, 0.0, 0)
            _reductions(embs, rows, lay, R, traffic, "untagged")
            for m in embs:
                k = m.pieces[R.r] if m.pieces is not None else m.local[0] * m.local[1]
                elem += adam_passes * k
                state += 8 * k
    return StagePlan(stage, n, ns, elem, state, traffic, unique[0])


def _method(mats, trace, lay, R, tr, ns, elem, state, tag, es, members, calls):
    if not mats:
        return
    flops = [ns_flops(*m.shape, trace.ns_steps) if trace.ns_steps else 0 for m in mats]
    allr = np.ones(R.n, dtype=bool)
    mem = members or [allr] * len(mats)
    for m, on in zip(mats, mem):
        k = m.pieces[R.r] if m.pieces is not None else np.full(R.n, m.local[0] * m.local[1])
        k = np.where(on, k, 0)
        elem += trace.elementwise_passes * k
        frac = k / max(1, m.local[0] * m.local[1])
        state += trace.state_bytes_per_element * k + 4 * frac * (trace.state_per_row * m.local[0]
                                                                  + trace.state_per_col * m.local[1])
    if trace.ns_steps:
        if lay.ns_mode == "owner":
            split = [_team_flops(m, R, trace.ns_steps) for m in mats] if lay.ns_split else None
            _exchange(mats, flops, lay, R, tr, ns, tag, es, members, calls, split, trace.ns_steps)
        else:
            _gather_mode(mats, flops, lay, R, tr, ns, tag, members)
    _reductions(mats, trace, lay, R, tr, tag, members)


def _layerwise(hidden: list[Mat], params: list[Param], R: _Ranks, tr: Traffic) -> tuple[list, list]:
    """Layer-wise DP: owners of whole parameters by ``hybrid._cost`` (largest first), the owner's
    TP group steps them, then one coalesced broadcast per owner (and bucket) on every rank."""
    order, views = [], defaultdict(list)
    for m in hidden:
        if m.param not in views:
            order.append(m.param)
        views[m.param].append(m)
    items = []
    for i in order:
        vs = views[i]
        lay_ = (SimpleNamespace(shape=vs[0].shape) if len(vs) == 1 and vs[0].kind == "plain"
                else SimpleNamespace(views=[SimpleNamespace(shard=SimpleNamespace(shape=v.shape)) for v in vs]))
        items.append(SimpleNamespace(layout=lay_))
    owners = assign_owners([layerwise_cost(it) for it in items], R.dw)
    own = dict(zip(order, owners))
    members = [R.r == own[m.param] for m in hidden]
    calls = [own[m.param] for m in hidden]
    buckets: dict = {}
    for i, o in zip(order, owners):
        numel = math.prod(params[i].shape)
        lst = buckets.setdefault(o, [[]])
        if lst[-1] and sum(lst[-1]) + numel > BROADCAST_BUCKET_NUMEL:
            lst.append([])
        lst[-1].append(numel)
    allr = np.ones(R.n, dtype=bool)
    for o, lists in sorted(buckets.items()):
        for b in lists:
            nb = sum(b) * 4
            is_o = R.r == o
            tr.add(("layer-wise", "broadcast", R.dg), allr, 1, np.where(is_o, (R.dw - 1) * nb, 0),
                   np.where(is_o, 0, nb))
            tr.add_round(R.dg, allr, 1)
    return members, calls


def type_name(optimizer: str) -> str:
    """The metering tag of a method (its class name, ``comm.metered(type(self).__name__)``)."""
    from ..optim.builder import MATRIX_OPTIMIZERS
    return MATRIX_OPTIMIZERS[optimizer].__name__


# ---------------------------------------------------------------------------------- totals
@dataclass
class Plan:
    spec: ModelSpec
    layout: Layout
    optimizer: str
    stages: list

    def per_rank(self, what: str) -> np.ndarray:
        return np.concatenate([getattr(s, what) for s in self.stages])

    def meter(self, stage: int, rank: int) -> dict:
        """``{(tag, kind): (calls, sent, received)}`` of one rank (``METER.table()``'s keys,
        summed over process groups)."""
        out: dict = defaultdict(lambda: [0, 0, 0])
        tr = self.stages[stage].traffic
        for key in tr.calls:
            tag, kind, _ = key
            v = out[(tag, kind)]
            v[0] += int(tr.calls[key][rank])
            v[1] += int(tr.sent[key][rank])
            v[2] += int(tr.received[key][rank])
        return {k: tuple(v) for k, v in out.items() if any(v)}


def plan(spec: ModelSpec, lay: Layout, optimizer: str) -> Plan:
    """Every stage of the pipeline (each stage's ranks: TP × DP)."""
    return Plan(spec, lay, optimizer, [plan_stage(spec, lay, optimizer, s) for s in range(lay.pp)])


def _group_bw(group: str, lay: Layout, hw: Hardware) -> tuple[float, float]:
    """(bytes/s, latency s) of a process group: NVLink when it fits in a node, else InfiniBand
    (ranks ordered TP, then DP — experts ETP, EP, then expert-DP — as megatron-core does)."""
    span = {"tp": lay.tp, "etp": lay.expert_tp, "dp": lay.tp * lay.dp, "edp": lay.tp * lay.dp}[group]
    if span <= hw.gpus_per_node:
        return hw.nvlink_gbs * 1e9, hw.nvlink_latency_us * 1e-6
    return hw.ib_gbs * 1e9, hw.ib_latency_us * 1e-6


@dataclass
class Times:
    ns: np.ndarray
    elementwise: np.ndarray
    comm: np.ndarray
    total: np.ndarray
    step: float              # model step time at the stated MFU
    model_flops: float
    #: the owner Newton–Schulz transfers (point-to-point gather/scatter): the part of ``comm`` the
    #: pipelined owner round can hide behind NS compute
    owner_comm: np.ndarray = None

    @property
    def pipelined(self) -> np.ndarray:
        """The optimizer time if the owner transfers hide entirely behind Newton–Schulz (a lower
        bound of the pipelined owner round; ``total`` is the upper bound)."""
        return self.total - np.minimum(self.ns, self.owner_comm)


def times(p: Plan, hw: Hardware) -> Times:
    lay = p.layout
    rate = (hw.bf16_tflops if lay.ns_dtype == "bf16" else hw.fp32_tflops) * 1e12 * hw.matmul_fraction
    ns = p.per_rank("ns_flops") / rate
    el = p.per_rank("elem_flops") * BYTES_PER_PASS / (hw.hbm_gbs * 1e9)
    comm, owner = [], []
    for s in p.stages:
        t, o = np.zeros(s.n), np.zeros(s.n)
        tr = s.traffic
        for (tag, kind, g), sent in tr.sent.items():
            bw, _ = _group_bw(g, lay, hw)
            t += np.maximum(sent, tr.received[(tag, kind, g)]) / bw
            if kind in ("gather", "scatter"):
                o += np.maximum(sent, tr.received[(tag, kind, g)]) / bw
        for g, k in tr.rounds.items():
            if g is None:
                continue
            _, lat = _group_bw(g, lay, hw)
            t += k * lat
        comm.append(t)
        owner.append(o)
    comm = np.concatenate(comm)
    _, active = p.spec.params()
    tokens = lay.global_batch * lay.seq
    mf = 6 * active * tokens
    step = mf / (lay.world * hw.bf16_tflops * 1e12 * hw.mfu)
    return Times(ns, el, comm, ns + el + comm, step, mf, np.concatenate(owner))


def summary(spec: ModelSpec, lay: Layout, optimizer: str, hw: Hardware, baseline: Optional[Times] = None) -> dict:
    """One row of the report: per-rank maxima and means, the optimizer's time and its share of
    the step; ``overhead`` = (slowest rank's optimizer time − AdamW's) / (step + AdamW's)."""
    p = plan(spec, lay, optimizer)
    t = times(p, hw)
    nsf = p.per_rank("ns_flops")
    owners = nsf[nsf > 0]
    base = baseline if baseline is not None else times(plan(spec, lay, "adam"), hw)
    sent = sum(int(v.max()) for s in p.stages for v in s.traffic.sent.values())
    calls = sum(int(v.max()) for s in p.stages for v in s.traffic.calls.values())
    tmax = float(t.total.max())
    bmax = float(base.total.max())
    return dict(
        model=spec.name, optimizer=optimizer, tp=lay.tp, pp=lay.pp, ep=lay.ep, dp=lay.dp, dp_mode=lay.dp_mode,
        ns_mode=lay.ns_mode, gpus=lay.world,
        ns_tflop_max=float(nsf.max()) / 1e12, ns_tflop_mean=float(nsf.mean()) / 1e12,
        imbalance=float(nsf.max() / nsf.mean()) if nsf.mean() else 0.0,
        owner_share=float(len(owners)) / len(nsf),
        elem_gflop_max=float(p.per_rank("elem_flops").max()) / 1e9,
        state_gb_max=float(p.per_rank("state_bytes").max()) / 1e9,
        bytes_sent_max_mb=sent / 1e6, calls_max=calls,
        t_ns_ms=float(t.ns.max()) * 1e3, t_elem_ms=float(t.elementwise.max()) * 1e3,
        t_comm_ms=float(t.comm.max()) * 1e3, t_opt_ms=tmax * 1e3, t_adamw_ms=bmax * 1e3, t_step_s=t.step,
        share=tmax / (t.step + tmax), overhead=(tmax - bmax) / (t.step + bmax),
        t_opt_piped_ms=float(t.pipelined.max()) * 1e3,
        overhead_piped=(float(t.pipelined.max()) - bmax) / (t.step + bmax),
        ns_vs_model=sum(s.unique_ns_flops for s in p.stages) / t.model_flops,
    )
