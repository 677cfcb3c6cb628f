"""The Megatron-Core training driver (megatron_md.training): flag validation and exact resume.

In-process (no ranks): invalid flag combinations fail in the parser/validator, before any model
is built, with the flags named in the message; ``main()`` turns them into exit code 2.

One spawned group of 2 gloo ranks (megatron-core on CPU via cpu_compat) runs the real driver
(``pretrain``) in-process on a tiny synthetic indexed dataset written with megatron-core's
``IndexedDatasetBuilder``: for each configuration, 8 iterations with checkpoints at 4 and 8,
then a ``--load --ckpt-step 4`` resume whose iterations 5..8 must reproduce the uninterrupted
run's losses, grad norms and validation loss bit for bit.
"""
from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402
from megatron_md.training.arguments import ArgumentError, build_parser, parse_args  # noqa: E402

pytestmark = [pytest.mark.megatron]

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "8", "--lr", "0.01", "--mock-data"]


# ============================================================================ validation (in-process)
@pytest.mark.parametrize("extra, needles", [
    (["--async-save"], ["--async-save", "synchronous"]),
    (["--use-megatron-fsdp", "--use-torch-fsdp2"], ["--use-torch-fsdp2", "--use-megatron-fsdp", "pick one"]),
    (["--use-megatron-fsdp"], ["--use-megatron-fsdp", "--untie-embeddings-and-output-weights"]),
    (["--optimizer", "muon-md", "--fp16", "--loss-scale", "1024"], ["--optimizer muon-md", "--fp16"]),
    (["--optimizer", "sf-normuon", "--lr-decay-style", "cosine"], ["--optimizer sf-normuon", "--lr-decay-style"]),
    (["--optimizer", "sf-adamw", "--lr-warmup-iters", "2"], ["--optimizer sf-adamw", "--lr-warmup-iters"]),
    (["--pipeline-model-parallel-size", "3"], ["--num-layers 2", "--pipeline-model-parallel-size 3"]),
    (["--num-layers-per-virtual-pipeline-stage", "1"], ["--num-layers-per-virtual-pipeline-stage",
                                                        "--pipeline-model-parallel-size > 1"]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
     ["interleaved", "--pipeline-model-parallel-size 2"]),
    (["--optimizer", "no-such-optimizer"], ["--optimizer", "invalid choice"]),
    (["--optimizer", "muon-md", "--weight-decay", "0.1"], ["--optimizer muon-md", "--weight-decay"]),
    (["--dp-mode", "layer-wise", "--use-distributed-optimizer"], ["--dp-mode layer-wise", "--use-distributed-optimizer"]),
    (["--split-fc1"], ["--split-fc1", "--swiglu"]),
    (["--tensor-model-parallel-size", "3"], ["--tensor-model-parallel-size 3"]),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], ["--num-experts 3", "--expert-model-parallel-size 2"]),
    (["--expert-model-parallel-size", "2"], ["--expert-model-parallel-size 2", "--num-experts"]),
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"], ["--num-experts", "--sequence-parallel"]),
    (["--num-experts", "4", "--moe-router-topk", "1"], ["--moe-router-topk 1", "--moe-router-pre-softmax"]),
    (["--global-batch-size", "3"], ["--global-batch-size 3", "--micro-batch-size"]),
    (["--fp16", "--bf16"], ["--fp16", "--bf16"]),
    (["--sequence-parallel"], ["--sequence-parallel", "--tensor-model-parallel-size"]),
    (["--fp8-format", "e4m3"], ["--fp8-format"]),
    (["--save-interval", "2"], ["--save-interval", "--save"]),
    (["--muon-md-momentum", "1.5"], ["--muon-md-momentum"]),
    (["--rope-type", "yarn"], ["--rope-type yarn", "--position-embedding-type rope"]),
    (["--rope-type", "yarn", "--position-embedding-type", "rope"], ["--original-max-position-embeddings"]),
    (["--rotary-scaling-factor", "4", "--beta-fast", "16"], ["--rotary-scaling-factor, --beta-fast", "--rope-type yarn"]),
    (["--rope-type", "yarn", "--position-embedding-type", "rope", "--original-max-position-embeddings", "8",
      "--rotary-scaling-factor", "0.5"], ["--rotary-scaling-factor 0.5"]),
    (["--use-torch-fsdp2"], ["--use-torch-fsdp2", "--untie-embeddings-and-output-weights"]),
    (["--use-torch-fsdp2", "--untie-embeddings-and-output-weights", "--use-distributed-optimizer"],
     ["--use-torch-fsdp2", "--use-distributed-optimizer"]),
    (["--use-torch-fsdp2", "--untie-embeddings-and-output-weights", "--pipeline-model-parallel-size", "2"],
     ["--use-torch-fsdp2", "--pipeline-model-parallel-size > 1"]),
    (["--use-torch-fsdp2", "--untie-embeddings-and-output-weights", "--dp-mode", "layer-wise"],
     ["--use-torch-fsdp2", "--dp-mode layer-wise"]),
    (["--use-torch-fsdp2", "--untie-embeddings-and-output-weights", "--ckpt-format", "torch"],
     ["--use-torch-fsdp2", "--ckpt-format torch"]),
])
def test_invalid_flag_combinations_fail_before_training(extra, needles):
    with pytest.raises(ArgumentError) as err:
        parse_args(TINY + extra, world_size=2)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg


