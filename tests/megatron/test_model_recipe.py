"""The MD authors' model recipe (``--model-recipe md-paper`` and its parts) on megatron-core.

In-process: the preset's values, explicit flags winning over it, and invalid values refused naming
the flag; the checkpoint manifest records the recipe (older ones stand for the defaults), ``reshard``
rebuilds it, ``to-hf`` refuses it naming the flags.

One spawned group of 2 gloo ranks (the real driver, ``pretrain`` in-process, on test_driver's
synthetic indexed dataset):

* semantics against hand-written formulas on the built modules: a branch output is
  ``s · g ⊙ x / rms(x)`` of the plain megatron-core module's output (``s`` = 1/L, ``g`` the
  post-norm gain; no gain with ``--no-post-norm-gain``), the decoder input is √d × the embedding,
  the queries/keys pass a norm, and every matrix — ``linear_proj``/``linear_fc2`` included — starts
  with std 1/√d; MuonMD's gains run at the partner LR, or at an explicit gains LR;
* the recipe trains with the losses of TP=1 (1e-5 relative) at TP=2 (with and without sequence
  parallelism), PP=2 (1F1B and interleaved) and ZeRO-1, with MuonMD and AdamW; bf16 trains;
  the post-norm without gain the same way at TP=2;
* torch_dist checkpoints: a TP=2 run resumes at PP=2, and an EP=2 MoE run at EP=1 (MuonMD: its router
  under MD), with the losses of the uninterrupted run;
* MD's MoE router rule: the router on the MD optimizer's rows sphere at unit Muon scale, unit rows
  after construction; ``--no-md-router`` leaves it on AdamW.
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

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "8", "--lr", "0.01", "--mock-data"]


def _sibling(name: str):
    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ============================================================================ flags (in-process)
def test_preset_values_and_explicit_flags_win():
    from megatron_md.training.arguments import parse_args
    a = parse_args(BASE + ["--model-recipe", "md-paper", "--adam-beta2", "0.95", "--no-post-norm-gain",
                           "--init-method-std", "0.02"], world_size=1)
    assert a.qk_layernorm and a.post_norm and not a.post_norm_gain and not a.scaled_output_init
    assert a.embedding_multiplier == pytest.approx(math.sqrt(32)) and a.fixed_layer_scale == pytest.approx(0.5)
    assert a.untie_embeddings_and_output_weights and a.swiglu and a.disable_bias_linear
    assert (a.normalization, a.position_embedding_type) == ("RMSNorm", "rope")
    assert a.adam_beta2 == 0.95 and a.init_method_std == 0.02  # given explicitly: the preset does not override
    d = parse_args(BASE, world_size=1)
    assert not (d.qk_layernorm or d.post_norm) and d.embedding_multiplier is None and d.fixed_layer_scale is None
    assert d.init_method_std == 0.02 and d.scaled_output_init and d.adam_beta2 == 0.999
    p = parse_args(BASE + ["--model-recipe", "md-paper", "--init-method-std=0.05"], world_size=1)
    assert p.init_method_std == 0.05 and p.adam_beta2 == 0.99
    m = parse_args(BASE + ["--model-recipe", "md-paper-moe"], world_size=1)
    assert m.qk_layernorm and not m.post_norm and m.embedding_multiplier is None and m.fixed_layer_scale is None
    assert m.init_method_std == pytest.approx(1 / math.sqrt(32)) and m.adam_beta2 == 0.95 and m.scaled_output_init


def test_checkpoint_records_the_recipe_and_reshard_rebuilds_it():
    """The manifest's model section carries the recipe (compared on load; older checkpoints without
    the keys stand for the defaults) and ``reshard`` passes it back to the driver."""
    import socket

    import torch.distributed as dist

    from megatron_md.checkpoint.reshard import driver_flags
    from megatron_md.checkpoint import topology as ck
    from megatron_md.training.arguments import parse_args
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _check_manifest(ck, driver_flags, parse_args)
    finally:
        dist.destroy_process_group()


def _check_manifest(ck, driver_flags, parse_args):
    a = parse_args(BASE + ["--model-recipe", "md-paper", "--no-post-norm-gain"], world_size=1)
    a.padded_vocab_size, a.vocab_size, a.transformer_impl = 128, 100, "local"
    topo = ck.run_topology(a)
    m = topo["model"]
    assert m["qk_layernorm"] and m["post_norm"] and not m["post_norm_gain"]
    assert m["fixed_layer_scale"] == 0.5 and m["embedding_multiplier"] == pytest.approx(math.sqrt(32))
    flags = driver_flags(topo, tp=1)
    again = parse_args(flags + ["--micro-batch-size", "2", "--train-iters", "1", "--lr", "0.01", "--mock-data"],
                       world_size=1)
    assert ck._recipe_keys(again) == ck._recipe_keys(a)
    plain = parse_args(BASE, world_size=1)
    plain.padded_vocab_size, plain.vocab_size, plain.transformer_impl = 128, 100, "local"
    old = ck.run_topology(plain)
    for k in ck._MODEL_KEY_DEFAULTS:  # a checkpoint from before the recipe: same model as the defaults
        del old["model"][k]
    assert not ck.topology_diffs(old, ck.run_topology(plain), "model", ck.MODEL_FLAGS)
    assert any("--post-norm" in d for d in ck.topology_diffs(old, topo, "model", ck.MODEL_FLAGS))
    from megatron_md.checkpoint.hf import to_hf_state
    with pytest.raises(ValueError, match="--embedding-multiplier, --post-norm, --fixed-layer-scale, --qk-layernorm"):
        to_hf_state({}, topo)  # no Llama/Mixtral computes the recipe: refused, naming its flags


@pytest.mark.parametrize("extra, flag", [(["--fixed-layer-scale", "0"], "--fixed-layer-scale"),
                                         (["--embedding-multiplier", "nan"], "--embedding-multiplier"),
                                         (["--model-recipe", "md"], "--model-recipe")])
def test_bad_recipe_values_are_refused_naming_the_flag(extra, flag):
    from megatron_md.training.arguments import ArgumentError, parse_args
    with pytest.raises(ArgumentError, match=flag):
        parse_args(BASE + extra, world_size=1)


# ============================================================================ spawned group
def _close(a: float, b: float) -> bool:
    return _sibling("test_pipeline")._close(a, b)


def _compare(ref: dict, got: dict) -> None:
    """Train and validation losses equal to 1e-5 relative, no skipped step (test_pipeline's check)."""
    _sibling("test_pipeline")._compare(ref, got)


def _semantics(ctx, base):
    """The built modules compute what the recipe says (rank-local, no training)."""
    import torch
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    from megatron_md.training import model as M
    from megatron_md.training.arguments import parse_args

    for gain in (True, False):
        args = parse_args(base + ["--model-recipe", "md-paper"] + ([] if gain else ["--no-post-norm-gain"]))
        args.padded_vocab_size = 64
        created = M.initialize(args)
        try:
            config = M.transformer_config(args)
            gpt = M.unwrap(M.build_model(args, config)[0])
            d, L = args.hidden_size, args.num_layers
            layer = gpt.decoder.layers[0]
            with torch.no_grad():
                for n, p in gpt.named_parameters():
                    if p.dim() == 2:  # every matrix at std 1/sqrt(d), no 1/sqrt(2L) shrink of the residual outputs
                        assert abs(p.std().item() * math.sqrt(d) - 1) < 0.15, (n, p.std().item())
                x = torch.randn(args.seq_length, 2, d)

                def expect(out):
                    y = out / out.pow(2).mean(-1, keepdim=True).add(config.layernorm_epsilon).sqrt()
                    if gain:
                        y = y * layer.self_attention.post_norm.weight
                    return y / L

                for br in (layer.mlp,):
                    br.post_norm.weight.uniform_(0.5, 1.5) if gain else None
                    got, bias = br(x)
                    ref, _ = MLP.forward(br, x)
                    y = ref / ref.pow(2).mean(-1, keepdim=True).add(config.layernorm_epsilon).sqrt()
                    y = (y * br.post_norm.weight if gain else y) / L
                    assert bias is None and torch.allclose(got, y, rtol=1e-5, atol=1e-6)
                att = layer.self_attention
                if gain:
                    att.post_norm.weight.uniform_(0.5, 1.5)
                else:
                    assert not list(att.post_norm.parameters())
                got, _ = att(x, attention_mask=None, rotary_pos_emb=None)
                ref, _ = SelfAttention.forward(att, x, attention_mask=None, rotary_pos_emb=None)
                assert torch.allclose(got, expect(ref), rtol=1e-5, atol=1e-6)
                assert type(att.q_layernorm).__name__ != "IdentityOp" and config.qk_layernorm
                tok = torch.randint(0, 64, (2, args.seq_length))
                pos = torch.arange(args.seq_length)[None].expand(2, -1)
                seen = {}
                h = gpt.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]),
                                                          with_kwargs=True)
                gpt(tok, pos, None)
                h.remove()
                emb = gpt.embedding.word_embeddings(tok).transpose(0, 1)
                assert torch.allclose(seen["x"], emb * math.sqrt(d), rtol=1e-6), "decoder input = sqrt(d) * embedding"
            if gain:  # MD's gains: at the partner LR by default, at --muon-md-gains-lr when given (a ratio to --lr)
                from megatron_md.megatron.builder import get_megatron_optimizer, hybrid_optimizers
                from megatron_md.training.arguments import optimizer_config
                for extra, ratio in (([], 0.002 / 0.04), (["--muon-md-gains-lr", "0.001"], 0.001 / 0.04)):
                    margs = parse_args(base + ["--model-recipe", "md-paper", "--optimizer", "muon-md", "--weight-decay",
                                               "0", "--lr", "0.04", "--partner-lr", "0.002"] + extra)
                    chunks = M.build_model(margs, M.transformer_config(margs))
                    opt = get_megatron_optimizer(optimizer_config(margs), chunks, margs.md)
                    (g,) = hybrid_optimizers(opt)[0]._matrix.param_groups
                    assert g["lr"] == 0.04 and g["gains_lr_ratio"] == pytest.approx(ratio), g
        finally:
            M.shutdown(created)


