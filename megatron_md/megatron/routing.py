"""Parameter routing and MatrixShard layouts for megatron-core models.

Declarative, ordered rules (first match wins) decide each parameter's role; a second step
builds the layout of every ``matrix`` parameter from its Megatron attributes and the right
process group. Rules are tested on real GPTModel/MoE models (tests/megatron).

Roles: ``matrix`` (hidden weights: attention QKV/out-proj, MLP fc1/fc2, experts and —
optionally — the router), ``adam`` (embeddings, output head, norms, biases, anything else).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..shard import TensorParallel, Whole, fused_qkv, grouped_mlp_experts, swiglu_fc1

Matcher = Callable[[str, torch.nn.Parameter, "RoutingOptions"], bool]


@dataclass(frozen=True)
class RoutingOptions:
    router_on_matrix: bool = False


@dataclass(frozen=True)
class MegatronRule:
    description: str
    role: str
    match: Matcher


_LINEAR = re.compile(r"(linear_qkv|linear_proj|linear_fc1|linear_fc2|linear_q|linear_kv|linear_q_proj|"
                     r"linear_q_down_proj|linear_q_up_proj|linear_kv_down_proj|linear_kv_up_proj)\.weight\d*$")
_GROUPED = re.compile(r"experts\.weight[12]$")

def is_grouped_gemm(name: str) -> bool:
    """A legacy ``GroupedMLP`` weight (``experts.weight1``/``weight2``: all experts in one tensor)."""
    return bool(_GROUPED.search(name))


MEGATRON_RULES: tuple[MegatronRule, ...] = (
    MegatronRule("0-D/1-D (norms, biases, layer_norm_weight)", "adam", lambda n, p, o: p.ndim < 2),
    MegatronRule("embedding or output head (attribute or name)", "adam",
                 lambda n, p, o: bool(getattr(p, "is_embedding_or_output_parameter", False))
                 or "embedding" in n or n.split(".")[-2:-1] == ["output_layer"]),
    MegatronRule("MoE router", "matrix", lambda n, p, o: is_router(n) and o.router_on_matrix),
    MegatronRule("MoE router (on Adam by default)", "adam", lambda n, p, o: is_router(n)),
    MegatronRule("attention/MLP/expert linear weight", "matrix", lambda n, p, o: bool(_LINEAR.search(n))),
    MegatronRule("legacy GroupedMLP expert weights", "matrix", lambda n, p, o: is_grouped_gemm(n)),
    MegatronRule("anything else", "adam", lambda n, p, o: True),
)


def role_of(name: str, p: torch.nn.Parameter, opts: RoutingOptions = RoutingOptions(),
            rules: Sequence[MegatronRule] = MEGATRON_RULES) -> str:
    return next(r.role for r in rules if r.match(name, p, opts))


def named_params(model_chunks) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, param)`` of every trainable parameter, chunk by chunk (names prefixed)."""
    out, seen = [], set()
    for i, chunk in enumerate(model_chunks):
        for n, p in chunk.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((f"chunk{i}.{n}" if len(model_chunks) > 1 else n, p))
    return out


def is_expert(p) -> bool:
    return not getattr(p, "allreduce", True)


def is_router(name: str) -> bool:
    """An MoE router weight (``….mlp.router.weight``)."""
    return ".router." in name


def residual_output(name: str) -> bool:
    return bool(re.search(r"(linear_proj|linear_fc2)\.weight\d*$", name)) or name.endswith("experts.weight2")


def _tp_dim_from_name(name: str) -> Optional[int]:
    """Column-parallel (d_out sharded) or row-parallel (d_in sharded), from the module name.
    Preferred over ``partition_dim``, which is wrong for TE expert fc2 on megatron-core 0.16."""
    if re.search(r"(linear_qkv|linear_fc1|linear_q|linear_kv|_up_proj|_down_proj)\.weight\d*$", name):
        return 0
    if re.search(r"(linear_proj|linear_fc2)\.weight\d*$", name):
        return 1
    return None


@dataclass
class ModelLayoutContext:
    """Everything layout resolution needs from the model config and process groups."""

    tp_group: object
    expert_tp_group: object
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    hidden_size: int
    num_local_experts: int = 0
    split_qkv: bool = True
    #: a gated (SwiGLU) MLP's linear_fc1 as two matrices, gate and up (``gated``: the model's MLP is gated)
    split_fc1: bool = False
    gated: bool = False


def matrix_layout(name: str, p: torch.Tensor, ctx: ModelLayoutContext, *, local_shape=None):
    """Layout of a matrix model parameter (its TP structure; no data-parallel sharding)."""
    from ..shard import comm

    shape = tuple(local_shape or p.shape)
    expert = is_expert(p)
    group = ctx.expert_tp_group if expert else ctx.tp_group
    tp = comm.group_size(group)
    tp_group = group if tp > 1 else None
    if _GROUPED.search(name):
        E = ctx.num_local_experts
        if name.endswith("weight1"):  # stored [hidden, E·ffn_loc]: logical [ffn, hidden], d_out sharded
            ffn_loc = shape[1] // E
            return grouped_mlp_experts(E, ffn_loc * tp, shape[0], stored_shape=shape, tp_group=tp_group, tp_dim=0)
        ffn_loc = shape[0] // E  # weight2 stored [E·ffn_loc, hidden]: logical [hidden, ffn], d_in sharded
        return grouped_mlp_experts(E, shape[1], ffn_loc * tp, stored_shape=shape, tp_group=tp_group, tp_dim=1)
    if len(shape) != 2:
        raise ValueError(f"{name}: a {len(shape)}-D matrix parameter needs an explicit Blocks layout")
    dim = _tp_dim_from_name(name)
    if tp_group is not None and getattr(p, "tensor_model_parallel", False):
        if dim is None:
            dim = int(p.partition_dim)
        elif not expert and int(getattr(p, "partition_dim", dim)) != dim:
            raise ValueError(f"{name}: partition_dim={p.partition_dim} contradicts its module kind (dim {dim})")
    else:
        dim = None
    if name.endswith("linear_qkv.weight") and ctx.split_qkv:
        hpg = ctx.num_attention_heads // ctx.num_query_groups
        return fused_qkv(num_query_groups=ctx.num_query_groups, heads_per_group=hpg, head_dim=ctx.kv_channels,
                         d_in=shape[1], tp_group=tp_group, tp_size=tp)
    if name.endswith("linear_fc1.weight") and ctx.split_fc1 and ctx.gated and not expert:
        return swiglu_fc1(shape[0] // 2 * tp, shape[1], tp_group=tp_group, tp_size=tp)
    if dim is None:
        return Whole(shape)
    full = list(shape)
    full[dim] *= tp
    return TensorParallel(tuple(full), dim=dim, group=tp_group)


def residual_radius_scale(num_layers: int) -> float:
    """MD's optional residual-output scaling α = sqrt(1/(2L))."""
    return math.sqrt(1.0 / (2 * num_layers))
