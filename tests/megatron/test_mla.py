"""Multi-latent attention (``--multi-latent-attention``, DeepSeek-V2/V3) in the driver, on CPU.

In-process: :func:`megatron_md.megatron.mla.mla_attention` and :class:`MLACoreAttention` (the
local MLA spec's core attention: query/key head dim ≠ value head dim) against PyTorch's
``scaled_dot_product_attention`` and an explicit per-head loop, forward and backward, with masks,
grouped key/value heads and dropout; flag combinations that cannot work are refused naming the
flags; the manifest's model topology records MLA (older manifests: off), ``reshard.driver_flags``
passes it on, and ``to-hf`` refuses it.

One spawned group of 2 gloo ranks runs the real driver on test_driver's synthetic dataset, a
DeepSeek-style MLA model (2 layers, hidden 32, 4 heads, q/kv latent ranks 16/12, head dims
8 + 4 RoPE, value 8; RMSNorm, latent norms, SwiGLU), global batch 4, 4 iterations:

* the routing: every MLA projection is one matrix on the matrix method, column-parallel
  (``linear_q_down_proj``, ``linear_q_up_proj``/``linear_q_proj``, ``linear_kv_down_proj``,
  ``linear_kv_up_proj``) or row-parallel (``linear_proj``) under TP; the latent norms on Adam;
* **TP=2 trains with the losses of TP=1** (DP=2, the same global batch; for half the optimizers
  DP=2 with ZeRO-1 flat shards), train and validation losses ≤1e-5 relative, for every optimizer;
  also without a query latent (``linear_q_proj``) and latent norms, with sequence parallelism, layer-wise DP=2 and
  PP=2 (megatron-core 0.16 drops part of the shared rotary key's gradient at TP > 1; the local
  spec's core attention restores it, and these comparisons fail by ~1e-3 without that);
* **torch_dist reshards**: a TP=2 checkpoint resumes at ZeRO-1 DP=2 (its optimizer state re-saved
  there bitwise equal) and at plain DP=2 with the uninterrupted run's losses (≤1e-5);
* **MLA MoE** (8 fine-grained experts and a shared expert): EP=2 and TP=2 with sequence
  parallelism train with the losses of EP=1.
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
#: the reference of these is DP=2 with ZeRO-1 (flat shards of the MLA matrices), of the others plain DP=2
ZERO_REF = {"muon", "rmnp", "muonh", "muon-md", "sf-normuon"}
MLA = ("--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 12 --qk-head-dim 8 --qk-pos-emb-head-dim 4 "
       "--v-head-dim 8 --position-embedding-type rope --normalization RMSNorm --qk-layernorm --swiglu "
       "--disable-bias-linear")
TP2 = "--tensor-model-parallel-size 2"
ZERO = "--use-distributed-optimizer"
SHARED = ("--num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 2 --moe-shared-expert-intermediate-size 32 "
          "--moe-token-dispatcher-type alltoall")
YARN = ("--rope-type yarn --rotary-scaling-factor 4 --original-max-position-embeddings 4 --mscale 1.2 "
        "--mscale-all-dim 0.7")
#: name: (optimizer, reference flags, flags of the run that must give the reference's losses)
VARIANTS = {f"tp2_equals_tp1_{o}": (o, ZERO if o in ZERO_REF else "", TP2) for o in OPTIMIZERS}
VARIANTS.update({
    # no query latent (the query is linear_q_proj of the hidden state), no latent norms
    "no_q_lora_tp2_normuon": ("normuon", "--no-q-lora --no-qk-layernorm", f"--no-q-lora --no-qk-layernorm {TP2}"),
    "sequence_parallel_tp2_muon_md": ("muon-md", "", f"{TP2} --sequence-parallel"),
    # whole MLA matrices owned by one DP rank each; two pipeline stages
    "layerwise_dp2_equals_tp2_adamh": ("adamh", "--dp-mode layer-wise", TP2),
    "pp2_equals_tp2_rmnp": ("rmnp", TP2, "--pipeline-model-parallel-size 2"),
    # YaRN on MLA's rotary dims (megatron-core's MLA rope_type="yarn"; its temperature in the softmax scale)
    "yarn_tp2_equals_tp1_muon-md": ("muon-md", YARN, f"{YARN} {TP2}"),
})
#: the runs above that save iteration 2 (torch_dist), and the MLA MoE run that does (EP=2)
SAVED = {"tp2_equals_tp1_muon-md", "tp2_equals_tp1_sf-normuon"}
MOE_SOURCE = ("muon-md", f"{SHARED} --expert-model-parallel-size 2")
#: resumed from a saved run's iteration 2 at another layout: name: (saved run, flags of the resumed run)
RESUMES = {
    "tp2_to_zero1_muon_md": ("tp2_equals_tp1_muon-md", ZERO),
    "tp2_to_dp2_sf_normuon": ("tp2_equals_tp1_sf-normuon", ""),
    "moe_ep2_to_ep1_muon_md": ("moe_ep2_muon_md", SHARED),
    "moe_ep2_to_tp2_sp_muon_md": ("moe_ep2_muon_md", f"{SHARED} {TP2} --sequence-parallel"),
}
RTOL = 1e-5


def _sibling(name: str):
    from megatron_md.testing.tools import load_module
    return load_module(Path(__file__).with_name(f"{name}.py"))


def _flags(s: str) -> list:
    """MLA flags plus ``s``; ``--no-q-lora`` drops ``--q-lora-rank``."""
    out = MLA.split() + s.split()
    if "--no-q-lora" in out:
        out.remove("--no-q-lora")
        i = out.index("--q-lora-rank")
        del out[i:i + 2]
    return out


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= RTOL * max(abs(a), abs(b))


def _compare(ref: dict, got: dict, its=None) -> None:
    for key in ("train_loss_history", "val_loss_history"):
        keys = its if (its and key == "train_loss_history") else ref[key].keys()
        for it in keys:
            assert _close(ref[key][it], got[key][it]), (key, it, ref[key], got[key])
    assert ref["skipped_steps"] == got["skipped_steps"] == 0


# ============================================================================ core attention (in-process)
def _loop_reference(q, k, v, scale, mask=None):
    """Per batch and head, the textbook formula; ``mask`` [b, 1, sq, sk] True = masked, plus causal."""
    import torch
    sq, b, n, _ = q.shape
    sk, g = k.shape[0], k.shape[2]
    out = torch.zeros(sq, b, n, v.shape[-1], dtype=torch.float64)
    for bb in range(b):
        for h in range(n):
            kh = h // (n // g)
            s = (q[:, bb, h].double() @ k[:, bb, kh].double().T) * scale
            m = torch.ones(sq, sk, dtype=torch.bool).triu(1)
            if mask is not None:
                m = m | mask[bb, 0]
            s = s.masked_fill(m, float("-inf"))
            out[:, bb, h] = torch.softmax(s, -1) @ v[:, bb, kh].double()
    return out.reshape(sq, b, -1)


def test_mla_attention_equals_sdpa_and_the_formula():
    import torch
    import torch.nn.functional as F

    from megatron_md.megatron.mla import mla_attention
    g = torch.Generator().manual_seed(0)
    sq, b, n, dk, dv = 7, 3, 4, 12, 5
    q = torch.randn(sq, b, n, dk, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sq, b, n, dk, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sq, b, n, dv, generator=g, dtype=torch.float64, requires_grad=True)
    scale = 0.37
    out = mla_attention(q, k, v, scale=scale)
    assert out.shape == (sq, b, n * dv)
    # PyTorch's SDPA ([b, n, s, d] layout, is_causal, its own scale argument) is the oracle
    ref = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3),
                                         is_causal=True, scale=scale).permute(2, 0, 1, 3).reshape(sq, b, n * dv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, _loop_reference(q, k, v, scale), rtol=1e-12, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_mla_attention_masks_groups_and_dropout():
    import torch

    from megatron_md.megatron.mla import mla_attention
    g = torch.Generator().manual_seed(1)
    sq, b, n, dk, dv = 6, 2, 4, 8, 3
    q = torch.randn(sq, b, n, dk, generator=g, dtype=torch.float64)
    k = torch.randn(sq, b, 2, dk, generator=g, dtype=torch.float64)  # 2 key/value heads for 4 query heads
    v = torch.randn(sq, b, 2, dv, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    mask[1, 0, :, 0] = True  # batch 1 never attends to token 0 (its query row 0 attends to nothing)
    out = mla_attention(q, k, v, scale=0.5, mask=mask)
    ref = _loop_reference(q, k, v, 0.5, mask)
    torch.testing.assert_close(out[:, 0], ref[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1:, 1], ref[1:, 1], rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0, 1], torch.zeros(n * dv, dtype=out.dtype))  # a fully masked row: zeros, not NaN
    # dropout acts on the probabilities: p = 1 drops everything
    assert torch.equal(mla_attention(q, k, v, scale=0.5, dropout=torch.nn.Dropout(1.0)),
                       torch.zeros(sq, b, n * dv, dtype=q.dtype))
    with pytest.raises(ValueError, match="not a multiple"):
        mla_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), scale=1.0)


def test_core_attention_module_takes_mla_arguments():
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_md.megatron.mla import MLACoreAttention, mla_attention
    cfg = MLATransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=12,
                               qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, rope_type="rope",
                               use_cpu_initialization=True, apply_rope_fusion=False, attention_dropout=0.0)
    # what MLASelfAttention passes (megatron-core's local DotProductAttention rejects k_channels)
    core = MLACoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                            softmax_scale=0.21, k_channels=12, v_channels=8, cp_comm_type=None, pg_collection=None)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, 2, 4, 12, generator=g), torch.randn(5, 2, 4, 12, generator=g)
    v = torch.randn(5, 2, 4, 8, generator=g)
    out = core(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    assert out.shape == (5, 2, 32)
    assert torch.equal(out, mla_attention(q, k, v, scale=0.21))
    # padding alone: no causal mask
    full = core(q, k, v, torch.zeros(2, 1, 5, 5, dtype=torch.bool), attn_mask_type=AttnMaskType.padding)
    assert torch.equal(full, mla_attention(q, k, v, scale=0.21, causal=False))
    assert core.sharded_state_dict() == {} and not list(core.parameters())
    assert MLACoreAttention(cfg, 1, AttnMaskType.causal, "self", k_channels=12).softmax_scale == 1 / math.sqrt(12)


def test_local_mla_spec_gets_our_core_attention():
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_md.megatron.mla import MLACoreAttention, use_local_core_attention
    spec = specs.get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    new = use_local_core_attention(spec)
    assert new.submodules.self_attention.submodules.core_attention is MLACoreAttention
    assert spec.submodules.self_attention.submodules.core_attention is DotProductAttention  # not modified
    plain = specs.get_gpt_layer_local_spec()
    assert use_local_core_attention(plain) is plain


# ============================================================================ flags (in-process)
TINY = _sibling("test_driver").TINY


@pytest.mark.parametrize("extra, needles", [
    (["--q-lora-rank", "16"], ["--q-lora-rank", "need --multi-latent-attention"]),
    (["--kv-lora-rank", "16", "--v-head-dim", "8"], ["--kv-lora-rank, --v-head-dim", "--multi-latent-attention"]),
    (["--multi-latent-attention"], ["--multi-latent-attention", "--position-embedding-type rope"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--num-query-groups", "2"],
     ["--multi-latent-attention", "--num-query-groups"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--group-query-attention"],
     ["--group-query-attention"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--kv-channels", "8"],
     ["--kv-channels", "--qk-head-dim"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--qk-pos-emb-head-dim", "5"],
     ["--qk-pos-emb-head-dim 5", "even"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--post-norm"],
     ["--post-norm", "--multi-latent-attention"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--model-recipe", "md-paper"],
     ["--post-norm, --fixed-layer-scale", "--multi-latent-attention"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--tensor-model-parallel-size", "2",
      "--q-lora-rank", "15", "--transformer-impl", "local"], ["--q-lora-rank (15)", "--tensor-model-parallel-size 2"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--tensor-model-parallel-size", "2",
      "--kv-lora-rank", "15", "--qk-pos-emb-head-dim", "4", "--transformer-impl", "local"],
     ["--kv-lora-rank + --qk-pos-emb-head-dim (19)"]),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--load-hf", "/nonexistent"],
     ["--load-hf", "--multi-latent-attention"]),
])
def test_bad_mla_flag_combinations_are_refused(extra, needles):
    from megatron_md.training.arguments import ArgumentError, parse_args
    with pytest.raises(ArgumentError) as err:
        parse_args(TINY + extra, world_size=2)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_mla_defaults_follow_megatron_lm():
    from megatron_md.training.arguments import parse_args
    a = parse_args(TINY + ["--multi-latent-attention", "--position-embedding-type", "rope"], world_size=1)
    dims = (a.q_lora_rank, a.kv_lora_rank, a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim)
    assert dims == (None, 32, 128, 64, 128)
    a = parse_args(TINY, world_size=1)
    assert not a.multi_latent_attention and a.kv_lora_rank is None


def test_transformer_config_is_mla_without_the_tp_sum_of_latent_norms():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_md.training.arguments import parse_args
    from megatron_md.training.model import transformer_config
    a = parse_args(TINY + _flags("--no-q-lora"), world_size=1)
    cfg = transformer_config(a)
    assert isinstance(cfg, MLATransformerConfig) and cfg.multi_latent_attention
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (
        None, 12, 8, 4, 8)
    assert cfg.rope_type == "rope" and not cfg.qk_layernorm  # the latent norms come from the spec


# ============================================================================ manifests and conversion
def _topology(args, world_size=2):
    from unittest import mock

    from megatron_md.checkpoint.topology import run_topology
    with mock.patch("torch.distributed.get_world_size", return_value=world_size):
        return run_topology(args)


def test_manifest_records_mla_and_reshard_passes_it_on():
    from megatron_md.checkpoint.reshard import driver_flags
    from megatron_md.checkpoint.topology import MODEL_FLAGS, topology_diffs
    from megatron_md.training.arguments import parse_args
    a = parse_args(TINY + _flags(TP2), world_size=2)
    topo = _topology(a)
    m = topo["model"]
    assert m["multi_latent_attention"] is True
    assert (m["q_lora_rank"], m["kv_lora_rank"], m["qk_head_dim"], m["qk_pos_emb_head_dim"], m["v_head_dim"]) == (
        16, 12, 8, 4, 8)
    # the conversion's driver run builds the same model at TP=1
    b = parse_args(driver_flags(topo, 1) + ["--lr", "1e-3", "--micro-batch-size", "1", "--mock-data",
                                            "--train-iters", "1"], world_size=1)
    assert topology_diffs(topo, _topology(b, 1), "model", MODEL_FLAGS) == []
    # a manifest written before MLA existed is a model without it
    dense = _topology(parse_args(TINY, world_size=2))
    old = {**dense, "model": {k: v for k, v in dense["model"].items() if "lora" not in k and "head_dim" not in k
                              and k != "multi_latent_attention"}}
    assert topology_diffs(old, dense, "model", MODEL_FLAGS) == []
    diffs = topology_diffs(old, topo, "model", MODEL_FLAGS)
    assert any(d.startswith("--multi-latent-attention: checkpoint False") for d in diffs), diffs


def test_to_hf_refuses_mla():
    from megatron_md.checkpoint.hf import hf_config
    from megatron_md.training.arguments import parse_args
    topo = _topology(parse_args(TINY + _flags(""), world_size=2))
    with pytest.raises(ValueError, match="--multi-latent-attention"):
        hf_config(topo)


# ============================================================================ 2-rank driver runs
def _mla_checks(ctx):
    import torch
    import torch.distributed as dist

    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain
    base = _sibling("test_driver").synthetic_base(
        ctx, "--train-iters", "4", "--global-batch-size", "4", "--log-interval", "1", "--eval-interval", "4",
        "--eval-iters", "1", "--ckpt-format", "torch_dist")

    def run(opt, flags, *extra):
        return pretrain(parse_args(base + ["--optimizer", opt] + _flags(flags) + list(extra)))

    with ctx.check("routing_and_layouts"):
        from megatron_md.megatron.builder import model_matrices
        from megatron_md.megatron.routing import named_params, role_of
        from megatron_md.shard import TensorParallel
        from megatron_md.training import model as model_mod
        args = parse_args(base + ["--optimizer", "muon"] + _flags(TP2))
        created = model_mod.initialize(args)
        try:
            chunks = model_mod.build_model(args, model_mod.transformer_config(args))
            mats = {n.split("self_attention.")[-1]: lay for n, _, lay in model_matrices(chunks)
                    if "decoder.layers.0.self_attention." in n}
            want = {"linear_q_down_proj.weight": ((16, 32), 0), "linear_q_up_proj.weight": ((4 * 12, 16), 0),
                    "linear_kv_down_proj.weight": ((12 + 4, 32), 0), "linear_kv_up_proj.weight": ((4 * 16, 12), 0),
                    "linear_proj.weight": ((32, 4 * 8), 1)}
            assert set(mats) == set(want), sorted(mats)
            for name, (shape, dim) in want.items():
                lay = mats[name]
                assert isinstance(lay, TensorParallel) and lay.dim == dim and lay.shape == shape, (name, lay)
            roles = {n: role_of(n, p) for n, p in named_params(chunks)}
            norms = [n for n in roles if "q_layernorm" in n or "kv_layernorm" in n]
            assert len(norms) == 4 and all(roles[n] == "adam" for n in norms), (norms, roles)
        finally:
            model_mod.shutdown(created)

    results = {}
    for name, (opt, ref_flags, flags) in VARIANTS.items():
        with ctx.check(name):
            save = ["--save", os.path.join(ctx.tmpdir, name), "--save-interval", "2"] if name in SAVED else []
            ref = run(opt, ref_flags)
            results[name] = run(opt, flags, *save)
            _compare(ref, results[name])

    with ctx.check("yarn_changes_the_model"):
        a, b = results["tp2_equals_tp1_muon-md"], results["yarn_tp2_equals_tp1_muon-md"]
        assert abs(a["train_loss_history"]["1"] - b["train_loss_history"]["1"]) > 1e-4, (a, b)

    with ctx.check("moe_ep2_muon_md"):  # 8 fine-grained experts and a shared expert, EP=2
        opt, flags = MOE_SOURCE
        results["moe_ep2_muon_md"] = res = run(opt, flags, "--save", os.path.join(ctx.tmpdir, "moe_ep2_muon_md"),
                                               "--save-interval", "2")
        assert all(math.isfinite(v) for v in res["train_loss_history"].values()) and res["skipped_steps"] == 0
        assert res["val_loss_history"]["4"] < res["train_loss_history"]["1"], res

    for name, (source, flags) in RESUMES.items():
        with ctx.check(name):
            ck = os.path.join(ctx.tmpdir, source)
            opt = "muon-md" if source.startswith("moe") else VARIANTS[source][0]
            res = run(opt, flags, "--load", ck, "--ckpt-step", "2")
            _compare(results[source], res, its=("3", "4"))
            if flags == ZERO:  # the TP=2 state re-saved at ZeRO-1 DP=2: every tensor bitwise
                from megatron.core import dist_checkpointing
                run(opt, flags, "--load", ck, "--ckpt-step", "2", "--train-iters", "2", "--save", ck + "_re")
                a = dist_checkpointing.load_plain_tensors(os.path.join(ck, "iter_0000002"))
                b = dist_checkpointing.load_plain_tensors(os.path.join(ck + "_re", "iter_0000002"))
                a = {k: v for k, v in a.items() if torch.is_tensor(v)}
                b = {k: v for k, v in b.items() if torch.is_tensor(v)}
                assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
                assert any("linear_kv_up_proj" in k for k in a if k.startswith("optimizer.state.")), sorted(a)[:8]
                bad = [k for k in a if not torch.equal(a[k], b[k])]
                assert not bad, bad[:5]
            dist.barrier()


mla_group = group_fixture(2, _mla_checks, megatron=True, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["routing_and_layouts", *VARIANTS, "yarn_changes_the_model", "moe_ep2_muon_md", *RESUMES])
def test_mla_trains_exactly_across_layouts(mla_group, name):
    mla_group.assert_ok(name)
