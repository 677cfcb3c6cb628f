"""Communication overlap in the driver (``--overlap-grad-reduce``, ``--overlap-param-gather``) changes no bit.

In-process (no ranks): ``--overlap-param-gather`` without ``--use-distributed-optimizer`` (plain
DDP or ``--dp-mode layer-wise``), without ``--overlap-grad-reduce``, and ``--ddp-bucket-size``
without ``--overlap-grad-reduce`` fail in the validator with both flags named; ``main()`` exits
with code 2 before a process group exists.

One spawned group of 2 gloo ranks runs the real driver (``pretrain`` in-process) on test_driver's
synthetic indexed dataset, 3 iterations of a 1-layer model with 2 micro-batches per rank (so the
schedule's ``no_sync_func`` holds back the first micro-batch's reductions), each run saving its
final checkpoint. For every optimizer:

* DP=2 plain DDP with ``--overlap-grad-reduce`` and several buckets (``--ddp-bucket-size``),
* DP=2 ZeRO-1 with ``--overlap-grad-reduce --overlap-param-gather``, in one bucket and in several
  (the fused QKV split into Q, K, V flat-sharded per block; without overlap its losses are plain DP=2's
  to ``LAYOUT_RTOL``),
* DP=2 ``--dp-mode layer-wise`` with ``--overlap-grad-reduce`` and several buckets,

give the losses and saved final weights of the same run without overlap, bit for bit (ZeRO-1 in
several buckets: against ``--overlap-grad-reduce`` alone, the same layout; no run without overlap
has it, and its losses are only checked against one bucket's to ``LAYOUT_RTOL``). With evaluation,
the optimizer telemetry and checkpoints every few iterations under ``--overlap-param-gather``
(MuonMD, and schedule-free NorMuon with its eval/train swaps), the validation losses, the
telemetry records and every saved checkpoint equal the non-overlapped run's bit for bit: each
of them reads the weights after a step, when only this rank's shard is updated until gathered;
and a ZeRO-1 run resumed under overlap reproduces the uninterrupted one bit for bit.
Pipeline schedules (DP=1: PP=2 1F1B with ``grad_sync_func``; interleaved PP=2 ZeRO-1 with the
schedule's ``param_sync_func``), EP=2 MoE (expert buckets) and bf16 ZeRO-1 (fp32 main shards copied
into bf16 weights before the gather) are checked bit for bit too.
"""
from __future__ import annotations

import json
import math
import os
from importlib import util
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402
from megatron_md.training.arguments import ArgumentError, parse_args  # noqa: E402

pytestmark = [pytest.mark.megatron]

OPTIMIZERS = ["adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon"]
#: elements per gradient bucket: the 1-layer model's 26k parameters make 6 buckets (several in flight at once)
BUCKET = "500"
#: ZeRO-1 in several buckets against one bucket, a sanity check of the ranges cut per bucket (megatron-core
#: buckets only with --overlap-grad-reduce, so no run without overlap has this layout; overlap itself is
#: compared bit for bit with the same layout). Other flat ranges and buffer offsets round differently (even
#: the first forward pass: plain DDP and ZeRO-1 losses differ by 6e-8 before any step), and MuonMD amplifies
#: that: measured 7e-7 here, <= 5e-8 for the other methods.
LAYOUT_RTOL = 1e-5
#: iterations per run: the first runs with the forward pre-hooks off and grads reduced at the end (megatron-core
#: learns the bucket order), the next two with every collective overlapped
ITERS = 3
OVERLAP = ["--overlap-grad-reduce"]
OVERLAP_ZERO1 = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def _sibling(name: str):
    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TINY = _sibling("test_driver").TINY


# ============================================================================ validation (in-process)
@pytest.mark.parametrize("extra, needles", [
    (["--overlap-grad-reduce", "--overlap-param-gather"], ["--overlap-param-gather", "--use-distributed-optimizer"]),
    (["--overlap-grad-reduce", "--overlap-param-gather", "--dp-mode", "layer-wise"],
     ["--overlap-param-gather", "--use-distributed-optimizer", "--dp-mode layer-wise"]),
    (["--use-distributed-optimizer", "--no-split-qkv", "--overlap-param-gather"],
     ["--overlap-param-gather", "--overlap-grad-reduce"]),
    (["--ddp-bucket-size", "1000"], ["--ddp-bucket-size 1000", "--overlap-grad-reduce"]),
])
def test_invalid_overlap_flags_fail_before_training(extra, needles):
    with pytest.raises(ArgumentError) as err:
        parse_args(_TINY + extra, world_size=2)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_param_gather_without_distributed_optimizer_exits_before_training(capsys):
    import torch.distributed as dist

    from megatron_md.training.pretrain import main
    assert main(_TINY + ["--overlap-grad-reduce", "--overlap-param-gather"]) == 2
    err = capsys.readouterr().err
    assert "--overlap-param-gather" in err and "--use-distributed-optimizer" in err, err
    assert not dist.is_initialized()  # nothing was started
    a = parse_args(_TINY + OVERLAP_ZERO1 + ["--no-split-qkv", "--ddp-bucket-size", "1000"], world_size=2)
    assert a.overlap_grad_reduce and a.overlap_param_gather and a.ddp_bucket_size == 1000


