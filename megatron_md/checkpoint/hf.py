"""Unsharded megatron-core GPT weights → Hugging Face Llama (dense), Mixtral (MoE) or Qwen3 (QK-norm).

The mapping is exact for the Llama-style driver model: ``--normalization RMSNorm --swiglu
--position-embedding-type rope --disable-bias-linear`` (plus, optionally, ``--num-query-groups``
for GQA and ``--untie-embeddings-and-output-weights``; tied embeddings become
``tie_word_embeddings``). With ``--qk-layernorm`` (megatron-core's RMSNorm over each head's queries
and keys before RoPE, as Qwen3's ``q_norm``/``k_norm``) a dense model is ``Qwen3ForCausalLM``.
Every other model-recipe option is refused, naming its flag: no Hugging Face architecture computes it.
Megatron's rotary embedding rotates halves (``rotate_half``), as
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

:func:`hf_tensors` maps one tensor at a time from any mapping of the unsharded model (a
:class:`~.reader.ModelReader` loads each on access), and :func:`write_hf` streams them into
safetensors files: the header of each file is written first from the tensors' shapes (computed on
``meta`` tensors), then every tensor's bytes as it is produced, so the writer holds one Megatron
tensor (e.g. a layer's fused QKV) and its Hugging Face pieces at a time — never a file or the
model. The files are read back by ``safetensors`` and ``transformers`` like ``save_file``'s
(``tests/megatron/test_convert.py``); ``--max-shard-size`` splits them as the Hub does, with a
``model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Optional

import torch

from .integrity import atomic_write_text

__all__ = ["hf_config", "hf_tensors", "to_hf_state", "write_hf", "write_safetensors", "parse_size", "NOT_MAPPABLE",
           "DTYPES"]

#: ``--dtype`` → (torch dtype, safetensors name, config name)
DTYPES = {"fp32": (torch.float32, "F32", "float32"), "bf16": (torch.bfloat16, "BF16", "bfloat16")}

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


def hf_config(topo: dict, dtype: str = "fp32") -> dict:
    """The ``config.json`` of the model a manifest's ``topo`` describes; a ``ValueError`` naming the
    flags when no Llama/Mixtral/Qwen3 architecture computes it."""
    m, info = topo["model"], topo["info"]
    if m.get("multi_latent_attention"):
        raise ValueError("the checkpoint's model uses --multi-latent-attention (DeepSeek-style MLA): no "
                         "Llama/Mixtral/Qwen3 architecture computes it; it cannot be exported to Hugging Face")
    wrong = [flag for key, want, flag in _NEEDS if m[key] != want]
    if wrong:
        raise ValueError(f"the checkpoint {NOT_MAPPABLE}{' '.join(f for _, _, f in _NEEDS)} (missing: {', '.join(wrong)})")
    recipe = [flag for key, flag in (("embedding_multiplier", "--embedding-multiplier"), ("post_norm", "--post-norm"),
                                     ("fixed_layer_scale", "--fixed-layer-scale"), ("qk_layernorm", "--qk-layernorm"))
              if m.get(key)]
    moe, qk = bool(m["num_experts"]), bool(m.get("qk_layernorm"))
    if recipe and (recipe != ["--qk-layernorm"] or moe):
        raise ValueError(f"the checkpoint's model uses {', '.join(recipe)} (--model-recipe"
                         + ("; --qk-layernorm exports as Qwen3, dense models only" if qk else "")
                         + "): no Llama/Mixtral/Qwen3 architecture computes it; it cannot be exported to Hugging Face")
    if moe and m.get("moe_shared_expert_intermediate_size"):
        raise ValueError("--moe-shared-expert-intermediate-size: Mixtral has no shared expert; a model with one "
                         "cannot be exported to Hugging Face as Mixtral")
    if moe and m["moe_router_pre_softmax"]:
        raise ValueError("--moe-router-pre-softmax routing (softmax, then top-k without renormalising) has no "
                         "Mixtral equivalent; train without it")
    h, heads, groups = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    d = m["kv_channels"] or h // heads
    vocab = info["vocab_size"]
    tied = not m["untie"]
    base = m["rotary_base"]
    config = {
        "architectures": ["MixtralForCausalLM" if moe else "Qwen3ForCausalLM" if qk else "LlamaForCausalLM"],
        "model_type": "mixtral" if moe else "qwen3" if qk else "llama",
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": m["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": d,
        "intermediate_size": m["moe_ffn_hidden_size"] if moe else m["ffn_hidden_size"],
        "hidden_act": "silu", "max_position_embeddings": m["max_position_embeddings"],
        "rms_norm_eps": info["layernorm_epsilon"], "rope_theta": float(base),
        "rope_parameters": _rope_parameters(m, float(base)),
        "tie_word_embeddings": tied, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": DTYPES[dtype][2], "dtype": DTYPES[dtype][2],
    }
    if moe:
        config.update(num_local_experts=m["num_experts"], num_experts_per_tok=m["moe_router_topk"],
                      output_router_logits=False, router_jitter_noise=0.0, sliding_window=None)
    elif qk:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=m["num_layers"])
    else:
        config["mlp_bias"] = False
    return config


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's attention temperature (the cos/sin multiplier), as megatron-core computes it:
    ``m(s, mscale) / m(s, mscale_all_dim)`` with ``m(s, a) = 0.1 · a · ln s + 1`` (1 for s ≤ 1)."""
    def m(a):
        return 1.0 if factor <= 1 else 0.1 * a * math.log(factor) + 1.0
    return m(mscale) / m(mscale_all_dim)


