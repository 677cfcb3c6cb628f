"""Process groups, seeds and the model: GPTModel (dense or MoE) wrapped in Megatron's DDP.

On a machine without CUDA, :func:`initialize` applies :mod:`megatron_md.megatron.cpu_compat`
(megatron-core then runs on CPU tensors over gloo) and forces fp32-friendly settings:
``use_cpu_initialization`` (every rank draws the full weights from the same seed, so a
TP=2 model starts from the same weights as TP=1) and no fused kernels.

Communication overlap (``--overlap-grad-reduce``, ``--overlap-param-gather``) is megatron-core's
own, configured in :func:`build_model`'s ``DistributedDataParallelConfig``. With overlapped
parameter gathering the distributed optimizer's step updates only this rank's shard of each
weight; the other ranks' shards arrive during the next forward pass (DDP's forward pre-hooks
wait for them). Anything that reads the weights between a step and the next forward must call
:func:`sync_params` first; :class:`ParamGatherHooks` is the hooks' lifecycle in the training loop.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from ..megatron.model_recipe import (add_embedding_multiplier, apply_to_layer_spec, recipe_from_args,
                                     unscaled_output_init)

__all__ = ["initialize", "set_seed", "transformer_config", "layer_spec", "build_model", "unwrap",
           "align_param_gather", "overlaps_param_gather", "sync_params", "ParamGatherHooks"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(args) -> bool:
    """Process group (env:// as set by torchrun; a 1-rank group otherwise), CPU compatibility
    patches, megatron's model-parallel groups and seeds. Returns True if this call created
    the default process group (the caller then destroys it at the end)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        from ..megatron import cpu_compat
        cpu_compat.apply()
    created = False
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # plain `python pretrain_gpt.py`: one rank
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(args.distributed_backend,
                                timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))
        created = True
    if dist.get_world_size() != args.world_size:
        raise RuntimeError(f"arguments were validated for world size {args.world_size}, the process group "
                           f"has {dist.get_world_size()}")
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    before = set(_live_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        create_gloo_process_groups=True)
    _MODEL_PARALLEL_GROUPS[:] = [g for g in _live_groups() if g not in before]
    set_seed(args.seed)
    return created


#: the process groups megatron's ``initialize_model_parallel`` created in :func:`initialize`
_MODEL_PARALLEL_GROUPS: list = []


def _live_groups() -> list:
    """Every process group torch.distributed holds. Its registry has no public listing; should a
    torch release rename it, :func:`shutdown` frees nothing more than before (no error)."""
    from torch.distributed import distributed_c10d
    world = getattr(distributed_c10d, "_world", None)
    return list(getattr(world, "pg_map", None) or ())


def shutdown(created: bool) -> None:
    """Undo :func:`initialize`: megatron's model-parallel state, the process groups it created
    (``destroy_model_parallel`` frees only the gloo data-parallel ones; each other group keeps
    its gloo threads, about 50 per run, which a process that trains many times in a row — the
    tests — would accumulate by the thousand) and, if ``created``, the default group."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    live = set(_live_groups()) if dist.is_initialized() else set()
    for g in _MODEL_PARALLEL_GROUPS:
        if g in live:
            dist.destroy_process_group(g)
    _MODEL_PARALLEL_GROUPS.clear()
    if created and dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Python, numpy, torch and megatron's TP/EP RNG tracker (as Megatron-LM does at PP=1)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def transformer_config(args):
    """The ``TransformerConfig`` for ``args``; an ``MLATransformerConfig`` with ``--multi-latent-attention``."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    kw: dict[str, Any] = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels, init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=not args.disable_bias_linear,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, fp16=args.fp16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not cuda, perform_initialization=True,
        # fused kernels: only the TE path on CUDA gets them (they need CUDA extensions)
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        calculate_per_token_loss=False, transformer_impl=args.transformer_impl,
    )
    recipe = recipe_from_args(args)
    mla = bool(getattr(args, "multi_latent_attention", False))
    if recipe.qk_layernorm and not mla:
        kw.update(qk_layernorm=True)  # megatron-core then all-reduces the q/k norms' gradients over TP
    if mla:
        # MLA's latent norms come from the layer spec alone: config.qk_layernorm would make
        # finalize_model_grads sum q_layernorm's (already whole) gradient over TP (megatron_md.megatron.mla)
        kw.update(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
                  qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim,
                  rope_type=getattr(args, "rope_type", "rope"), rotary_base=args.rotary_base,
                  **(_yarn_fields(args, prefix="") if getattr(args, "rope_type", "rope") == "yarn"
                     else dict(rotary_scaling_factor=1.0)))
    if args.num_experts:
        kw.update(num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
                  moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                  moe_router_load_balancing_type=args.moe_router_load_balancing_type,
                  moe_token_dispatcher_type=args.moe_token_dispatcher_type,
                  moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_grouped_gemm=args.moe_grouped_gemm,
                  moe_router_pre_softmax=args.moe_router_pre_softmax,
                  moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size)
    if args.fp8_format is not None:  # validated: TE + CUDA + bf16
        kw.update(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_margin=args.fp8_margin,
                  fp8_amax_history_len=args.fp8_amax_history_len,
                  fp8_amax_compute_algo=args.fp8_amax_compute_algo)
    cls = MLATransformerConfig if mla else TransformerConfig
    config = cls(**kw)
    if getattr(args, "rope_type", "rope") == "yarn" and not mla:
        for k, v in _yarn_fields(args, prefix="yarn_").items():
            setattr(config, k, v)
    return unscaled_output_init(config, args)  # --no-scaled-output-init


