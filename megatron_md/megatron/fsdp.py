"""Torch FSDP2 (megatron-core's ``TorchFullyShardedDataParallel``) and Megatron-FSDP (its
``mcore_fsdp_adapter.FullyShardedDataParallel``) under megatron_md's optimizers.

FSDP2 stores every parameter as a DTensor ``Shard(0)`` over the data-parallel group: rank ``r``
holds rows ``[r0, r1)`` of the (tensor-parallel local) weight, ``r0 = min(r·⌈m/w⌉, m)``,
``r1 = min(r0 + ⌈m/w⌉, m)`` (``torch.chunk``'s split; trailing ranks may hold nothing). Those
rows are one contiguous run of the weight's row-major flattening, ``[r0·n, r1·n)``: a ZeRO-1 flat
range that happens to be row-aligned. So the optimizer binds each local piece with the layouts the
ZeRO-1 path already uses — :class:`~megatron_md.shard.FlatRange` over the DP group, around the
weight's tensor-parallel layout (:func:`~megatron_md.shard.flat_blocks` for a fused QKV or a split
``linear_fc1``) — and every method's update is the exact single-process one: row and column
statistics are reduced over the DP group (O(d_out + d_in) per matrix), Newton–Schulz gathers each
matrix at one owner.

Megatron's optimizer wrappers (``FP32Optimizer``, ``Float16OptimizerWithFloat16Params``) never see
a DTensor: they hold one plain :class:`Proxy` parameter per DTensor, a second tensor object on the
same storage as the DTensor's local piece (so the optimizer's in-place update *is* the model's
update, which FSDP2 all-gathers at the next forward), whose ``.grad`` is set to the local piece of
the DTensor's reduce-scattered gradient before each step (:func:`pull_grads`). Megatron's grad-norm
reduction then runs over the whole data × model-parallel group, as for ZeRO-1.

Megatron-FSDP (ZeRO-3 ``optim_grads_params``) is bound the same way. Its buffers group parameters by
row size and cut each bucket into equal flat chunks in rank order, so a rank again holds whole rows
``[r0, r1)`` of each weight — unevenly, possibly none — which :func:`row_ranges` reads from the ranks.
Its DTensors span a DP × TP mesh (the whole weight's shape: :func:`tp_local_shape` gives the
TP-local one); its updated main weights are copied into the weights it gathers after each step
(:func:`install_weights`); with bf16 the proxies are its fp32 main weights.

Here: the wrapper class (:func:`fsdp2_class`: megatron-core's class with the two methods that
megatron-core 0.16.1's loop calls on it fixed), the row geometry (:func:`row_range`,
:func:`row_ranges`), the proxies, and the torch_dist row boxes (:func:`row_factory`,
:func:`sharded_state_dict`, :func:`megatron_fsdp_sharded_state_dict`). The CPU/gloo device meshes
are :mod:`.cpu_compat`'s ``fsdp2_cpu_mesh`` and ``megatron_fsdp_cpu_mesh`` (device shims).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["available", "fsdp2_class", "is_fsdp2", "is_dtensor", "is_megatron_fsdp", "row_range", "row_ranges",
           "install_weights", "tp_local_shape", "mark_experts", "Proxy", "make_proxies", "pull_grads", "dp_group_of"]

_CLASS = None


def available(megatron: bool = False) -> tuple[bool, str]:
    """``(True, "")`` when torch has FSDP2 and megatron-core has its wrapper (``megatron``: its
    Megatron-FSDP adapter), else ``(False, why)``."""
    if megatron:
        try:
            from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel  # noqa: F401
        except ImportError as exc:
            return False, f"megatron-core has no Megatron-FSDP adapter (distributed.fsdp.mcore_fsdp_adapter: {exc})"
        import importlib.util
        if importlib.util.find_spec("einops") is None:
            return False, "megatron-core's Megatron-FSDP adapter needs einops (pip install 'megatron_md[fsdp]')"
        return True, ""
    try:
        from megatron.core.distributed.torch_fully_sharded_data_parallel import HAVE_FSDP
    except ImportError as exc:
        return False, f"megatron-core has no torch_fully_sharded_data_parallel ({exc})"
    if not HAVE_FSDP:
        return False, "this torch has no torch.distributed.fsdp.fully_shard (FSDP2 needs torch >= 2.4)"
    return True, ""


def fsdp2_class():
    """megatron-core's ``TorchFullyShardedDataParallel`` with two fixes of its loop-facing methods:

    * ``finish_grad_sync(force_all_reduce=...)``: megatron-core 0.16.1's ``finalize_model_grads``
      passes the keyword, which the base class's method does not take (a ``TypeError`` in every
      FSDP2 step of that release); FSDP2 has reduce-scattered the gradients during backward, so
      there is nothing to finish;
    * ``zero_grad_buffer()``: FSDP2 accumulates into each parameter's ``.grad`` (a DTensor), which
      the base class's no-op never clears; here it sets them to None, as the optimizer's
      ``zero_grad`` would if it held the DTensors (ours holds proxies)."""
    global _CLASS
    if _CLASS is None:
        from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel

        class MDTorchFullyShardedDataParallel(TorchFullyShardedDataParallel):
            md_fsdp2 = True

            def finish_grad_sync(self, *args, **kwargs):
                return None

            def zero_grad_buffer(self):
                for p in self.module.parameters():
                    p.grad = None

            def scale_gradients(self, scaling_factor: float):
                for p in self.module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(scaling_factor)

        _CLASS = MDTorchFullyShardedDataParallel
    return _CLASS


def is_fsdp2(model_chunks) -> bool:
    """Whether the model chunks are FSDP2-wrapped (their parameters are DTensors)."""
    return any(is_dtensor(p) for c in model_chunks for p in c.parameters())


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def is_megatron_fsdp(chunk) -> bool:
    """Whether ``chunk`` is megatron-core's Megatron-FSDP adapter (``--use-megatron-fsdp``)."""
    return bool(getattr(getattr(chunk, "ddp_config", None), "use_megatron_fsdp", False))


