"""Pipeline parallelism in the driver: PP=2 trains exactly like PP=1, for every optimizer.

One spawned group of 2 gloo ranks runs the real driver (``pretrain`` in-process, megatron-core's
1F1B schedule, tied embeddings reduced across the first and last stage by
``finalize_model_grads``) on test_driver's synthetic indexed dataset: for every optimizer, 4
iterations of a 2-layer model at ``--pipeline-model-parallel-size 2`` against the same run at PP=1 (DP=2, the same
global batch; the stages start from the PP=1 weights). Train and validation losses agree to
1e-5 relative (only the order of floating-point reductions differs: DP=2 averages two
micro-batch gradients across ranks, PP=2 accumulates them on each stage). The interleaved
schedule (4 layers, ``--num-layers-per-virtual-pipeline-stage 1``: 2 virtual stages per rank) and an
untied output layer are checked the same way, and a PP=2 run saved at iteration 2 and resumed
reproduces the uninterrupted iterations 3..4 bit for bit.

A second group of 4 ranks runs PP=2 × DP=2 with ZeRO-1 (``--use-distributed-optimizer``) and
with layer-wise DP (``--dp-mode layer-wise``), and TP=2 × DP=2 with ZeRO-1, for every optimizer
against PP=1 × DP=4 (the same global batch of 8; plain DDP; GQA, 4 heads in 2 query groups; the
per-block methods split the fused QKV into Q, K, V, which ZeRO-1 flat-shards per block), to the
same 1e-5.
"""
from __future__ import annotations

import math
import os
from importlib import util
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

OPTIMIZERS = ["adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon"]
#: PP=2 variants beyond the plain 1F1B one (name: extra flags)
VARIANTS = {
    "vpp2_muon_md": ["--optimizer", "muon-md", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"],
    "vpp2_sf_normuon": ["--optimizer", "sf-normuon", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"],
    "untied_rmnp": ["--optimizer", "rmnp", "--untie-embeddings-and-output-weights"],
}
RESUME = ["muon-md", "sf-normuon"]
RTOL = 1e-5


def _sibling(name: str):
    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


def _compare(ref: dict, got: dict) -> None:
    for key in ("train_loss_history", "val_loss_history"):
        assert ref[key].keys() == got[key].keys(), (key, ref[key], got[key])
        for it, v in ref[key].items():
            assert math.isfinite(v) and _close(v, got[key][it]), (key, it, ref[key], got[key])
    assert ref["skipped_steps"] == got["skipped_steps"] == 0, (ref["skipped_steps"], got["skipped_steps"])


def _pipeline_checks(ctx):
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    base = _sibling("test_driver").synthetic_base(
        ctx, "--train-iters", "4", "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "4",
        "--eval-iters", "1")
    pp2 = ["--pipeline-model-parallel-size", "2"]

    def run(extra):
        return pretrain(parse_args(base + extra))

    for opt in OPTIMIZERS:
        with ctx.check(f"pp2_equals_pp1_{opt}"):
            ref = run(["--optimizer", opt])
            got = run(["--optimizer", opt] + pp2)
            assert got["pp"] == 2 and ref["pp"] == 1 and ref["dp"] == 2
            assert ref["train_loss_history"]["4"] < ref["train_loss_history"]["1"], ref  # it trains
            _compare(ref, got)
            ctx.record(opt, {"pp1": ref["train_loss_history"], "pp2": got["train_loss_history"]})
    for name, extra in VARIANTS.items():
        with ctx.check(f"pp2_equals_pp1_{name}"):
            flat = extra[:-2] if "--num-layers-per-virtual-pipeline-stage" in extra else extra
            ref = run(flat)  # the same model and optimizer at PP=1
            _compare(ref, run(extra + pp2))
    for opt in RESUME:
        with ctx.check(f"pp2_resume_exact_{opt}"):
            ckpt = os.path.join(ctx.tmpdir, f"pp2_{opt}")
            full = run(["--optimizer", opt, "--save", ckpt, "--save-interval", "2"] + pp2)
            res = run(["--optimizer", opt, "--load", ckpt, "--ckpt-step", "2"] + pp2)
            for it in ("3", "4"):
                assert res["train_loss_history"][it] == full["train_loss_history"][it], (it, full, res)
            assert res["val_loss_history"]["4"] == full["val_loss_history"]["4"], (full, res)


pipeline_group = group_fixture(2, _pipeline_checks, megatron=True, timeout=500)


def _pipeline_dp_checks(ctx):
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    base = _sibling("test_driver").synthetic_base(
        ctx, "--train-iters", "3", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "3",
        "--eval-iters", "1", "--num-query-groups", "2")
    pp2 = ["--pipeline-model-parallel-size", "2"]

    def run(extra):
        return pretrain(parse_args(base + extra))

    for opt in OPTIMIZERS:
        ref = None
        with ctx.check(f"pp2_dp2_zero1_{opt}"):
            ref = run(["--optimizer", opt])
            got = run(["--optimizer", opt, "--use-distributed-optimizer"] + pp2)
            assert got["pp"] == 2 and got["dp"] == 2 and ref["dp"] == 4
            _compare(ref, got)
        with ctx.check(f"pp2_dp2_layerwise_{opt}"):
            assert ref is not None, "the PP=1 × DP=4 reference failed"
            _compare(ref, run(["--optimizer", opt, "--dp-mode", "layer-wise"] + pp2))
        with ctx.check(f"tp2_dp2_zero1_{opt}"):
            assert ref is not None, "the PP=1 × DP=4 reference failed"
            got = run(["--optimizer", opt, "--use-distributed-optimizer", "--tensor-model-parallel-size", "2"])
            assert got["tp"] == 2 and got["dp"] == 2, got
            _compare(ref, got)


pipeline_w4 = group_fixture(4, _pipeline_dp_checks, megatron=True, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"{par}_dp2_{mode}_{o}" for par, mode in (("pp2", "zero1"), ("pp2", "layerwise"),
                                                                         ("tp2", "zero1")) for o in OPTIMIZERS])
def test_pipeline_with_data_parallel_modes(pipeline_w4, name):
    pipeline_w4.assert_ok(name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"pp2_equals_pp1_{o}" for o in OPTIMIZERS + list(VARIANTS)]
                         + [f"pp2_resume_exact_{o}" for o in RESUME])
def test_pipeline(pipeline_group, name):
    pipeline_group.assert_ok(name)
