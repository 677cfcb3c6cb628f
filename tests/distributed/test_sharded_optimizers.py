"""The core promise: every sharded optimizer equals its single-process reference on every layout.

One spawned gloo group per world size (2 and 4) runs every check of this module; pytest then
reports one test per check name (``<optimizer>-<layout>`` etc.), looked up in the cached group
result. No megatron import in the ranks: only torch and ``megatron_md``.

For every optimizer (NorMuon in both step forms; weight decay where the method has it;
``ns_dtype=float32``) and every layout below, 5 steps on fresh random data (the *global*
matrices and gradients come from a seed shared by all ranks; each rank takes its own piece)
must equal :mod:`megatron_md.optim.reference` run on the full logical matrices, to
``rtol=1e-5, atol=1e-6``, after construction and after every step; Newton–Schulz methods run
``ns_mode="owner"`` and ``"gather"`` side by side and both must match (and agree). MD methods
also compare their gains (local rows/cols) with the reference's.

Local pieces are built here from the global tensors *independently* of the product's
``BlockView``/``take_local`` code (tensor_split / explicit sizes, row-major flat ranges,
Megatron's per-query-group QKV interleaving).

Layouts (``w`` = world size; at w=4 "tp" is {0,1},{2,3} and "dp" is {0,2},{1,3}):

* ``tp0`` / ``tp1``: TensorParallel over the world, 13×10 / 10×13 (uneven tensor_split),
  ``tp1_sizes``: explicit uneven sizes;
* ``flat*``: FlatRange over Whole 13×10 with mid-row boundaries, empty and one-element shards;
  ``flat_self`` / ``tp0_flat_self``: a FlatRange over a group of one rank (ZeRO-1 at DP=1, an expert
  at expert-DP=1) of Whole / of a TP shard: the whole (TP-local) matrix, flattened;
* ``tp0_flat`` / ``tp1_flat`` (w=4): FlatRange over the dp group of a TensorParallel(tp) shard;
* ``qkv``: fused QKV with GQA (8 query heads in 2 groups), TP over the query groups (tp size 2);
* ``qkv_flat``: ZeRO-1 flat ranges of that fused QKV (w=2: no TP, over the world; w=4: of each TP
  shard, over dp), cutting K mid-row, leaving a rank without any V (w=2) or with nothing (w=4);
  Q, K and V are each a FlatRange of their own layout, read as segments of the rank's flat piece;
* ``fc1`` / ``fc1_flat``: a SwiGLU ``linear_fc1`` ``[gate; up]`` per TP rank split into its gate and
  up matrices, TP over the world (w=2) and ZeRO-1 flat ranges of it (cutting a row mid-way; w=4:
  one dp rank of one TP shard empty);
* ``stacked*`` / ``concat0*`` / ``concat1*``: experts as 3-D stack or 2-D concatenation along
  dim 0/1, without TP (expert-parallel over the world) and with TP on each expert (EP over dp).

Also: the byte meter, construction errors that must raise ``ValueError`` on every rank (never a
hang), and a NaN on one rank's shard that must make every rank skip the step.
"""
from __future__ import annotations

import zlib

import pytest

from megatron_md.testing.spawn import group_fixture

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
STEPS = 5

# name -> (product/reference class name, keyword arguments shared by both)
OPTIMIZERS = {
    "Muon": ("Muon", dict(lr=0.02, weight_decay=0.1)),
    "NorMuon_rescale": ("NorMuon", dict(lr=0.02, weight_decay=0.1, step_form="rescale")),
    "NorMuon_rms_match": ("NorMuon", dict(lr=0.02, weight_decay=0.1, step_form="rms_match")),
    "RMNP": ("RMNP", dict(lr=0.01, weight_decay=0.1)),
    "AdamH": ("AdamH", dict(lr=0.05)),
    "MuonH": ("MuonH", dict(lr=0.05)),
    "AdamMD": ("AdamMD", dict(lr=0.01)),
    "AdamMD_rows": ("AdamMD", dict(lr=0.01, sphere="rows")),   # MD's output-head rule
    "MuonMD": ("MuonMD", dict(lr=0.02)),
    # a radius scale that also scales the step (the authors' rule) and gains at their own LR
    "MuonMD_radius": ("MuonMD", dict(lr=0.02, radius_scale=0.5, gains_lr=0.005)),
    "MuonMD_rows": ("MuonMD", dict(lr=0.02, sphere="rows", scale="none")),  # the authors' MoE-router rule
    "SFNorMuon": ("SFNorMuon", dict(lr=0.01, weight_decay=0.05)),
}
NS_METHODS = {"Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon"}
MD_METHODS = {"AdamMD", "MuonMD"}