# ============================================================================ 2-rank driver runs
def _close(a: float, b: float, rtol: float) -> bool:
    return a == b if rtol == 0 else abs(a - b) <= rtol * max(abs(a), abs(b))


def _weights(ckpt: str, iteration: int, rank: int) -> dict:
    """This rank's saved model (and, schedule-free, averaged-x) tensors of one checkpoint."""
    import torch

    from megatron_md.checkpoint.integrity import checkpoint_dir
    st = torch.load(os.path.join(checkpoint_dir(ckpt, iteration), f"rank_{rank:05d}.pt"), weights_only=False)
    out = {}
    for tag, chunks in (("model", st["model"]), ("model_x", st["model_x"] or [])):
        for i, sd in enumerate(chunks):
            out.update({f"{tag}{i}/{k}": v for k, v in sd.items() if torch.is_tensor(v)})
    return out


def _compare(ref: dict, got: dict, rtol: float = 0.0) -> float:
    """Same train/validation losses and skipped steps; returns the largest relative loss difference."""
    worst = 0.0
    for key in ("train_loss_history", "val_loss_history"):
        assert ref[key].keys() == got[key].keys(), (key, ref[key], got[key])
        for it, v in ref[key].items():
            assert math.isfinite(v) and _close(v, got[key][it], rtol), (key, it, ref[key], got[key])
            worst = max(worst, abs(v - got[key][it]) / abs(v))
    assert ref["skipped_steps"] == got["skipped_steps"] == 0, (ref["skipped_steps"], got["skipped_steps"])
    return worst


def _compare_weights(ref: dict, got: dict) -> None:
    """Every saved tensor equal, bit for bit."""
    assert ref.keys() == got.keys() and ref, (sorted(ref)[:4], sorted(got)[:4])
    for k, a in ref.items():
        b = got[k]
        assert a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all()), (k, (a - b).abs().max())


def _stats_records(path: str) -> list:
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if r["event"] == "optimizer_stats"]


