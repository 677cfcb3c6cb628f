"""Split ("distributed Gram") Newton–Schulz on 4 gloo ranks (pairs {0,1},{2,3} and the world).

* ``math-<k>``: :func:`split_newton_schulz` over a group of k = 2 and 4 ranks, each holding a block
  of the long side, equals single-process ``newton_schulz`` of the whole matrix (≤1e-5 relative,
  fp32) for tall (rows split) and wide (columns split) matrices, uneven and empty blocks, a square
  one, 3-D and 4-D batches; bf16 within bf16's NS noise; ``group=None`` is the one-block path.
* ``meter``: the bytes the meter records for one split call equal the documented formula exactly:
  ``round(2(k−1)/k · 4b) + steps · round(2(k−1)/k · b m² e)`` sent and received, ``steps + 1`` calls.
* ``owner-split``: owner mode with ``split=True`` on TP {0,1},{2,3} × DP {0,2},{1,3}: large matrices
  split along their long side (TP-only and ZeRO-1 flat ranges over TP) and one split along the short
  side (not splittable) among small ones: ≤1e-5 of ``split=False``; every matrix that was not split
  bitwise unchanged (``batch=False``); pipelined and unpipelined agree bitwise; in bf16 within bf16's NS
  noise of the fp32 result; the all-reduce bytes equal the formula for the team batch.
* ``owner-nosplit``: when nothing is worth splitting (comparable matrices), ``split=True`` is bitwise
  ``split=False``, with the same meter table.
"""
from __future__ import annotations

import pytest

from megatron_md.testing.spawn import group_fixture

pytestmark = pytest.mark.distributed


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ar_bytes(k, b, m, es, steps):
    """Bytes sent (= received) per member by one split call: the fp32 norm, then one Gram per step."""
    f = 2 * (k - 1) / k
    return int(round(f * 4 * b)) + steps * int(round(f * b * m * m * es))


def _blocks(full, sizes, dim, r):
    import torch
    return torch.split(full, sizes, dim=dim)[r]


def _check_math(group, k, r):
    import torch

    from megatron_md.ops import newton_schulz, resolve_coefficients
    from megatron_md.shard.orthogonalize import split_newton_schulz

    coeffs = resolve_coefficients("jordan", None)
    g = torch.Generator().manual_seed(5)
    even = lambda n: [len(c) for c in torch.arange(n).tensor_split(k)]  # noqa: E731
    cases = [  # (full shape, split dim, block sizes)
        ((37, 9), -2, even(37)),                                    # tall, uneven blocks
        ((9, 37), -1, even(37)),                                    # wide, uneven blocks
        ((12, 12), -1, even(12)),                                   # square, columns split
        ((10, 10), -2, even(10)),                                   # square, rows split (transposed)
        ((6, 20), -1, [0, 20] if k == 2 else [0, 11, 0, 9]),        # empty blocks
        ((3, 7, 29), -1, even(29)),                                 # batched
        ((2, 2, 30, 6), -2, even(30)),                              # 4-D batch, tall
    ]
    for shape, sd, sizes in cases:
        full = torch.randn(*shape, generator=g)
        ref = newton_schulz(full, coeffs)
        got = split_newton_schulz(_blocks(full, sizes, sd, r).contiguous(), group, split_dim=sd,
                                  coefficients=coeffs)
        want = _blocks(ref, sizes, sd, r)
        assert got.shape == want.shape and got.dtype == full.dtype, (shape, got.shape)
        if want.numel():
            assert _rel(got, want) <= 1e-5, (shape, k, _rel(got, want))
        # bf16: the Gram is summed in bf16 — within bf16's own NS error of the fp32 result
        got16 = split_newton_schulz(_blocks(full, sizes, sd, r).contiguous(), group, split_dim=sd,
                                    coefficients=coeffs, dtype=torch.bfloat16)
        if want.numel():
            ref16 = _blocks(newton_schulz(full, coeffs, dtype=torch.bfloat16), sizes, sd, r)
            assert _rel(got16, want) <= 2 * _rel(ref16, want) + 2e-2, (shape, _rel(got16, want), _rel(ref16, want))
    # no group: the one-block path is the ordinary NS (to the norm's rounding)
    full = torch.randn(9, 21, generator=g)
    one = split_newton_schulz(full, None, split_dim=-1, coefficients=coeffs)
    assert _rel(one, newton_schulz(full, coeffs)) <= 1e-6