EXPERT_LAYOUTS = ["stacked", "stacked_tp0", "stacked_tp1", "concat0", "concat0_tp1", "concat1",
                  "concat1_tp0"]
LAYOUTS = {
    2: ["tp0", "tp1", "tp1_sizes", "flat", "flat_one", "flat_empty", "flat_self", "tp0_flat_self", "qkv",
        "qkv_flat", "fc1", "fc1_flat",
        *EXPERT_LAYOUTS],
    4: ["tp0", "tp1", "tp1_sizes", "flat", "flat2", "tp0_flat", "tp1_flat", "flat_self", "qkv", "qkv_flat",
        "fc1_flat",
        *EXPERT_LAYOUTS],
}
#: ZeRO-1 boundaries of the (TP-local) fused tensor: world -> per TP rank, the dp ranks' bounds.
#: QKV (2 groups × [4 q, 1 k, 1 v heads] × head_dim 3, d_in 10): w=2 360 elements, no TP — 125 is
#: mid-row in group 0's K, rank 0 holds no V; w=4 180 per TP shard — 137 mid-row in K, and the second
#: TP shard's dp rank 1 is empty. fc1 (ffn 7, or 8 at TP=2; d_in 5): mid-row cuts, an empty range.
BLOCK_BOUNDS = {
    ("qkv_flat", 2): [[0, 125, 360]], ("qkv_flat", 4): [[0, 137, 180], [0, 180, 180]],
    ("fc1_flat", 2): [[0, 33, 70]], ("fc1_flat", 4): [[0, 22, 40], [0, 0, 40]],
}
# explicit per-rank boundaries of the 130 elements of a 13×10 matrix (row length 10)
FLAT_BOUNDS = {
    (2, "flat"): [0, 57, 130],            # mid-row split
    (2, "flat_one"): [0, 1, 130],         # rank 0 holds one element
    (2, "flat_empty"): [0, 130, 130],     # rank 1 is empty (at the very end)
    (4, "flat"): [0, 23, 23, 24, 130],    # rank 1 empty, rank 2 one element mid-row
    (4, "flat2"): [0, 63, 67, 129, 130],  # rank 1 inside one row, rank 3 the last element
}
TP_SIZES = {2: [9, 4], 4: [5, 1, 4, 3]}   # explicit uneven split of 13 columns ("tp1_sizes")
NAN_LAYOUT = {2: "tp1", 4: "tp0_flat"}    # where one rank's NaN must make every rank skip

METER_CHECKS = ["meter-RMNP-tp0-zero", "meter-RMNP-tp1-allreduce", "meter-Muon-owner-even",
                "meter-Muon-owner-uneven", "meter-Muon-gather-even"]
ERROR_CHECKS = ["error-flat-overlapping-ranges", "error-flat-ranges-short", "error-tp-sizes-vs-group",
                "error-local-shape-all-ranks", "error-tp-shapes-disagree", "error-local-shape-one-rank"]


def reference_checks(world: int) -> list[str]:
    return [f"{opt}-{lay}" for lay in LAYOUTS[world] for opt in OPTIMIZERS]


def nan_checks(world: int) -> list[str]:
    return [f"nan-{opt}-{NAN_LAYOUT[world]}" for opt in OPTIMIZERS]


# =============================================================================== rank side
def _seed(name: str, world: int) -> int:
    return zlib.crc32(f"{name}/w{world}".encode())


