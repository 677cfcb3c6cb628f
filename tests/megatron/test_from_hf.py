"""``from-hf`` / ``--load-hf``: Hugging Face Llama, Qwen3 and Mixtral folders into megatron-core and back.

Rank 0 builds three models with ``transformers`` and random weights and saves them with
``save_pretrained``: a Llama with GQA (4 heads / 2 groups, untied head, fp32, one
``model.safetensors``), a Qwen3 (QK-norm, ``head_dim`` 16 ≠ hidden/heads, tied embeddings, **bf16**,
sharded with ``model.safetensors.index.json``) and a Mixtral (4 experts, top-2, fp32, sharded).
One spawned group of 2 gloo ranks then, per model:

* writes the checkpoint with the real driver (``--train-iters 0 --load-hf``; the flags are
  :func:`hf_import.model_flags` of the folder's config.json) at a 2-rank layout — Llama at TP=2,
  Qwen3 at PP=2, Mixtral at EP=2 — as torch_dist;
* exports it with ``to-hf`` (``--dtype bf16`` for the bf16 source): every tensor is bitwise the
  original and the names are the same set (round trip);
* loads it at *another* layout (Llama TP=1/DP=2, Qwen3 TP=2, Mixtral EP=1/DP=2) and computes logits on
  fixed tokens (TP shards gathered): they equal ``transformers``' fp32 logits of the original folder
  to 1e-4 relative (of the largest logit).

Then the Llama checkpoint trains (``--no-load-optim``) with adam and with muon-md
(``--md-init factor --no-md-embedding-unit-norm``): both see the same first-iteration loss (the
imported model), and with a vanishing LR MuonMD's first step keeps that model (its gains are factored
from the imported weights: the second loss equals the first), unlike the paper's projection. The
command-line tool writes a checkpoint with one rank (``torchrun``) and refuses what it must, in one
``error:`` line: architectures and settings no flag computes, a run whose flags differ from the
config (naming them), MD without the factor flags, a from-hf checkpoint loaded with its optimizer.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]

VOCAB = 250
#: name: (transformers config class, config kwargs, save_pretrained dtype, max_shard_size or None,
#:        layout that writes the checkpoint, layout that loads it for the logits)
MODELS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False), "float32", None,
              ["--tensor-model-parallel-size", "2"], []),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-6),
              "bfloat16", "20KB", ["--pipeline-model-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]),
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                      tie_word_embeddings=False), "float32", "40KB",
                ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], []),
}
BASE = ["--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--mock-data", "--eval-iters", "0",
        "--make-vocab-size-divisible-by", "64", "--log-interval", "1"]
RTOL = 1e-4


def _make_hf(name: str, out: str) -> None:
    import torch
    import transformers
    cls, kw, dtype, shard, _, _ = MODELS[name]
    cfg = getattr(transformers, cls)(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, **kw)
    torch.manual_seed({"llama": 1, "qwen3": 2, "mixtral": 3}[name])
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():   # norms away from 1 so that a dropped or swapped norm shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))


def _tensors(d: str) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def _logits(model, tokens):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model[0].eval()
    with torch.no_grad():
        out = model[0](tokens, pos, None)
    parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _checks(ctx):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_md.checkpoint import load_checkpoint
    from megatron_md.checkpoint.hf_import import model_flags, read_config
    from megatron_md.testing.tools import load_tool
    from megatron_md.training import model as M
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    tool = load_tool("convert_checkpoint")
    d = ctx.tmpdir
    if ctx.rank == 0:
        for name in MODELS:
            _make_hf(name, os.path.join(d, f"{name}_hf"))
    dist.barrier()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))

    for name, (_, _, dtype, shard, write, read) in MODELS.items():
        src, ckpt = os.path.join(d, f"{name}_hf"), os.path.join(d, f"{name}_ckpt")
        flags = model_flags(read_config(src)) + BASE
        with ctx.check(f"{name}_round_trip_is_bitwise"):
            if ctx.rank == 0:
                files = os.listdir(src)
                assert ("model.safetensors.index.json" in files) == bool(shard), files
            pretrain(parse_args(flags + write + ["--optimizer", "adam", "--train-iters", "0", "--load-hf", src,
                                                 "--save", ckpt]))
            if ctx.rank == 0:
                back = os.path.join(d, f"{name}_back")
                assert tool.main(["to-hf", "--load", ckpt, "--out", back,
                                  "--dtype", "bf16" if dtype == "bfloat16" else "fp32"]) == 0
                a, b = _tensors(src), _tensors(back)
                assert a.keys() == b.keys() and a, sorted(set(a) ^ set(b))
                bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
                assert not bad, bad
                man = json.load(open(os.path.join(ckpt, "iter_0000000", "manifest.json")))
                assert man["ckpt_format"] == "torch_dist" and man["topology"]["to_md"]["by"] == "from-hf", man
        with ctx.check(f"{name}_logits_equal_transformers"):
            args = parse_args(flags + read + ["--optimizer", "adam", "--train-iters", "1", "--load", ckpt,
                               "--no-load-optim"])
            M.initialize(args)
            try:
                model = M.build_model(args, M.transformer_config(args))
                load_checkpoint(ckpt, model, None, None, args, load_optim=False)
                got = _logits(model, tokens)[..., :VOCAB]
            finally:
                ps.destroy_model_parallel()
            if ctx.rank == 0:
                from transformers import AutoModelForCausalLM
                hf = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager", dtype=torch.float32)
                with torch.no_grad():
                    ref = hf(tokens).logits
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                ctx.record(f"{name}_logit_err", err)
                assert got.shape == ref.shape and err <= RTOL, (got.shape, ref.shape, err)

    src, ckpt = os.path.join(d, "llama_hf"), os.path.join(d, "llama_ckpt")
    flags = model_flags(read_config(src)) + BASE + ["--train-iters", "3", "--load", ckpt, "--no-load-optim"]
    factor = ["--md-init", "factor", "--no-md-embedding-unit-norm", "--weight-decay", "0"]
    with ctx.check("imported_model_trains_with_adam_and_muon_md"):
        runs = {"adam": pretrain(parse_args(flags + ["--optimizer", "adam"])),
                "muon-md": pretrain(parse_args(flags + ["--optimizer", "muon-md", *factor]))}
        losses = {k: [r["train_loss_history"][str(i)] for i in (1, 2, 3)] for k, r in runs.items()}
        ctx.record("losses", losses)
        assert all(torch.isfinite(torch.tensor(v)).all() for v in losses.values()), losses
        assert abs(losses["adam"][0] - losses["muon-md"][0]) <= 1e-6 * losses["adam"][0], losses
    with ctx.check("load_hf_under_fsdp2_gives_the_same_model"):
        # --load-hf straight into FSDP2's row shards (SwiGLU gate/up rows, the untied head): the first
        # loss is the imported model's, as at plain DP=2
        hf_flags = model_flags(read_config(src)) + BASE + ["--train-iters", "1", "--load-hf", src, "--optimizer", "adam"]
        plain = pretrain(parse_args(hf_flags))["train_loss_history"]["1"]
        fsdp = pretrain(parse_args(hf_flags + ["--use-torch-fsdp2"]))["train_loss_history"]["1"]
        ctx.record("fsdp2_first_losses", [plain, fsdp])
        assert abs(plain - fsdp) <= 1e-6 * plain, (plain, fsdp)
    with ctx.check("muon_md_first_step_keeps_the_imported_model"):
        tiny = ["--lr", "1e-12", "--min-lr", "0"]
        kept = pretrain(parse_args(flags + tiny + ["--optimizer", "muon-md", "--train-iters", "2", *factor]))
        l1, l2 = kept["train_loss_history"]["1"], kept["train_loss_history"]["2"]
        # the second batch differs from the first: compare with Adam's (an LR of 1e-12 moves nothing)
        ref = pretrain(parse_args(flags + tiny + ["--optimizer", "adam", "--train-iters", "2"]))["train_loss_history"]
        ctx.record("tiny_lr_losses", {"muon-md": [l1, l2], "adam": [ref["1"], ref["2"]]})
        assert abs(l1 - ref["1"]) <= 1e-6 * l1 and abs(l2 - ref["2"]) <= 1e-5 * l2, (l1, l2, ref)

    with ctx.check("cli_writes_and_refuses_in_one_line"):
        if ctx.rank == 0:
            out = os.path.join(d, "cli_ckpt")
            assert tool.main(["from-hf", "--load-hf", src, "--save", out, "--make-vocab-size-divisible-by", "64"]) == 0
            rec = json.load(open(os.path.join(out, "from_hf.json")))
            assert rec["architecture"] == "LlamaForCausalLM" and "--num-query-groups" in rec["model_flags"], rec
            assert _tensors_of_ckpt_equal(tool, out, ckpt, d)
            for argv, needle in ((["from-hf", "--load-hf", src, "--save", out], "already a checkpoint"),
                                 (["from-hf", "--load-hf", os.path.join(d, "nowhere"), "--save", out + "2"],
                                  "no config.json")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = tool.main(argv)
                lines = err.getvalue().strip().splitlines()
                assert rc == 1 and len(lines) == 1 and "from-hf: error:" in lines[0] and needle in lines[0], lines
            # the checkpoint holds weights only: a run that would load its optimizer is refused, naming the flag
            from megatron_md.training.arguments import ArgumentError
            with_optim = [f for f in flags if f != "--no-load-optim"]
            try:
                parse_args(with_optim + ["--optimizer", "adam"])
            except ArgumentError as exc:
                assert "--no-load-optim" in str(exc) and "from-hf" in str(exc), str(exc)
            else:
                raise AssertionError("a from-hf checkpoint loaded with its optimizer state was accepted")


def _tensors_of_ckpt_equal(tool, a: str, b: str, d: str) -> bool:
    """Two checkpoints export to the same tensors."""
    import torch
    ea, eb = os.path.join(d, "ea"), os.path.join(d, "eb")
    assert tool.main(["to-hf", "--load", a, "--out", ea]) == 0 and tool.main(["to-hf", "--load", b, "--out", eb]) == 0
    ta, tb = _tensors(ea), _tensors(eb)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


hf_group = group_fixture(2, _checks, megatron=True, timeout=400)

CHECKS = ([f"{n}_{c}" for n in MODELS for c in ("round_trip_is_bitwise", "logits_equal_transformers")]
          + ["imported_model_trains_with_adam_and_muon_md", "load_hf_under_fsdp2_gives_the_same_model",
             "muon_md_first_step_keeps_the_imported_model",
             "cli_writes_and_refuses_in_one_line"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", CHECKS)
def test_from_hf(hf_group, name):
    hf_group.assert_ok(name)


# ------------------------------------------------------------------------ refusals (in-process)
def _llama_config(**kw) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 48,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
           "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("kw, needle", [
    ({"architectures": ["GPT2LMHeadModel"]}, "from-hf maps LlamaForCausalLM"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unmappable_configs_are_refused_naming_the_setting(kw, needle):
    from megatron_md.checkpoint.hf_import import model_flags
    with pytest.raises(ValueError, match="cannot be imported|from-hf maps") as exc:
        model_flags(_llama_config(**kw))
    assert needle in str(exc.value), str(exc.value)


def test_transformers_5_rope_parameters_and_head_dim_map_to_flags():
    from megatron_md.checkpoint.hf_import import model_flags
    f = model_flags(_llama_config(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                  head_dim=16, tie_word_embeddings=True))
    assert f[f.index("--rotary-base") + 1] == "500000" and f[f.index("--kv-channels") + 1] == "16", f
    assert "--untie-embeddings-and-output-weights" not in f


def test_driver_refuses_a_run_that_is_not_the_folders_model(tmp_path):
    from megatron_md.checkpoint.hf_import import model_flags
    from megatron_md.training.arguments import ArgumentError, parse_args
    cfg = _llama_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    base = model_flags(cfg) + BASE + ["--train-iters", "2", "--load-hf", str(tmp_path)]
    parse_args(base + ["--optimizer", "adam"])   # the folder's own flags pass
    for argv, needles in (
            ([x if x != "48" else "64" for x in base] + ["--optimizer", "adam"], ["--ffn-hidden-size 48"]),
            (base + ["--optimizer", "adam", "--rotary-base", "500000"], ["--rotary-base 10000"]),
            (base + ["--optimizer", "muon-md"], ["--md-init factor", "--no-md-embedding-unit-norm"]),
            (base + ["--optimizer", "adam", "--load", str(tmp_path)], ["--load-hf and --load"]),
            (base + ["--optimizer", "adam", "--post-norm"], ["--post-norm"])):
        with pytest.raises(ArgumentError) as exc:
            parse_args(argv)
        assert all(n in str(exc.value) for n in needles), (argv, str(exc.value))
