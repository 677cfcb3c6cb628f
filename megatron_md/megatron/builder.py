"""``get_megatron_optimizer``: our optimizers inside megatron-core's optimizer stack.

Returns a Megatron ``MegatronOptimizer``: the matrix method chained with its Adam-family
partner inside Megatron's own wrappers — ``FP32Optimizer`` (fp32), ``Float16OptimizerWith
Float16Params`` (bf16 params, fp32 main params) or ``DistributedOptimizer`` (ZeRO-1: the
matrix math runs on flat shards through :class:`~megatron_md.shard.FlatRange`, gathering only
for Newton–Schulz) — with Megatron's grad clipping before the step. ``dp_mode="layer-wise"``
instead distributes whole matrices over the data-parallel group. Dense and expert parameters
get separate optimizers (expert ones use the expert-TP and expert-DP groups), chained.

A non-finite gradient anywhere (any rank) makes every rank skip the step: the wrappers'
``prepare_grads`` report it like an fp16 overflow, so ``step()`` returns
``(False, None, None)`` and Megatron's loop counts a skipped iteration. So does a non-finite
global grad norm as Megatron's clipping computes it (``clip_grad_norm`` / the chained
``get_grad_norm``: a sum of squares can overflow while every gradient is finite): nothing is
updated and ``step()`` returns ``(False, norm, ...)``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..optim import AdamMD
from ..optim.base import nonfinite_flag
from ..optim.md import project_rows_
from ..optim.builder import MATRIX_OPTIMIZERS, fused_adamw_kwargs
from ..shard import Blocks, FlatRange, flat_blocks
from ..shard import comm as _comm
from . import fsdp as _fsdp
from .hybrid import HybridOptimizer, MatrixItem
from .sharded_state import is_wrapper_sharded_state, wrapper_load, wrapper_sharded_state
from .routing import (ModelLayoutContext, RoutingOptions, is_expert, is_router, matrix_layout, named_params,
                      residual_output, residual_radius_scale, role_of)

logger = logging.getLogger(__name__)

#: methods whose math treats Q, K, V (and experts) as separate matrices
_PER_BLOCK = {"muon", "normuon", "adamh", "muonh", "adam-md", "muon-md", "sf-normuon"}


# ----------------------------------------------------------------------- non-finite skipping
class _SkipNonFinite:
    """Mixin for Megatron optimizer wrappers: a non-finite main grad on any rank is reported
    by ``prepare_grads`` as found-inf, so the whole step is skipped everywhere."""

    md_skipped_steps = 0

    def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, metadata=None, **kwargs):
        """Megatron's torch_dist seam (Megatron-LM's ``save_checkpoint``/``load_checkpoint``): every
        optimizer state in the unsharded model's coordinates (:mod:`.sharded_state`),
        whatever the wrapper and DP mode — not Megatron's Adam-shaped layout."""
        return wrapper_sharded_state(self, model_sharded_state_dict, is_loading)

    def load_state_dict(self, state_dict):
        if is_wrapper_sharded_state(state_dict):
            return wrapper_load(self, state_dict)
        return super().load_state_dict(state_dict)

    def prepare_grads(self) -> bool:
        proxies = getattr(self, "md_fsdp_proxies", None)
        if proxies:  # FSDP2: the DTensors' reduce-scattered local gradients onto the proxies
            _fsdp.pull_grads(proxies)
        found = super().prepare_grads()
        if getattr(self, "is_stub_optimizer", False):
            return found
        bad = nonfinite_flag(self.optimizer.param_groups)
        if torch.cuda.is_available():  # NCCL reduces device tensors only
            bad = bad.cuda()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            self.md_skipped_steps += 1
            logger.warning("megatron_md: non-finite gradient — skipping this step on every rank "
                           "(%d skipped so far)", self.md_skipped_steps)
            return True
        self._md_norm_nonfinite = False
        return found

    def _md_check_norm(self, norm) -> None:
        # the norm is already reduced over the model-parallel group: every rank sees the same value
        if norm is not None and not math.isfinite(float(norm)) and not getattr(self, "_md_norm_nonfinite", False):
            self._md_norm_nonfinite = True
            self.md_skipped_steps += 1
            logger.warning("megatron_md: non-finite grad norm %s — skipping this step on every rank "
                           "(%d skipped so far)", norm, self.md_skipped_steps)

    def get_grad_norm(self):
        norm = super().get_grad_norm()
        self._md_check_norm(norm)
        return norm

    def clip_grad_norm(self, clip_grad: float) -> float:
        norm = super().clip_grad_norm(clip_grad)
        self._md_check_norm(norm)
        return norm

    def step_with_ready_grads(self) -> bool:
        if getattr(self, "_md_norm_nonfinite", False):
            return False  # nothing changes: no update, no copy to the model params
        updated = super().step_with_ready_grads()
        if updated:  # Megatron-FSDP: the updated main weights into the weights it gathers
            _fsdp.install_weights(getattr(self, "md_megatron_fsdp_chunks", ()))
        return updated


    @staticmethod
    def _filter_and_reorder_param_groups(current_groups, state_dict_groups):
        """Megatron matches saved groups to current ones by (wd_mult, lr_mult,
        is_expert_parallel, is_decoupled_lr); our matrix and Adam groups share those, so
        ``md_role`` is part of the key here. Otherwise the same semantics: parameter lists keep
        the saved order, hyperparameters come from the matching saved group."""
        from .compat import param_group_identifier

        def ident(g):
            return (g.get("md_role"),) + param_group_identifier(g)

        loaded = {ident(g): g for g in state_dict_groups}
        if len(loaded) != len(state_dict_groups):
            raise ValueError("checkpoint has parameter groups that cannot be told apart")
        out = []
        for g, params in zip(current_groups, [g["params"] for g in state_dict_groups]):
            if ident(g) not in loaded:
                raise ValueError(f"no parameter group {ident(g)} in the checkpoint; it has {sorted(map(str, loaded))}")
            group = loaded[ident(g)]
            group["params"] = params
            out.append(group)
        return out


