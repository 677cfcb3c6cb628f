"""Megatron sharded-state templates, read the same way by the optimizer's sharded state
(:mod:`.sharded_state`) and the FSDP row boxes (:mod:`.fsdp`)."""
from __future__ import annotations

__all__ = ["built_tensors"]


def built_tensors(T) -> list:
    """The ShardedTensors of a template: itself, or what its factory builds (one tensor, or a
    nested list/dict of them; nothing for a rank that saves nothing of it)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    if isinstance(T, ShardedTensor):
        return [T]
    out = T.build()
    if isinstance(out, ShardedTensor):
        return [out]
    if not isinstance(out, (dict, list, tuple)):  # e.g. a LocalNonpersistentObject: nothing saved here
        return []
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    return [t for t in nested_values(out) if isinstance(t, ShardedTensor)]
