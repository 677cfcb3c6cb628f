"""``--ckpt-format torch_dist``: Megatron distributed checkpoints of the model and of every
optimizer's whole state, resharded on load across TP/PP/EP/DP and DP modes.

One spawned group of 2 gloo ranks runs the real driver (``pretrain`` in-process) on
test_driver's synthetic indexed dataset (global batch 4, 4 iterations, a save every 2). Every
scenario saves at one layout and loads iteration 2 at another, and asserts

* **the state is carried over exactly**: the run at the new layout with nothing left to train
  re-saves iteration 2 (what ``tools/convert_checkpoint.py reshard`` runs), and every tensor of
  that checkpoint — model weights, every optimizer state (param-shaped moments and momenta,
  schedule-free ``z``, MD gains and their moments, row moments, fp32 main copies), per-matrix
  scalars — equals the original's **bitwise**, read back in the unsharded model's coordinates
  (``dist_checkpointing.load_plain_tensors``); the key sets are equal;
* **kill and resume is exact**: iterations 3 and 4 resumed at the saving layout equal the
  uninterrupted run's bitwise (train and validation losses), for every optimizer at ZeRO-1, TP=2
  and EP=2 (MoE), and at PP=2, layer-wise and bf16;
* **training continues as if the layout never changed**: iterations 3 and 4 resumed at the new
  layout give the uninterrupted run's losses to 1e-5 relative (only the order of floating-point
  reductions differs between layouts; 1e-4 in bf16, whose weights round those differences each
  step).

Scenarios: every optimizer from DP=2 with ZeRO-1 flat shards (Q, K, V flat-sharded per block) to TP=2,
from TP=2 to PP=2, and from
an EP=2 MoE (dense and expert optimizers chained) to TP=2 (ZeRO-1 from TP=2 for two); PP=2 → TP=2; layer-wise DP=2 → TP=2, ZeRO-1 ↔ layer-wise; MoE EP=2 with ZeRO-1 → TP=2; MoE EP=2 → EP=1 × DP=2 and the reverse; bf16 ZeRO-1 → bf16 TP=2 (the fp32
main copies); the Llama-style model (SwiGLU ``linear_fc1`` row vectors through the weight's
own gate/up factory, untied head with MD's head gains, GQA) DP=2 → TP=2, and with ``--split-fc1``
(gate and up as blocks, ZeRO-1 flat-sharded per block) ZeRO-1 ↔ TP=2; a DeepSeek-style MoE (8
fine-grained experts and a shared expert, ``--moe-shared-expert-intermediate-size``) EP=2 ↔ TP=2,
EP=2 + ZeRO-1 → EP=1 and EP=1 → EP=2 + ZeRO-1, for MuonMD, NorMuon, AdamMD and SF-NorMuon; legacy
grouped-GEMM experts (``--moe-grouped-gemm``, bf16: every expert of a layer in one transposed tensor)
for every optimizer across EP, TP and layer-wise DP and to and from SequentialMLP experts (with SwiGLU:
the row vectors' gate and up halves); Megatron-FSDP (``--use-megatron-fsdp``: ZeRO-3 buckets cut at whole
rows, ranks without rows of a weight) for every optimizer to ZeRO-1, and ZeRO-1 → Megatron-FSDP,
Megatron-FSDP → FSDP2, a Llama model to TP=2 and bf16 (its fp32 main weights) to TP=2. Bad input: a
corrupted ``.distcp`` file, a checkpoint of another optimizer and one of another model shape are refused before anything
is loaded, naming the file or the flag. ``tools/convert_checkpoint.py reshard`` (a driver run
with nothing left to train) writes a torch_dist checkpoint as per-rank files at one rank: the
same weights, with optimizer state.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

OPTIMIZERS = ["adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon"]
#: ZeRO-1 flat-shards the per-block methods' Q, K, V (and, with --split-fc1, gate and up) per block
ZERO = "--use-distributed-optimizer"
TP2 = "--tensor-model-parallel-size 2"
FC1 = "--split-fc1"
LLAMA = ("--swiglu --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights "
         "--disable-bias-linear --num-query-groups 2")
MOE = "--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall --disable-bias-linear"
#: DeepSeek-style MoE: fine-grained experts (8 of hidden 16) and a shared expert beside them
SHARED = ("--num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 2 --moe-shared-expert-intermediate-size 32 "
          "--moe-token-dispatcher-type alltoall --disable-bias-linear")
#: name: (optimizer, flags of the saving run, flags of the loading run)
#: every optimizer three times: ZeRO-1 → TP=2, TP=2 → PP=2, MoE EP=2 → MoE TP=2 (each also resumed
#: at its saving layout)
SCENARIOS = {f"{o}/zero1-to-tp2": (o, ZERO, TP2) for o in OPTIMIZERS}
SCENARIOS.update({f"{o}/tp2-to-pp2": (o, TP2, "--pipeline-model-parallel-size 2") for o in OPTIMIZERS})
#: megatron-core's MoE layer needs sequence parallelism under TP
SCENARIOS.update({f"{o}/moe-ep2-to-tp2": (o, f"{MOE} --expert-model-parallel-size 2", f"{MOE} {TP2} --sequence-parallel")
                  for o in OPTIMIZERS})
SCENARIOS.update({
    "muon-md/tp2-to-zero1": ("muon-md", TP2, ZERO),
    "sf-normuon/tp2-to-zero1": ("sf-normuon", TP2, ZERO),
    "normuon/layerwise-to-tp2": ("normuon", "--dp-mode layer-wise", TP2),
    "muon-md/zero1-to-layerwise": ("muon-md", ZERO, "--dp-mode layer-wise"),
    "adam-md/layerwise-to-zero1": ("adam-md", "--dp-mode layer-wise", ZERO),
    "adam-md/layerwise-to-tp2": ("adam-md", "--dp-mode layer-wise", TP2),
    "adamh/pp2-to-tp2": ("adamh", "--pipeline-model-parallel-size 2", TP2),
    "muon-md/ep2-to-ep1": ("muon-md", f"{MOE} --expert-model-parallel-size 2", MOE),
    # EP=2 x dense DP=2 with ZeRO-1: the dense QKV flat-sharded per block beside the expert optimizer
    "normuon/moe-ep2-zero1-to-tp2": ("normuon", f"{MOE} --expert-model-parallel-size 2 {ZERO}",
                                     f"{MOE} {TP2} --sequence-parallel"),
    "rmnp/ep1-to-ep2": ("rmnp", MOE, f"{MOE} --expert-model-parallel-size 2"),
    "adam/ep2-to-ep1": ("adam", f"{MOE} --expert-model-parallel-size 2", MOE),
    "muon/bf16-zero1-to-tp2": ("muon", f"--bf16 {ZERO}", f"--bf16 {TP2}"),
    "muon-md/llama-dp2-to-tp2": ("muon-md", LLAMA, f"{LLAMA} {TP2}"),
    "normuon/llama-fc1-zero1-to-tp2": ("normuon", f"{LLAMA} {FC1} {ZERO}", f"{LLAMA} {FC1} {TP2}"),
    "muon-md/llama-fc1-tp2-to-zero1": ("muon-md", f"{LLAMA} {FC1} {TP2}", f"{LLAMA} {FC1} {ZERO}"),
    "adam-md/llama-zero1-to-tp2": ("adam-md", f"{LLAMA} {ZERO}", f"{LLAMA} {TP2}"),
    "muon-md/shared-ep2-to-tp2": ("muon-md", f"{SHARED} --expert-model-parallel-size 2",
                                  f"{SHARED} {TP2} --sequence-parallel"),
    "normuon/shared-ep2-zero1-to-ep1": ("normuon", f"{SHARED} --expert-model-parallel-size 2 {ZERO}", SHARED),
    "adam-md/shared-tp2-to-ep2": ("adam-md", f"{SHARED} {TP2} --sequence-parallel",
                                  f"{SHARED} --expert-model-parallel-size 2"),
    "sf-normuon/shared-ep1-to-ep2-zero1": ("sf-normuon", SHARED, f"{SHARED} --expert-model-parallel-size 2 {ZERO}"),
})
#: torch FSDP2 (rows of every weight over DP=2; megatron-core's wrapper needs an untied head): every
#: optimizer FSDP2 → ZeRO-1 (each also resumed at FSDP2), and back; the Llama model's SwiGLU rows (gate
#: and up boxes of one FSDP2 piece) to and from TP=2; bf16 main copies; layer-wise
UNTIE = "--untie-embeddings-and-output-weights"
FSDP = f"--use-torch-fsdp2 {UNTIE}"
SCENARIOS.update({f"{o}/fsdp2-to-zero1": (o, FSDP, f"{ZERO} {UNTIE}") for o in OPTIMIZERS})
#: Megatron-FSDP (ZeRO-3 buckets cut at whole rows, unevenly: ranks with no rows of a weight): every
#: optimizer to ZeRO-1, and back, to FSDP2 and (Llama) to TP=2
MFSDP = f"--use-megatron-fsdp {UNTIE}"
SCENARIOS.update({f"{o}/megatron-fsdp-to-zero1": (o, MFSDP, f"{ZERO} {UNTIE}") for o in OPTIMIZERS})
SCENARIOS.update({
    "muon-md/zero1-to-fsdp2": ("muon-md", f"{ZERO} {UNTIE}", FSDP),
    "muon-md/llama-fsdp2-to-tp2": ("muon-md", f"{LLAMA} --use-torch-fsdp2", f"{LLAMA} {TP2}"),
    "normuon/llama-fc1-tp2-to-fsdp2": ("normuon", f"{LLAMA} {FC1} {TP2}", f"{LLAMA} {FC1} --use-torch-fsdp2"),
    "sf-normuon/llama-fsdp2-to-layerwise": ("sf-normuon", f"{LLAMA} --use-torch-fsdp2", f"{LLAMA} --dp-mode layer-wise"),
    "muon/bf16-fsdp2-to-tp2": ("muon", f"--bf16 {FSDP}", f"--bf16 {TP2} {UNTIE}"),
    "muon/bf16-megatron-fsdp-to-tp2": ("muon", f"--bf16 {MFSDP}", f"--bf16 {TP2} {UNTIE}"),
    "normuon/zero1-to-megatron-fsdp": ("normuon", f"{ZERO} {UNTIE}", MFSDP),
    "sf-normuon/megatron-fsdp-to-fsdp2": ("sf-normuon", MFSDP, FSDP),
    "adam-md/llama-megatron-fsdp-to-tp2": ("adam-md", f"{LLAMA} --use-megatron-fsdp", f"{LLAMA} {TP2}"),
})
#: legacy GroupedMLP experts (--moe-grouped-gemm without TE: all experts of a layer in one tensor,
#: bf16 only): each expert's optimizer state is named as SequentialMLP's expert, so every optimizer
#: reshards across EP, TP and layer-wise DP and between grouped and SequentialMLP experts (the SwiGLU
#: row vectors as gate and up halves). MD's EP→TP changes stay within one expert implementation's
#: layout family here: in bf16 its recomputed weights round the other layout's fp32 sums into other
#: bf16 values (~1e-3 of the loss, with SequentialMLP experts as much as with grouped ones)
GG = f"{MOE} --bf16 --moe-grouped-gemm"
SEQ = f"{MOE} --bf16"
EP2, SP = "--expert-model-parallel-size 2", f"{TP2} --sequence-parallel"
SCENARIOS.update({
    "muon-md/grouped-ep2-to-sequential-ep2": ("muon-md", f"{GG} {EP2}", f"{SEQ} {EP2}"),
    "muon-md/grouped-swiglu-ep2-to-ep1": ("muon-md", f"{GG} --swiglu {EP2}", f"{GG} --swiglu"),
    "adam-md/sequential-swiglu-ep2-to-grouped-ep2": ("adam-md", f"{SEQ} --swiglu {EP2}", f"{GG} --swiglu {EP2}"),
    "normuon/grouped-swiglu-tp2-to-sequential-ep2": ("normuon", f"{GG} --swiglu {SP}", f"{SEQ} --swiglu {EP2}"),
    "muon/grouped-ep2-to-tp2": ("muon", f"{GG} {EP2}", f"{GG} {SP}"),
    "sf-normuon/grouped-layerwise-to-ep2": ("sf-normuon", f"{GG} --dp-mode layer-wise", f"{GG} {EP2}"),
    "rmnp/grouped-ep1-to-ep2": ("rmnp", GG, f"{GG} {EP2}"),
    "adamh/grouped-ep2-to-ep1": ("adamh", f"{GG} {EP2}", GG),
    "muonh/grouped-tp2-to-ep2": ("muonh", f"{GG} {SP}", f"{GG} {EP2}"),
    "adam/grouped-ep2-to-sequential-ep1": ("adam", f"{GG} {EP2}", SEQ),
    "sf-adamw/grouped-ep2-to-tp2": ("sf-adamw", f"{GG} {EP2}", f"{GG} {SP}"),
})
RTOL = 1e-5
#: bf16 runs: the layouts' different reduction orders are rounded to bf16 weights each step
RTOL_BF16 = 1e-4


def _sibling(name: str):
    from megatron_md.testing.tools import load_module
    return load_module(Path(__file__).with_name(f"{name}.py"))


def _plain(path: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing
    return {k: v for k, v in dist_checkpointing.load_plain_tensors(path).items() if torch.is_tensor(v)}


def _dist_checks(ctx):
    import torch

    from megatron_md.training.arguments import parse_args
    from megatron_md.errors import CheckpointError
    from megatron_md.training.pretrain import pretrain
    td = _sibling("test_driver")
    base = td.synthetic_base(ctx, "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
                             "--global-batch-size", "4", "--train-iters", "4", "--ckpt-format", "torch_dist")

    def run(opt, flags, *extra):
        return pretrain(parse_args(base + ["--optimizer", opt] + flags.split() + list(extra)))

    for name, (opt, src, dst) in SCENARIOS.items():
        with ctx.check(name):
            ck = os.path.join(ctx.tmpdir, name.replace("/", "_"))
            full = run(opt, src, "--save", ck, "--save-interval", "2")
            # the loaded state re-saved at the other layout: every tensor bitwise equal
            run(opt, dst, "--load", ck, "--ckpt-step", "2", "--train-iters", "2", "--save", ck + "_re")
            a, b = _plain(os.path.join(ck, "iter_0000002")), _plain(os.path.join(ck + "_re", "iter_0000002"))
            assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
            assert any(k.startswith("optimizer.state.") for k in a), sorted(a)[:5]
            bad = [k for k in a if not torch.equal(a[k], b[k])]
            assert not bad, bad[:5]
            # kill and resume at the same layout: bitwise the uninterrupted run
            again = run(opt, src, "--load", ck, "--ckpt-step", "2")
            for it in ("3", "4"):
                assert again["train_loss_history"][it] == full["train_loss_history"][it], (it, full, again)
            assert again["val_loss_history"] == full["val_loss_history"]
            # training continues at the new layout with the uninterrupted run's losses
            res = again if src == dst else run(opt, dst, "--load", ck, "--ckpt-step", "2")
            rtol = RTOL_BF16 if "--bf16" in src else RTOL
            for it in ("3", "4"):
                x, y = full["train_loss_history"][it], res["train_loss_history"][it]
                assert math.isfinite(x) and abs(x - y) <= rtol * abs(x), (it, x, y)
            assert res["skipped_steps"] == full["skipped_steps"] == 0

    with ctx.check("bad_input"):
        import shutil

        import torch.distributed as dist
        ck = os.path.join(ctx.tmpdir, "muon-md_zero1-to-tp2")
        # another optimizer: refused, naming the flag and suggesting --no-load-optim
        with pytest.raises(CheckpointError, match=r"--optimizer: checkpoint 'muon-md', this run 'adam'.*--no-load-optim"):
            run("adam", "", "--load", ck, "--ckpt-step", "2")
        run("adam", "", "--load", ck, "--ckpt-step", "2", "--no-load-optim", "--train-iters", "2")  # weights only
        with pytest.raises(CheckpointError, match=r"another model shape \(--hidden-size: checkpoint 32, this run 64"):
            run("muon-md", "--hidden-size 64", "--load", ck, "--ckpt-step", "2")
        # a corrupted shard file: refused, naming it, before anything is loaded
        bad = os.path.join(ctx.tmpdir, "corrupt")
        if ctx.rank == 0:
            shutil.copytree(ck, bad)
            f = sorted(n for n in os.listdir(os.path.join(bad, "iter_0000002")) if n.endswith(".distcp"))[0]
            p = os.path.join(bad, "iter_0000002", f)
            data = bytearray(open(p, "rb").read())
            data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
            open(p, "wb").write(bytes(data))
        dist.barrier()
        with pytest.raises(CheckpointError, match=r"\.distcp is corrupted"):
            run("muon-md", TP2, "--load", bad, "--ckpt-step", "2")


    with ctx.check("reshard_tool"):
        # the offline front end: torch_dist (DP=2) -> per-rank files at one rank (to-hf also reads the
        # torch_dist checkpoint itself); the weights are the checkpoint's, the optimizer state is there
        import torch.distributed as dist

        from megatron_md.checkpoint.merge import load_full_model
        from megatron_md.checkpoint.integrity import checkpoint_dir, load_verified
        src = os.path.join(ctx.tmpdir, "muon-md_llama-dp2-to-tp2")
        out = os.path.join(ctx.tmpdir, "resharded_torch")
        plain = _plain(os.path.join(src, "iter_0000002"))  # collective: every rank
        if ctx.rank == 0:
            tool = _sibling_tool()
            assert tool.main(["to-hf", "--load", src, "--out", out + "_hf"]) == 0  # reads torch_dist directly
            assert os.path.isfile(os.path.join(out + "_hf", "config.json"))
            assert tool.main(["reshard", "--load", src, "--ckpt-step", "2", "--save", out, "--nproc", "1",
                              "--ckpt-format", "torch"]) == 0
            full, topo, it = load_full_model(out)
            assert it == 2 and topo["layout"]["world_size"] == 1
            assert torch.equal(full["embedding.word_embeddings.weight"], plain["embedding.word_embeddings.weight"])
            for i in range(2):
                assert torch.equal(full[f"decoder.layers.{i}.mlp.linear_fc2.weight"],
                                   plain["decoder.layers.mlp.linear_fc2.weight"][i])
                assert torch.equal(full[f"decoder.layers.{i}.mlp.linear_fc1.weight"],
                                   plain["decoder.layers.mlp.linear_fc1.weight"][i])
            man = __import__("json").load(open(os.path.join(checkpoint_dir(out, 2), "manifest.json")))
            state = load_verified(os.path.join(checkpoint_dir(out, 2), "rank_00000.pt"), man["files"]["rank_00000.pt"])
            assert state["optimizer"] is not None and state["iteration"] == 2
        dist.barrier()


def _sibling_tool():
    from megatron_md.testing.tools import load_tool
    return load_tool("convert_checkpoint")


dist_group = group_fixture(2, _dist_checks, megatron=True, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS) + ["bad_input", "reshard_tool"])
def test_torch_dist_reshards_every_optimizer_state(dist_group, name):
    dist_group.assert_ok(name)