def layer_spec(args, config):
    """Local (megatron-core only) spec, or the Transformer Engine spec, with the model recipe's
    QK-norm and branch post-processing (:mod:`megatron_md.megatron.model_recipe`). With
    ``--multi-latent-attention`` megatron-core's MLA spec (``--qk-layernorm``: its latent norms);
    the local one with our core attention (:mod:`megatron_md.megatron.mla`: megatron-core's local
    attention cannot take MLA's key and value head dims)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from ..megatron.mla import correct_te_flag, use_local_core_attention
    recipe = recipe_from_args(args)
    mla = bool(getattr(args, "multi_latent_attention", False))
    if mla:
        correct_te_flag()
    if args.transformer_impl == "transformer_engine":
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm, qk_layernorm=recipe.qk_layernorm,
            multi_latent_attention=mla)
    else:
        spec = specs.get_gpt_layer_local_spec(
            num_experts=args.num_experts, moe_grouped_gemm=args.moe_grouped_gemm,
            normalization=args.normalization, qk_layernorm=recipe.qk_layernorm, multi_latent_attention=mla)
        spec = use_local_core_attention(spec)
    return apply_to_layer_spec(spec, recipe)


def _yarn_fields(args, prefix: str) -> dict:
    """YaRN's parameters as megatron-core reads them: ``MLATransformerConfig`` fields (``prefix=""``) or,
    for multi-head/GQA attention, ``yarn_*`` attributes of the config (GPTModel's ``position_embedding_type
    ="yarn"`` and the attention's temperature read them there)."""
    return {f"{prefix}rotary_scaling_factor": args.rotary_scaling_factor,
            f"{prefix}original_max_position_embeddings": args.original_max_position_embeddings,
            f"{prefix}beta_fast": args.beta_fast, f"{prefix}beta_slow": args.beta_slow,
            f"{prefix}mscale": args.mscale, f"{prefix}mscale_all_dim": args.mscale_all_dim,
            **({"yarn_correction_range_round_to_int": True} if prefix else {})}


def _position_embedding_type(args) -> str:
    """GPTModel's position embedding: ``"yarn"`` for YaRN on multi-head/GQA attention (MLA builds its own)."""
    if getattr(args, "rope_type", "rope") == "yarn" and not getattr(args, "multi_latent_attention", False):
        return "yarn"
    return args.position_embedding_type


def _gpt(args, config, pre_process: bool, post_process: bool, vp_stage=None):
    from megatron.core.models.gpt.gpt_model import GPTModel
    model = GPTModel(
        config=config, transformer_layer_spec=layer_spec(args, config), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        parallel_output=True, share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=_position_embedding_type(args), rotary_base=args.rotary_base, vp_stage=vp_stage)
    add_embedding_multiplier(model, recipe_from_args(args).embedding_multiplier)
    return model


def _stage_models(args, config) -> list:
    """This pipeline rank's GPTModel chunk(s): one per virtual stage; the embedding on the
    first stage (``pre_process``), the final norm and output layer on the last (``post_process``)."""
    from megatron.core import parallel_state as ps
    vp = args.virtual_pipeline_model_parallel_size
    chunks = []
    for v in range(vp or 1):
        vs = v if vp else None
        chunks.append(_gpt(args, config, ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vs),
                           ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vs), vs))
    return chunks


