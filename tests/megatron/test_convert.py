"""``tools/convert_checkpoint.py to-hf``: Hugging Face logits equal the Megatron model's.

One spawned group of 2 gloo ranks trains a Llama-style model with the real driver (RMSNorm,
SwiGLU, RoPE, GQA 4 heads / 2 groups, no biases) for 2 iterations and saves it — dense at TP=2
(tied embeddings; the vocabulary and every column/row-parallel and gated fc1 shard are merged),
MoE at EP=2 (4 experts, top-2, untied head) — then both ranks load the checkpoint into the
driver's GPTModel and compute logits on fixed random tokens (TP shards gathered), while rank 0
converts with the tool's entry point and runs ``transformers.AutoModelForCausalLM`` (eager
attention, fp32) on the same tokens: logits agree to 1e-4 relative (of the largest logit).
A PP=2 checkpoint merges into the same weights as the PP=1 run of the same training (1e-4).
``sf-to-x`` of a schedule-free (sf-normuon, DP=2) checkpoint, loaded with ``--no-load-optim``,
evaluates to the driver's own schedule-free validation loss (1e-6), unlike the raw weights y.

``to-md`` of an AdamW-trained checkpoint (untied head), at TP=2 resumed with muon-md and at DP=2
with ZeRO-1 (``--use-distributed-optimizer``, flat shards) resumed with adam-md: the model as the
driver builds it from the converted checkpoint — optimizer constructed first, weights loaded
after it, as in ``pretrain`` — gives the original checkpoint's logits exactly (fp32), and still
does (1e-5) after a zero-gradient optimizer step, which is where MD factors the gains of every
hidden matrix and of the head from the loaded weights: they equal the reference
(``reference.factor_gains`` of the gathered logical matrix), with D on its sphere. The same
zero-gradient step with ``--md-init project`` moves the logits by O(1) (the trained matrices are
pulled onto their spheres). The resumed MD run trains (loss falls over 6 iterations). to-md of
a missing checkpoint, of its own output, of an MD-trained checkpoint or onto an existing one
fails with one ``error:`` line; resuming the output without the flags it needs is refused by
the driver's argument check, naming them.
"""
from __future__ import annotations

import os
from importlib import util
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_md.checkpoint.integrity import TRACKER  # noqa: E402
from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--num-query-groups", "2", "--ffn-hidden-size", "48"]
CASES = {
    "dense_tp2": ["--tensor-model-parallel-size", "2"],
    "moe_ep2": ["--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
                "--untie-embeddings-and-output-weights", "--moe-token-dispatcher-type", "alltoall"],
    "qk_tp2": ["--tensor-model-parallel-size", "2", "--qk-layernorm"],      # exported as Qwen3
    # YaRN on a 4x context: megatron-core's YarnRotaryEmbedding against transformers' own YaRN (an
    # independent implementation), positions 0..15 beyond the original 8, a non-default temperature
    "yarn_tp2": ["--tensor-model-parallel-size", "2", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
                 "--original-max-position-embeddings", "8", "--mscale", "1.5", "--mscale-all-dim", "0.5",
                 "--max-position-embeddings", "32"],
}
#: the Hugging Face class each case exports to
ARCH = {"dense_tp2": "LlamaForCausalLM", "moe_ep2": "MixtralForCausalLM", "qk_tp2": "Qwen3ForCausalLM",
        "yarn_tp2": "LlamaForCausalLM"}
RTOL = 1e-4