def test_transformer_engine_request_is_a_clear_error_without_te():
    from megatron_md.training.arguments import te_available
    ok, why = te_available()
    if ok:
        pytest.skip("Transformer Engine and CUDA are available here")
    with pytest.raises(ArgumentError, match="--transformer-impl transformer_engine"):
        parse_args(TINY + ["--transformer-impl", "transformer_engine"], world_size=1)


def test_missing_required_and_data_flags():
    with pytest.raises(ArgumentError, match="--num-layers"):
        parse_args(TINY[2:], world_size=1)
    no_data = [a for a in TINY if a != "--mock-data"]
    with pytest.raises(ArgumentError, match="--data-path"):
        parse_args(no_data, world_size=1)
    with pytest.raises(ArgumentError, match="preprocess_data"):
        parse_args(no_data + ["--data-path", "/nonexistent/prefix"], world_size=1)


def test_defaults_follow_the_optimizer():
    a = parse_args(TINY + ["--optimizer", "sf-normuon"], world_size=2)
    assert a.lr_decay_style == "constant" and a.weight_decay == 0.01 and a.data_parallel_size == 2
    a = parse_args(TINY + ["--optimizer", "muon-md", "--tensor-model-parallel-size", "2"], world_size=2)
    assert a.weight_decay == 0.0 and a.lr_decay_style == "linear" and a.data_parallel_size == 1
    assert a.md.optimizer == "muon-md" and a.transformer_impl in ("local", "transformer_engine")
    assert a.global_batch_size == 2 and a.num_microbatches == 1
    a = parse_args(TINY + ["--optimizer", "adam", "--global-batch-size", "8"], world_size=2)
    assert a.num_microbatches == 2 and a.padded_vocab_size % 128 == 0


def test_main_reports_usage_errors_with_exit_code_2(capsys):
    from megatron_md.training.pretrain import main
    assert main(TINY + ["--pipeline-model-parallel-size", "3"]) == 2
    assert "--pipeline-model-parallel-size 3" in capsys.readouterr().err
    assert "--optimizer" in build_parser().format_help()


def test_preprocess_documents_group_whole_paragraphs():
    from importlib import util
    from pathlib import Path
    spec = util.spec_from_file_location("preprocess_data", Path(__file__).parents[2] / "tools" / "preprocess_data.py")
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = list(mod._documents([[5, 6], [7], [8, 9, 10]], newline_id=1, eod_id=2, doc_tokens=5))
    assert docs == [[5, 6, 1, 7, 2], [8, 9, 10, 2]]
    assert list(mod._documents([[5], [6]], 1, 2, 0)) == [[5, 1, 6, 2]]


def test_checkpoint_pointer_is_atomic_and_ignores_partial_files(tmp_path):
    from megatron_md.checkpoint import integrity as ck
    assert ck.read_latest(str(tmp_path)) is None
    ck.atomic_write_text(str(tmp_path / ck.TRACKER), "4\n")
    # a crash while writing iteration 8: a partial temp file, the pointer still says 4
    os.makedirs(ck.checkpoint_dir(str(tmp_path), 8))
    (tmp_path / "iter_0000008" / "rank_00000.pt.tmp999").write_bytes(b"partial")
    (tmp_path / f"{ck.TRACKER}.tmp999").write_text("8")
    assert ck.read_latest(str(tmp_path)) == 4
    ck.atomic_torch_save({"x": 1}, str(tmp_path / "obj.pt"))
    assert sorted(p.name for p in tmp_path.iterdir() if "obj" in p.name) == ["obj.pt"]


