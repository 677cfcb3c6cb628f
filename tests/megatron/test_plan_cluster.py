"""The cluster cost model (megatron_md.planning) against real driver runs: exact counts.

Each case runs the real driver (``pretrain`` in-process, test_driver's tiny GPT on its synthetic
data) for 2 iterations and reads ``shard.METER`` at the start of every matrix optimizer's step
(a global ``torch.optim`` step pre-hook): the difference between the first snapshot of iteration
2 and that of iteration 1 is exactly one step's collectives on this rank — every (tag, kind): the
calls, bytes sent and bytes received. ``torch.utils.flop_counter.FlopCounterMode`` counts the
matmul FLOPs inside the matrix optimizers' steps (only Newton–Schulz multiplies matrices there).
The cost model's prediction for the same model, layout and rank must equal both, exactly.

Layouts: TP=2, ZeRO-1 DP=2 (per-block flat ranges of the split QKV; and of SwiGLU's split fc1),
layer-wise DP=2, PP=2, EP=2 ZeRO-1 (experts at expert-DP 1: whole on their rank) (2 ranks);
TP=2 × DP=2 ZeRO-1 and EP=2 × DP=2 ZeRO-1 MoE with ``--no-split-qkv`` (4 ranks; MD's router rule);
TP=2 × DP=2 ZeRO-1 with split Newton–Schulz (``MEGATRON_MD_NS_SPLIT=1``, the model's ``ns_split``) on one
layer with FFN 1024, where each DP owner's TP group splits its fc1 / fc2 (a team: no owner transfers at the
TP level, the Gram all-reduces, half an NS each), and the same under TP=2 × layer-wise DP=2. Newton–Schulz in fp32 (the tests' pinned dtype; bf16 halves the NS bytes).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

#: name: (driver flags, cost-model layout keywords, model overrides, optimizers)
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--disable-bias-linear"]
CASES_W2 = {
    "tp2": (["--tensor-model-parallel-size", "2"], dict(tp=2), {}, ["muon-md", "adamh"]),
    "tp2_gather": (["--tensor-model-parallel-size", "2", "--ns-mode", "gather"], dict(tp=2, ns_mode="gather"), {},
                   ["muon"]),
    "zero1_dp2": (["--use-distributed-optimizer"], dict(dp=2, dp_mode="zero1"), {},
                  ["muon-md", "rmnp"]),
    "layerwise_dp2": (["--dp-mode", "layer-wise"], dict(dp=2, dp_mode="layer-wise"), {}, ["muon"]),
    "pp2": (["--pipeline-model-parallel-size", "2"], dict(pp=2), {}, ["muon-md"]),
    "zero1_dp2_split_fc1": (["--use-distributed-optimizer", "--swiglu", "--split-fc1"],
                            dict(dp=2, dp_mode="zero1", split_fc1=True), dict(swiglu=True), ["muon-md"]),
    # torch FSDP2: every weight's rows over DP=2 (per block for Q, K, V), an untied head
    "fsdp2_dp2": (["--use-torch-fsdp2", "--untie-embeddings-and-output-weights"], dict(dp=2, dp_mode="fsdp"),
                  dict(tied=False), ["muon-md", "rmnp", "normuon"]),
    "ep2_zero1": (MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--no-split-qkv"],
                  dict(dp=2, ep=2, dp_mode="zero1", split_qkv=False), dict(bias=False, num_experts=4, moe_ffn=128,
                                                                         topk=2), ["muon"]),
}
CASES_W4 = {
    "tp2_dp2_zero1": (["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"],
                      dict(tp=2, dp=2, dp_mode="zero1"), {}, ["muon-md"]),
    "ep2_dp2_zero1": (MOE + ["--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--no-split-qkv"],
                      dict(dp=4, ep=2, dp_mode="zero1", split_qkv=False), dict(bias=False, num_experts=4, moe_ffn=128,
                                                                             topk=2),
                      ["muon", "adam-md"]),
    "tp2_dp2_zero1_split": (["--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--num-layers", "1",
                             "--ffn-hidden-size", "1024"],
                            dict(tp=2, dp=2, dp_mode="zero1", ns_split=True), dict(layers=1, ffn=1024),
                            ["muon", "muon-md"]),
    "tp2_layerwise_dp2_split": (["--tensor-model-parallel-size", "2", "--dp-mode", "layer-wise", "--num-layers", "1",
                                 "--ffn-hidden-size", "1024"],
                                dict(tp=2, dp=2, dp_mode="layer-wise", ns_split=True), dict(layers=1, ffn=1024),
                                ["muon"]),
}


def _measure(args):
    """One driver run of 2 iterations: (per-step METER delta, NS FLOPs per step) of this rank."""
    import torch.optim.optimizer as topt
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_md.optim.base import MatrixOptimizer
    from megatron_md.shard import METER
    from megatron_md.training.pretrain import pretrain

    snaps, flops, active = [], [0], []

    def pre(opt, a, k):
        if isinstance(opt, MatrixOptimizer):
            snaps.append({(t, kd): (c, s, r) for t, kd, c, s, r in METER.table()})
            mode = FlopCounterMode(display=False)
            mode.__enter__()
            active.append(mode)

    def post(opt, a, k):
        if isinstance(opt, MatrixOptimizer):
            mode = active.pop()
            mode.__exit__(None, None, None)
            flops[0] += mode.get_total_flops()

    h1, h2 = topt.register_optimizer_step_pre_hook(pre), topt.register_optimizer_step_post_hook(post)
    try:
        METER.reset()
        pretrain(args)
    finally:
        h1.remove()
        h2.remove()
    n = len(snaps) // 2
    assert n and len(snaps) == 2 * n, len(snaps)
    a, b = snaps[0], snaps[n]
    delta = {}
    for key in set(a) | set(b):
        va, vb = a.get(key, (0, 0, 0)), b.get(key, (0, 0, 0))
        d = tuple(y - x for x, y in zip(va, vb))
        if any(d):
            delta[key] = d
    assert flops[0] % 2 == 0, flops
    return delta, flops[0] // 2


def _checks(ctx, cases):
    import os
    from dataclasses import replace

    import torch.distributed as dist

    from megatron_md.planning.cost import Layout, plan
    from megatron_md.planning.model import tiny
    from megatron_md.training.arguments import parse_args

    os.environ["MEGATRON_MD_NS_DTYPE"] = "fp32"
    from megatron_md.testing.tools import load_module

    base = load_module(Path(__file__).with_name("test_driver.py")).synthetic_base(
        ctx, "--train-iters", "2", "--global-batch-size", "8", "--eval-interval", "100", "--eval-iters", "0",
        "--log-interval", "100")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, (flags, lay_kw, model_kw, optimizers) in cases.items():
        for opt in optimizers:
            with ctx.check(f"{name}_{opt}"):
                # the product's knob until the builder passes --ns-split (orthogonalize.split_default)
                os.environ["MEGATRON_MD_NS_SPLIT"] = "1" if lay_kw.get("ns_split") else "0"
                got, got_flops = _measure(parse_args(base + ["--optimizer", opt] + flags))
                lay = Layout(ns_dtype="fp32", vocab_divisible_by=64, **lay_kw)
                assert lay.world == world, (lay, world)
                p = plan(tiny(**model_kw), lay, opt)
                n = lay.tp * lay.dp
                want = p.meter(rank // n, rank % n)
                want_flops = int(p.stages[rank // n].ns_flops[rank % n])
                ctx.record(f"{name}_{opt}", {"meter": {f"{t}/{k}": v for (t, k), v in got.items()},
                                             "ns_flops": got_flops})
                assert got == want, f"rank {rank}: METER {sorted(got.items())} != model {sorted(want.items())}"
                assert got_flops == want_flops, f"rank {rank}: NS FLOPs run {got_flops} != model {want_flops}"
                if lay.ns_split:   # the case exercises teams: without the split this rank's step differs
                    off = plan(tiny(**model_kw), replace(lay, ns_split=False), opt)
                    assert off.meter(rank // n, rank % n) != want and \
                        int(off.stages[rank // n].ns_flops[rank % n]) != want_flops, "nothing was split"


def _checks_w2(ctx):
    _checks(ctx, CASES_W2)


def _checks_w4(ctx):
    _checks(ctx, CASES_W4)


plan_w2 = group_fixture(2, _checks_w2, megatron=True, timeout=400)
plan_w4 = group_fixture(4, _checks_w4, megatron=True, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"{c}_{o}" for c, v in CASES_W2.items() for o in v[3]])
def test_model_equals_meter_2_ranks(plan_w2, name):
    plan_w2.assert_ok(name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"{c}_{o}" for c, v in CASES_W4.items() for o in v[3]])
def test_model_equals_meter_4_ranks(plan_w4, name):
    plan_w4.assert_ok(name)
