"""Bucketed reductions on 4 gloo ranks (TP {0,1},{2,3} × DP {0,2},{1,3}).

* ``equal-<optimizer>``: the multi-tensor step with bucketed reductions (``foreach=True``) equals
  the per-matrix step (``foreach=False``, one collective per reduction) for 4 steps, on a mixed
  set of layouts: column- and row-parallel TP, a FlatRange over Whole that is **empty** on one DP
  rank, a FlatRange of a row-parallel TP shard with a one-element piece, an unsharded matrix, a
  fused QKV over TP, and per-block ZeRO-1 flat ranges over DP of a TP-sharded fused QKV (cut mid-row)
  and of a SwiGLU fc1 split into gate and up (empty on one DP rank). The per-matrix path is itself tested against the references in
  test_sharded_optimizers.py.
* ``count-<optimizer>``: the collectives of one step, counted by ``comm.METER``: with bucketing the
  count is the same for 1 and for 3 copies of that set (it no longer grows with the number of
  matrices), while the per-matrix path's count grows — and the bytes moved are the same for both.
* ``ns-transport``: owner-mode Newton–Schulz, whose pieces travel in batched point-to-point
  rounds in the NS dtype, equals gather mode (every rank all-gathers in fp32 and orthogonalizes)
  bitwise in bf16 and in fp32 on the same mixed layouts (one NS call per matrix in both), and
  moves exactly half the bytes in bf16.
* ``ns-overlap``: the pipelined owner round (the last level's transfers in flight while the owners
  orthogonalize, returns posted per batch) equals the unpipelined one bitwise — batched by shape,
  on three copies of the mixed layouts (one- and two-level shards: TP, DP flat ranges, TP × DP) in
  fp32 and bf16 — and the meter records the same bytes and the same number of transfers.
"""
from __future__ import annotations

import pytest

from megatron_md.testing.spawn import group_fixture

pytestmark = pytest.mark.distributed

OPTIMIZERS = {
    "RMNP": dict(lr=0.01, weight_decay=0.1),
    "AdamH": dict(lr=0.05),
    "AdamMD": dict(lr=0.01),
    "NorMuon": dict(lr=0.02, weight_decay=0.1),
    "MuonH": dict(lr=0.05),
    "MuonMD": dict(lr=0.02),
    "SFNorMuon": dict(lr=0.01, weight_decay=0.05),
    "Muon": dict(lr=0.02, weight_decay=0.1),
}
NS = {"Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon"}
#: data-dependency rounds of reductions per step; each costs one all-reduce per process group
#: (here 2 per rank: its TP and its DP group)
ROUNDS = {"RMNP": 1, "AdamH": 2, "AdamMD": 1, "NorMuon": 2, "MuonMD": 1}
COUNTED = tuple(ROUNDS)
STEPS = 4