def _sibling(name: str):
    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _convert_checks(ctx):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_md.checkpoint.merge import load_full_model
    from megatron_md.checkpoint import load_checkpoint
    from megatron_md.training import model as M
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    drv = _sibling("test_driver")
    tool = _sibling_tool()
    prefix = os.path.join(ctx.tmpdir, "synthetic")
    if ctx.rank == 0:
        drv._write_synthetic(prefix)
    dist.barrier()
    base = [a for a in drv.TINY if a != "--mock-data"] + LLAMA + [
        "--data-path", prefix, "--train-iters", "2", "--eval-iters", "0", "--make-vocab-size-divisible-by", "64",
        "--vocab-size", "250", "--seed", "7", "--optimizer", "adam", "--global-batch-size", "4", "--ckpt-format", "torch"]
    for name, extra in CASES.items():
        with ctx.check(f"to_hf_logits_{name}"):
            save = os.path.join(ctx.tmpdir, name)
            pretrain(parse_args(base + extra + ["--save", save]))
            args = parse_args(base + extra + ["--save", save])
            M.initialize(args)
            try:
                model = M.build_model(args, M.transformer_config(args))
                load_checkpoint(save, model, None, None, args, load_optim=False)
                g = torch.Generator().manual_seed(3)
                tokens = torch.randint(3, 250, (2, 16), generator=g)
                pos = torch.arange(16).unsqueeze(0).expand(2, 16)
                model[0].eval()
                with torch.no_grad():
                    logits = model[0](tokens, pos, None)
                parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
                ref = torch.cat(parts, dim=-1)[..., :250]
            finally:
                ps.destroy_model_parallel()
            if ctx.rank == 0:
                from transformers import AutoModelForCausalLM
                out = os.path.join(ctx.tmpdir, f"{name}_hf")
                assert tool.main(["to-hf", "--load", save, "--out", out]) == 0
                hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
                assert type(hf).__name__ == ARCH[name]
                with torch.no_grad():
                    got = hf(tokens).logits
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                ctx.record(name, err)
                assert got.shape == ref.shape and err <= RTOL, (got.shape, ref.shape, err)

    with ctx.check("pp2_merges_to_the_pp1_weights"):
        runs = {}
        for pp in ("1", "2"):
            save = os.path.join(ctx.tmpdir, f"pp{pp}")
            pretrain(parse_args(base + ["--num-layers", "4", "--pipeline-model-parallel-size", pp, "--save", save]))
            if ctx.rank == 0:
                runs[pp] = load_full_model(save)[0]
        if ctx.rank == 0:
            assert runs["1"].keys() == runs["2"].keys(), sorted(set(runs["1"]) ^ set(runs["2"]))
            assert any(k.startswith("decoder.layers.3.") for k in runs["2"])
            for k, a in runs["1"].items():
                b = runs["2"][k]
                assert a.shape == b.shape and (a - b).abs().max() <= RTOL * a.abs().max(), k

    with ctx.check("sf_to_x_gives_the_driver_eval_loss"):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_md.training.data import build_datasets
        from megatron_md.training.pretrain import evaluate
        save, out = os.path.join(ctx.tmpdir, "sf"), os.path.join(ctx.tmpdir, "sf_x")
        sf = ["--optimizer", "sf-normuon", "--eval-iters", "1", "--eval-interval", "2"]
        full = pretrain(parse_args(base + sf + ["--save", save]))
        if ctx.rank == 0:
            assert tool.main(["sf-to-x", "--load", save, "--save", out]) == 0
            assert tool.main(["sf-to-x", "--load", save, "--save", out]) == 1  # never overwrites
        dist.barrier()
        losses = {}
        for which, path in (("x", out), ("y", save)):
            args = parse_args(base + ["--eval-iters", "1", "--load", path, "--no-load-optim"])
            M.initialize(args)
            try:
                model = M.build_model(args, M.transformer_config(args))
                load_checkpoint(path, model, None, None, args, load_optim=False)
                losses[which] = evaluate(args, model, None, build_datasets(args)[1], get_forward_backward_func())
            finally:
                ps.destroy_model_parallel()
        ctx.record("sf_losses", {**losses, "driver": full["final_val_loss"]})
        ref = full["final_val_loss"]
        assert abs(losses["x"] - ref) <= 1e-6 * abs(ref), (losses, ref)
        assert abs(losses["y"] - ref) > 1e-4 * abs(ref), (losses, ref)  # x is not the training iterate y

    _to_md_checks(ctx, base, tool)
    _torch_dist_checks(ctx, base, tool)

    with ctx.check("to_hf_refuses_non_llama_models"):
        if ctx.rank == 0:
            plain = os.path.join(ctx.tmpdir, "pp1")  # its layout is fine; rewrite the topology as a GPT-2 style one
            state, topo, _ = load_full_model(plain)
            topo["model"]["normalization"] = "LayerNorm"
            from megatron_md.checkpoint.hf import to_hf_state
            with pytest.raises(ValueError, match="--normalization RMSNorm"):
                to_hf_state(state, topo)
            missing = os.path.join(ctx.tmpdir, "nothing_here")
            assert tool.main(["to-hf", "--load", missing, "--out", missing + "_hf"]) == 1


