"""Model shapes for the cost model: megatron-core GPT/MoE parameters, by name, per pipeline stage.

:class:`ModelSpec` describes a megatron-core ``GPTModel`` (dense or MoE, GQA or multi-latent
attention); :func:`stage_params` lists the parameters one pipeline stage (or virtual stage)
holds, in megatron-core's registration order (``named_parameters``), with the names, local shapes
and attributes that our routing (:mod:`megatron_md.megatron.routing`) decides on. The order
matters: Megatron's gradient buffer — and so every ZeRO-1 range — is laid out from it.

Modelled: local spec names (``input_layernorm``, ``self_attention.linear_proj`` /
``linear_qkv``, ``pre_mlp_layernorm``, ``mlp.linear_fc1`` / ``linear_fc2``; MoE: ``mlp.router``,
``mlp.experts.local_experts.<e>.linear_fc1/2`` (SequentialMLP), ``mlp.shared_experts``; MLA:
``linear_q_down_proj`` / ``linear_q_up_proj`` / ``linear_kv_down_proj`` / ``linear_kv_up_proj``,
the down projections replicated over TP, as megatron-core builds them). Not modelled: the TE spec's
fused layer-norm weights (one 1-D parameter moves into ``linear_qkv``/``linear_fc1``: the
matrices are the same), multi-token prediction layers, grouped-GEMM expert tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class MLA:
    q_lora_rank: int          # 0: no query down-projection
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    query_groups: int
    head_dim: int
    ffn: int
    vocab: int
    swiglu: bool = True
    bias: bool = False            # linear biases
    norm_bias: bool = False       # LayerNorm (True) or RMSNorm (False)
    learned_pos: int = 0          # learned absolute position embeddings (rows), 0: RoPE
    tied: bool = False
    num_experts: int = 0
    moe_ffn: int = 0
    topk: int = 0
    shared_ffn: int = 0
    dense_layers: int = 0         # the first k layers are dense (DeepSeek-V3: 3)
    mla: Optional[MLA] = None

    def layer_is_moe(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.dense_layers

    def params(self) -> tuple[int, int]:
        """(total, active per token) parameter counts (embedding and head included once each)."""
        total = active = 0
        for i in range(self.layers):
            for n, shape, expert in _layer(self, i, tp=1, ep=1, etp=1):
                k = math.prod(shape)
                total += k
                active += k if not expert else 0
            if self.layer_is_moe(i):
                f = (3 if self.swiglu else 2) * self.hidden * self.moe_ffn
                active += self.topk * f
        emb = self.vocab * self.hidden
        total += emb * (1 if self.tied else 2)
        active += emb * (1 if self.tied else 2)
        return total, active


def _linear(name, d_out, d_in, bias, dim, tp):
    shape = (d_out // tp, d_in) if dim == 0 else (d_out, d_in // tp) if dim == 1 else (d_out, d_in)
    out = [(name + ".weight", shape, dim)]
    if bias:
        out.append((name + ".bias", (shape[0],), dim if dim == 0 else None))
    return out


def _norm(name, d, spec):
    return [(name + ".weight", (d,), None)] + ([(name + ".bias", (d,), None)] if spec.norm_bias else [])


def _mlp(prefix, spec, ffn, tp):
    f1 = (2 if spec.swiglu else 1) * ffn
    return _linear(prefix + ".linear_fc1", f1, spec.hidden, spec.bias, 0, tp) + \
        _linear(prefix + ".linear_fc2", spec.hidden, ffn, spec.bias, 1, tp)


def _layer(spec: ModelSpec, i: int, *, tp: int, ep: int, etp: int):
    """``(name, local shape, expert)`` of layer ``i``'s parameters (name relative to the layer)."""
    out = []
    d = spec.hidden
    out += [(n, s, False) for n, s, _ in _norm("input_layernorm", d, spec)]
    if spec.mla is None:
        qkv = (spec.heads + 2 * spec.query_groups) * spec.head_dim
        out += [(n, s, False) for n, s, _ in _linear("self_attention.linear_proj", d, spec.heads * spec.head_dim,
                                                      spec.bias, 1, tp)]
        out += [(n, s, False) for n, s, _ in _linear("self_attention.linear_qkv", qkv, d, spec.bias, 0, tp)]
    else:
        m = spec.mla
        qk = m.qk_head_dim + m.qk_pos_dim
        lin = []
        if m.q_lora_rank:
            lin += _linear("self_attention.linear_q_down_proj", m.q_lora_rank, d, False, None, tp)
            lin += _linear("self_attention.linear_q_up_proj", spec.heads * qk, m.q_lora_rank, False, 0, tp)
        else:
            lin += _linear("self_attention.linear_q_proj", spec.heads * qk, d, False, 0, tp)
        lin += _linear("self_attention.linear_kv_down_proj", m.kv_lora_rank + m.qk_pos_dim, d, False, None, tp)
        lin += _linear("self_attention.linear_kv_up_proj", spec.heads * (m.qk_head_dim + m.v_head_dim),
                       m.kv_lora_rank, False, 0, tp)
        lin += _linear("self_attention.linear_proj", d, spec.heads * m.v_head_dim, False, 1, tp)
        out += [(n, s, False) for n, s, _ in lin]
        if m.q_lora_rank:
            out += [(n, s, False) for n, s, _ in _norm("self_attention.q_layernorm", m.q_lora_rank, spec)]
        out += [(n, s, False) for n, s, _ in _norm("self_attention.kv_layernorm", m.kv_lora_rank, spec)]
    out += [(n, s, False) for n, s, _ in _norm("pre_mlp_layernorm", d, spec)]
    if not spec.layer_is_moe(i):
        out += [(n, s, False) for n, s, _ in _mlp("mlp", spec, spec.ffn, tp)]
        return out
    out.append(("mlp.router.weight", (spec.num_experts, d), False))
    for e in range(spec.num_experts // ep):
        out += [(n, s, True) for n, s, _ in _mlp(f"mlp.experts.local_experts.{e}", spec, spec.moe_ffn, etp)]
    if spec.shared_ffn:
        out += [(n, s, False) for n, s, _ in _mlp("mlp.shared_experts", spec, spec.shared_ffn, tp)]
    return out


@dataclass(frozen=True)
class Param:
    """One parameter of one model chunk, as the optimizer builder sees it."""

    name: str
    shape: tuple                # local (this TP / EP rank)
    expert: bool
    tp_partitioned: bool        # ``tensor_model_parallel``
    shared_embedding: bool = False


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary (``--make-vocab-size-divisible-by`` × TP)."""
    m = divisible_by * tp
    return -(-vocab // m) * m


def stage_params(spec: ModelSpec, *, tp: int, pp: int, ep: int, etp: int, stage: int, vpp: int = 1,
                 chunk: int = 0, vocab_divisible_by: int = 128) -> list[Param]:
    """The parameters of (virtual) chunk ``chunk`` of pipeline stage ``stage``, in registration
    order. Layers are split evenly (megatron-core's default; a remainder to the last blocks), the interleaved schedule gives stage
    ``s`` the layer blocks ``s, s + pp, …``; the first chunk of stage 0 holds the embedding, the
    last chunk of the last stage the final norm and the output head (or, tied and PP > 1, the
    embedding copy Megatron keeps there)."""
    L, vs = spec.layers, pp * vpp
    if L < vs:
        raise ValueError(f"{spec.name}: {L} layers do not fill PP {pp} × VPP {vpp}")
    block = chunk * pp + stage
    # even split; a remainder goes one layer each to the last blocks (as --decoder-last-pipeline-num-layers would)
    counts = [L // vs + (1 if b >= vs - L % vs else 0) for b in range(vs)]
    per, first_layer = counts[block], sum(counts[:block])
    first = stage == 0 and chunk == 0
    last = stage == pp - 1 and chunk == vpp - 1
    V = padded_vocab(spec.vocab, tp, vocab_divisible_by)
    out: list[Param] = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", (V // tp, spec.hidden), False, True, pp > 1 and spec.tied))
        if spec.learned_pos:
            out.append(Param("embedding.position_embeddings.weight", (spec.learned_pos, spec.hidden), False, False))
    for j in range(per):
        i = first_layer + j
        for n, s, expert in _layer(spec, i, tp=tp, ep=ep, etp=etp):
            tpp = _partitioned(n, s, expert, tp, etp)
            out.append(Param(f"decoder.layers.{j}.{n}", tuple(s), expert, tpp))
    if last:
        for n, s, _ in _norm("decoder.final_layernorm", spec.hidden, spec):
            out.append(Param(n, s, False, False))
        if not spec.tied:
            out.append(Param("output_layer.weight", (V // tp, spec.hidden), False, True))
        elif pp > 1:
            out.append(Param("output_layer.weight", (V // tp, spec.hidden), False, True, True))
    return out


def _partitioned(name: str, shape, expert: bool, tp: int, etp: int) -> bool:
    if "down_proj" in name or "norm" in name or ".router." in name:
        return False
    if name.endswith(".bias"):
        return "linear_qkv" in name or "linear_fc1" in name
    return True


# --------------------------------------------------------------------------------- presets
def _llama(name, d, L, heads, groups, ffn):
    return ModelSpec(name, d, L, heads, groups, d // heads, ffn, 128256)


PRESETS: dict[str, ModelSpec] = {
    "llama3-8b": _llama("llama3-8b", 4096, 32, 32, 8, 14336),
    "llama3-70b": _llama("llama3-70b", 8192, 80, 64, 8, 28672),
    "llama3-405b": _llama("llama3-405b", 16384, 126, 128, 8, 53248),
    # Qwen3-30B-A3B: 48 layers, d 2048, 32 query heads / 4 KV groups of 128, 128 experts of 768, top-8
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", 2048, 48, 32, 4, 128, 6144, 151936,
                               num_experts=128, moe_ffn=768, topk=8),
    # DeepSeek-V3: 61 layers (3 dense, ffn 18432), 256 routed experts of 2048 + 1 shared, top-8, MLA
    "deepseek-v3": ModelSpec("deepseek-v3", 7168, 61, 128, 128, 128, 18432, 129280, num_experts=256, moe_ffn=2048,
                             topk=8, shared_ffn=2048, dense_layers=3, mla=MLA(1536, 512, 128, 64, 128)),
    # Kimi-K2: DeepSeek-V3's architecture with 384 experts, 64 heads, 1 dense layer
    "kimi-k2": ModelSpec("kimi-k2", 7168, 61, 64, 64, 128, 18432, 163840, num_experts=384, moe_ffn=2048,
                         topk=8, shared_ffn=2048, dense_layers=1, mla=MLA(1536, 512, 128, 64, 128)),
}


def tiny(**kw) -> ModelSpec:
    """The driver tests' tiny GPT (tests/megatron/test_driver.py ``TINY``: LayerNorm, biases,
    learned positions, GELU, tied embedding), with overrides."""
    base = ModelSpec("tiny", 32, 2, 4, 4, 8, 128, 200, swiglu=False, bias=True, norm_bias=True, learned_pos=16,
                     tied=True)
    return replace(base, **kw)