_WRAPPED: dict = {}


def _skipping(cls):
    if cls not in _WRAPPED:
        _WRAPPED[cls] = type(f"MD{cls.__name__}", (_SkipNonFinite, cls), {})
    return _WRAPPED[cls]


def _chained(optimizers):
    """Megatron's ``ChainedOptimizer`` whose global grad norm (computed over all chained
    optimizers at once) marks each of them when it is non-finite."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    class MDChainedOptimizer(ChainedOptimizer):
        def get_grad_norm(self):
            norm = super().get_grad_norm()
            for o in self.chained_optimizers:
                if isinstance(o, _SkipNonFinite):
                    o._md_check_norm(norm)
            return norm

    return MDChainedOptimizer(optimizers)


def skipped_steps(optimizer) -> int:
    """Steps skipped for non-finite gradients (a chained optimizer counts once per step)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return max((getattr(o, "md_skipped_steps", 0) for o in subs), default=0)


def hybrid_optimizers(optimizer) -> list[HybridOptimizer]:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in subs if isinstance(getattr(o, "optimizer", None), HybridOptimizer)]


# ----------------------------------------------------------------------------- the builder
def _process_groups(model_chunks, use_gloo: bool) -> dict:
    from .compat import process_groups_for_optimizer
    return process_groups_for_optimizer(model_chunks, use_gloo)