#: the per-rank runs above, by name: their layout flags
DIST_CASES = {"dense_tp2": CASES["dense_tp2"], "moe_ep2": CASES["moe_ep2"],
              "pp2": ["--num-layers", "4", "--pipeline-model-parallel-size", "2"]}
DIST_CHECKS = ["to_hf_torch_dist_equals_per_rank", "to_hf_bf16_shards_with_index_load_in_transformers",
               "to_hf_of_grouped_gemm_experts",
               "sf_to_x_torch_dist_equals_per_rank", "to_md_torch_dist_resumes_as_the_per_rank_one"]


def _same_export(a: str, b: str) -> None:
    """Two to-hf folders hold the same tensors, bit for bit, and the same config."""
    import json

    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta, sorted(set(ta) ^ set(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    for f in ("config.json", "generation_config.json"):
        assert json.load(open(os.path.join(a, f))) == json.load(open(os.path.join(b, f))), f


def _torch_dist_checks(ctx, base, tool):
    """to-hf reads torch_dist checkpoints (TP=2, EP=2, PP=2) into what it gives for the per-rank
    ones of the same weights; bf16 shards with an index load in transformers; sf-to-x of torch_dist
    schedule-free runs (DP=2, TP=2, MoE EP=2) gives the per-rank conversion's x bit for bit."""
    import json

    import torch
    import torch.distributed as dist

    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    with ctx.check("to_hf_torch_dist_equals_per_rank"):
        for name, layout in DIST_CASES.items():
            src, dst = os.path.join(ctx.tmpdir, name), os.path.join(ctx.tmpdir, f"{name}_dist")
            # the same run's state re-saved as torch_dist: nothing left to train, the weights as loaded
            pretrain(parse_args(base + layout + ["--load", src, "--save", dst, "--ckpt-format", "torch_dist"]))
            if ctx.rank == 0:
                assert json.load(open(os.path.join(dst, "iter_0000002", "manifest.json")))["ckpt_format"] == "torch_dist"
                for fmt, ckpt in (("torch", src), ("dist", dst)):
                    assert tool.main(["to-hf", "--load", ckpt, "--out", os.path.join(ctx.tmpdir, f"{name}_hf_{fmt}")]) == 0
                _same_export(os.path.join(ctx.tmpdir, f"{name}_hf_torch"), os.path.join(ctx.tmpdir, f"{name}_hf_dist"))
            dist.barrier()

    with ctx.check("to_hf_bf16_shards_with_index_load_in_transformers"):
        if ctx.rank == 0:
            from safetensors.torch import load_file
            from transformers import AutoModelForCausalLM
            out = os.path.join(ctx.tmpdir, "moe_ep2_hf_bf16")
            assert tool.main(["to-hf", "--load", os.path.join(ctx.tmpdir, "moe_ep2_dist"), "--out", out,
                              "--dtype", "bf16", "--max-shard-size", "20KB"]) == 0
            index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
            files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
            assert len(files) > 2 and set(index["weight_map"].values()) == set(files), files
            assert all(os.path.getsize(os.path.join(out, f)) <= 20_000 + 4096 or
                       len(load_file(os.path.join(out, f))) == 1 for f in files)  # only a lone tensor is larger
            ref = {}
            d32 = os.path.join(ctx.tmpdir, "moe_ep2_hf_dist")
            for f in os.listdir(d32):
                if f.endswith(".safetensors"):
                    ref.update(load_file(os.path.join(d32, f)))
            assert set(index["weight_map"]) == set(ref)
            assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ref.values())
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
            got = dict(hf.named_parameters())
            for k, v in ref.items():
                if k in got:
                    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k].detach(), v.to(torch.bfloat16)), k
            assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
            assert json.load(open(os.path.join(out, "generation_config.json")))["do_sample"] is False

    with ctx.check("to_hf_of_grouped_gemm_experts"):
        # a MoE with legacy GroupedMLP experts (--moe-grouped-gemm, bf16: all experts of a layer in one
        # transposed tensor) trained at EP=1 x DP=2 and saved as torch_dist, then loaded into
        # SequentialMLP experts (the whole state: nothing left to train) and re-saved: to-hf of the
        # grouped checkpoint gives the SequentialMLP one's export bit for bit
        moe = list(DIST_CASES["moe_ep2"])
        i = moe.index("--expert-model-parallel-size")
        del moe[i:i + 2]
        grouped, seq = os.path.join(ctx.tmpdir, "moe_grouped_dist"), os.path.join(ctx.tmpdir, "moe_grouped_as_seq")
        pretrain(parse_args(base + moe + ["--bf16", "--moe-grouped-gemm", "--save", grouped, "--ckpt-format", "torch_dist"]))
        pretrain(parse_args(base + moe + ["--bf16", "--load", grouped, "--save", seq, "--ckpt-format", "torch_dist"]))
        if ctx.rank == 0:
            out = {}
            for name, ckpt in (("grouped", grouped), ("seq", seq)):
                out[name] = os.path.join(ctx.tmpdir, f"moe_{name}_hf")
                assert tool.main(["to-hf", "--load", ckpt, "--out", out[name]]) == 0
            _same_export(out["grouped"], out["seq"])
        dist.barrier()

    with ctx.check("sf_to_x_torch_dist_equals_per_rank"):
        # schedule-free runs saved in both formats — DP=2 (the run of sf_to_x_gives_the_driver_eval_loss
        # again), TP=2 and MoE EP=2: sf-to-x of the torch_dist checkpoint (a driver run at its layout)
        # gives the same x, bit for bit, as sf-to-x of the per-rank files
        from torch.distributed.checkpoint import FileSystemReader
        sf = ["--optimizer", "sf-normuon", "--eval-iters", "1", "--eval-interval", "2"]
        for name, layout in (("dp2", []), ("tp2", DIST_CASES["dense_tp2"]), ("ep2", DIST_CASES["moe_ep2"])):
            per_rank = os.path.join(ctx.tmpdir, "sf") if name == "dp2" else os.path.join(ctx.tmpdir, f"sf_{name}")
            if name != "dp2":
                pretrain(parse_args(base + layout + sf + ["--save", per_rank]))
            save = os.path.join(ctx.tmpdir, f"sf_dist_{name}")
            pretrain(parse_args(base + layout + sf + ["--save", save, "--ckpt-format", "torch_dist"]))
            if ctx.rank == 0:
                out = save + "_x"
                assert tool.main(["sf-to-x", "--load", save, "--save", out]) == 0
                assert tool.main(["sf-to-x", "--load", save, "--save", out]) == 1   # never overwrites
                man = json.load(open(os.path.join(out, "iter_0000002", "manifest.json")))
                assert man["ckpt_format"] == "torch_dist" and man["topology"]["optim"]["optimizer"].startswith("none")
                keys = FileSystemReader(os.path.join(out, "iter_0000002")).read_metadata().state_dict_metadata
                assert keys and not any(k.startswith("optimizer.") for k in keys), "optimizer state in the output"
                x_per_rank = per_rank + "_x" if name != "dp2" else os.path.join(ctx.tmpdir, "sf_x")
                if name != "dp2":
                    assert tool.main(["sf-to-x", "--load", per_rank, "--save", x_per_rank]) == 0
                for src, fmt in ((x_per_rank, "torch"), (out, "dist")):
                    assert tool.main(["to-hf", "--load", src, "--out", os.path.join(ctx.tmpdir, f"sf_hf_{name}_{fmt}")]) == 0
                _same_export(os.path.join(ctx.tmpdir, f"sf_hf_{name}_torch"), os.path.join(ctx.tmpdir, f"sf_hf_{name}_dist"))
            dist.barrier()

    with ctx.check("to_md_torch_dist_resumes_as_the_per_rank_one"):
        # the AdamW TP=2 run of the to-md checks, re-saved as torch_dist (nothing left to train)
        md_base = base + ["--untie-embeddings-and-output-weights", "--log-interval", "1"]
        layout, opt, extra = TO_MD_CASES["tp2"]
        src, dst = os.path.join(ctx.tmpdir, "adam_tp2"), os.path.join(ctx.tmpdir, "adam_tp2_dist")
        out, per_rank = os.path.join(ctx.tmpdir, "md_tp2_dist"), os.path.join(ctx.tmpdir, "md_tp2")
        pretrain(parse_args(md_base + layout + EVAL + ["--train-iters", "6", "--weight-decay", "0.1", "--load", src,
                                                       "--save", dst, "--ckpt-format", "torch_dist"]))
        if ctx.rank == 0:
            assert tool.main(["to-md", "--load", dst, "--save", out]) == 0
            man = json.load(open(os.path.join(out, "iter_0000006", "manifest.json")))
            assert man["ckpt_format"] == "torch_dist" and man["topology"]["to_md"]["from"] == "adam"
            name = sorted(man["files"])[0]   # the files themselves, not rewritten
            assert os.path.samefile(os.path.join(dst, "iter_0000006", name), os.path.join(out, "iter_0000006", name))
        dist.barrier()
        md = md_base + layout + extra + ["--optimizer", opt, "--weight-decay", "0", "--train-iters", "2"]
        losses = {k: pretrain(parse_args(md + ["--load", path] + TO_MD_FLAGS))["train_loss_history"]
                  for k, path in (("per_rank", per_rank), ("torch_dist", out))}
        ctx.record("to_md_dist_losses", losses)
        assert losses["per_rank"].keys() == losses["torch_dist"].keys() == {"1", "2"}, losses
        assert all(abs(losses["per_rank"][i] - losses["torch_dist"][i]) <= 1e-6 * abs(losses["per_rank"][i])
                   for i in ("1", "2")), losses