def mark_experts(named) -> None:
    """Megatron-FSDP's DTensors do not carry Megatron's ``allreduce=False`` of expert parameters: set it
    where its adapter's own rule (``".experts." in name``) makes a parameter an expert's, so the
    expert-parallel groups, layouts and the expert optimizer take them as on every other layout."""
    for n, p in named:
        if ".experts." in n and is_dtensor(p) and not hasattr(p, "allreduce"):
            p.allreduce = False


def dp_group_of(model_chunks, expert: bool = False):
    """The process group FSDP shards over (DP × CP): FSDP2's ``process_group``, Megatron-FSDP's
    dist index's FSDP group (``expert``: its expert-data-parallel one)."""
    groups = {}
    for c in model_chunks:
        g = (c.megatron_fsdp_dist_index.get_fsdp_group(is_expert_parallel=expert) if is_megatron_fsdp(c)
             else getattr(c, "process_group", None))
        if g is not None:
            groups[id(g)] = g
    if len(groups) != 1:
        raise ValueError(f"FSDP2 model chunks must share one data-parallel group (got {len(groups)})")
    return next(iter(groups.values()))


def row_ranges(named: list[tuple[str, torch.Tensor]], group, *, uneven: bool) -> dict[str, tuple[int, int]]:
    """name → :func:`row_range` of every DTensor; ``uneven`` (Megatron-FSDP): the rows each rank holds
    are read from the ranks themselves (one all-gather of every parameter's local row count):
    Megatron-FSDP cuts each bucket into equal flat chunks in rank order, with every parameter's rows
    kept whole (its buffer groups parameters by row size), so a rank's rows follow those of the ranks
    before it; checked to sum to each parameter's rows."""
    if not uneven or not named:  # (every rank has the same parameter kinds: none skips the collective)
        return {n: row_range(p, group) for n, p in named}
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    # per parameter: this rank's rows and its row size (elements), both gathered over the DP group
    local = torch.tensor([[p._local_tensor.shape[0] if p.ndim else p._local_tensor.numel(),
                           math.prod(p._local_tensor.shape[1:]) if p._local_tensor.numel() else 0] for _, p in named],
                         dtype=torch.int64).view(-1, 2)
    w, r = dist.get_world_size(group), dist.get_rank(group)
    every = [torch.zeros_like(local) for _ in range(w)]
    dist.all_gather(every, local, group=group)
    counts, widths = torch.stack(every)[..., 0], torch.stack(every)[..., 1]  # [ranks, params]
    tps = {1, ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()}
    out = {}
    for j, (n, p) in enumerate(named):
        rows = int(counts[:, j].sum())
        width = {int(x) for x in widths[:, j] if int(x)}
        # the DTensor is the whole (TP-unsharded) weight; the DP ranks' rows tile its TP-local part
        row = width.pop() if len(width) == 1 else (1 if not width else None)
        if row is None or not any(rows * row * t == p.numel() for t in tps):
            raise RuntimeError(f"Megatron-FSDP shard of {n} {tuple(p.shape)}: local pieces of "
                               f"{counts[:, j].tolist()} rows (local shape {tuple(p._local_tensor.shape)}) are not "
                               "whole rows that tile its tensor-parallel part in rank order")
        r0 = int(counts[:r, j].sum())
        out[n] = (r0, r0 + int(counts[r, j]))
    return out