class _Env:
    """Process groups (created on every rank in the same order) and this rank's coordinates."""

    def __init__(self, ctx):
        import torch.distributed as dist

        self.rank, self.world = ctx.rank, ctx.world_size
        self.groups = {"world": dist.group.WORLD}
        # a group of this rank alone (every rank creates every one, in the same order)
        self.groups["self"] = [dist.new_group([r]) for r in range(self.world)][self.rank]
        if self.world == 4:
            tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            self.groups["tp"], self.groups["dp"] = tp[self.rank // 2], dp[self.rank % 2]
        else:
            self.groups["tp"] = self.groups["world"]
            self.groups["dp"] = None
        self.tp_size = 2
        self.tp_rank = self.rank % 2
        self.dp_size = self.world // 2
        self.dp_rank = self.rank // 2

    def coords(self, key):
        """(size, rank) of this rank in group ``key``."""
        if key == "world":
            return self.world, self.rank
        if key == "tp":
            return self.tp_size, self.tp_rank
        if key == "self":
            return 1, 0
        return self.dp_size, self.dp_rank


# --- plain shard descriptors: ("whole", shape) | ("tp", shape, dim, group, sizes) |
#     ("flat", start, end, group, inner) — the test's own model of each layout
def _tp_sizes(env, desc):
    import torch

    _, shape, dim, key, sizes = desc
    w, _ = env.coords(key)
    if sizes is None:  # torch.tensor_split: earlier ranks get one more when it does not divide
        sizes = [len(c) for c in torch.arange(shape[dim]).tensor_split(w)]
    return sizes


def _make_shard(env, desc):
    from megatron_md.shard import FlatRange, TensorParallel, Whole

    if desc[0] == "whole":
        return Whole(desc[1])
    if desc[0] == "tp":
        _, shape, dim, key, sizes = desc
        return TensorParallel(shape, dim, env.groups[key], sizes=sizes)
    _, start, end, key, inner = desc
    return FlatRange(start, end, env.groups[key], _make_shard(env, inner))


def _piece(env, desc, full):
    """This rank's local piece of the logical matrix ``full`` under ``desc``."""
    if desc[0] == "whole":
        return full
    if desc[0] == "tp":
        sizes = _tp_sizes(env, desc)
        r = env.coords(desc[3])[1]
        return full.narrow(desc[2], sum(sizes[:r]), sizes[r])
    _, start, end, _, inner = desc
    return _piece(env, inner, full).reshape(-1)[start:end]


def _local_shape(env, desc):
    if desc[0] == "whole":
        return tuple(desc[1])
    if desc[0] == "tp":
        shape = list(desc[1])
        shape[desc[2]] = _tp_sizes(env, desc)[env.coords(desc[3])[1]]
        return tuple(shape)
    return (desc[2] - desc[1],)


def _ranges(env, desc):
    """(row_range, col_range) of the logical matrix that this rank's gains vectors cover."""
    if desc[0] == "whole":
        return (0, desc[1][0]), (0, desc[1][1])
    if desc[0] == "tp":
        _, shape, dim, key, _ = desc
        sizes = _tp_sizes(env, desc)
        r = env.coords(key)[1]
        own = (sum(sizes[:r]), sum(sizes[: r + 1]))
        return (own, (0, shape[1])) if dim == 0 else ((0, shape[0]), own)
    _, start, end, _, inner = desc
    (ir0, _), cols = _ranges(env, inner)
    m, n = _local_shape(env, inner)
    r0, r1 = (start // n, (end - 1) // n + 1) if end > start else (min(start // n, m),) * 2
    return (ir0 + r0, ir0 + r1), cols


class _Case:
    """One layout on this rank: the product layout, the global logical shapes, which of them
    are local (in block order), their shard descriptors and how to build the local tensor."""

    def __init__(self, layout, shapes, local_ids, descs, assemble):
        self.layout, self.shapes, self.local_ids = layout, shapes, local_ids
        self.descs, self.assemble = descs, assemble


def _plain_case(env, desc, shape):
    return _Case(_make_shard(env, desc), [shape], [0], [desc],
                 lambda fulls: _piece(env, desc, fulls[0]).clone().contiguous())


def _flat_desc(env, bounds, key, inner):
    r = env.coords(key)[1]
    return ("flat", bounds[r], bounds[r + 1], key, inner)


def _flat_block_case(env, name, blocks, shapes, inners, fused):
    """ZeRO-1 flat range of a tensor of row blocks: this rank's ``[s, e)`` of the flattened
    (TP-local) tensor that ``fused`` builds from the logical matrices; each block's own flat range
    counted here from a block-id map of the fused tensor (not with the product's segment code)."""
    import torch

    from megatron_md.shard import flat_blocks

    tp_r = env.tp_rank if env.world == 4 else 0
    bounds = BLOCK_BOUNDS[(name, env.world)][tp_r]
    key = "dp" if env.world == 4 else "world"
    r = env.coords(key)[1]
    s, e = bounds[r], bounds[r + 1]
    ids = fused([torch.full(sh, float(b)) for b, sh in enumerate(shapes)]).reshape(-1)
    descs = [("flat", int((ids[:s] == b).sum()), int((ids[:e] == b).sum()), key, inner)
             for b, inner in enumerate(inners)]
    layout = flat_blocks(blocks, s, e, env.groups[key])
    return _Case(layout, shapes, list(range(len(shapes))), descs,
                 lambda fulls: fused(fulls).reshape(-1)[s:e].clone())


def _build_case(env, name):
    import torch

    from megatron_md.shard import concatenated_experts, fused_qkv, stacked_experts, swiglu_fc1

    w = env.world
    if name == "tp0":
        return _plain_case(env, ("tp", (13, 10), 0, "world", None), (13, 10))
    if name == "tp1":
        return _plain_case(env, ("tp", (10, 13), 1, "world", None), (10, 13))
    if name == "tp1_sizes":
        return _plain_case(env, ("tp", (10, 13), 1, "world", TP_SIZES[w]), (10, 13))
    if (w, name) in FLAT_BOUNDS:
        desc = _flat_desc(env, FLAT_BOUNDS[(w, name)], "world", ("whole", (13, 10)))
        return _plain_case(env, desc, (13, 10))
    if name == "flat_self":  # ZeRO-1 at DP=1: one rank's range is the whole matrix
        return _plain_case(env, ("flat", 0, 130, "self", ("whole", (13, 10))), (13, 10))
    if name == "tp0_flat_self":  # the same of a TP shard (7 or 6 rows of 10)
        inner = ("tp", (13, 10), 0, "world", None)
        n = _local_shape(env, inner)[0] * 10
        return _plain_case(env, ("flat", 0, n, "self", inner), (13, 10))
    if name in ("tp0_flat", "tp1_flat"):
        dim = int(name[2])
        shape = (13, 10) if dim == 0 else (10, 13)
        inner = ("tp", shape, dim, "tp", None)
        # per TP rank: 70 / 60 local elements, split over the 2 dp ranks
        bounds = {("tp0_flat", 0): [0, 33, 70], ("tp0_flat", 1): [0, 1, 60],
                  ("tp1_flat", 0): [0, 0, 70], ("tp1_flat", 1): [0, 45, 60]}[(name, env.tp_rank)]
        return _plain_case(env, _flat_desc(env, bounds, "dp", inner), shape)
    if name == "qkv":
        groups, heads, hd, d_in = 2, 4, 3, 10  # 8 query heads in 2 query groups (GQA)
        blocks = fused_qkv(num_query_groups=groups, heads_per_group=heads, head_dim=hd, d_in=d_in,
                           tp_group=env.groups["tp"], tp_size=env.tp_size)
        shapes = [(groups * heads * hd, d_in), (groups * hd, d_in), (groups * hd, d_in)]
        descs = [("tp", s, 0, "tp", None) for s in shapes]

        def assemble(fulls):  # Megatron's layout: per query group [q_0 … q_{h-1}, k, v]
            q, k, v = fulls
            rows = [torch.cat([q[g * heads * hd:(g + 1) * heads * hd], k[g * hd:(g + 1) * hd],
                               v[g * hd:(g + 1) * hd]]) for g in range(groups)]
            return torch.cat(rows).tensor_split(env.tp_size)[env.tp_rank].clone()

        return _Case(blocks, shapes, [0, 1, 2], descs, assemble)
    if name == "qkv_flat":  # per-block ZeRO-1 of the fused QKV above (w=2: without TP)
        groups, heads, hd, d_in = 2, 4, 3, 10
        tp_kw = dict(tp_group=env.groups["tp"], tp_size=2) if w == 4 else {}
        shapes = [(groups * heads * hd, d_in), (groups * hd, d_in), (groups * hd, d_in)]

        def fused(fulls):
            q, k, v = fulls
            rows = [torch.cat([q[g * heads * hd:(g + 1) * heads * hd], k[g * hd:(g + 1) * hd],
                               v[g * hd:(g + 1) * hd]]) for g in range(groups)]
            out = torch.cat(rows)
            return out.tensor_split(2)[env.tp_rank] if w == 4 else out
        blocks = fused_qkv(num_query_groups=groups, heads_per_group=heads, head_dim=hd, d_in=d_in, **tp_kw)
        inners = [("tp", s, 0, "tp", None) if w == 4 else ("whole", s) for s in shapes]
        return _flat_block_case(env, name, blocks, shapes, inners, fused)
    if name in ("fc1", "fc1_flat"):  # SwiGLU fc1: [gate; up] per TP rank (fc1_flat, w=2: without TP)
        tp = name == "fc1" or w == 4
        ffn, d_in = (8, 5) if tp else (7, 5)
        key = "world" if name == "fc1" else "tp"
        tp_kw = dict(tp_group=env.groups[key], tp_size=2) if tp else {}
        blocks = swiglu_fc1(ffn, d_in, **tp_kw)
        shapes = [(ffn, d_in), (ffn, d_in)]
        r = env.coords(key)[1]

        def fused(fulls):
            return torch.cat([f.tensor_split(2)[r] for f in fulls]) if tp else torch.cat(fulls)
        inners = [("tp", s, 0, key, None) if tp else ("whole", s) for s in shapes]
        if name == "fc1":
            return _Case(blocks, shapes, [0, 1], inners, lambda fulls: fused(fulls).clone())
        return _flat_block_case(env, name, blocks, shapes, inners, fused)
    # experts: 2 local experts of 7×5; without TP expert-parallel over the world, with TP
    # (over "tp") expert-parallel over "dp"
    kind, _, tp = name.partition("_")
    e_loc, d_out, d_in = 2, 7, 5
    if tp:
        tp_dim = int(tp[2])
        sub = ("tp", (d_out, d_in), tp_dim, "tp", None)
        ep_size, ep_rank = env.dp_size, env.dp_rank
        tp_kw = dict(tp_group=env.groups["tp"], tp_dim=tp_dim)
    else:
        sub = ("whole", (d_out, d_in))
        ep_size, ep_rank = w, env.rank
        tp_kw = {}
    shapes = [(d_out, d_in)] * (e_loc * ep_size)
    local_ids = list(range(ep_rank * e_loc, (ep_rank + 1) * e_loc))
    if kind == "stacked":
        blocks = stacked_experts(e_loc, d_out, d_in, **tp_kw)
        join = lambda ps: torch.stack(ps)  # noqa: E731
    else:
        dim = int(kind[-1])
        blocks = concatenated_experts(e_loc, d_out, d_in, dim, **tp_kw)
        join = lambda ps: torch.cat(ps, dim=dim)  # noqa: E731
    return _Case(blocks, shapes, local_ids, [sub] * e_loc,
                 lambda fulls: join([_piece(env, sub, f) for f in fulls]).clone().contiguous())


class _Mismatches:
    """Collects comparison failures instead of raising at once: a rank that left the check
    early would leave its peers blocked in the next collective (and the harness would abort
    the whole group); every rank finishes the check's steps, then raises the first failures."""

    def __init__(self):
        self.errors: list[str] = []

    def close(self, actual, expected, what):
        import torch

        # fast path (the same criterion as assert_close); assert_close only to explain a failure
        if actual.shape == expected.shape and actual.dtype == expected.dtype and \
                bool(((actual - expected).abs() <= 1e-6 + 1e-5 * expected.abs()).all()):
            return
        try:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        except AssertionError as e:
            self.errors.append(f"{what}: {e}")

    def check(self, ok: bool, what: str):
        if not ok:
            self.errors.append(what)

    def raise_if_any(self):
        if self.errors:
            more = f"\n(+{len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
            raise AssertionError("\n\n".join(self.errors[:3]) + more)


def _data(seed, case, steps):
    """Global initial matrices and per-step global gradients (identical on every rank)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    W0 = [torch.randn(s, generator=g) * 0.5 for s in case.shapes]
    grads = [[torch.randn(s, generator=g) for s in case.shapes] for _ in range(steps)]
    pick = lambda mats: [mats[i] for i in case.local_ids]  # noqa: E731
    return pick(W0), [pick(gs) for gs in grads]


def _new_opt(opt_name, params, layout, mode=None, **extra):
    import torch

    from megatron_md import optim

    cls_name, kw = OPTIMIZERS[opt_name]
    kw = dict(kw, **extra)
    if cls_name in NS_METHODS:
        kw.update(ns_dtype=torch.float32, ns_mode=mode or "owner")
    return getattr(optim, cls_name)(params, shards={params[0]: layout}, **kw)


def _new_ref(opt_name, mats, case=None):
    import torch

    from megatron_md.optim import reference as ref

    cls_name, kw = OPTIMIZERS[opt_name]
    if cls_name in NS_METHODS:
        kw = dict(kw, ns_dtype=torch.float32)
    if cls_name in MD_METHODS and getattr(getattr(case, "layout", None), "same_columns", False):
        kw = dict(kw, col_groups=[list(range(len(mats)))])  # Q, K, V share one column gain (the default)
    return getattr(ref, cls_name)(mats, **kw)


def _compare(env, opt_name, case, opt, p, oracle, when, mm):
    mm.close(p.detach(), case.assemble(oracle.params), f"{when}: params")
    if OPTIMIZERS[opt_name][0] in MD_METHODS:
        for k, desc in enumerate(case.descs):
            (r0, r1), (c0, c1) = _ranges(env, desc)
            s_r, s_c = opt.gains(p, k)
            ref_r, ref_c = oracle.gains(k)
            mm.close(s_r, ref_r[r0:r1], f"{when}: row gains of block {k}")
            mm.close(s_c, ref_c[c0:c1], f"{when}: col gains of block {k}")


def _check_reference(env, opt_name, layout_name):
    import torch
    from torch import nn

    case = _build_case(env, layout_name)
    W0, grads = _data(_seed(f"{opt_name}-{layout_name}", env.world), case, STEPS)
    modes = ("owner", "gather") if OPTIMIZERS[opt_name][0] in NS_METHODS else (None,)
    params = {m: nn.Parameter(case.assemble(W0)) for m in modes}
    opts = {m: _new_opt(opt_name, [params[m]], case.layout, m) for m in modes}
    oracle = _new_ref(opt_name, W0, case)
    mm = _Mismatches()
    for m in modes:
        _compare(env, opt_name, case, opts[m], params[m], oracle, f"after construction (ns_mode={m})", mm)
    for t in range(STEPS):
        for m in modes:
            params[m].grad = case.assemble(grads[t])
            opts[m].step()
        oracle.step(grads[t])
        for m in modes:
            _compare(env, opt_name, case, opts[m], params[m], oracle, f"step {t + 1} (ns_mode={m})", mm)
        if len(modes) == 2:
            mm.close(params["owner"].detach(), params["gather"].detach(), f"step {t + 1}: owner vs gather")
    for m in modes:
        mm.check(opts[m].skipped_steps == 0, f"ns_mode={m}: skipped_steps={opts[m].skipped_steps}")
    mm.raise_if_any()


def _check_nan(env, opt_name, layout_name):
    """A NaN in one rank's shard: every rank skips (bit-identical params, skipped_steps == 1);
    the finite steps before and after still match the reference (the skip changed no state)."""
    import torch
    from torch import nn

    case = _build_case(env, layout_name)
    W0, grads = _data(_seed(f"nan-{opt_name}-{layout_name}", env.world), case, 4)
    p = nn.Parameter(case.assemble(W0))
    opt = _new_opt(opt_name, [p], case.layout)
    oracle = _new_ref(opt_name, W0, case)
    # the last rank whose shard is not empty gets the NaN
    sizes = torch.tensor([float(p.numel())])
    import torch.distributed as dist

    all_sizes = [torch.zeros(1) for _ in range(env.world)]
    dist.all_gather(all_sizes, sizes)
    nan_rank = max(r for r, s in enumerate(all_sizes) if s.item() > 0)
    mm = _Mismatches()
    for t in range(4):
        g = case.assemble(grads[t])
        if t == 1 and env.rank == nan_rank:
            g.view(-1)[g.numel() // 2] = float("nan")
        before = p.detach().clone()
        p.grad = g
        opt.step()
        if t == 1:
            mm.check(opt.skipped_steps == 1, f"rank {env.rank}: skipped_steps={opt.skipped_steps} "
                                              f"after a NaN on rank {nan_rank}")
            mm.check(torch.equal(p.detach(), before), f"rank {env.rank} changed its params on a skipped "
                                                      f"step")
        else:
            oracle.step(grads[t])
            _compare(env, opt_name, case, opt, p, oracle, f"step {t + 1}", mm)
    mm.check(opt.skipped_steps == 1, f"skipped_steps={opt.skipped_steps} at the end")
    mm.raise_if_any()


def _group_sum(x):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)  # not through megatron_md.shard.comm: not metered
    return int(t.item())


def _metered_steps(env, opt_name, desc, shape, mode=None, steps=3):
    """Run ``steps`` steps of ``opt_name`` on a plain layout; return the meter for its tag."""
    from torch import nn

    from megatron_md.shard import METER

    case = _plain_case(env, desc, shape)
    W0, grads = _data(_seed(f"meter-{opt_name}", env.world), case, steps)
    p = nn.Parameter(case.assemble(W0))
    opt = _new_opt(opt_name, [p], case.layout, mode)
    METER.reset()
    for t in range(steps):
        p.grad = case.assemble(grads[t])
        opt.step()
    return METER, case


def _check_meter(env, name):
    w = env.world
    steps = 3
    if name == "meter-RMNP-tp0-zero":
        desc = ("tp", (13, 10), 0, "world", None)
        meter, _ = _metered_steps(env, "RMNP", desc, (13, 10), steps=steps)
        assert meter.total("RMNP") == (0, 0), meter.table()
        # the only traffic is the non-finite agreement: one 4-byte flag all-reduce per step
        flag = round(2 * (w - 1) / w * 4) * steps
        assert meter.table() == [("untagged", "all_reduce", steps, flag, flag)], meter.table()
    elif name == "meter-RMNP-tp1-allreduce":
        d_out = 10
        desc = ("tp", (d_out, 13), 1, "world", None)
        meter, _ = _metered_steps(env, "RMNP", desc, (d_out, 13), steps=steps)
        per_step = round(2 * (w - 1) / w * 4 * d_out)
        rows = [r for r in meter.table() if r[0] == "RMNP"]
        assert rows == [("RMNP", "all_reduce", steps, per_step * steps, per_step * steps)], meter.table()
    elif name in ("meter-Muon-owner-even", "meter-Muon-owner-uneven"):
        shape = (13, 10) if "uneven" in name else (12, 8)
        n_bytes = shape[0] * shape[1] * 4
        meter, _ = _metered_steps(env, "Muon", ("tp", shape, 0, "world", None), shape, "owner", steps)
        sent, received = meter.total("Muon")
        g_sent, g_recv = _group_sum(sent), _group_sum(received)  # every rank, before any assert
        kinds = {r[1] for r in meter.table() if r[0] == "Muon"}
        assert kinds == {"gather", "scatter"}, meter.table()
        assert g_sent == g_recv, (g_sent, g_recv)
        assert g_sent <= 2 * n_bytes * steps, (g_sent, n_bytes, meter.table())
        if "uneven" not in name:  # even pieces: exactly 2 (w−1)/w × the matrix per step
            assert g_sent == round(2 * (w - 1) / w * n_bytes) * steps, (g_sent, n_bytes)
    elif name == "meter-Muon-gather-even":
        shape = (12, 8)
        n_bytes = shape[0] * shape[1] * 4
        meter, _ = _metered_steps(env, "Muon", ("tp", shape, 0, "world", None), shape, "gather", steps)
        rows = [r for r in meter.table() if r[0] == "Muon"]
        g_recv = _group_sum(meter.total("Muon")[1])  # every rank, before any assert
        piece = n_bytes // w
        # every rank receives the (w−1) other pieces: (w−1)× its piece per rank and step,
        # (w−1)× the matrix across the group
        per_rank = (w - 1) * piece * steps
        assert rows == [("Muon", "all_gather", steps, per_rank, per_rank)], rows
        assert g_recv == (w - 1) * n_bytes * steps, (g_recv, n_bytes)
    else:  # pragma: no cover
        raise AssertionError(name)


def _expect_value_error(fn, match) -> str | None:
    """None if ``fn()`` raises a ValueError matching ``match``, else what went wrong."""
    import re

    try:
        fn()
    except ValueError as e:
        return None if re.search(match, str(e)) else f"ValueError {e!r} does not match {match!r}"
    return f"no ValueError (expected one matching {match!r})"


def _group_alive(env):
    """The gloo group is still usable and its collectives still pair up after the error."""
    assert _group_sum(env.rank + 1) == env.world * (env.world + 1) // 2


def _check_error(env, name):
    import torch
    from torch import nn

    from megatron_md import optim
    from megatron_md.shard import FlatRange, TensorParallel, Whole

    w, r = env.world, env.rank
    world = env.groups["world"]

    def muon_on(local_shape, layout):
        p = nn.Parameter(torch.zeros(local_shape))
        return optim.Muon([p], shards={p: layout}, ns_dtype=torch.float32)

    def flat_muon(bounds):  # a FlatRange over Whole 13×10 with this rank's (start, end)
        s, e = bounds[r]
        return muon_on((e - s,), FlatRange(s, e, world, Whole((13, 10))))

    if name == "error-flat-overlapping-ranges":
        bounds = [(0, 60), (50, 130)] if w == 2 else [(0, 30), (30, 60), (55, 100), (100, 130)]
        problem = _expect_value_error(lambda: flat_muon(bounds), "do not tile")
    elif name == "error-flat-ranges-short":
        bounds = [(0, 60), (60, 120)] if w == 2 else [(0, 30), (30, 60), (60, 100), (100, 120)]
        problem = _expect_value_error(lambda: flat_muon(bounds), "end at 120, not 130")
    elif name == "error-tp-sizes-vs-group":
        sizes = [7, 6] if w == 4 else [5, 4, 4]  # a sizes list for a group of another size
        problem = _expect_value_error(lambda: TensorParallel((13, 10), 0, world, sizes=sizes),
                                      "do not split 13")
    elif name in ("error-local-shape-all-ranks", "error-local-shape-one-rank"):
        desc = ("tp", (13, 10), 0, "world", None)
        good = _local_shape(env, desc)
        bad = name.endswith("all-ranks") or r == w - 1
        local = (good[0] + 1, good[1]) if bad else good
        match = "does not match its declared layout" if bad else "another rank"
        problem = _expect_value_error(lambda: muon_on(local, _make_shard(env, desc)), match)
    elif name == "error-tp-shapes-disagree":
        shape = (13, 10) if r != w - 1 else (12, 10)  # the last rank declares another shape
        desc = ("tp", shape, 0, "world", None)
        problem = _expect_value_error(lambda: muon_on(_local_shape(env, desc), _make_shard(env, desc)),
                                      "disagree")
    else:  # pragma: no cover
        raise AssertionError(name)
    _group_alive(env)  # on every rank, also where the expectation failed
    assert problem is None, f"rank {r}: {problem}"


def _rank_main(ctx):
    import torch

    torch.set_num_threads(1)
    env = _Env(ctx)
    for lay in LAYOUTS[env.world]:
        for opt_name in OPTIMIZERS:
            with ctx.check(f"{opt_name}-{lay}", timeout=60):
                _check_reference(env, opt_name, lay)
    for opt_name in OPTIMIZERS:
        with ctx.check(f"nan-{opt_name}-{NAN_LAYOUT[env.world]}", timeout=60):
            _check_nan(env, opt_name, NAN_LAYOUT[env.world])
    for name in METER_CHECKS:
        with ctx.check(name, timeout=60):
            _check_meter(env, name)
    for name in ERROR_CHECKS:
        with ctx.check(name, timeout=60):
            _check_error(env, name)


# ============================================================================== pytest side
# torch.optim.Optimizer's first construction imports torch._dynamo (~5 s on a small CPU): the
# fork server imports it once for both groups instead of every rank importing it again.
_OPTIONS = dict(timeout=600, stuck_grace=10.0, preload=("torch._dynamo",))
group_w2 = group_fixture(2, _rank_main, **_OPTIONS)
group_w4 = group_fixture(4, _rank_main, **_OPTIONS)


def _group(request, world):
    return request.getfixturevalue(f"group_w{world}")


def _params(fn):
    return [pytest.param(w, name, id=f"w{w}-{name}") for w in WORLD_SIZES for name in fn(w)]


@pytest.mark.parametrize("world,check", _params(reference_checks))
def test_matches_reference(request, world, check):
    _group(request, world).assert_ok(check)


@pytest.mark.parametrize("world,check", _params(nan_checks))
def test_nan_on_one_rank_skips_everywhere(request, world, check):
    _group(request, world).assert_ok(check)


@pytest.mark.parametrize("world,check", _params(lambda w: METER_CHECKS))
def test_byte_meter(request, world, check):
    _group(request, world).assert_ok(check)


@pytest.mark.parametrize("world,check", _params(lambda w: ERROR_CHECKS))
def test_construction_errors(request, world, check):
    _group(request, world).assert_ok(check)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_no_errors_outside_checks(request, world):
    res = _group(request, world)
    assert not res.errors, res.summary()
    print(res.summary())
