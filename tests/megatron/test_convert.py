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
"""
from __future__ import annotations

import os
from importlib import util
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--num-query-groups", "2", "--ffn-hidden-size", "48"]
CASES = {
    "dense_tp2": ["--tensor-model-parallel-size", "2"],
    "moe_ep2": ["--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
                "--untie-embeddings-and-output-weights", "--moe-token-dispatcher-type", "alltoall"],
}
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

    from megatron_md.convert.megatron_ckpt import load_full_model
    from megatron_md.training import checkpointing as ck
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
        "--vocab-size", "250", "--seed", "7", "--optimizer", "adam", "--global-batch-size", "4"]
    for name, extra in CASES.items():
        with ctx.check(f"to_hf_logits_{name}"):
            save = os.path.join(ctx.tmpdir, name)
            pretrain(parse_args(base + extra + ["--save", save]))
            args = parse_args(base + extra + ["--save", save])
            M.initialize(args)
            try:
                model = M.build_model(args, M.transformer_config(args))
                ck.load_checkpoint(save, model, None, None, args, load_optim=False)
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
                assert type(hf).__name__ == ("MixtralForCausalLM" if "moe" in name else "LlamaForCausalLM")
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
                ck.load_checkpoint(path, model, None, None, args, load_optim=False)
                losses[which] = evaluate(args, model, None, build_datasets(args)[1], get_forward_backward_func())
            finally:
                ps.destroy_model_parallel()
        ctx.record("sf_losses", {**losses, "driver": full["final_val_loss"]})
        ref = full["final_val_loss"]
        assert abs(losses["x"] - ref) <= 1e-6 * abs(ref), (losses, ref)
        assert abs(losses["y"] - ref) > 1e-4 * abs(ref), (losses, ref)  # x is not the training iterate y

    with ctx.check("to_hf_refuses_non_llama_models"):
        if ctx.rank == 0:
            plain = os.path.join(ctx.tmpdir, "pp1")  # its layout is fine; rewrite the topology as a GPT-2 style one
            state, topo, _ = load_full_model(plain)
            topo["model"]["normalization"] = "LayerNorm"
            from megatron_md.convert.hf import to_hf_state
            with pytest.raises(ValueError, match="--normalization RMSNorm"):
                to_hf_state(state, topo)
            missing = os.path.join(ctx.tmpdir, "nothing_here")
            assert tool.main(["to-hf", "--load", missing, "--out", missing + "_hf"]) == 1


def _sibling_tool():
    spec = util.spec_from_file_location("convert_checkpoint", Path(__file__).parents[2] / "tools" / "convert_checkpoint.py")
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert_group = group_fixture(2, _convert_checks, megatron=True, timeout=400)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [f"to_hf_logits_{c}" for c in CASES]
                         + ["pp2_merges_to_the_pp1_weights", "sf_to_x_gives_the_driver_eval_loss",
                            "to_hf_refuses_non_llama_models"])
def test_convert(convert_group, name):
    convert_group.assert_ok(name)


def test_help_lists_subcommands_with_examples(capsys):
    tool = _sibling_tool()
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    text = capsys.readouterr().out
    assert "to-hf" in text and "sf-to-x" in text and "Examples:" in text and "--position-embedding-type rope" in text
