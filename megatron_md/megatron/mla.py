"""Multi-latent attention (MLA; DeepSeek-V2, arXiv:2405.04434, and DeepSeek-V3, arXiv:2412.19437)
on megatron-core: a core-attention module for the *local* layer spec, and what each MLA matrix
is to our optimizers.

**The model.** megatron-core's ``MLASelfAttention`` (``MLATransformerConfig``) computes, per token
``x`` (hidden ``d``), with ``n`` heads, ranks ``r_q`` (``--q-lora-rank``) and ``r_kv``
(``--kv-lora-rank``), head dims ``d_nope`` (``--qk-head-dim``), ``d_rope`` (``--qk-pos-emb-head-dim``)
and ``d_v`` (``--v-head-dim``)::

    c_q        = N_q(W_q_down x)                     W_q_down   [r_q, d]     (linear_q_down_proj)
    [q_nope_i; q_rope_i] = (W_q_up c_q)_i            W_q_up     [n (d_nope + d_rope), r_q] (linear_q_up_proj)
      (without --q-lora-rank: (W_q x)_i,             W_q        [n (d_nope + d_rope), d]   (linear_q_proj))
    [c_kv; k_rope] = W_kv_down x                     W_kv_down  [r_kv + d_rope, d]  (linear_kv_down_proj)
    [k_nope_i; v_i] = (W_kv_up N_kv(c_kv))_i         W_kv_up    [n (d_nope + d_v), r_kv]  (linear_kv_up_proj)
    q_i = [q_nope_i; RoPE(q_rope_i)],  k_i = [k_nope_i; RoPE(k_rope)]   (k_rope shared by all heads)
    o_i = softmax(q_i k_iᵀ / √(d_nope + d_rope) + causal mask) v_i
    y   = W_o [o_1; …; o_n]                          W_o        [d, n d_v]   (linear_proj)

``N_q``/``N_kv`` are the latent norms (``q_layernorm``/``kv_layernorm``, present with
``--qk-layernorm``, identity otherwise). The rotary embedding is MLA's own (``rope_type="rope"``
on the ``d_rope`` dims); GPTModel builds none for MLA.

**Core attention on CPU.** ``MLASelfAttention`` builds its ``core_attention`` with
``k_channels = d_nope + d_rope`` and ``v_channels = d_v``; megatron-core 0.16's local
``DotProductAttention`` takes neither (``TypeError: … unexpected keyword argument 'k_channels'``), so
its local MLA spec cannot build a model. :class:`MLACoreAttention` is the local replacement
(:func:`mla_attention` is its math on plain tensors) and :func:`use_local_core_attention` puts it
into a layer spec. Without Transformer Engine, megatron-core 0.16's MLA module also believes TE is
there (:func:`correct_te_flag` corrects that flag). The Transformer-Engine spec keeps TE's
``DotProductAttention`` (fused kernels, takes both channel counts) — clusters use that.

**Optimizers: each MLA projection is one matrix** (the choice of Moonlight, arXiv:2502.16982, and
Kimi K2, which apply Muon to DeepSeek-V3-style MLA): ``linear_q_down_proj``, ``linear_q_up_proj``
(or ``linear_q_proj``), ``linear_kv_down_proj``, ``linear_kv_up_proj`` and ``linear_proj`` go to the
matrix method, each as one logical matrix of the shape above; ``q_layernorm``/``kv_layernorm``
(vectors) go to the Adam partner (:data:`MLA_MATRICES`; routing rule 4 of
:mod:`megatron_md.megatron.routing`). Why whole matrices: the down projections are shared by all
heads (no per-head structure to split), ``linear_kv_down_proj`` stacks the latent ``c_kv`` and the
shared ``k_rope`` rows the way DeepSeek's own ``wkv_a`` does, and the up projections' rows are
per-head blocks ``[k_nope_i; v_i]`` whose outputs meet only after a product with the next
matrix — Muon's one orthogonalisation per weight matrix is what the published MLA runs used.
Splitting ``linear_kv_up_proj`` into its K and V parts or per head (as :func:`~megatron_md.shard.fused_qkv`
splits a fused QKV) is a possible later refinement, not done here.

**Tensor parallelism** (local spec): all five are megatron-core ``ColumnParallelLinear`` (the
four ``*_proj`` projections in, output rows split over TP: ``TensorParallel(dim=0)``) or
``RowParallelLinear`` (``linear_proj``: ``dim=1``); the down projections' outputs are gathered over
TP before the latent norms. With the two corrections below, a TP=2 run computes the TP=1 model's
gradients and every optimizer's update (tests/megatron/test_mla.py). The TE spec keeps the down
projections whole on every TP rank (``TELinear`` ``duplicated``: our ``Whole`` layout, each rank the
same update).

**The shared rotary key under TP** (a megatron-core 0.16 bug, Megatron-LM issue #1699): ``k_rope``
comes out of ``linear_kv_down_proj`` whole on every TP rank and is expanded over that rank's
heads only, so its gradient on each rank holds only the local heads' share, and nothing sums
the shares (the local spec's gather of the down projection's output splits the gradient back
unreduced; the TE spec's duplicated ``TELinear`` sums them only under sequence parallelism, through
the sequence all-gather). :class:`MLACoreAttention` therefore takes the rotary part of the key
through ``copy_to_tensor_model_parallel_region`` (the fix proposed upstream, Megatron-LM PR #6839),
so that the local spec's gradients are the TP=1 model's; the driver refuses the TE spec at TP > 1
without ``--sequence-parallel``.

**The latent norms under TP.** megatron-core's ``finalize_model_grads`` sums the gradients of
parameters named ``q_layernorm`` over TP when ``config.qk_layernorm`` is set (per-head QK norms
see only their rank's heads). MLA's latent norms act on the *gathered* latent, so every TP rank
already holds their whole gradient (or, under sequence parallelism, its sequence slice, which
megatron-core sums through the norm's ``sequence_parallel`` tag); the sum would double the
``q_layernorm`` gradient at TP=2. The driver therefore builds MLA's norms through the layer spec
alone (``qk_layernorm=True`` to the spec function) and leaves ``config.qk_layernorm`` off
(:func:`megatron_md.training.model.transformer_config`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = ["mla_attention", "MLACoreAttention", "use_local_core_attention", "correct_te_flag", "MLA_MATRICES",
           "MLA_VECTORS"]

#: MLA's parameters on the matrix method (one logical matrix each; module docstring)
MLA_MATRICES = ("linear_q_down_proj", "linear_q_up_proj", "linear_q_proj", "linear_kv_down_proj",
                "linear_kv_up_proj", "linear_proj")
#: MLA's vector parameters (the Adam partner)
MLA_VECTORS = ("q_layernorm", "kv_layernorm")


def mla_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
                  mask: Optional[torch.Tensor] = None, causal: bool = True,
                  dropout: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Softmax attention whose query/key head dim differs from the value head dim.

    ``query`` ``[s_q, b, n, d_qk]``, ``key`` ``[s_k, b, g, d_qk]``, ``value`` ``[s_k, b, g, d_v]``
    (megatron's ``[seq, batch, heads, dim]``; ``g`` key/value heads divide ``n``, each serving
    ``n/g`` consecutive query heads). Per batch ``β`` and head ``i``::

        P = softmax(scale · Q Kᵀ + M),   out = dropout(P) V

    with ``M = -∞`` where masked: ``mask`` (boolean, broadcastable to ``[b, n, s_q, s_k]``, ``True`` =
    not attended, megatron's convention) and, if ``causal``, every key after the query
    (position ``j > i + s_k - s_q``). Scores and softmax in fp32 (fp64 inputs: fp64), the
    probabilities then in ``value``'s dtype, as megatron-core's softmax-in-fp32 does; a row with every key masked
    attends to none (zeros) instead of NaN. Returns ``[s_q, b, n · d_v]`` in ``query``'s dtype.
    """
    sq, b, n, dk = query.shape
    sk, g = key.shape[0], key.shape[2]
    if key.shape[1] != b or key.shape[3] != dk or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"attention shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if n % g:
        raise ValueError(f"{n} query heads are not a multiple of {g} key/value heads")
    if g != n:
        key, value = key.repeat_interleave(n // g, dim=2), value.repeat_interleave(n // g, dim=2)
    acc = torch.promote_types(query.dtype, torch.float32)  # fp32 (or wider) scores and softmax
    scores = torch.einsum("sbnd,tbnd->bnst", query.to(acc), key.to(acc)) * scale
    masked = None
    if causal:
        masked = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
    if mask is not None:
        masked = mask.bool() if masked is None else masked | mask.bool()
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: exp(-inf)/0
    probs = probs.to(value.dtype)
    if dropout is not None:
        probs = dropout(probs)
    out = torch.einsum("bnst,tbnd->sbnd", probs, value)
    return out.reshape(sq, b, n * value.shape[-1]).to(query.dtype)


class MLACoreAttention(torch.nn.Module):
    """Core attention of the local MLA spec: :func:`mla_attention` with megatron-core's
    ``DotProductAttention`` interface plus ``k_channels``/``v_channels`` (what
    ``MLASelfAttention`` passes; TE's ``DotProductAttention`` takes them too).

    ``softmax_scale`` as MLA computes it (``mscale² / √(d_nope + d_rope)``; ``1/√k_channels`` if
    ``None``), attention dropout ``config.attention_dropout`` drawn, as megatron-core's local
    attention does, from the model-parallel RNG stream unless sequence parallelism is on. Masks:
    ``attn_mask_type`` causal (or ``padding_causal``) adds the causal mask to the
    ``attention_mask`` given (megatron's boolean ``[b, 1, s_q, s_k]``, ``True`` = masked);
    ``padding``/``arbitrary`` use the given mask alone, ``no_mask`` none. Refused: context
    parallelism, packed sequences, an attention bias, sliding windows, softmax offsets and
    layer-number query-key scaling (none of which MLA on the local spec needs)."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        self.config = config
        softmax = getattr(config, "softmax_type", "vanilla")
        unsupported = [what for bad, what in (
            (getattr(config, "context_parallel_size", 1) > 1, "context parallelism"),
            (getattr(config, "window_size", None) is not None, "sliding-window attention"),
            (softmax != "vanilla", f"softmax_type {softmax!r}"),
            (getattr(config, "apply_query_key_layer_scaling", False), "apply_query_key_layer_scaling"),
        ) if bad]
        if unsupported:
            raise NotImplementedError(f"MLACoreAttention (the local MLA spec's core attention): "
                                      f"{', '.join(unsupported)} not supported; use the Transformer-Engine spec")
        self.tp_group = getattr(pg_collection, "tp", None)
        #: MLA's key ends in the rotary part shared by every head (module docstring, "The shared rotary key")
        self.shared_key_dims = (int(getattr(config, "qk_pos_emb_head_dim", 0) or 0)
                                if getattr(config, "multi_latent_attention", False) else 0)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.k_channels) if softmax_scale is None else softmax_scale
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attention_dropout = torch.nn.Dropout(p)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``[s_q, b, n, k_channels]``, ``[s_k, b, g, k_channels]``, ``[s_k, b, g, v_channels]`` →
        ``[s_q, b, n · v_channels]``."""
        from megatron.core.transformer.enums import AttnMaskType
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MLACoreAttention: packed sequences and attention bias need the "
                                      "Transformer-Engine spec")
        kind = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if kind not in (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.padding,
                        AttnMaskType.arbitrary, AttnMaskType.no_mask):
            raise NotImplementedError(f"MLACoreAttention: attn_mask_type {kind}")
        causal = kind in (AttnMaskType.causal, AttnMaskType.padding_causal)
        mask = None if kind == AttnMaskType.no_mask else attention_mask
        key = self._shared_rotary_key(key)
        return mla_attention(query, key, value, scale=self.softmax_scale, mask=mask, causal=causal,
                             dropout=self._dropout if self.attention_dropout.p > 0 and self.training else None)

    def _shared_rotary_key(self, key: torch.Tensor) -> torch.Tensor:
        """``key`` whose last ``qk_pos_emb_head_dim`` dims (MLA's rotary key ``k_rope``, one vector
        expanded over the heads) enter the attention as one tensor whose gradient is summed over
        the heads of every TP rank: head 0's copy through megatron-core's
        ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), expanded
        over this rank's heads. The same values; the gradient megatron-core 0.16 drops (module
        docstring). Unchanged at TP=1 or where no gradient is needed."""
        from megatron.core.utils import get_pg_size
        if not self.shared_key_dims or self.tp_group is None or get_pg_size(self.tp_group) == 1 \
                or not key.requires_grad:
            return key
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
        d = key.shape[-1] - self.shared_key_dims
        shared = copy_to_tensor_model_parallel_region(key[:, :, :1, d:], group=self.tp_group)
        return torch.cat([key[..., :d], shared.expand(-1, -1, key.shape[2], -1)], dim=-1)

    def _dropout(self, probs: torch.Tensor) -> torch.Tensor:
        if self.config.sequence_parallel:
            return self.attention_dropout(probs)
        from megatron.core import tensor_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.attention_dropout(probs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        """No parameters, nothing to checkpoint (megatron-core asks every child)."""
        return {}


def use_local_core_attention(spec):
    """``spec`` (a megatron-core layer ``ModuleSpec``) with :class:`MLACoreAttention` as its MLA
    self-attention's ``core_attention`` where that is megatron-core's local ``DotProductAttention``
    (the local MLA spec). A new spec; ``spec`` is not modified (megatron-core caches specs). Other
    specs (non-MLA, Transformer Engine) are returned unchanged."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
    attn = getattr(spec.submodules, "self_attention", None)
    sub = getattr(attn, "submodules", None)
    if not isinstance(sub, MLASelfAttentionSubmodules) or sub.core_attention is not DotProductAttention:
        return spec
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(sub, core_attention=MLACoreAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def use_local_core_attention_any(spec):
    """:func:`use_local_core_attention` for what a host passes as ``GPTModel(transformer_layer_spec=...)``:
    a layer ``ModuleSpec`` or a decoder block spec (``TransformerBlockSubmodules``: each of its
    ``layer_specs``)."""
    if spec is None:
        return spec
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[use_local_core_attention(s) for s in spec.layer_specs])
    return use_local_core_attention(spec)


def mla_gpt_model(base: type) -> type:
    """A subclass of the host's ``GPTModel`` class ``base`` (Megatron-LM's ``gpt_builders.GPTModel``) that
    builds an MLA model (``config.multi_latent_attention``) on megatron-core's local spec with
    :class:`MLACoreAttention` (megatron-core 0.16's local ``DotProductAttention`` cannot take MLA's head
    dims) and the TE flag corrected (:func:`correct_te_flag`); any other model is built unchanged."""

    class MLAGPTModel(base):
        def __init__(self, *args, **kwargs):
            config = kwargs.get("config", args[0] if args else None)
            if getattr(config, "multi_latent_attention", False):
                correct_te_flag()
                if "transformer_layer_spec" in kwargs:
                    kwargs["transformer_layer_spec"] = use_local_core_attention_any(kwargs["transformer_layer_spec"])
                elif len(args) >= 2:
                    args = (args[0], use_local_core_attention_any(args[1]), *args[2:])
            super().__init__(*args, **kwargs)

    MLAGPTModel.__qualname__ = MLAGPTModel.__name__ = base.__name__
    return MLAGPTModel


def correct_te_flag() -> bool:
    """Make megatron-core's ``multi_latent_attention.HAVE_TE`` say what
    ``megatron.core.extensions.transformer_engine.HAVE_TE`` says; True if it changed.

    Without Transformer Engine, ``megatron.core.extensions.transformer_engine`` still imports (it
    stands a ``MagicMock`` in for ``transformer_engine``), so megatron-core 0.16's
    ``multi_latent_attention`` sets ``HAVE_TE = True`` and its ``TELinear`` is a mock instance;
    ``MultiLatentAttention.__init__`` then calls ``isinstance(self.linear_proj, TELinear)`` and every
    MLA model build fails (``TypeError: isinstance() arg 2 must be a type``), on CPU and on a GPU
    without TE alike. The flag only guards that TE-specific FP8/FP4 memory option; with TE
    installed nothing is changed."""
    from megatron.core.extensions import transformer_engine as te_ext
    from megatron.core.transformer import multi_latent_attention as mla_module
    if getattr(te_ext, "HAVE_TE", True) or not getattr(mla_module, "HAVE_TE", False):
        return False
    mla_module.HAVE_TE = False
    return True