def _copy_from_unpipelined(args, config, chunks) -> None:
    """Give pipeline stages the weights a ``--pipeline-model-parallel-size 1`` run starts from.

    With CPU initialisation every rank draws full weights from one seed in module order, so
    the draws depend on which modules a rank builds. Here every rank re-seeds, builds the whole
    model (all layers, this rank's TP/EP shards; it is temporary) and copies its own layers by
    global layer number, the embedding, final norm and output layer (the embedding, when tied).
    The RNG ends where a PP=1 run's does after building the model.
    """
    import copy
    flat = copy.copy(config)
    flat.pipeline_model_parallel_size = 1
    flat.virtual_pipeline_model_parallel_size = None
    set_seed(args.seed)
    full_model = _gpt(args, flat, True, True)
    numbers = [layer.layer_number for layer in full_model.decoder.layers]
    if numbers != list(range(1, args.num_layers + 1)):
        raise RuntimeError(f"unpipelined reference model has layer numbers {numbers}")
    full = dict(full_model.named_parameters())
    tied = not args.untie_embeddings_and_output_weights
    with torch.no_grad():
        for chunk in chunks:
            layer_of = {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}
            for n, p in chunk.named_parameters():
                src = n
                if n.startswith("decoder.layers."):
                    _, _, i, rest = n.split(".", 3)
                    src = f"decoder.layers.{layer_of[int(i)]}.{rest}"
                elif n == "output_layer.weight" and tied:
                    src = "embedding.word_embeddings.weight"
                q = full[src]
                if q.shape != p.shape:
                    raise RuntimeError(f"{n}: stage shape {tuple(p.shape)} != unpipelined {src} {tuple(q.shape)}")
                p.copy_(q)


def align_param_gather(args) -> bool:
    """Megatron-LM's ``align_param_gather``: with overlapped parameter gathering and the
    interleaved schedule, the schedule starts each model chunk's all-gather itself
    (``config.param_sync_func``) and the forward pre-hooks only wait; otherwise the hooks chain
    the buckets' all-gathers (Megatron-LM turns the flag off without virtual stages)."""
    return bool(args.overlap_param_gather and args.virtual_pipeline_model_parallel_size)


def build_model(args, config) -> list:
    """``[DistributedDataParallel(GPTModel), ...]``: this rank's model chunks (one, or one per
    virtual pipeline stage), as Megatron's schedules and ``finalize_model_grads`` take them.

    ``--overlap-grad-reduce`` buckets the gradients (``--ddp-bucket-size``; megatron-core's
    default otherwise) and starts each bucket's all-reduce / reduce-scatter from the backward
    hooks; ``--overlap-param-gather`` makes DDP register the forward pre-hooks that wait for
    the all-gathered parameters."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks = _stage_models(args, config)
    if args.pipeline_model_parallel_size > 1 and config.use_cpu_initialization:
        _copy_from_unpipelined(args, config, chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        align_param_gather=align_param_gather(args), bucket_size=args.ddp_bucket_size,
        check_for_nan_in_grad=False)
    out = []
    for i, model in enumerate(chunks):
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        if args.bf16 or args.fp16:
            from megatron.core.transformer.module import Float16Module
            model = Float16Module(config, model)
        if getattr(args, "use_torch_fsdp2", False):
            out.append(_fsdp2(config, model))
            continue
        if getattr(args, "use_megatron_fsdp", False):
            out.append(_megatron_fsdp(config, model))
            continue
        # as Megatron-LM: only the first chunk's buffers are bucketed
        ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                      disable_bucketing=i > 0)
        ddp.broadcast_params()  # DP replicas start identical (they already are with CPU init)
        out.append(ddp)
    return out


def _from_dp_rank0(model) -> None:
    """Every data-parallel rank takes rank 0's weights (an FSDP wrapper shards what each rank holds)."""
    from megatron.core import parallel_state as ps
    group = ps.get_data_parallel_group(with_context_parallel=True)
    src = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src, group=group)