def tp_local_shape(p) -> Optional[tuple]:
    """The tensor-parallel local shape of a Megatron-FSDP DTensor, whose mesh spans data × tensor
    parallel (``("dp_cp", "tp")``): its global shape with each dim a ``"tp"`` mesh dimension shards
    divided by that dimension's size. None for anything else (FSDP2's DTensors are already TP-local)."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard
    names = p.device_mesh.mesh_dim_names or ()
    if "tp" not in names:
        return None
    shape = list(p.shape)
    for i, pl in enumerate(p.placements):
        if names[i] == "tp" and isinstance(pl, Shard):
            shape[pl.dim] //= p.device_mesh.size(i)
    return tuple(shape)


def install_weights(model_chunks) -> None:
    """After an optimizer step: Megatron-FSDP copies its (updated) main weights into the model weights
    it all-gathers for the next forward (megatron-core's own optimizer does this in its step)."""
    for c in model_chunks:
        if is_megatron_fsdp(c):
            c.module.install_optimized_model_weights()


def row_range(p, group=None) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of DTensor ``p`` (``Shard(0)`` on a 1-D mesh over ``group``, default megatron's
    data-parallel × context-parallel group) held by this rank; checked against the local piece's length."""
    rows = getattr(p, "md_rows", None)
    if rows is not None:  # as the optimizer bound it (builder; Megatron-FSDP's uneven rows)
        return rows
    import torch.distributed as dist
    from torch.distributed.tensor import Shard
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"FSDP2 parameter with placements {placements} on a {mesh.ndim}-D mesh: megatron_md "
                         "binds Shard(0) over one data-parallel mesh dimension only")
    if group is None:
        from megatron.core import parallel_state as ps
        group = ps.get_data_parallel_group(with_context_parallel=True)
    m, w, r = p.shape[0], dist.get_world_size(group), dist.get_rank(group)
    if w != mesh.size():
        raise ValueError(f"FSDP2 mesh of {mesh.size()} ranks, data-parallel group of {w}")
    chunk = math.ceil(m / w) if m else 0
    r0 = min(r * chunk, m)
    r1 = min(r0 + chunk, m)
    if p._local_tensor.shape[0] != r1 - r0:
        raise RuntimeError(f"FSDP2 local piece of {tuple(p.shape)} has {p._local_tensor.shape[0]} rows on rank {r} "
                           f"of {w}; expected {r1 - r0} (torch.chunk's split)")
    return r0, r1


class Proxy(torch.nn.Parameter):
    """A plain parameter on the storage of an FSDP2 DTensor's local piece (see module docstring).
    ``md_dtensor``: the DTensor; Megatron's parameter attributes (``tensor_model_parallel``,
    ``partition_dim``, ``shared``, ``allreduce``, ...) are copied from it."""


def make_proxies(named: list[tuple[str, torch.Tensor]]) -> dict[int, Proxy]:
    """id(DTensor) → its :class:`Proxy` (shape: the local piece's)."""
    out = {}
    for _, p in named:
        local = p._local_tensor
        q = Proxy(local.detach(), requires_grad=p.requires_grad)
        for k, v in vars(p).items():
            if not k.startswith("_"):
                setattr(q, k, v)
        q.md_dtensor = p
        out[id(p)] = q
    return out


def pull_grads(proxies) -> None:
    """Each proxy's ``.grad`` ← the local piece of its DTensor's gradient; a parameter that received
    none this step gets zeros, as megatron-core's DDP grad buffer gives it (every rank then takes part in
    the same collectives of the step). Refuses a proxy no longer on its DTensor's storage (FSDP2
    re-allocated the shard)."""
    for q in proxies:
        p = q.md_dtensor
        local = p._local_tensor
        if local.numel() and local.data_ptr() != q.data_ptr():
            raise RuntimeError("FSDP2 moved a parameter's local shard to new storage after the optimizer was built "
                               "(e.g. model.load_state_dict(assign=True) or .to()); build the optimizer after that")
        g = p.grad
        q.grad = torch.zeros_like(q) if g is None else (g._local_tensor if is_dtensor(g) else g).view_as(q)
        if q.dtype == torch.float32:  # Megatron-FSDP's fp32 main weights of a bf16 model: Megatron's
            q.main_grad = q.grad      # Float16 wrapper takes an fp32 parameter's gradient from main_grad