def _groups(rank):
    import torch.distributed as dist

    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return tp[rank // 2], dp[rank % 2], rank % 2, rank // 2


def _layer(env, seed):
    """[(local weight, layout)] of one set of mixed layouts (pieces of seeded global matrices)."""
    import torch

    from megatron_md.shard import FlatRange, TensorParallel, Whole, flat_blocks, fused_qkv, swiglu_fc1

    tp, dp, tp_rank, dp_rank = env
    g = torch.Generator().manual_seed(seed)
    out = []
    w = torch.randn(12, 6, generator=g)
    out.append((torch.tensor_split(w, 2, dim=0)[tp_rank], TensorParallel((12, 6), 0, tp)))
    w = torch.randn(5, 14, generator=g)
    out.append((torch.tensor_split(w, 2, dim=1)[tp_rank], TensorParallel((5, 14), 1, tp)))
    w = torch.randn(7, 9, generator=g)          # ZeRO over dp: dp rank 1 holds nothing
    bounds = [0, 63, 63]
    s, e = bounds[dp_rank], bounds[dp_rank + 1]
    out.append((w.reshape(-1)[s:e].clone(), FlatRange(s, e, dp, Whole((7, 9)))))
    w = torch.randn(8, 10, generator=g)         # ZeRO over dp of a row-parallel TP shard (8×5)
    loc = torch.tensor_split(w, 2, dim=1)[tp_rank].reshape(-1)
    bounds = [0, 1, 40]                          # dp rank 0: one element
    s, e = bounds[dp_rank], bounds[dp_rank + 1]
    out.append((loc[s:e].clone(), FlatRange(s, e, dp, TensorParallel((8, 10), 1, tp))))
    out.append((torch.randn(6, 4, generator=g), Whole((6, 4))))
    qkv = fused_qkv(num_query_groups=2, heads_per_group=2, head_dim=2, d_in=6, tp_group=tp, tp_size=2)
    out.append((torch.randn(qkv.local_shape, generator=g), qkv))
    for blocks, bounds in ((qkv, [0, 21, 48]), (swiglu_fc1(6, 4, tp_group=tp, tp_size=2), [0, 24, 24])):
        s, e = bounds[dp_rank], bounds[dp_rank + 1]
        out.append((torch.randn(blocks.local_shape, generator=g).reshape(-1)[s:e].clone(),
                    flat_blocks(blocks, s, e, dp)))
    return out


def _build(name, spec, foreach):
    import torch

    from megatron_md import optim

    kw = dict(OPTIMIZERS[name])
    if name in NS:
        kw["ns_dtype"] = torch.float32
    ps = [torch.nn.Parameter(w.clone()) for w, _ in spec]
    opt = getattr(optim, name)(ps, shards={p: lay for p, (_, lay) in zip(ps, spec)}, **kw)
    opt.foreach = foreach
    return opt, ps


def _grads(spec, seed, t):
    import torch

    g = torch.Generator().manual_seed(seed * 100 + t)
    return [torch.randn(w.shape, generator=g) for w, _ in spec]


def _check_equal(env, name, rank):
    import torch

    spec = _layer(env, 7) + _layer(env, 8)
    fast, pf = _build(name, spec, True)
    slow, ps = _build(name, spec, False)
    for t in range(STEPS):
        grads = _grads(spec, rank, t)
        for a, b, gr in zip(pf, ps, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        fast.step()
        slow.step()
        for i, (a, b) in enumerate(zip(pf, ps)):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {t} param {i} ({spec[i][1]!r}): {m}")
    moved = torch.tensor([max(((a.detach() - w).abs().max().item() if w.numel() else 0.0)
                               for a, (w, _) in zip(pf, spec))])
    assert moved.item() > 1e-4


def _count(env, name, layers, foreach, rank):
    from megatron_md.shard import METER

    spec = [x for k in range(layers) for x in _layer(env, 20 + k)]
    opt, ps = _build(name, spec, foreach)
    opt.check_finite = False  # count the optimizer's own collectives only
    for t in range(2):
        for p, gr in zip(ps, _grads(spec, rank, t)):
            p.grad = gr
        METER.reset()
        opt.step()
    rows = [r for r in METER.table() if r[0] == name]
    return sum(r[2] for r in rows), sum(r[3] for r in rows), {r[1]: r[2] for r in rows}


def _check_count(env, name, rank, ctx):
    one = _count(env, name, 1, True, rank)
    three = _count(env, name, 3, True, rank)
    slow1 = _count(env, name, 1, False, rank)
    slow3 = _count(env, name, 3, False, rank)
    ctx.record(f"count-{name}", dict(bucketed=(one[0], three[0]), per_matrix=(slow1[0], slow3[0]),
                                     kinds=three[2], bytes=(three[1], slow3[1])))
    reduce_calls = lambda c: c[2].get("all_reduce", 0)  # noqa: E731 - NS pieces travel point-to-point
    assert reduce_calls(one) == reduce_calls(three) == 2 * ROUNDS[name], (one, three)
    assert reduce_calls(slow3) > reduce_calls(slow1) > reduce_calls(one), (slow1, slow3, one)
    if name not in NS:
        assert one[0] == three[0], (one, three)
        assert abs(three[1] - slow3[1]) <= slow3[0], (three, slow3)  # same bytes (per-call rounding aside)


def _rank_main(ctx):
    import torch

    torch.set_num_threads(1)
    env = _groups(ctx.rank)
    for name in OPTIMIZERS:
        with ctx.check(f"equal-{name}", timeout=60):
            _check_equal(env, name, ctx.rank)
    for name in COUNTED:
        with ctx.check(f"count-{name}", timeout=60):
            _check_count(env, name, ctx.rank, ctx)
    with ctx.check("ns-transport", timeout=60):
        _check_ns_transport(env)
    with ctx.check("ns-overlap", timeout=60):
        _check_ns_overlap(env)


def _ns_items(env, seeds):
    from megatron_md.shard import Blocks
    items = []
    for seed in seeds:
        for x, lay in _layer(env, seed):
            if isinstance(lay, Blocks):
                items += [(v.shard, v.get(x)) for v in lay.views]
            else:
                items.append((lay, x))
    for lay, _ in items:
        lay.validate()  # construction-time metadata exchange: not part of the metered NS traffic
    return items


def _check_ns_overlap(env):
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import METER
    from megatron_md.shard.orthogonalize import orthogonalize

    items = _ns_items(env, (11, 12, 13))
    coeffs = resolve_coefficients("jordan", None)
    for dt in (torch.float32, torch.bfloat16):
        out, meter = {}, {}
        for overlap in (False, True):
            METER.reset()
            out[overlap] = orthogonalize(items, coefficients=coeffs, dtype=dt, mode="owner", overlap=overlap)
            meter[overlap] = METER.table()
        for k, (a, b) in enumerate(zip(out[False], out[True])):
            assert torch.equal(a, b), (dt, k, (a - b).abs().max())
        assert meter[False] == meter[True] and sum(r[3] for r in meter[True]) > 0, meter


def _check_ns_transport(env):
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import METER, Blocks
    from megatron_md.shard.orthogonalize import orthogonalize

    items = []
    for x, lay in _layer(env, 7) + _layer(env, 8):
        if isinstance(lay, Blocks):
            items += [(v.shard, v.get(x)) for v in lay.views]
        else:
            items.append((lay, x))
    coeffs = resolve_coefficients("jordan", None)
    for lay, _ in items:
        lay.validate()  # construction-time metadata exchange: not part of the metered NS traffic
    owner_bytes = {}
    for dt in (torch.bfloat16, torch.float32):
        METER.reset()
        # batch=False: one NS call per matrix in both modes (a batched call may round differently)
        got = orthogonalize(items, coefficients=coeffs, dtype=dt, mode="owner", batch=False)
        owner_bytes[dt] = METER.total()
        ref = orthogonalize(items, coefficients=coeffs, dtype=dt, mode="gather", batch=False)
        for k, (a, b) in enumerate(zip(got, ref)):
            assert a.dtype == b.dtype == items[k][1].dtype and torch.equal(a, b), (dt, k, (a - b).abs().max())
    (s16, r16), (s32, r32) = owner_bytes[torch.bfloat16], owner_bytes[torch.float32]
    assert s32 > 0 and 2 * s16 == s32 and 2 * r16 == r32, owner_bytes


bucketed_w4 = group_fixture(4, _rank_main, timeout=300, stuck_grace=10.0, preload=("torch._dynamo",))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bucketed_equals_per_matrix(bucketed_w4, name):
    bucketed_w4.assert_ok(f"equal-{name}")


def test_owner_ns_transport_in_ns_dtype_equals_gather(bucketed_w4):
    bucketed_w4.assert_ok("ns-transport")


def test_pipelined_owner_ns_is_bitwise_the_unpipelined(bucketed_w4):
    bucketed_w4.assert_ok("ns-overlap")


@pytest.mark.parametrize("name", COUNTED)
def test_collectives_per_step_independent_of_matrix_count(bucketed_w4, name):
    bucketed_w4.assert_ok(f"count-{name}")
    print(name, bucketed_w4.values[0].get(f"count-{name}"))