def _fsdp2(config, model):
    """``--use-torch-fsdp2``: the chunk in megatron-core's FSDP2 wrapper (megatron_md.megatron.fsdp)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from ..megatron.fsdp import fsdp2_class
    _from_dp_rank0(model)
    return fsdp2_class()(config, DistributedDataParallelConfig(), model)


def _megatron_fsdp(config, model):
    """``--use-megatron-fsdp``: the chunk in megatron-core's Megatron-FSDP adapter, ZeRO-3
    (``optim_grads_params``: parameters, gradients and optimizer state sharded, each transformer layer
    a unit), gradients reduced in fp32. On a machine without CUDA the module stays on the CPU, and the
    gradient average is a scale then a sum (NCCL's pre-multiplied sum does not exist on gloo)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel

    _from_dp_rank0(model)
    nccl = dist.get_backend() == "nccl"
    ddp = DistributedDataParallelConfig(use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params",
                                        grad_reduce_in_fp32=True, check_for_nan_in_grad=False,
                                        gradient_reduce_div_fusion=nccl)
    return FullyShardedDataParallel(config, ddp, model, device=None if torch.cuda.is_available() else torch.device("cpu"))


def unwrap(chunk):
    """The GPTModel inside DDP / Float16Module."""
    m = chunk
    while hasattr(m, "module"):
        m = m.module
    return m


# ------------------------------------------------------------------------------- overlapped param gather
def overlaps_param_gather(model_chunks) -> bool:
    """True if the model's parameters are all-gathered during the forward pass
    (``--use-distributed-optimizer --overlap-param-gather``): after an optimizer step only this
    rank's shard of each weight is current until :func:`sync_params` or the next forward."""
    return any(getattr(c, "use_forward_hook", False) for c in model_chunks)


def sync_params(model_chunks) -> None:
    """Make every rank's model parameters the updated, all-gathered ones now (megatron-core's
    ``start_param_sync(force_sync=True)``: a synchronous all-gather, or a wait on one already in
    flight). A no-op without overlapped parameter gathering, where the optimizer step gathers.
    It never changes training: the next forward pass finds the buckets gathered and skips them."""
    for c in model_chunks:
        if getattr(c, "use_forward_hook", False):
            c.start_param_sync(force_sync=True)


class ParamGatherHooks:
    """The forward pre-hooks of ``--overlap-param-gather`` across the training loop, as
    Megatron-LM's ``train()`` handles them.

    * :meth:`start` (before the first iteration): hooks off without gathering, and the
      schedule's ``param_sync_func`` removed, so that the first iteration runs on the weights as
      built or loaded on each rank (an error there cannot spread through a first all-gather);
    * :meth:`after_step` re-enables both after the first *successful* step (a skipped one
      changed no weight);
    * :meth:`paused` (evaluation): weights gathered, hooks off, and back on afterwards;
    * :meth:`finish` (end of training): weights gathered, hooks off.

    Without overlapped parameter gathering every method does nothing."""

    def __init__(self, model_chunks, config):
        self.chunks = model_chunks
        self.config = config
        self.active = overlaps_param_gather(model_chunks)
        self.on = self.active  # DDP registers the hooks when it is built
        self._param_sync_func = None

    def _disable(self, param_sync: bool) -> None:
        for c in self.chunks:
            c.disable_forward_pre_hook(param_sync=param_sync)
        self.on = False

    def _enable(self) -> None:
        for c in self.chunks:
            c.enable_forward_pre_hook()
        self.on = True

    def start(self) -> None:
        if self.active and self.on:
            self._disable(param_sync=False)
            self._param_sync_func, self.config.param_sync_func = self.config.param_sync_func, None

    def after_step(self, ok: bool) -> None:
        if self.active and not self.on and ok:
            self._enable()
            self.config.param_sync_func = self._param_sync_func

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was_on = self.on
        if was_on:
            self._disable(param_sync=True)
        else:
            sync_params(self.chunks)
        try:
            yield
        finally:
            if was_on:
                self._enable()

    def finish(self) -> None:
        if self.on:
            self._disable(param_sync=True)
