"""Unsharded megatron-core GPT weights → Hugging Face Llama (dense) or Mixtral (MoE).

The mapping is exact for the Llama-style driver model: ``--normalization RMSNorm --swiglu
--position-embedding-type rope --disable-bias-linear`` (plus, optionally, ``--num-query-groups``
for GQA and ``--untie-embeddings-and-output-weights``; tied embeddings become
``tie_word_embeddings``). Megatron's rotary embedding rotates halves (``rotate_half``), as
Hugging Face's does, so Q and K need no permutation. Per layer:

* fused ``linear_qkv`` rows, per query group ``[q (heads/groups · d); k (d); v (d)]`` →
  ``q_proj``, ``k_proj``, ``v_proj``; ``linear_proj`` → ``o_proj``;
* ``linear_fc1`` ``[gate; up]`` → ``gate_proj``, ``up_proj``; ``linear_fc2`` → ``down_proj``;
  MoE: ``router`` → ``block_sparse_moe.gate``, expert ``e``'s fc1/fc2 → ``experts.e.w1/w3/w2``
  (the Hub's Mixtral layout). Megatron's default router (top-k of the logits, softmax over those
  k) equals Mixtral's (softmax, top-k, renormalise); ``--moe-router-pre-softmax`` does not;
* ``input_layernorm`` / ``pre_mlp_layernorm`` (or TE's fused ``layer_norm_weight``) →
  ``input_layernorm`` / ``post_attention_layernorm``; ``final_layernorm`` → ``model.norm``.

The vocabulary is cut back from the padded size to the tokenizer's.
"""
from __future__ import annotations

import json
import os

import torch

__all__ = ["to_hf_state", "write_hf", "NOT_MAPPABLE"]

#: (model key, required value, flag) — the driver flags of a Llama-style model
_NEEDS = [("normalization", "RMSNorm", "--normalization RMSNorm"), ("swiglu", True, "--swiglu"),
          ("position_embedding_type", "rope", "--position-embedding-type rope"),
          ("bias_linear", False, "--disable-bias-linear")]
NOT_MAPPABLE = "is not a Llama/Mixtral-style model; train it with "


def _first(state: dict, *names: str) -> torch.Tensor:
    for n in names:
        if n in state:
            return state[n]
    raise KeyError(f"none of {names} in the checkpoint")


def to_hf_state(state: dict, topo: dict) -> tuple[dict, dict]:
    """``(tensors, config)`` for ``LlamaForCausalLM`` / ``MixtralForCausalLM``."""
    m, info = topo["model"], topo["info"]
    wrong = [flag for key, want, flag in _NEEDS if m[key] != want]
    if wrong:
        raise ValueError(f"the checkpoint {NOT_MAPPABLE}{' '.join(f for _, _, f in _NEEDS)} (missing: {', '.join(wrong)})")
    recipe = [flag for key, flag in (("embedding_multiplier", "--embedding-multiplier"), ("post_norm", "--post-norm"),
                                     ("fixed_layer_scale", "--fixed-layer-scale"), ("qk_layernorm", "--qk-layernorm"))
              if m.get(key)]
    if recipe:
        raise ValueError(f"the checkpoint's model uses {', '.join(recipe)} (--model-recipe): no Llama/Mixtral "
                         "architecture computes it; it cannot be exported to Hugging Face")
    moe = bool(m["num_experts"])
    if moe and m["moe_router_pre_softmax"]:
        raise ValueError("--moe-router-pre-softmax routing (softmax, then top-k without renormalising) has no "
                         "Mixtral equivalent; train without it")
    h, heads, groups = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    d = m["kv_channels"] or h // heads
    qpg = heads // groups
    vocab = info["vocab_size"]
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab]}
    for i in range(m["num_layers"]):
        p, o = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[p + "self_attention.linear_qkv.weight"].reshape(groups, (qpg + 2) * d, h)
        out[o + "self_attn.q_proj.weight"] = qkv[:, :qpg * d].reshape(heads * d, h)
        out[o + "self_attn.k_proj.weight"] = qkv[:, qpg * d:(qpg + 1) * d].reshape(groups * d, h)
        out[o + "self_attn.v_proj.weight"] = qkv[:, (qpg + 1) * d:].reshape(groups * d, h)
        out[o + "self_attn.o_proj.weight"] = state[p + "self_attention.linear_proj.weight"]
        out[o + "input_layernorm.weight"] = _first(state, p + "input_layernorm.weight",
                                                   p + "self_attention.linear_qkv.layer_norm_weight")
        out[o + "post_attention_layernorm.weight"] = _first(state, p + "pre_mlp_layernorm.weight",
                                                            p + "mlp.linear_fc1.layer_norm_weight")
        if moe:
            out[o + "block_sparse_moe.gate.weight"] = state[p + "mlp.router.weight"]
            for e in range(m["num_experts"]):
                q = f"{p}mlp.experts.local_experts.{e}."
                gate, up = state[q + "linear_fc1.weight"].chunk(2, dim=0)
                out[o + f"block_sparse_moe.experts.{e}.w1.weight"] = gate
                out[o + f"block_sparse_moe.experts.{e}.w3.weight"] = up
                out[o + f"block_sparse_moe.experts.{e}.w2.weight"] = state[q + "linear_fc2.weight"]
        else:
            gate, up = state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[o + "mlp.gate_proj.weight"] = gate
            out[o + "mlp.up_proj.weight"] = up
            out[o + "mlp.down_proj.weight"] = state[p + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = state["decoder.final_layernorm.weight"]
    tied = not m["untie"]
    if not tied:
        out["lm_head.weight"] = state["output_layer.weight"][:vocab]
    base = m["rotary_base"]
    config = {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "llama",
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": m["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d,
        "intermediate_size": m["moe_ffn_hidden_size"] if moe else m["ffn_hidden_size"],
        "hidden_act": "silu", "max_position_embeddings": m["max_position_embeddings"],
        "rms_norm_eps": info["layernorm_epsilon"], "rope_theta": float(base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(base)},
        "tie_word_embeddings": tied, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": "float32", "dtype": "float32",
    }
    if moe:
        config.update(num_local_experts=m["num_experts"], num_experts_per_tok=m["moe_router_topk"],
                      output_router_logits=False, router_jitter_noise=0.0, sliding_window=None)
    else:
        config["mlp_bias"] = False
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}, config


def write_hf(state: dict, topo: dict, out_dir: str) -> dict:
    """Write ``model.safetensors`` and ``config.json`` to ``out_dir``; returns the config."""
    from safetensors.torch import save_file
    tensors, config = to_hf_state(state, topo)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    return config