def _router_under_md(base):
    """MuonMD on an MoE model: the router is a matrix of the MD optimizer on one unit sphere per row
    (rows = experts) with unit Muon scale and its own gains; ``--no-md-router`` leaves it on AdamW."""
    import torch

    from megatron_md.megatron.builder import get_megatron_optimizer, hybrid_optimizers
    from megatron_md.training import model as M
    from megatron_md.training.arguments import optimizer_config, parse_args

    for on in (True, False):
        args = parse_args(base + ["--model-recipe", "md-paper-moe", "--optimizer", "muon-md", "--weight-decay", "0",
                                  "--num-experts", "4", "--moe-router-topk", "2"] + ([] if on else ["--no-md-router"]))
        args.padded_vocab_size = 64
        created = M.initialize(args)
        try:
            chunks = M.build_model(args, M.transformer_config(args))
            opt = get_megatron_optimizer(optimizer_config(args), chunks, args.md)
            hy = hybrid_optimizers(opt)[0]
            routers = {n: p for n, p in hy.local_params.items() if ".router." in n}
            assert bool(routers) == on, sorted(hy.local_params)
            for n, p in routers.items():
                (g,) = [g for g in hy._matrix.param_groups if any(q is p for q in g["params"])]
                assert g["sphere"] == "rows" and g["scale"] == "none", (n, g)
                torch.testing.assert_close(p.norm(dim=1), torch.ones(p.shape[0]), rtol=1e-5, atol=1e-6)
            others = [g for g in hy._matrix.param_groups if not any(q is p for q in g["params"] for p in routers.values())]
            assert all(g["sphere"] == "frobenius" and g["scale"] == "shape_up" for g in others)
        finally:
            M.shutdown(created)