# ============================================================================ 2-rank driver runs
VOCAB = 256
CONFIGS = {
    # TP=2 (DP=1): Muon-MD, FP32Optimizer wrapper
    "tp2_muon_md": ["--tensor-model-parallel-size", "2", "--optimizer", "muon-md"],
    # DP=2, ZeRO-1: schedule-free NorMuon (eval swaps x/y; group-level SF counters checkpointed)
    "dp2_distopt_sf_normuon": ["--use-distributed-optimizer", "--optimizer", "sf-normuon", "--global-batch-size", "4"],
    # DP=2, bf16 params with fp32 main params (Float16OptimizerWithFloat16Params), AdamW
    "dp2_bf16_adam": ["--bf16", "--optimizer", "adam", "--lr-warmup-iters", "2"],
    # DP=2, ZeRO-1 + bf16: Muon-MD on flat shards (fused QKV kept whole)
    "dp2_distopt_bf16_muon_md": ["--use-distributed-optimizer", "--bf16", "--optimizer", "muon-md",
                                 "--no-split-qkv"],
    # EP=2 MoE, alltoall dispatcher: dense + expert optimizers chained
    "ep2_moe_muon": ["--num-experts", "4", "--expert-model-parallel-size", "2", "--moe-router-topk", "2",
                     "--moe-aux-loss-coeff", "0.01", "--moe-token-dispatcher-type", "alltoall",
                     "--optimizer", "muon", "--weight-decay", "0.0"],
}


def synthetic_base(ctx, *extra: str) -> list:
    """The driver flags of the spawned-group driver tests: :data:`TINY` on the synthetic indexed
    dataset (written by rank 0 into the group's shared ``ctx.tmpdir``; every rank waits for it),
    a vocabulary padded to 64, seed 7, then ``extra``."""
    import torch.distributed as dist

    prefix = os.path.join(ctx.tmpdir, "synthetic")
    if ctx.rank == 0:
        _write_synthetic(prefix)
    dist.barrier()
    return [a for a in TINY if a != "--mock-data"] + [
        "--data-path", prefix, "--make-vocab-size-divisible-by", "64", "--seed", "7", *extra]


def _write_synthetic(prefix: str) -> None:
    """A small learnable token stream (noisy counting) as train/valid indexed datasets."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 40), ("valid", 6)):
        b = IndexedDatasetBuilder(f"{prefix}_{split}.bin", dtype=np.uint16)
        for _ in range(n_docs):
            n = int(rng.integers(20, 60))
            start = int(rng.integers(3, VOCAB))
            doc = (start + np.arange(n)) % (VOCAB - 3) + 3
            noise = rng.random(n) < 0.1
            doc[noise] = rng.integers(3, VOCAB, noise.sum())
            b.add_document(torch.tensor(np.append(doc, 2)), [n + 1])
        b.finalize(f"{prefix}_{split}.idx")
    with open(f"{prefix}.json", "w") as fh:
        json.dump({"vocab_size": VOCAB, "eod_id": 2, "newline_id": 1}, fh)


def _driver_checks(ctx):
    import torch.distributed as dist

    from megatron_md.checkpoint.integrity import TRACKER
    from megatron_md.training.pretrain import pretrain

    prefix = os.path.join(ctx.tmpdir, "synthetic")
    if ctx.rank == 0:
        _write_synthetic(prefix)
    dist.barrier()
    base = [a for a in TINY if a != "--mock-data"] + [
        "--data-path", prefix, "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
        "--make-vocab-size-divisible-by", "64", "--seed", "7", "--ckpt-format", "torch"]
    for name, extra in CONFIGS.items():
        with ctx.check(f"{name}_resume_exact"):
            ckpt = os.path.join(ctx.tmpdir, name)
            full = pretrain(parse_args(base + extra + ["--save", ckpt, "--save-interval", "4"]))
            resumed = pretrain(parse_args(base + extra + ["--load", ckpt, "--ckpt-step", "4"]))
            ctx.record(name, {"full": full, "resumed": resumed})
            tr_full, tr_res = full["train_loss_history"], resumed["train_loss_history"]
            assert all(math.isfinite(v) for v in tr_full.values()), tr_full
            assert full["val_loss_history"]["8"] != full["val_loss_history"]["4"]  # the model trained
            for it in ("5", "6", "7", "8"):
                assert tr_res[it] == tr_full[it], (it, tr_full, tr_res)
            assert resumed["val_loss_history"]["8"] == full["val_loss_history"]["8"]
            assert resumed["final_val_loss"] == full["final_val_loss"]
            assert full["skipped_steps"] == resumed["skipped_steps"] == 0
            if ctx.rank == 0:
                assert open(os.path.join(ckpt, TRACKER)).read().strip() == "8"
                leftovers = [f for _, _, fs in os.walk(ckpt) for f in fs if ".tmp" in f]
                assert not leftovers, leftovers
                assert sorted(os.listdir(os.path.join(ckpt, "iter_0000004"))) == ["manifest.json", "rank_00000.pt", "rank_00001.pt"]


driver_group = group_fixture(2, _driver_checks, megatron=True, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_reproduces_uninterrupted_run(driver_group, name):
    driver_group.assert_ok(f"{name}_resume_exact")