def _layout_context(model_chunks, split_qkv: bool, split_fc1: bool = False) -> ModelLayoutContext:
    from megatron.core import parallel_state as ps
    cfg = model_chunks[0].config
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups or heads
    num_experts = getattr(cfg, "num_moe_experts", None) or 0
    ep = ps.get_expert_model_parallel_world_size() if num_experts else 1
    return ModelLayoutContext(
        tp_group=ps.get_tensor_model_parallel_group(),
        expert_tp_group=ps.get_expert_tensor_parallel_group() if num_experts else None,
        num_attention_heads=heads, num_query_groups=groups,
        kv_channels=cfg.kv_channels or cfg.hidden_size // heads, hidden_size=cfg.hidden_size,
        num_local_experts=num_experts // ep if num_experts else 0, split_qkv=split_qkv, split_fc1=split_fc1,
        gated=bool(getattr(cfg, "gated_linear_unit", False)))


def model_matrices(model_chunks, *, router_on_matrix: bool = False) -> list[tuple[str, torch.Tensor, object]]:
    """``(name, model param, layout)`` of every hidden matrix of the model (what the matrix
    methods would optimize, whatever the chosen optimizer), with fused QKV split into Q, K, V
    blocks: the per-matrix view that telemetry reports on."""
    ctx = _layout_context(model_chunks, split_qkv=True)
    opts = RoutingOptions(router_on_matrix=router_on_matrix)
    return [(n, p, matrix_layout(n, p, ctx, local_shape=_fsdp.tp_local_shape(p))) for n, p in named_params(model_chunks)
            if role_of(n, p, opts) == "matrix"]


def _partner_lr(md, config) -> float:
    """The AdamW partner's peak LR: --partner-lr, else --lr."""
    return md.partner_lr if getattr(md, "partner_lr", None) is not None else config.lr


def _param_groups(model_chunks, config, names, roles, md, expert: bool, group_roles=("matrix", "adam")) -> list[dict]:
    """Megatron-style groups (wd_mult / lr_mult / max_lr / min_lr keys), split by role. The
    group structure is the same on every rank (empty groups are kept): ``group_roles`` comes
    from the configuration, never from which parameters this rank (pipeline stage) holds."""
    partner_lr = _partner_lr(md, config)
    emb_lr = getattr(md, "md_embedding_lr", None) or partner_lr
    ratios = {"matrix": 1.0, "adam": partner_lr / config.lr if config.lr else 1.0,
              "head": partner_lr / config.lr if config.lr else 1.0,
              "embedding": emb_lr / config.lr if config.lr else 1.0}
    buckets: dict = {}
    for name, p in names:
        if (not getattr(p, "allreduce", True)) != expert:
            continue
        no_wd = p.ndim < 2 or name.endswith(".bias")
        role = roles[name]
        buckets.setdefault((role, no_wd), []).append(p)
    groups = []
    for role in group_roles:
        for no_wd in (False, True):
            params = buckets.get((role, no_wd), [])
            ratio = ratios[role]
            groups.append({
                "params": params, "md_role": role, "wd_mult": 0.0 if no_wd else 1.0, "lr_mult": 1.0,
                "is_expert_parallel": expert, "is_decoupled_lr": False,
                "max_lr": config.lr * ratio,
                "min_lr": (config.min_lr or 0.0) * ratio,
                "default_config": role == "matrix" and not no_wd,
                "lr": config.lr * ratio,
                "weight_decay": 0.0 if no_wd else config.weight_decay,
            })
    return groups


_WORD_EMBEDDING = re.compile(r"(^|\.)embedding\.word_embeddings\.weight$")
_OUTPUT_LAYER = re.compile(r"(^|\.)output_layer\.weight$")