TO_MD_CASES = {
    # name: (layout flags of the AdamW run and of the MD resume, MD optimizer, extra MD flags)
    "tp2": (["--tensor-model-parallel-size", "2"], "muon-md", []),
    "dp2_zero": (["--use-distributed-optimizer"], "adam-md", ["--no-split-qkv"]),
}
TO_MD_FLAGS = ["--no-load-optim", "--md-init", "factor", "--no-md-embedding-unit-norm"]
EVAL = ["--eval-iters", "2", "--eval-interval", "100"]  # the validation loss at the end of a run
TO_MD_CHECKS = [f"to_md_{c}_{what}" for c in TO_MD_CASES
                for what in ("logits_unchanged", "gains_equal_reference", "resumed_run_trains")] + [
    "to_md_bad_input_is_one_error_line", "to_md_resume_without_its_flags_is_refused"]


def _gather_full(shard, local):
    """The logical matrix of a MatrixShard's local piece, gathered level by level (a FlatRange
    → its inner matrix, a TensorParallel piece → the whole matrix)."""
    import torch
    import torch.distributed as dist
    x = local.detach()
    while shard is not None and shard.level_group is not None:
        n = max(shard.piece_numels())
        flat = torch.zeros(n, dtype=x.dtype)
        flat[:x.numel()] = x.reshape(-1)
        pieces = [torch.empty_like(flat) for _ in range(dist.get_world_size(shard.level_group))]
        dist.all_gather(pieces, flat, group=shard.level_group)
        x, shard = shard.assemble(pieces), shard.inner
    return x