# ------------------------------------------------------------------------ torch_dist checkpoints
def _prepend_of(T):
    """(shape, offset, fragmentation) of the prepended axes of megatron-core's sharded tensor (or
    the first tensor its factory builds): e.g. the local expert index of SequentialMLP experts."""
    from .templates import built_tensors
    T = built_tensors(T)[0]
    k = T.prepend_axis_num
    return tuple(T.global_shape[:k]), tuple(T.global_offset[:k]), tuple(T.axis_fragmentations[:k] or ())


def row_factory(key: str, data: torch.Tensor, *, rows: tuple[int, int], full_rows: int, tp_rank: int, tp: int,
                tp_axis: Optional[int], swiglu: bool, prepend: tuple, replica_id):
    """A ``ShardedTensorFactory`` of rows ``[r0, r1)`` (``data``) of a TP-local tensor of ``full_rows``
    rows, in the coordinates megatron-core saves the unsharded parameter in (the same keys, global
    shape and offsets as without FSDP2, so a checkpoint reshards to and from every other layout):

    * TP along rows (``tp_axis`` 0): global rows ``tp · full_rows``, this piece at ``tp_rank · full_rows + r0``;
    * a SwiGLU ``linear_fc1`` (``[gate_t; up_t]`` on each TP rank, saved as all gates then all ups):
      the piece's gate rows and up rows are two boxes;
    * TP along columns (``tp_axis`` 1): the columns at ``tp_rank · n``.

    Boxes may be uneven (``axis_fragmentations=None``: DCP checks the coverage). Megatron-core's own
    FSDP2 sharded tensors assume even splits and cut a SwiGLU piece in two halves regardless of
    which rows it holds, which mislabels gate and up rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    r0, r1 = rows
    pshape, poff, _ = prepend
    k = len(pshape)

    def boxes(cols):
        if swiglu:
            f = full_rows // 2
            out = []
            if r0 < f:
                out.append((0, min(r1, f) - r0, tp_rank * f + r0))
            if r1 > f:
                lo = max(r0, f)
                out.append((lo - r0, r1 - r0, tp * f + tp_rank * f + (lo - f)))
            return out, 2 * f * tp, cols, 0
        grows = full_rows * tp if tp_axis == 0 else full_rows
        gcols = cols * tp if tp_axis == 1 else cols
        return [(0, r1 - r0, (tp_rank * full_rows if tp_axis == 0 else 0) + r0)], grows, gcols, \
            (tp_rank * cols if tp_axis == 1 else 0)

    def build(key, t, replica_id, flattened_range):
        if t.ndim not in (1, 2):
            raise ValueError(f"FSDP2 checkpoint: {key} has {t.ndim} dimensions; expected a vector or a matrix")
        spec, grows, gcols, c0 = boxes(t.shape[1] if t.ndim == 2 else 1)
        out = []
        for a, b, g0 in spec:
            if b <= a:
                continue
            # the prepended axes (e.g. the layer index) become leading axes of size 1: DCP takes boxes of an
            # irregular grid with the tensor's own dimensions
            piece = t[a:b].reshape((1,) * k + tuple(t[a:b].shape))
            gshape, goff = ((grows, gcols), (g0, c0)) if t.ndim == 2 else ((grows,), (g0,))
            sh = ShardedTensor(key=key, data=piece, dtype=piece.dtype, local_shape=tuple(piece.shape),
                               global_shape=pshape + gshape, global_offset=poff + goff,
                               axis_fragmentations=None, replica_id=replica_id, prepend_axis_num=0)
            sh.validate_metadata_integrity()
            out.append(sh)
        if not out:  # no rows here (Megatron-FSDP's uneven cut): nothing to save, nothing in common.pt
            from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
            return LocalNonpersistentObject([])
        return out

    def merge(pieces):
        pieces = [x.reshape(x.shape[k:]) for x in pieces]
        return torch.cat(pieces) if pieces else data.new_zeros((0,) + tuple(data.shape[1:]))

    fac = ShardedTensorFactory(key, data, build, merge, replica_id)
    fac.md_fsdp = dict(full_rows=full_rows, tp_rank=tp_rank, tp=tp, tp_axis=tp_axis, swiglu=swiglu, prepend=prepend)
    return fac


def sharded_state_dict(module) -> dict:
    """``module.sharded_state_dict()`` of an FSDP2-wrapped GPTModel with every DTensor parameter's
    entry replaced by a :func:`row_factory` of its local rows (others unchanged)."""
    sd = module.sharded_state_dict()
    by_local = {id(p._local_tensor): (n, p) for n, p in module.named_parameters() if is_dtensor(p)}
    return _rows_sharded(sd, by_local)


def megatron_fsdp_sharded_state_dict(chunk, module) -> dict:
    """:func:`sharded_state_dict` of a Megatron-FSDP chunk. megatron-core's own ``sharded_state_dict()``
    cannot take its uneven DTensors (a SwiGLU ``linear_fc1`` with no rows on a rank divides by zero in
    ``apply_swiglu_sharded_factory``), and the module's state-dict pre-hooks put the sharded DTensors
    back whenever a submodule asks for its ``state_dict()``. So megatron-core is asked with each sharded
    parameter stood in for by a meta tensor of its whole tensor-parallel-local shape (keys, shapes and
    offsets are all it reads), and every such entry is then replaced by a :func:`row_factory` of the
    DTensor's local rows; the DTensors are put back in any case. ``module``: the GPTModel inside."""
    chunk.module.state_dict(keep_vars=True)  # Megatron-FSDP's pre-hook: its sharded DTensors in place
    stand_ins, swapped = {}, []
    try:
        for prefix, mod in module.named_modules():
            for pn, p in list(mod._parameters.items()):
                if p is None or not is_dtensor(p):
                    continue
                q = torch.nn.Parameter(torch.empty(tp_local_shape(p) or tuple(p.shape), dtype=p.dtype, device="meta"),
                                       requires_grad=p.requires_grad)
                for k, v in vars(p).items():
                    if not k.startswith("_"):
                        setattr(q, k, v)
                mod._parameters[pn] = q
                swapped.append((mod, pn, p))
                stand_ins[id(q)] = (f"{prefix}.{pn}" if prefix else pn, p)
        sd = module.sharded_state_dict()
    finally:
        for mod, pn, p in swapped:
            mod._parameters[pn] = p
    # the stand-ins are plain tensors, so megatron-core numbered their replicas by DP rank; the row
    # boxes are disjoint over DP (each the main copy of its rows), as FSDP2's DTensor entries are. With
    # bf16/fp16 the sharded DTensors are Megatron-FSDP's fp32 main weights: the model's weights are saved
    # in the model's dtype (as every other layout saves them; the fp32 copies are the optimizer's)
    cfg = chunk.config
    cast = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    return _rows_sharded(sd, stand_ins, own_dp_replica=True, cast=cast)