def _unwrapped(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def md_recipe_roles(model_chunks, names, roles: dict, md) -> tuple[dict, tuple]:
    """MD's recipe for the word embedding and the output head (``--md-embedding-unit-norm``,
    ``--md-head-gains``): ``(roles, group_roles)`` with the embedding (and a tied head's
    pipeline-stage copy, which must stay equal to it) as ``"embedding"`` and an untied head as
    ``"head"``. ``group_roles`` depends on the configuration and the model's tying only."""
    tied = any(getattr(_unwrapped(c), "share_embeddings_and_output_weights", False) for c in model_chunks)
    if model_chunks and dist.is_initialized():  # every pipeline stage must agree, whichever it holds
        from megatron.core import parallel_state as ps
        flag = torch.tensor([float(tied)], device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
        tied = bool(flag.item())
    # --md-head-gains defaults to the model (None: on for an untied head); only an explicit request on a
    # tied head is worth a warning
    unit, head = md.md_embedding_unit_norm, md.md_head_gains is not False and not tied
    if md.md_head_gains is True and tied:
        logger.warning("megatron_md: --md-head-gains needs an untied output head "
                       "(--untie-embeddings-and-output-weights); the tied head follows the embedding%s",
                       "'s unit-norm rows" if unit else "")
    out = dict(roles)
    for n, _ in names:
        if unit and (_WORD_EMBEDDING.search(n) or (tied and _OUTPUT_LAYER.search(n))):
            out[n] = "embedding"
        elif head and _OUTPUT_LAYER.search(n):
            out[n] = "head"
    group_roles = ("matrix", "adam") + (("embedding",) if unit else ()) + (("head",) if head else ())
    return out, group_roles


def _wrap(inner, config, model_chunks, buffers, dp_group, dp_group_gloo, dp_idx, mp_group, instance_id,
          stats_group=None):
    from megatron.core.optimizer import optimizer as mopt
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler

    scaler = ConstantGradScaler(config.loss_scale) if config.loss_scale else None
    if config.use_distributed_optimizer:
        w = _skipping(DistributedOptimizer)(inner, config, scaler, None, model_chunks=model_chunks,
                                            per_model_buffers=buffers, data_parallel_group=dp_group,
                                            data_parallel_group_gloo=dp_group_gloo,
                                            data_parallel_group_idx=dp_idx,
                                            distributed_optimizer_instance_id=instance_id)
        w.grad_stats_parallel_group = stats_group
    elif config.bf16 or config.fp16:
        w = _skipping(mopt.Float16OptimizerWithFloat16Params)(inner, config, scaler, None)
        w.grad_stats_parallel_group = mp_group
    else:
        w = _skipping(mopt.FP32Optimizer)(inner, config, None)
        w.grad_stats_parallel_group = mp_group
    from megatron.core import parallel_state as ps
    w.tp_group = ps.get_tensor_model_parallel_group()
    return w


def _main_params(wrapper) -> dict[int, torch.Tensor]:
    """id(model param) → its (fp32 main / ZeRO shard) parameter in the wrapped optimizer."""
    pairs = []
    for a, b in (("model_float16_groups", "shard_fp32_from_float16_groups"), ("model_fp32_groups", "shard_fp32_groups"),
                 ("float16_groups", "fp32_from_float16_groups"), ("fp32_from_fp32_groups", "fp32_from_fp32_groups")):
        if hasattr(wrapper, a) and hasattr(wrapper, b):
            for ga, gb in zip(getattr(wrapper, a), getattr(wrapper, b)):
                pairs.extend(zip(ga, gb))
    if not pairs:  # FP32Optimizer: the model params are the main params
        return {id(p): p for g in wrapper.optimizer.param_groups for p in g["params"]}
    return {id(a): b for a, b in pairs}


def zero_range(model_param, buffers, dp_group) -> tuple[int, int]:
    """This rank's ZeRO-1 range ``[s, e)`` of ``model_param.view(-1)``, from the grad buffer's
    geometry (the same arithmetic as Megatron's DistributedOptimizer, for every param, local or not)."""
    from ..shard import comm
    for bufs in buffers.values():
        for buf in bufs:
            if model_param in buf.param_index_map:
                start, end, b = buf.param_index_map[model_param]
                bucket = buf.buckets[b]
                size = bucket.grad_data.numel()
                w, r = comm.group_size(dp_group), comm.group_rank(dp_group)
                chunk = size // w
                ws, we = bucket.offset + r * chunk, bucket.offset + min(size, (r + 1) * chunk)
                n = end - start
                s = min(max(ws - start, 0), n)
                e = max(min(we - start, n), s)
                return s, e
    raise ValueError("distributed optimizer: parameter not found in any grad buffer")


def _flat_range(model_param, buffers, dp_group, inner):
    """This rank's ZeRO-1 :class:`FlatRange` of ``model_param`` (see :func:`zero_range`); a
    parameter of several matrices (:class:`Blocks`) gets one FlatRange per block (:func:`flat_blocks`)."""
    return _flat_layout(inner, *zero_range(model_param, buffers, dp_group), dp_group)


def _flat_layout(inner, start: int, end: int, group):
    """Elements ``[start, end)`` of a parameter with layout ``inner``: a :class:`FlatRange`, or one per
    block of a :class:`Blocks` parameter (:func:`flat_blocks`)."""
    if isinstance(inner, Blocks):
        return flat_blocks(inner, start, end, group)
    return FlatRange(start, end, group, inner)


def _flat_view(q: torch.Tensor) -> torch.Tensor:
    """A leaf alias of ``q``'s storage, flattened (what a flat range's optimizer steps)."""
    return q.detach().view(-1)


def fsdp_layout(inner, rows: tuple[int, int], group):
    """FSDP2's rows ``[r0, r1)`` of a parameter with (TP) layout ``inner``, as the flat range
    ``[r0·n, r1·n)`` (per block for a fused QKV / split fc1, :func:`flat_blocks`)."""
    n = math.prod(inner.local_shape[1:])
    return _flat_layout(inner, rows[0] * n, rows[1] * n, group)


def _fsdp_stats_group(pgs):
    """The group over which FSDP2's sharded gradient statistics (norm, zeros) are summed: every
    data- and model-parallel rank of one optimizer instance (ZeRO-1's ``intra_dist_opt_group``)."""
    g = pgs.get("intra_dist_opt_group")
    if g is None:
        raise ValueError("FSDP2: megatron-core gave no intra_dist_opt_group for the gradient statistics")
    return g


@dataclass
class ParamRecord:
    """What a checkpoint needs to know of one model parameter of one Megatron wrapper: its
    name, the model param, this rank's main param (``None``: no local piece), its ZeRO-1 range
    of ``model.view(-1)`` (``None``: not flat-sharded), its role and data-parallel group."""

    name: str
    model: torch.Tensor
    main: Optional[torch.Tensor]
    zero: Optional[tuple[int, int]]
    role: str
    dp_group: object
    expert: bool
    #: FSDP2: this rank's rows ``[r0, r1)`` of the (TP-local) parameter, a DTensor (``None``: not FSDP2)
    fsdp_rows: Optional[tuple[int, int]] = None


def get_megatron_optimizer(config, model_chunks, md=None, *, use_gloo_process_groups: bool = True):
    """Build the Megatron optimizer for ``md.optimizer`` (see module docstring).

    ``config``: megatron-core ``OptimizerConfig`` (lr, min_lr, weight_decay, adam betas/eps,
    clip_grad, bf16, use_distributed_optimizer). ``md``: :class:`megatron_md.megatron.config.MDConfig`.
    """
    from .config import MDConfig, validate
    md = md or MDConfig()
    validate(md, config)
    name = md.optimizer
    matrix_cls = MATRIX_OPTIMIZERS.get(name)
    ctx = _layout_context(model_chunks, split_qkv=md.split_qkv and name in _PER_BLOCK,
                          split_fc1=md.split_fc1 and name in _PER_BLOCK)
    names = named_params(model_chunks)
    mfsdp = [c for c in model_chunks if _fsdp.is_megatron_fsdp(c)]
    _fsdp.mark_experts(names if mfsdp else ())
    fsdp = _fsdp.is_fsdp2(model_chunks)  # torch FSDP2 or Megatron-FSDP: DTensors of whole rows
    if fsdp and (config.use_distributed_optimizer or md.dp_mode == "layer-wise"):
        raise ValueError(f"{'--use-megatron-fsdp' if mfsdp else '--use-torch-fsdp2'} shards parameters, gradients and "
                         "optimizer state itself: drop "
                         + ("--use-distributed-optimizer" if config.use_distributed_optimizer else "--dp-mode layer-wise"))
    md_run = matrix_cls is not None and name in ("adam-md", "muon-md")
    md_router = md_run and md.md_router  # MD's MoE recipe: the router on its own rows sphere, with gains
    opts = RoutingOptions(router_on_matrix=md.router_on_matrix or md_router)
    roles = {n: (role_of(n, p, opts) if matrix_cls is not None else "adam") for n, p in names}
    group_roles = ("matrix", "adam")
    if md_run:
        roles, group_roles = md_recipe_roles(model_chunks, names, roles, md)
    layouts = {n: matrix_layout(n, p, ctx, local_shape=_fsdp.tp_local_shape(p))
               for n, p in names if roles[n] in ("matrix", "head", "embedding")}
    if (config.use_distributed_optimizer and md.dp_mode != "layer-wise") or fsdp:
        # per-block ZeRO-1 (flat_blocks) needs blocks that select whole rows: fused QKV, SwiGLU fc1
        bad = [n for n, lay in layouts.items() if isinstance(lay, Blocks) and roles[n] == "matrix"
               and any(v.parent_rows() is None for v in lay.views)]
        if bad:
            raise ValueError(
                f"--optimizer {name} with {'--use-torch-fsdp2' if fsdp else '--use-distributed-optimizer'}: "
                f"ZeRO-1/FSDP2 flat shards of legacy GroupedMLP "
                f"expert weights ({bad[0]}, …: --moe-grouped-gemm without Transformer Engine; each expert a "
                f"transposed chunk) are not supported; drop --moe-grouped-gemm, or use --dp-mode layer-wise")
    num_layers = model_chunks[0].config.num_layers
    radius = {n: (residual_radius_scale(num_layers) if md.md_residual_scaling and residual_output(n) else 1.0)
              for n in layouts}
    overrides = {n: (router_overrides(name) if md_router and is_router(n) and roles[n] == "matrix" else ())
                 for n in layouts}
    kwargs = md.matrix_kwargs() if matrix_cls is not None else {}
    if md_run:
        # the gains' LR is kept as a ratio to the matrix LR: construct with the peak matrix LR (the
        # class default 0.01 would make an explicit --muon-md-gains-lr a ratio to 0.01)
        kwargs["lr"] = config.lr
        if kwargs.get("gains_lr") is None:  # the gains at the base LR (the MD paper; the authors' MoE recipe)
            kwargs["gains_lr"] = _partner_lr(md, config)
    head_kwargs = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    pgs = _process_groups(model_chunks, use_gloo_process_groups)
    # FSDP2: the wrappers hold a plain proxy of every DTensor's local rows; matrices are bound as
    # row-aligned flat ranges over FSDP2's group (fsdp.py)
    proxies = _fsdp.make_proxies(names) if fsdp else {}
    # the group each parameter is sharded over (Megatron-FSDP: experts over the expert-data-parallel group)
    fsdp_groups = {e: _fsdp.dp_group_of(model_chunks, expert=e) for e in (False, True)} if fsdp else {}
    fsdp_group_of = {n: fsdp_groups[is_expert(p)] for n, p in names} if fsdp else {}
    fsdp_rows = {}
    for e in fsdp_groups:
        fsdp_rows.update(_fsdp.row_ranges([(n, p) for n, p in names if is_expert(p) == e], fsdp_groups[e],
                                          uneven=bool(mfsdp)))
    for n, p in names if fsdp else ():
        p.md_rows = fsdp_rows[n]  # what fsdp.row_range answers from now on (telemetry)
    if md_run:
        kwargs["init"] = head_kwargs["init"] = md.md_init
        if fsdp:  # project each rank's rows: the same sphere, its norms reduced over the group
            local = [(n, _flat_view(proxies[id(p)])) for n, p in names]
            local_lay = {n: fsdp_layout(layouts[n], fsdp_rows[n], fsdp_group_of[n]) for n in layouts}
            _project_model_matrices(matrix_cls, kwargs, head_kwargs, local, roles, local_lay, radius, overrides)
            _fsdp.install_weights(mfsdp)  # Megatron-FSDP: the projected main weights into the gathered ones
        else:
            _project_model_matrices(matrix_cls, kwargs, head_kwargs, names, roles, layouts, radius, overrides)

    partner = "sf-adamw" if name in ("sf-adamw", "sf-normuon") else "adamw"
    partner_kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    if partner == "sf-adamw":
        partner_kwargs.update(md.partner_kwargs() if hasattr(md, "partner_kwargs") else {})
    else:  # torch picks the per-tensor loop on CPU by default; its fused kernel is the fast one (CPU
        partner_kwargs.update(fused_adamw_kwargs())  # and CUDA; ~5× foreach on CPU, docs/side_by_side.md)
    wrappers = []
    for expert in (False, True):
        groups = _param_groups(model_chunks, config, names, roles, md, expert, group_roles)
        if expert and not any(g["params"] for g in groups):
            continue
        if fsdp:
            for g in groups:
                g["params"] = [proxies[id(p)] for p in g["params"]]
        inner = HybridOptimizer(groups, matrix_cls=matrix_cls, matrix_kwargs=kwargs, partner=partner,
                                partner_kwargs=partner_kwargs, ns_mode=md.ns_mode, head_kwargs=head_kwargs,
                                ns_split=True if getattr(md, "ns_split", False) else None)
        model_groups = [list(g["params"]) for g in inner.param_groups]
        dp_group = pgs["intra_expt_dp_group"] if expert else pgs["intra_dp_cp_group"]
        dp_gloo = pgs.get("intra_expt_dp_group_gloo" if expert else "intra_dp_cp_group_gloo")
        mp_group = pgs["expt_tp_pp_group"] if expert else pgs["mp_group"]
        buffers = {i: getattr(c, "expert_parallel_buffers" if expert else "buffers", [])
                   for i, c in enumerate(model_chunks)}
        from megatron.core.utils import get_pg_rank
        if fsdp:
            dp_group = fsdp_groups[expert]
        w = _wrap(inner, config, model_chunks, buffers, dp_group, dp_gloo, get_pg_rank(mp_group), mp_group, 0,
                  stats_group=pgs.get("intra_dist_opt_group"))
        mains = _main_params(w)
        by_id = {id(p): n for n, p in names}
        if fsdp:  # the model's DTensors are reached through their proxies
            w.grad_stats_parallel_group = _fsdp_stats_group(pgs)
            w.md_fsdp_proxies = [q for g in model_groups for q in g]
            mains = {id(q.md_dtensor): m for q in w.md_fsdp_proxies for m in [mains.get(id(q))]}
            model_groups = [[q.md_dtensor for q in g] for g in model_groups]
        items = []
        flat = config.use_distributed_optimizer and md.dp_mode != "layer-wise"
        for gi, params in enumerate(model_groups):
            if inner.param_groups[gi]["md_role"] == "adam":
                continue
            for mp in params:
                n = by_id[id(mp)]
                main = mains.get(id(mp))
                if fsdp:
                    lay = fsdp_layout(layouts[n], fsdp_rows[n], dp_group)
                else:
                    lay = _flat_range(mp, buffers, dp_group, layouts[n]) if flat else layouts[n]
                if (flat or fsdp) and main is not None and main.numel() != lay.local_shape[0]:
                    raise RuntimeError(f"{n}: DistributedOptimizer shard of {main.numel()} elements does not match "
                                       f"the computed range {lay!r}")
                items.append(MatrixItem(gi, n, main, lay, radius[n], overrides[n]))
        inner.bind(items, layerwise_group=dp_group if md.dp_mode == "layer-wise" else None)
        #: every model param of this wrapper in a fixed order (the same on every rank of its DP
        #: group): what :mod:`.sharded_state` maps optimizer state through
        w.md_records = [ParamRecord(by_id[id(mp)], mp, mains.get(id(mp)),
                                    zero_range(mp, buffers, dp_group) if config.use_distributed_optimizer else None,
                                    inner.param_groups[gi]["md_role"], dp_group, expert,
                                    fsdp_rows.get(by_id[id(mp)]))
                        for gi, params in enumerate(model_groups) for mp in params]
        w.md_layerwise = md.dp_mode == "layer-wise" and _comm.group_size(dp_group) > 1
        wrappers.append(w)
    # Megatron-FSDP: its updated main weights go into the weights it gathers once per step, after the
    # last chained wrapper (dense, then expert) has stepped: the copy covers every parameter of a chunk
    wrappers[-1].md_megatron_fsdp_chunks = mfsdp
    return wrappers[0] if len(wrappers) == 1 else _chained(wrappers)


def router_overrides(name: str) -> tuple:
    """Matrix-group keys of an MoE router under MD (the authors' MoE recipe): one unit sphere per row
    (rows = experts) with row and column gains; MuonMD's Muon step at unit scale."""
    return (("sphere", "rows"),) + ((("scale", "none"),) if name == "muon-md" else ())


def _project_model_matrices(matrix_cls, kwargs, head_kwargs, names, roles, layouts, radius, overrides):
    """MD: put every hidden model matrix on its sphere (and the recipe's head rows and embedding
    rows on theirs) before the wrappers copy them into main params (the optimizers'
    construction does the projection, with TP-complete norms). ``init="factor"`` leaves the
    matrices and the head as they are (their gains are factored by the optimizers themselves)."""
    project = kwargs.get("init", "project") == "project"
    by_r: dict = {}
    for n, p in names:
        if roles[n] == "matrix" and project:
            by_r.setdefault((radius[n], overrides[n]), []).append(p)
    shards = {p: layouts[n] for n, p in names if n in layouts}
    groups = [{"params": ps, "radius_scale": r, **dict(o)} for (r, o), ps in by_r.items()]
    heads = [p for n, p in names if roles[n] == "head" and project]
    emb = [(p, layouts[n]) for n, p in names if roles[n] == "embedding"]
    with torch.no_grad():
        if groups:
            matrix_cls(groups, shards=shards, **kwargs)
        if heads:
            AdamMD(heads, shards=shards, sphere="rows", **head_kwargs)
        if emb:
            project_rows_([p.data for p, _ in emb], [lay for _, lay in emb])


def swap_to_eval(optimizer, model_chunks) -> None:
    """Schedule-free: parameters ← x (for evaluation and checkpoint export)."""
    _swap(optimizer, model_chunks, "eval")


def swap_to_train(optimizer, model_chunks) -> None:
    """Schedule-free: parameters ← y (exactly as before :func:`swap_to_eval`)."""
    _swap(optimizer, model_chunks, "train")


def _swap(optimizer, model_chunks, mode):
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    touched = False
    for w in subs:
        inner = getattr(w, "optimizer", None)
        if isinstance(inner, HybridOptimizer) and inner._sf_parts():
            getattr(inner, mode)()
            if hasattr(w, "_copy_main_params_to_model_params"):
                w._copy_main_params_to_model_params()
            touched = True
    if touched:
        for c in model_chunks:
            if hasattr(c, "start_param_sync") and getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False):
                c.start_param_sync(force_sync=True)
