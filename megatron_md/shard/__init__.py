"""How local tensors relate to logical matrices, and the few collectives the math needs.

The only package that calls torch.distributed for optimizer math; it also counts the bytes
it moves (:data:`megatron_md.shard.comm.METER`).
"""
from . import comm
from .blocks import (BlockView, Blocks, concatenated_experts, flat_blocks, fused_qkv, grouped_mlp_experts,
                     stacked_experts, swiglu_fc1)
from .bucket import Pending, Reductions
from .comm import METER, metered
from .layouts import FlatRange, MatrixShard, Plan, TensorParallel, Whole
from .orthogonalize import NS_MODES, assign_owners, gather_full, orthogonalize

__all__ = [
    "comm", "METER", "metered", "MatrixShard", "Whole", "TensorParallel", "FlatRange",
    "BlockView", "Blocks", "fused_qkv", "swiglu_fc1", "flat_blocks", "stacked_experts", "concatenated_experts",
    "grouped_mlp_experts", "orthogonalize", "gather_full", "NS_MODES", "assign_owners",
]