def _rope_parameters(m: dict, base: float) -> dict:
    """Hugging Face's ``rope_parameters``: plain RoPE, or YaRN (``--rope-type yarn``) with megatron-core's
    attention factor written out (transformers would infer another one when ``mscale_all_dim`` is 0)."""
    if m.get("rope_type", "rope") != "yarn":
        return {"rope_type": "default", "rope_theta": base}
    s = float(m["rotary_scaling_factor"])
    return {"rope_type": "yarn", "rope_theta": base, "factor": s,
            "original_max_position_embeddings": int(m["original_max_position_embeddings"]),
            "beta_fast": float(m["beta_fast"]), "beta_slow": float(m["beta_slow"]), "truncate": True,
            "attention_factor": yarn_attention_factor(s, float(m["mscale"]), float(m["mscale_all_dim"]))}


def hf_tensors(state: Mapping, topo: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, tensor)`` of every weight, in a fixed order, reading each Megatron
    tensor of ``state`` (a dict or a :class:`~.reader.ModelReader`) once, when it is needed."""
    hf_config(topo)   # refuses what does not map, before anything is read
    m, info = topo["model"], topo["info"]
    moe = bool(m["num_experts"])
    h, heads, groups = m["hidden_size"], m["num_attention_heads"], m["num_query_groups"]
    d = m["kv_channels"] or h // heads
    qpg = heads // groups
    vocab = info["vocab_size"]
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"][:vocab]
    for i in range(m["num_layers"]):
        p, o = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[p + "self_attention.linear_qkv.weight"].reshape(groups, (qpg + 2) * d, h)
        yield o + "self_attn.q_proj.weight", qkv[:, :qpg * d].reshape(heads * d, h)
        yield o + "self_attn.k_proj.weight", qkv[:, qpg * d:(qpg + 1) * d].reshape(groups * d, h)
        yield o + "self_attn.v_proj.weight", qkv[:, (qpg + 1) * d:].reshape(groups * d, h)
        yield o + "self_attn.o_proj.weight", state[p + "self_attention.linear_proj.weight"]
        if m.get("qk_layernorm"):
            yield o + "self_attn.q_norm.weight", state[p + "self_attention.q_layernorm.weight"]
            yield o + "self_attn.k_norm.weight", state[p + "self_attention.k_layernorm.weight"]
        yield o + "input_layernorm.weight", _first(state, p + "input_layernorm.weight",
                                                  p + "self_attention.linear_qkv.layer_norm_weight")
        yield o + "post_attention_layernorm.weight", _first(state, p + "pre_mlp_layernorm.weight",
                                                           p + "mlp.linear_fc1.layer_norm_weight")
        if moe:
            yield o + "block_sparse_moe.gate.weight", state[p + "mlp.router.weight"]
            for e in range(m["num_experts"]):
                q = f"{p}mlp.experts.local_experts.{e}."
                gate, up = state[q + "linear_fc1.weight"].chunk(2, dim=0)
                yield o + f"block_sparse_moe.experts.{e}.w1.weight", gate
                yield o + f"block_sparse_moe.experts.{e}.w3.weight", up
                yield o + f"block_sparse_moe.experts.{e}.w2.weight", state[q + "linear_fc2.weight"]
        else:
            gate, up = state[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            yield o + "mlp.gate_proj.weight", gate
            yield o + "mlp.up_proj.weight", up
            yield o + "mlp.down_proj.weight", state[p + "mlp.linear_fc2.weight"]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    tied = not m["untie"]
    if not tied:
        yield "lm_head.weight", state["output_layer.weight"][:vocab]


def to_hf_state(state: Mapping, topo: dict, dtype: str = "fp32") -> tuple[dict, dict]:
    """``(tensors, config)`` for ``LlamaForCausalLM`` / ``MixtralForCausalLM``, all in memory."""
    cast = DTYPES[dtype][0]
    return ({k: v.detach().to(cast).contiguous() for k, v in hf_tensors(state, topo)}, hf_config(topo, dtype))



class _Shapes(Mapping):
    """A view of a model mapping whose values are ``meta`` tensors of the same shape and dtype:
    :func:`hf_tensors` over it gives every output's shape without reading any data."""

    def __init__(self, state: Mapping):
        self.state = state

    def __getitem__(self, name):
        if hasattr(self.state, "shape") and hasattr(self.state, "dtype"):
            if name not in self.state:
                raise KeyError(name)
            return torch.empty(self.state.shape(name), dtype=self.state.dtype(name), device="meta")
        t = self.state[name]
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def __contains__(self, name):
        return name in self.state

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