def _rows_sharded(sd: dict, by_data: dict, own_dp_replica: bool = False, cast=None) -> dict:
    """``sd`` with every entry whose data is a key of ``by_data`` (→ ``(name, DTensor)``) replaced by a
    :func:`row_factory` of the DTensor's local rows (``own_dp_replica``: the replica id's DP component,
    megatron-core's last, set to 0; ``cast``: saved as a copy in that dtype, ``md_source`` the piece)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()

    def fix(T):
        if not isinstance(T, (ShardedTensor, ShardedTensorFactory)) or id(T.data) not in by_data:
            return T
        name, p = by_data[id(T.data)]
        tp_axis = p.partition_dim if getattr(p, "tensor_model_parallel", False) and tp > 1 else None
        swiglu = isinstance(T, ShardedTensorFactory)
        if swiglu and not name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
            raise ValueError(f"FSDP2 checkpoint: {name} has a sharded-tensor factory megatron_md does not know")
        local = p._local_tensor
        data = local if cast is None or local.dtype == cast else local.detach().to(cast)
        replica = T.replica_id
        if own_dp_replica and isinstance(replica, tuple):
            replica = tuple(replica[:-1]) + (0,)
        fac = row_factory(T.key, data, rows=row_range(p), full_rows=(tp_local_shape(p) or p.shape)[0],
                          tp_rank=tp_rank, tp=tp, tp_axis=tp_axis, swiglu=swiglu, prepend=_prepend_of(T),
                          replica_id=replica)
        fac.md_source = local
        return fac
    dict_list_map_inplace(fix, sd)
    return sd
