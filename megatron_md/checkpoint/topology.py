"""The run's identity in a checkpoint's manifest, and what another run may change.

:func:`run_topology` records, per group, what the run that saves was: its parallel ``layout``, its
optimizer setup (``optim``), its ``model`` shape and recipe, and ``info`` the conversion tools read. A
load compares the groups with :func:`topology_diffs` and refuses, naming the flags
(:func:`topology_error`): another model always; another layout for a per-rank (``torch``)
checkpoint unless only the weights are loaded (:func:`reshards_weights`: merged and cut for this
layout); another optimizer setup unless the optimizer state is not loaded. A ``torch_dist``
checkpoint holds its state in the unsharded model's coordinates, so only ``DIST_OPTIM_FLAGS``
must match there.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from ..megatron.model_recipe import recipe_from_args

__all__ = ["LAYOUT_FLAGS", "OPTIM_FLAGS", "MODEL_FLAGS", "MLA_KEYS", "DIST_OPTIM_FLAGS", "run_topology",
           "rank_coords", "topology_diffs", "reshards_weights", "topology_error"]

#: layout/optimizer keys of the manifest and the flag each comes from
LAYOUT_FLAGS = {
    "world_size": "the number of ranks", "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size", "vpp": "--num-layers-per-virtual-pipeline-stage (virtual stages)",
    "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size", "dp": "the data-parallel size",
}
OPTIM_FLAGS = {
    "optimizer": "--optimizer", "use_distributed_optimizer": "--use-distributed-optimizer",
    "dp_mode": "--dp-mode", "split_qkv": "--split-qkv/--no-split-qkv", "split_fc1": "--split-fc1/--no-split-fc1",
    "precision": "--bf16/--fp16",
    "zero_buckets": "--overlap-grad-reduce/--ddp-bucket-size (ZeRO-1 shards follow the gradient buckets)",
}
#: optimizer-setup keys compared only when the checkpoint records them (older checkpoints do not)
_OPTIONAL_OPTIM_KEYS = ("zero_buckets", "split_fc1")
MODEL_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups", "ffn_hidden_size": "--ffn-hidden-size", "kv_channels": "--kv-channels",
    "swiglu": "--swiglu", "normalization": "--normalization", "position_embedding_type": "--position-embedding-type",
    "max_position_embeddings": "--max-position-embeddings", "untie": "--untie-embeddings-and-output-weights",
    "bias_linear": "--disable-bias-linear", "padded_vocab_size": "--vocab-size (padded)",
    "num_experts": "--num-experts", "moe_ffn_hidden_size": "--moe-ffn-hidden-size", "rotary_base": "--rotary-base",
    "moe_router_topk": "--moe-router-topk", "moe_router_pre_softmax": "--moe-router-pre-softmax",
    # the model recipe (megatron_md.megatron.model_recipe): absent in older checkpoints = the defaults
    "qk_layernorm": "--qk-layernorm", "embedding_multiplier": "--embedding-multiplier",
    "post_norm": "--post-norm", "post_norm_gain": "--post-norm-gain/--no-post-norm-gain",
    "fixed_layer_scale": "--fixed-layer-scale", "norm_epsilon": "--norm-epsilon",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
    # multi-latent attention (megatron_md.megatron.mla): absent in older checkpoints = off
    "multi_latent_attention": "--multi-latent-attention", "q_lora_rank": "--q-lora-rank",
    "kv_lora_rank": "--kv-lora-rank", "qk_head_dim": "--qk-head-dim", "qk_pos_emb_head_dim": "--qk-pos-emb-head-dim",
    "v_head_dim": "--v-head-dim",
    # YaRN (--rope-type yarn): absent in older checkpoints = plain RoPE
    "rope_type": "--rope-type", "rotary_scaling_factor": "--rotary-scaling-factor",
    "original_max_position_embeddings": "--original-max-position-embeddings", "beta_fast": "--beta-fast",
    "beta_slow": "--beta-slow", "mscale": "--mscale", "mscale_all_dim": "--mscale-all-dim",
}
#: YaRN's manifest keys (None with plain RoPE)
YARN_KEYS = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim")
#: the MLA dimensions of the manifest (None without --multi-latent-attention)
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
#: model keys that older checkpoints lack, with the value they stand for
_MODEL_KEY_DEFAULTS = {"qk_layernorm": False, "embedding_multiplier": None, "post_norm": False,
                       "post_norm_gain": True, "fixed_layer_scale": None, "norm_epsilon": 1e-5,
                       "moe_shared_expert_intermediate_size": None, "multi_latent_attention": False,
                       **{k: None for k in MLA_KEYS}, "rope_type": "rope", **{k: None for k in YARN_KEYS}}
#: optimizer-setup keys a torch_dist checkpoint must share with the run that loads its optimizer
#: state (its state is in the unsharded model's coordinates: the DP mode and ZeRO buckets may change)
DIST_OPTIM_FLAGS = {k: v for k, v in OPTIM_FLAGS.items() if k in ("optimizer", "split_qkv", "split_fc1",
                                                                      "precision")}


def run_topology(args) -> dict:
    """What must be equal between the run that saved and the run that loads (per group)."""
    prec = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    md = getattr(args, "md", None)
    return {
        "layout": {"world_size": dist.get_world_size(), "tp": args.tensor_model_parallel_size,
                   "pp": args.pipeline_model_parallel_size,
                   "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None),
                   "ep": args.expert_model_parallel_size, "etp": args.expert_tensor_parallel_size,
                   "dp": args.data_parallel_size},
        "optim": {"optimizer": args.optimizer, "use_distributed_optimizer": args.use_distributed_optimizer,
                  "dp_mode": getattr(md, "dp_mode", None), "split_qkv": getattr(md, "split_qkv", None),
                  "split_fc1": getattr(md, "split_fc1", None),
                  "precision": prec,
                  # ZeRO-1 flat ranges are cut per gradient bucket: another bucket layout, other shards
                  "zero_buckets": ([bool(getattr(args, "overlap_grad_reduce", False)),
                                    getattr(args, "ddp_bucket_size", None)]
                                   if args.use_distributed_optimizer else None)},
        "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                  "num_attention_heads": args.num_attention_heads,
                  "num_query_groups": args.num_query_groups or args.num_attention_heads,
                  "ffn_hidden_size": args.ffn_hidden_size, "kv_channels": args.kv_channels,
                  "swiglu": args.swiglu, "normalization": args.normalization,
                  "position_embedding_type": args.position_embedding_type,
                  "max_position_embeddings": args.max_position_embeddings,
                  "untie": args.untie_embeddings_and_output_weights, "bias_linear": not args.disable_bias_linear,
                  "padded_vocab_size": args.padded_vocab_size, "num_experts": args.num_experts,
                  "moe_ffn_hidden_size": args.moe_ffn_hidden_size if args.num_experts else None,
                  "rotary_base": args.rotary_base if args.position_embedding_type == "rope" else None,
                  "moe_router_topk": args.moe_router_topk if args.num_experts else None,
                  "moe_router_pre_softmax": args.moe_router_pre_softmax if args.num_experts else None,
                  "norm_epsilon": getattr(args, "norm_epsilon", 1e-5),
                  "moe_shared_expert_intermediate_size": (getattr(args, "moe_shared_expert_intermediate_size", None)
                                                          if args.num_experts else None),
                  **_recipe_keys(args), **_mla_keys(args), **_yarn_keys(args)},
        # not compared on load; read by tools/convert_checkpoint.py
        "info": {"vocab_size": args.vocab_size, "seq_length": args.seq_length, "layernorm_epsilon": getattr(args, "norm_epsilon", 1e-5),
                 "transformer_impl": args.transformer_impl, "moe_grouped_gemm": bool(args.moe_grouped_gemm)},
    }


def _recipe_keys(args) -> dict:
    """The model recipe's manifest keys (the function of the model; not the init-only options)."""
    r = recipe_from_args(args)
    return {"qk_layernorm": r.qk_layernorm, "embedding_multiplier": r.embedding_multiplier, "post_norm": r.post_norm,
            "post_norm_gain": r.post_norm_gain if r.post_norm else True, "fixed_layer_scale": r.fixed_layer_scale}