def _md_gain_mismatches(optimizer) -> tuple[list, int]:
    """Every hidden matrix and head row-sphere of the MD run: (mismatches against
    ``reference.factor_gains`` of the gathered W and the sphere of D, number of matrices)."""
    import torch
    import torch.nn.functional as F

    from megatron_md.megatron.builder import hybrid_optimizers
    from megatron_md.optim import reference as ref
    bad, count = [], 0
    for hyb in hybrid_optimizers(optimizer):
        for opt in (hyb.matrix_optimizer, hyb._head):  # _head: the MD output head's AdamMD(sphere="rows")
            if opt is None:
                continue
            for g in opt.param_groups:
                for p in g["params"]:
                    for k, m in enumerate(opt.mats_of(p, g)):
                        count += 1
                        rows = g["sphere"] == "rows"
                        W = _gather_full(m.shard, m.W)
                        g_r, g_c = ref.factor_gains(W, opt.radius(m), g["sphere"])
                        s_r, s_c = opt.gains(p, k)
                        (r0, r1), (c0, c1) = m.shard.row_range, m.shard.col_range
                        D = _gather_full(m.shard, opt.direction(p, k))
                        norm = D.norm(dim=1) if rows else D.norm()
                        for what, a, b in (("row gains", s_r, F.softplus(g_r)[r0:r1]),
                                           ("col gains", s_c, F.softplus(g_c)[c0:c1]),
                                           ("sphere", norm, torch.full_like(norm, opt.radius(m)))):
                            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                                bad.append(f"{hyb.matrix_names.get(p, tuple(p.shape))}[{k}] {what}: "
                                           f"max err {(a - b).abs().max().item():.3g}")
    return bad, count