def _recipe_checks(ctx):
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    base = _sibling("test_driver").synthetic_base(
        ctx, "--train-iters", "4", "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "4",
        "--eval-iters", "1", "--model-recipe", "md-paper")
    tp2 = ["--tensor-model-parallel-size", "2"]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall"]

    def run(extra):
        return pretrain(parse_args(base + extra))

    with ctx.check("semantics"):
        _semantics(ctx, [a for a in base if a != "--model-recipe" and a != "md-paper"])
    with ctx.check("router_under_md"):
        _router_under_md([a for a in base if a != "--model-recipe" and a != "md-paper"])
    opts = {"muon-md": ["--optimizer", "muon-md", "--weight-decay", "0"],
            "adam": ["--optimizer", "adam", "--weight-decay", "0.1", "--lr", "0.003"]}
    for name, o in opts.items():
        ref = None
        with ctx.check(f"tp2_{name}"):
            ref = run(o)
            assert ref["train_loss_history"]["4"] < ref["train_loss_history"]["1"], ref
            _compare(ref, run(o + tp2))
        with ctx.check(f"tp2_sp_{name}"):
            _compare(ref, run(o + tp2 + ["--sequence-parallel"]))
        with ctx.check(f"pp2_{name}"):
            _compare(ref, run(o + pp2))
        with ctx.check(f"zero1_{name}"):
            _compare(ref, run(o + ["--use-distributed-optimizer"]))  # per-block flat ranges of Q, K, V
        with ctx.check(f"moe_ep2_{name}"):
            # EP=2 and EP=1 draw their experts differently at init: the EP=2 run's iteration-2 checkpoint
            # continues at EP=1 with the EP=2 run's losses
            ckpt = os.path.join(ctx.tmpdir, f"recipe_ep2_{name}")
            full = run(o + moe + ["--expert-model-parallel-size", "2", "--save", ckpt, "--save-interval", "2"])
            res = run(o + moe + ["--load", ckpt, "--ckpt-step", "2"])
            for it in ("3", "4"):
                assert _close(res["train_loss_history"][it], full["train_loss_history"][it]), (it, full, res)
    with ctx.check("bf16_muon_md"):  # bf16 parameters with fp32 main copies: the post-norm computes in fp32
        got = run(opts["muon-md"] + ["--bf16"])
        losses = list(got["train_loss_history"].values())
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], got
    with ctx.check("vpp2_muon_md"):
        four = opts["muon-md"] + ["--num-layers", "4"]
        _compare(run(four), run(four + pp2 + ["--num-layers-per-virtual-pipeline-stage", "1"]))
    with ctx.check("no_gain_tp2_muon_md"):
        o = opts["muon-md"] + ["--no-post-norm-gain"]
        _compare(run(o), run(o + tp2))
    with ctx.check("torch_dist_tp2_to_pp2_muon_md"):
        ckpt = os.path.join(ctx.tmpdir, "recipe_tp2")
        full = run(opts["muon-md"] + tp2 + ["--save", ckpt, "--save-interval", "2"])
        res = run(opts["muon-md"] + pp2 + ["--load", ckpt, "--ckpt-step", "2"])
        for it in ("3", "4"):
            assert _close(res["train_loss_history"][it], full["train_loss_history"][it]), (it, full, res)


recipe_group = group_fixture(2, _recipe_checks, megatron=True, timeout=600)

NAMES = (["semantics", "router_under_md", "bf16_muon_md", "vpp2_muon_md", "no_gain_tp2_muon_md", "torch_dist_tp2_to_pp2_muon_md"]
         + [f"{k}_{o}" for o in ("muon-md", "adam") for k in ("tp2", "tp2_sp", "pp2", "zero1", "moe_ep2")])


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_model_recipe(recipe_group, name):
    recipe_group.assert_ok(name)