def _overlap_checks(ctx):
    from megatron_md.training.pretrain import pretrain

    drv = _sibling("test_driver")
    base = drv.synthetic_base(ctx, "--ckpt-format", "torch", "--num-layers", "1", "--train-iters", str(ITERS), "--micro-batch-size", "1",
                              "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0")
    runs = iter(range(10**6))

    def run(extra):
        """One driver run that saves its final checkpoint: (summary, this rank's final weights)."""
        ckpt = os.path.join(ctx.tmpdir, f"run{next(runs)}")
        summary = pretrain(parse_args(base + extra + ["--save", ckpt]))
        if "--ddp-bucket-size" in extra:
            assert summary["grad_buckets"] >= 6, summary
        losses = list(summary["train_loss_history"].values())
        assert len(set(losses)) == len(losses) == ITERS, summary  # every step changed the model
        return summary, _weights(ckpt, ITERS, ctx.rank)

    def same(ref, got):
        _compare(ref[0], got[0])
        _compare_weights(ref[1], got[1])

    for opt in OPTIMIZERS:
        flags = ["--optimizer", opt]
        ddp = None
        with ctx.check(f"ddp_{opt}"):
            ref = ddp = run(flags)
            assert ref[0]["dp"] == 2 and ref[0]["grad_buckets"] == 1, ref[0]
            same(ref, run(flags + OVERLAP + ["--ddp-bucket-size", BUCKET]))
        with ctx.check(f"zero1_{opt}"):
            zflags = flags + ["--use-distributed-optimizer"]  # per-block methods: Q, K, V flat-sharded per block
            ref = run(zflags)
            assert ddp is not None, "the plain DP=2 run failed"
            ctx.record(f"zero1_{opt}_vs_ddp_rel_diff", _compare(ddp[0], ref[0], LAYOUT_RTOL))  # ZeRO-1 == plain DP
            same(ref, run(zflags + OVERLAP_ZERO1[1:]))  # one bucket, as without overlap
            grads_only = run(zflags + OVERLAP + ["--ddp-bucket-size", BUCKET])
            many = run(zflags + OVERLAP_ZERO1[1:] + ["--ddp-bucket-size", BUCKET])
            same(grads_only, many)  # several buckets: overlapping their all-gathers changes no bit
            ctx.record(f"zero1_{opt}_layout_rel_diff", _compare(ref[0], many[0], LAYOUT_RTOL))
        with ctx.check(f"layerwise_{opt}"):
            lflags = flags + ["--dp-mode", "layer-wise"]
            same(run(lflags), run(lflags + OVERLAP + ["--ddp-bucket-size", BUCKET]))

    # evaluation, telemetry and checkpoints after steps whose parameter all-gather is overlapped; each is
    # the first reader after some step: evaluation after step 2, the save after step 3, telemetry after 4
    for opt in ("muon-md", "sf-normuon"):
        with ctx.check(f"eval_telemetry_save_{opt}"):
            out = []
            for tag, extra in (("ref", []), ("overlap", OVERLAP_ZERO1[1:])):
                ckpt = os.path.join(ctx.tmpdir, f"{opt}_{tag}")
                summary = pretrain(parse_args(
                    base + ["--optimizer", opt, "--use-distributed-optimizer", "--train-iters", "5",
                            "--eval-iters", "1", "--eval-interval", "2", "--log-optimizer-stats-interval", "4",
                            "--save", ckpt, "--save-interval", "3", "--log-jsonl", ckpt + ".jsonl"] + extra))
                out.append((summary, ckpt, ckpt + ".jsonl"))
            (ref, ref_ckpt, ref_log), (got, got_ckpt, got_log) = out
            assert list(ref["val_loss_history"]) == ["2", "4", "5"], ref["val_loss_history"]
            _compare(ref, got)
            for it in (3, 5):
                _compare_weights(_weights(ref_ckpt, it, ctx.rank), _weights(got_ckpt, it, ctx.rank))
            if ctx.rank == 0:
                a, b = _stats_records(ref_log), _stats_records(got_log)
                assert [r["iteration"] for r in a] == [4] and len(a[0]["matrices"]) >= 6, a
                assert a[0]["matrices"] == b[0]["matrices"], (a[0]["overall"], b[0]["overall"])

    # a resume under overlap: the first iteration after --load runs with the hooks off, on the loaded weights
    with ctx.check("zero1_resume"):
        flags = ["--optimizer", "muon-md", "--use-distributed-optimizer"] + OVERLAP_ZERO1[1:]
        full_dir, res_dir = (os.path.join(ctx.tmpdir, f"resume_{t}") for t in ("full", "resumed"))
        full = pretrain(parse_args(base + flags + ["--save", full_dir, "--save-interval", "1"]))
        res = pretrain(parse_args(base + flags + ["--load", full_dir, "--ckpt-step", "1", "--save", res_dir]))
        assert res["train_loss_history"] == full["train_loss_history"], (full, res)
        _compare_weights(_weights(full_dir, ITERS, ctx.rank), _weights(res_dir, ITERS, ctx.rank))

    # DP=1 pipeline schedules (grad_sync_func; interleaved: aligned param_sync_func) and MoE expert buckets
    pp = ["--optimizer", "muon-md", "--num-layers", "2", "--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]
    vpp = pp + ["--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1", "--use-distributed-optimizer"]
    moe = ["--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-router-topk", "2",
           "--moe-aux-loss-coeff", "0.01", "--moe-token-dispatcher-type", "alltoall", "--optimizer", "muon",
           "--weight-decay", "0.0"]
    bf16 = ["--optimizer", "muon-md", "--bf16", "--use-distributed-optimizer"]
    for name, flags, overlap in (("pp2_1f1b", pp, OVERLAP), ("vpp2_zero1", vpp, OVERLAP_ZERO1[1:]),
                                 ("ep2_moe", moe, OVERLAP), ("zero1_bf16", bf16, OVERLAP_ZERO1[1:])):
        with ctx.check(name):
            ref, got = run(flags), run(flags + overlap)
            assert ref[0]["pp"] == (2 if name.startswith(("pp", "vpp")) else 1), ref[0]
            same(ref, got)


overlap_group = group_fixture(2, _overlap_checks, megatron=True, timeout=400)

CHECKS = ([f"{mode}_{o}" for o in OPTIMIZERS for mode in ("ddp", "zero1", "layerwise")]
          + ["eval_telemetry_save_muon-md", "eval_telemetry_save_sf-normuon", "zero1_resume", "pp2_1f1b", "vpp2_zero1",
             "ep2_moe", "zero1_bf16"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", CHECKS)
def test_overlap_trains_like_no_overlap(overlap_group, name):
    overlap_group.assert_ok(name)