def _check_meter(group, k, r):
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import METER, metered
    from megatron_md.shard.orthogonalize import split_newton_schulz

    coeffs = resolve_coefficients("quintic", 3)
    for dt, es in ((torch.float32, 4), (torch.bfloat16, 2)):
        for shape, sd, m, b in (((13, 5), -2, 5, 1), ((3, 7, 10), -1, 7, 3)):
            METER.reset()
            x = torch.randn(*shape)
            with metered("split"):
                split_newton_schulz(x, group, split_dim=sd, coefficients=coeffs, dtype=dt)
            rows = METER.table()
            want = _ar_bytes(k, b, m, es, len(coeffs))
            assert rows == [("split", "all_reduce", len(coeffs) + 1, want, want)], (rows, want)


def _groups(rank):
    import torch.distributed as dist

    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return tp[rank // 2], dp[rank % 2], rank % 2, rank // 2


def _owner_items(env, seed, big):
    """[(layout, local piece)] and the indices of the matrices expected to be split."""
    import torch

    from megatron_md.shard import FlatRange, TensorParallel, Whole

    tp, dp, tp_rank, dp_rank = env
    g = torch.Generator().manual_seed(seed)
    items, splittable = [], []

    def tp_item(shape, dim, may_split):
        w = torch.randn(*shape, generator=g)
        if may_split:
            splittable.append(len(items))
        items.append((TensorParallel(shape, dim, tp), torch.tensor_split(w, 2, dim=dim)[tp_rank].contiguous()))

    def zero_item(shape, dim, cut, may_split):   # ZeRO-1 flat range over dp of a TP shard
        w = torch.randn(*shape, generator=g)
        loc = torch.tensor_split(w, 2, dim=dim)[tp_rank].reshape(-1)
        b = [0, cut, loc.numel()]
        if may_split:
            splittable.append(len(items))
        items.append((FlatRange(b[dp_rank], b[dp_rank + 1], dp, TensorParallel(shape, dim, tp)),
                      loc[b[dp_rank]:b[dp_rank + 1]].clone()))

    tp_item((6, 4), 0, False)
    if big:
        # the TP groups' loads: (64, 12) dominates (split: 109 k FLOPs per member instead of 202 k);
        # ZeRO-1: (12, 64) (short side split, never a team) goes to DP rank 0, (9, 66) and (6, 10) to
        # DP rank 1, whose TP group {2, 3} splits (9, 66) (61 k + 9 k < 114 k)
        tp_item((64, 12), 0, True)      # column-parallel, long side split
        zero_item((12, 64), 0, 300, False)
        zero_item((9, 66), 1, 100, True)     # row-parallel, long side split
    else:
        tp_item((8, 6), 0, False)       # comparable costs: none above the group's mean load
    tp_item((5, 9), 1, False)
    items.append((Whole((5, 4)), torch.randn(5, 4, generator=g)))
    zero_item((6, 10), 0, 0, False)     # dp rank 0 holds nothing
    for lay, _ in items:
        lay.validate()
    return items, splittable


def _check_owner_split(env):
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import METER
    from megatron_md.shard.orthogonalize import orthogonalize

    items, splittable = _owner_items(env, 3, big=True)
    coeffs = resolve_coefficients("jordan", None)
    out = {}
    for split in (False, True):
        for batch in (False, True):
            for overlap in (False, True):
                METER.reset()
                out[split, batch, overlap] = orthogonalize(items, coefficients=coeffs, mode="owner",
                                                           batch=batch, overlap=overlap, split=split)
                ar = [r for r in METER.table() if r[1] == "all_reduce"]
                assert bool(ar) == split, (split, ar)
    for key, got in out.items():
        for k, (a, b) in enumerate(zip(got, out[False, False, False])):
            assert a.shape == b.shape and a.dtype == b.dtype, (key, k)
            if b.numel():
                assert _rel(a, b) <= 1e-5, (key, k, _rel(a, b))
    differ = set()
    for batch in (False, True):
        for k, (a, b) in enumerate(zip(out[True, batch, False], out[True, batch, True])):
            assert torch.equal(a, b), ("pipelined", batch, k)
    for k, (a, b) in enumerate(zip(out[True, False, False], out[False, False, False])):
        if not torch.equal(a, b):
            differ.add(k)
    # only matrices that may be split differ; the others are bitwise those of the owner path
    assert differ and differ <= set(splittable), (differ, splittable)
    # bf16: the split result is within bf16's own NS noise of the owner result (same tolerance as math-k)
    ref32 = out[False, False, False]
    own16 = orthogonalize(items, coefficients=coeffs, dtype=torch.bfloat16, mode="owner", split=False)
    got16 = orthogonalize(items, coefficients=coeffs, dtype=torch.bfloat16, mode="owner", split=True)
    for k, (a, b, r) in enumerate(zip(got16, own16, ref32)):
        if r.numel():
            assert _rel(a, r) <= 2 * _rel(b, r) + 2e-2, (k, _rel(a, r), _rel(b, r))
    # every rank takes part in the TP-only team of (64, 12) (each DP replica's TP group runs its
    # own); the ZeRO-1 team of (9, 66) runs on its DP owner's TP group only
    METER.reset()
    orthogonalize(items, coefficients=coeffs, mode="owner", split=True)
    ar = [r for r in METER.table() if r[1] == "all_reduce"]
    steps = len(coeffs)
    base = _ar_bytes(2, 1, 12, 4, steps)
    with_zero = base + _ar_bytes(2, 1, 9, 4, steps)
    calls = sum(r[2] for r in ar)
    sent = sum(r[3] for r in ar)
    assert sum(r[4] for r in ar) == sent, ar
    assert (calls, sent) in ((steps + 1, base), (2 * (steps + 1), with_zero)), (calls, sent, base, with_zero)
    return calls == 2 * (steps + 1)


def _check_owner_nosplit(env):
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import METER
    from megatron_md.shard.orthogonalize import orthogonalize

    items, _ = _owner_items(env, 4, big=False)
    coeffs = resolve_coefficients("jordan", None)
    for overlap in (False, True):
        got, tables = {}, {}
        for split in (False, True):
            METER.reset()
            got[split] = orthogonalize(items, coefficients=coeffs, mode="owner", overlap=overlap, split=split)
            tables[split] = METER.table()
        assert tables[False] == tables[True], tables
        for k, (a, b) in enumerate(zip(got[True], got[False])):
            assert torch.equal(a, b), (overlap, k)


def _rank_main(ctx):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    world = dist.new_group([0, 1, 2, 3])
    env = _groups(ctx.rank)
    with ctx.check("math-2", timeout=60):
        _check_math(pairs[ctx.rank // 2], 2, ctx.rank % 2)
    with ctx.check("math-4", timeout=60):
        _check_math(world, 4, ctx.rank)
    with ctx.check("meter", timeout=60):
        _check_meter(pairs[ctx.rank // 2], 2, ctx.rank % 2)
        _check_meter(world, 4, ctx.rank)
    with ctx.check("owner-split", timeout=120):
        ctx.record("zero-team", _check_owner_split(env))
    with ctx.check("owner-nosplit", timeout=60):
        _check_owner_nosplit(env)


split_w4 = group_fixture(4, _rank_main, timeout=300, stuck_grace=10.0)


@pytest.mark.parametrize("k", [2, 4])
def test_split_ns_equals_whole_matrix_ns(split_w4, k):
    split_w4.assert_ok(f"math-{k}")


def test_split_ns_bytes_equal_formula(split_w4):
    split_w4.assert_ok("meter")


def test_owner_split_close_to_owner_and_others_bitwise(split_w4):
    split_w4.assert_ok("owner-split")
    # the ZeRO-1 team ran on exactly one TP group (2 of the 4 ranks)
    assert sum(bool(v.get("zero-team")) for v in split_w4.values) == 2, split_w4.values


def test_owner_split_without_gain_is_bitwise_off(split_w4):
    split_w4.assert_ok("owner-nosplit")


def test_assign_teams_splits_only_what_lowers_the_busiest_load():
    from megatron_md.shard.orthogonalize import assign_owners, assign_teams

    # one dominating splittable matrix: split (busiest 60 + LPT(10, 10) = 70 < 100)
    assert assign_teams([100, 10, 10], [60, None, None], 2) == [-1, 0, 1]
    # two equal big ones on two ranks: already balanced, nothing split — exactly assign_owners
    costs = [100, 100, 10, 10]
    assert assign_teams(costs, [60, 60, None, None], 2) == assign_owners(costs, 2)
    # not splittable (None) or not cheaper split: the owners
    assert assign_teams([100, 10], [None, None], 2) == assign_owners([100, 10], 2)
    assert assign_teams([100, 10], [100, None], 2) == assign_owners([100, 10], 2)
    # every prefix is tried: one split is worse than none (20 + 90 > 95), both are better (20 + 20 + 5)
    assert assign_teams([90, 90, 5], [20, 20, None], 3) == [-1, -1, 0]
    # the replicated part counts: with 4 ranks no split beats the owners (90 against 50 + 90, 100 + 5)
    assert assign_teams([90, 90, 5], [50, 50, None], 4) == assign_owners([90, 90, 5], 4)