def _yarn_keys(args) -> dict:
    """``--rope-type`` and YaRN's parameters (None with plain RoPE)."""
    yarn = getattr(args, "rope_type", "rope") == "yarn"
    return {"rope_type": "yarn" if yarn else "rope", **{k: getattr(args, k, None) if yarn else None for k in YARN_KEYS}}


def _mla_keys(args) -> dict:
    """Multi-latent attention on or off, and its dimensions (all None when off)."""
    mla = bool(getattr(args, "multi_latent_attention", False))
    return {"multi_latent_attention": mla, **{k: getattr(args, k, None) if mla else None for k in MLA_KEYS}}


def rank_coords() -> dict:
    """This rank's place in every parallel group (which shard of what the conversion tools merge)."""
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
            "etp": ps.get_expert_tensor_parallel_rank(), "edp": ps.get_expert_data_parallel_rank()}


def topology_diffs(have: dict, want: dict, group: str, flags: dict) -> list:
    a, b = have.get(group, {}), want[group]
    if group == "model":
        a = {**_MODEL_KEY_DEFAULTS, **a}
    return [f"{flags[k]}: checkpoint {a.get(k)!r}, this run {b[k]!r}" for k in flags
            if a.get(k) != b[k] and not (k in _OPTIONAL_OPTIM_KEYS and k not in a)]


def reshards_weights(have: dict, want: dict, load_optim: bool) -> bool:
    """A weights-only load (``--no-load-optim``) of the same model at another parallel layout:
    the weights are merged from every rank file and cut for this run's layout."""
    return (not load_optim and not topology_diffs(have, want, "model", MODEL_FLAGS)
            and bool(topology_diffs(have, want, "layout", LAYOUT_FLAGS)) and "info" in have)


def topology_error(where: str, have: dict, want: dict, load_optim: bool) -> Optional[str]:
    def diffs(group, flags):
        return topology_diffs(have, want, group, flags)

    model = diffs("model", MODEL_FLAGS)
    if model:
        return (f"{where} holds another model shape ({'; '.join(model)}); pass the model flags it was "
                "trained with, or another --load directory")
    layout = diffs("layout", LAYOUT_FLAGS)
    if layout:
        return (f"{where} was written with another parallel layout ({'; '.join(layout)}); its optimizer state "
                "is per-rank, so resume with the same layout, or pass --no-load-optim to load the weights at "
                "this layout (resharded) with a fresh optimizer")
    optim = diffs("optim", OPTIM_FLAGS) if load_optim else []
    if optim:
        return (f"{where} holds the state of another optimizer setup ({'; '.join(optim)}); to continue from its "
                "weights with this optimizer pass --no-load-optim (fresh optimizer state, iteration 0)")
    return None