def parse_size(text: str) -> int:
    """Bytes of ``--max-shard-size`` values like ``5GB``, ``500MB``, ``2GiB``, ``1000000``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.I)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise ValueError(f"--max-shard-size {text!r}: must be positive")
    return n


def write_safetensors(path: str, entries: list[tuple[str, tuple, str]], tensors: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file of ``entries`` (name, shape, safetensors dtype) whose data come, in
    that order, from ``tensors`` — one tensor in memory at a time. The format
    (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
    header of every tensor's dtype, shape and byte range (padded with spaces to 8 bytes), then the
    tensors' bytes back to back. Written to ``path.tmp<pid>`` and renamed: complete or absent."""
    sizes = {"F32": 4, "BF16": 2}
    header, offset = {}, 0
    for name, shape, dt in entries:
        n = sizes[dt]
        for x in shape:
            n *= x
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for (name, shape, dt), t in zip(entries, tensors):
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: shape {tuple(t.shape)}, planned {tuple(shape)}")
            if t.numel():   # the tensor's own bytes, no copy (numpy's buffer)
                fh.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_hf(state: Mapping, topo: dict, out_dir: str, *, dtype: str = "fp32",
             max_shard_size: Optional[int] = None, tokenizer_model: Optional[str] = None) -> dict:
    """Write the Hugging Face model of ``state`` (a dict or :class:`~.reader.ModelReader`) to
    ``out_dir``: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_size`` bytes each — a tensor larger than that gets a shard of its own — and
    ``model.safetensors.index.json``), ``config.json`` and ``generation_config.json``; returns the
    config. Tensors are cast to ``dtype`` (``fp32``/``bf16``) one at a time. With ``tokenizer_model``
    (our sentencepiece model) the tokenizer files too (:mod:`.hf_tokenizer`), checked first."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    cast, st_dtype, _ = DTYPES[dtype]
    config = hf_config(topo, dtype)
    special = {}
    if tokenizer_model is not None:
        from .hf_tokenizer import write_tokenizer
        special = write_tokenizer(tokenizer_model, out_dir, topo["model"]["max_position_embeddings"],
                                  vocab_size=config["vocab_size"])
        config.update(special)
    entries = [(name, tuple(t.shape), st_dtype) for name, t in hf_tensors(_Shapes(state), topo)]
    nbytes = [int(torch.Size(s).numel()) * cast.itemsize for _, s, _ in entries]
    shards, cur, size = [], [], 0
    for e, n in zip(entries, nbytes):
        if cur and max_shard_size is not None and size + n > max_shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    os.makedirs(out_dir, exist_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    stream = (t.detach().to(cast) for _, t in hf_tensors(state, topo))
    for fname, shard in zip(names, shards):
        write_safetensors(os.path.join(out_dir, fname), shard, stream)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes)},
                 "weight_map": {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}}
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    _write_json(os.path.join(out_dir, "generation_config.json"), {**generation_config(topo), **special})
    _write_json(os.path.join(out_dir, "config.json"), config)
    return config


def generation_config(topo: dict) -> dict:
    """``generation_config.json``: sampling off by default (greedy), the tokenizer's special ids
    when the manifest records them."""
    info = topo.get("info", {})
    out = {"_from_model_config": True, "do_sample": False}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if info.get(key) is not None:
            out[key] = info[key]
    return out


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