def _logits(model, tokens):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model[0].eval()
    with torch.no_grad():
        out = model[0](tokens, pos, None)
    model[0].train()
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _md_model_after_zero_step(args, path, tokens):
    """The driver's order (optimizer built, then the weights-only load), logits, one optimizer
    step on zero gradients, logits again; returns (before, after, gain mismatches, matrices)."""
    from megatron.core import parallel_state as ps

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.checkpoint import load_checkpoint
    from megatron_md.training import model as M
    from megatron_md.training.arguments import optimizer_config
    M.initialize(args)
    try:
        model = M.build_model(args, M.transformer_config(args))
        optimizer = get_megatron_optimizer(optimizer_config(args), model, args.md)
        load_checkpoint(path, model, optimizer, None, args, load_optim=False, load_rng=False)
        before = _logits(model, tokens)
        for c in model:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        ok, _, _ = optimizer.step()
        assert ok, "the zero-gradient step was skipped"
        after = _logits(model, tokens)
        bad, count = _md_gain_mismatches(optimizer) if args.md.md_init == "factor" else ([], 0)
        return before, after, bad, count
    finally:
        ps.destroy_model_parallel()


def _to_md_checks(ctx, base, tool):
    import contextlib
    import io

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_md.checkpoint import load_checkpoint
    from megatron_md.training import model as M
    from megatron_md.training.arguments import ArgumentError, parse_args
    from megatron_md.training.pretrain import pretrain

    base = base + ["--untie-embeddings-and-output-weights", "--log-interval", "1"]
    tokens = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(5))
    for name, (layout, opt, extra) in TO_MD_CASES.items():
        orig, out = os.path.join(ctx.tmpdir, f"adam_{name}"), os.path.join(ctx.tmpdir, f"md_{name}")
        md = base + layout + extra + ["--optimizer", opt, "--weight-decay", "0"]
        with ctx.check(f"to_md_{name}_logits_unchanged"):
            trained = pretrain(parse_args(base + layout + EVAL + ["--train-iters", "6", "--weight-decay", "0.1",
                                                                  "--save", orig]))
            if ctx.rank == 0:
                assert tool.main(["to-md", "--load", orig, "--save", out]) == 0
            dist.barrier()
            args = parse_args(base + layout)
            M.initialize(args)
            try:
                model = M.build_model(args, M.transformer_config(args))
                load_checkpoint(orig, model, None, None, args, load_optim=False)
                ref = _logits(model, tokens)
            finally:
                ps.destroy_model_parallel()
            before, after, bad, count = _md_model_after_zero_step(parse_args(md + ["--load", out] + TO_MD_FLAGS),
                                                                  out, tokens)
            scale = ref.abs().max().item()
            err0, err1 = ((before - ref).abs().max().item() / scale, (after - ref).abs().max().item() / scale)
            ctx.record(f"to_md_{name}_logit_err", {"after_load": err0, "after_zero_step": err1, "matrices": count})
            assert err0 <= 1e-6 and err1 <= 1e-5, (err0, err1)
        with ctx.check(f"to_md_{name}_gains_equal_reference"):
            assert count > 0 and not bad, (count, bad[:5])
            # the same zero-gradient step with the paper's projection moves a trained model's outputs
            proj = parse_args(md + ["--load", orig, "--no-load-optim", "--no-md-embedding-unit-norm"])
            _, moved, _, _ = _md_model_after_zero_step(proj, orig, tokens)
            err = (moved - ref).abs().max().item() / scale
            ctx.record(f"to_md_{name}_project_logit_change", err)
            assert err > 1e-2, err
        with ctx.check(f"to_md_{name}_resumed_run_trains"):
            # validation loss of the converted model (= the AdamW run's last one) → after 8 MD iterations;
            # the same 8 iterations after the paper's projection start from a pulled-apart model
            runs = {"factor": pretrain(parse_args(md + EVAL + ["--load", out, "--train-iters", "8", "--save",
                                                              out + "_run"] + TO_MD_FLAGS)),
                    "project": pretrain(parse_args(md + EVAL + ["--load", orig, "--no-load-optim", "--train-iters",
                                                                "8", "--no-md-embedding-unit-norm"]))}
            got = {k: {"train": [round(r["train_loss_history"][str(i)], 4) for i in range(1, 9)],
                       "val": r["final_val_loss"]} for k, r in runs.items()}
            ctx.record(f"to_md_{name}_losses", {"adam_val": trained["final_val_loss"], **got})
            assert got["factor"]["val"] < trained["final_val_loss"] < got["project"]["val"], got
            assert got["factor"]["train"][1] < got["project"]["train"][1], got  # the first step keeps the model

    with ctx.check("to_md_bad_input_is_one_error_line"):
        if ctx.rank == 0:
            d = ctx.tmpdir
            never = os.path.join(d, "never_written")
            for load, save, needle in ((os.path.join(d, "nothing_here"), never, "does not exist"),
                                       (os.path.join(d, "md_tp2"), never, "already MD-ready"),
                                       (os.path.join(d, "md_tp2_run"), never, "already MD"),
                                       (os.path.join(d, "adam_tp2"), os.path.join(d, "md_tp2"), "already a checkpoint")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = tool.main(["to-md", "--load", load, "--save", save])
                lines = err.getvalue().strip().splitlines()
                assert rc == 1 and len(lines) == 1 and "to-md: error:" in lines[0] and needle in lines[0], (load, lines)
            assert not os.path.exists(os.path.join(never, TRACKER))

    with ctx.check("to_md_resume_without_its_flags_is_refused"):
        if ctx.rank == 0:
            layout, opt, extra = TO_MD_CASES["tp2"]
            md = base + layout + ["--optimizer", opt, "--weight-decay", "0", "--load", os.path.join(ctx.tmpdir, "md_tp2")]
            for drop, needles in ((["--md-init", "factor"], ["--md-init factor"]),
                                  (["--no-load-optim"], ["--no-load-optim"]),
                                  (["--no-md-embedding-unit-norm"], ["--no-md-embedding-unit-norm"]),
                                  (TO_MD_FLAGS, ["--no-load-optim", "--md-init factor",
                                                 "--no-md-embedding-unit-norm"])):
                flags = [f for f in TO_MD_FLAGS if f not in drop]
                try:
                    parse_args(md + flags)
                except ArgumentError as exc:
                    msg = str(exc)
                else:
                    raise AssertionError(f"accepted without {drop}")
                assert all(n in msg for n in needles) and "\n" not in msg, (drop, msg)
            parse_args(md + TO_MD_FLAGS)  # the right flags pass
            parse_args(base + layout + ["--optimizer", "adam", "--load", os.path.join(ctx.tmpdir, "md_tp2"),
                                        "--no-load-optim"])  # plain Adam needs only --no-load-optim


def _sibling_tool():
    from megatron_md.testing.tools import load_tool
    return load_tool("convert_checkpoint")


convert_group = group_fixture(2, _convert_checks, megatron=True, timeout=800)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"to_hf_logits_{c}" for c in CASES]
                         + ["pp2_merges_to_the_pp1_weights", "sf_to_x_gives_the_driver_eval_loss",
                            "to_hf_refuses_non_llama_models"] + TO_MD_CHECKS + DIST_CHECKS)
def test_convert(convert_group, name):
    convert_group.assert_ok(name)


def test_help_lists_subcommands_with_examples(capsys):
    tool = _sibling_tool()
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = capsys.readouterr().out
    assert "to-hf" in text and "sf-to-x" in text and "Examples:" in text and "--position-embedding-type rope" in text
    assert "to-md" in text and "--md-init factor --no-md-embedding-unit-norm" in text
