"""The sharded state of our Megatron optimizer wrappers: the seam a checkpoint builds on.

Megatron's checkpoints ask an optimizer for ``sharded_state_dict(model_sharded_state_dict)`` and
give the loaded dict back to ``load_state_dict``. Our wrappers (:mod:`.builder`) answer with
:func:`wrapper_sharded_state` / :func:`wrapper_load` — in Megatron-LM's loop — and the driver's
``torch_dist`` format (:mod:`megatron_md.checkpoint.dist`) builds its sharded dict from the same
pieces (:func:`wrapper_entries`, :func:`wrapper_common`, :func:`merge_commons`,
:func:`apply_wrapper_common`). Every state is named by the model parameter it belongs to, in the
coordinates of the *unsharded* model, so that ``dist_checkpointing`` reshards it on load:

* param-shaped optimizer state (momentum, Adam moments, schedule-free ``z``, the fp32 main
  copies of a bf16/fp16 run) as ShardedTensors keyed ``optimizer.state.<key>.<model key>``, made
  from the model parameter's own ShardedTensor (or SwiGLU factory), so it is sharded exactly like
  its parameter. ZeRO-1 flat shards are first reassembled to the parameter's TP-local shape over
  the data-parallel group (an exact sum of disjoint pieces), as Megatron's "fully reshardable"
  format does; layer-wise DP saves each matrix's state from its owner;
* per-matrix vectors (MD gains and their moments, NorMuon/SF-NorMuon row moments) keyed
  ``optimizer.vec.<key>.<model key>[.block<b>]``: a row vector of ``d_out`` (column vector of
  ``d_in``) values of the logical matrix (Q, K and V of a fused QKV are blocks 0, 1, 2), split
  along whichever TP dimension splits it and replicated otherwise; rows that a ZeRO range cuts
  are reassembled first (each row taken from the rank holding its first element); a SwiGLU
  ``linear_fc1``'s row vectors go through the parameter's factory (its gate and up halves), or with
  ``--split-fc1`` are the gate's and the up's own (blocks 0 and 1);
* per-matrix scalars (step counts, hyperball radii) keyed ``optimizer.scalar.<key>...``;
* common state (``common.pt``): per optimizer (dense/expert) its param groups' scalars
  (schedule-free counters, LRs), skip counters and grad-scaler state — merged over all ranks,
  since pipeline stages hold different groups.

Every state exists before the first save (the matrix optimizers create theirs at construction; the
Adam partner's is created here when it has not stepped yet). A loading entry is an empty buffer
whose ``restore`` writes the loaded value into the optimizer.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..optim.base import BlockState
from ..shard import Blocks, FlatRange
from .routing import is_grouped_gemm
from .templates import built_tensors

__all__ = ["wrapper_entries", "built_tensors", "wrapper_sharded_state", "is_wrapper_sharded_state", "wrapper_load", "wrapper_common",
           "commons_for",
           "merge_commons", "apply_wrapper_common", "template_map", "optimizer_wrappers", "sharded_types", "Entry"]

_ROW_KEYS = ("g_r", "row_moment")
_COL_KEYS = ("g_c",)


# -------------------------------------------------------------------------------- small helpers
def sharded_types():
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    return ShardedTensor, ShardedTensorFactory, ShardedObject


def _rid(r) -> tuple:
    return tuple(r) if isinstance(r, tuple) else (int(r),)


def optimizer_wrappers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _axis(key: str) -> Optional[str]:
    if key.startswith(_ROW_KEYS):
        return "rows"
    if key.startswith(_COL_KEYS):
        return "cols"
    return None


def template_map(templates) -> dict:
    """id(model param) → its ShardedTensor / ShardedTensorFactory in the model's sharded dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    ShardedTensor, ShardedTensorFactory, _ = sharded_types()
    out = {}
    for sd in templates:
        for t in nested_values(sd):
            if isinstance(t, (ShardedTensor, ShardedTensorFactory)):
                # a Megatron-FSDP bf16 weight is saved as a bf16 copy of its fp32 main DTensor piece
                out.setdefault(id(getattr(t, "md_source", t.data)), t)
    return out


class Entry:
    """One sharded value of the optimizer: what is saved/loaded and how a load is applied."""

    __slots__ = ("sharded", "restore")

    def __init__(self, sharded, restore: Optional[Callable[[torch.Tensor], None]]):
        self.sharded, self.restore = sharded, restore


# ------------------------------------------------------------------------------------- geometry
def _prepend(T):
    """(shape, offset, fragmentation) of the prepended axes of the template (experts of a
    SequentialMLP); for a factory, of the tensors it builds."""
    ShardedTensor, _, _ = sharded_types()
    if isinstance(T, _Axes):  # one expert of a grouped-GEMM weight
        return T.prepend
    if getattr(T, "md_fsdp", None) is not None:  # an FSDP2 parameter's rows (fsdp.row_factory)
        return T.md_fsdp["prepend"]
    if not isinstance(T, ShardedTensor):
        T = built_tensors(T)[0]
    k = T.prepend_axis_num
    return tuple(T.global_shape[:k]), tuple(T.global_offset[:k]), tuple(T.axis_fragmentations[:k])


def _vector_tensor(key: str, data: torch.Tensor, T, length: int, offset: int, replica: tuple):
    """A ShardedTensor of ``data`` (1-D) at ``offset`` of a ``length`` vector, below ``T``'s
    prepended axes."""
    ShardedTensor, _, _ = sharded_types()
    shape, off, frag = _prepend(T)
    n = max(int(data.shape[0]), 1)
    sh = ShardedTensor(key=key, data=data, dtype=data.dtype, local_shape=tuple(data.shape),
                       global_shape=shape + (int(length),), global_offset=off + (int(offset),),
                       axis_fragmentations=frag + (max(int(length) // n, 1),), replica_id=replica,
                       prepend_axis_num=len(shape))
    sh.validate_metadata_integrity()
    return sh


# ------------------------------------------------------------------------ one wrapper's entries
def wrapper_entries(w, tmap: dict, mixed: bool, *, loading: bool) -> list[Entry]:
    """The sharded entries of one Megatron wrapper (FP32 / Float16 / Distributed optimizer) of
    megatron_md's builder; ``tmap``: :func:`template_map` of the model's sharded state dict."""
    inner = w.optimizer
    inner.ensure_partner_state()
    records = getattr(w, "md_records", None)
    if records is None:
        raise CheckpointError("--ckpt-format torch_dist needs the optimizer of megatron_md's builder")
    partner_keys = ("z", "exp_avg_sq") if "SFAdamW" in type(inner._partner).__name__ else ("exp_avg", "exp_avg_sq")
    entries: list[Entry] = []
    for rec in records:
        fsdp = rec.fsdp_rows is not None
        # megatron-core's sharded tensor of an FSDP2 DTensor holds its local piece
        T = tmap.get(id(rec.model._local_tensor if fsdp else rec.model))
        if T is None:
            raise CheckpointError(f"{rec.name}: not in the model's sharded_state_dict()"
                                  + (" as its FSDP2 local rows (a parameter with fewer rows than data-parallel ranks: "
                                     "megatron-core saves it whole)" if fsdp else ""))
        if mixed:  # the fp32 main copy: every rank holds (and loads) it, layer-wise too
            entries.append(_param_shaped("optimizer.main", T, rec, rec.main, loading))
        layerwise_owner = False
        if rec.role in ("matrix", "head"):
            sub = inner.sub_optimizer_of(rec.name)
            if sub is None:  # layer-wise DP: another rank owns this matrix
                continue
            q = inner.local_params[rec.name]
            st = sub.state[q]
            keys = [k for k, v in st.items()
                    if torch.is_tensor(v) and not k.startswith(BlockState.PREFIX) and v.shape == q.shape]
            layerwise_owner = bool(getattr(w, "md_layerwise", False)) and rec.role == "matrix"
        else:
            sub, q = None, rec.main
            st = inner.state.get(q) if q is not None else None
            keys = list(partner_keys)
        rep = _rid(T.replica_id)
        if layerwise_owner:
            rep = rep[:-1] + (0,)
        Tr = replace(T, replica_id=rep if isinstance(T.replica_id, tuple) else rep[0])
        for k in keys:
            t = st[k] if st is not None else None
            entries.append(_param_shaped(f"optimizer.state.{k}", Tr, rec, t, loading))
        if rec.role not in ("matrix", "head"):
            # the Adam partner's per-param step count (the same for every param of a group)
            if is_grouped_gemm(rec.name):  # one step per expert, named as SequentialMLP's
                experts = _GroupedExperts(T, rec.name)
                entries.extend(_partner_step(experts.axes(b), rep, rec, st, loading, main=experts.first_tp_shard)
                               for b in range(experts.n_local))
            else:
                entries.append(_partner_step(T, rep, rec, st, loading))
            continue
        lay = sub.layout(q)
        views = lay.views if isinstance(lay, Blocks) else [None]
        experts = _GroupedExperts(T, rec.name, len(views)) if is_grouped_gemm(rec.name) else None
        if isinstance(lay, Blocks) and experts is None and not rec.name.endswith(("linear_qkv.weight",
                                                                                   "linear_fc1.weight")):
            raise CheckpointError(f"--ckpt-format torch_dist: {rec.name} is a parameter of several matrices "
                                  "that has no global naming of its per-matrix optimizer state")
        if fsdp:  # per-matrix vectors are reassembled over the DP group: one main replica, DP rank 0
            rep = rep[:-1] + (dist.get_rank(rec.dp_group),)
        for b, view in enumerate(views):
            vec = BlockState(st, b)
            shard = lay if view is None else view.shard
            for k, v in vec.items():
                if experts is not None:  # named as SequentialMLP's expert ``e``: the expert axis prepended
                    if experts.glu and _axis(k) == "rows":
                        entries.extend(experts.glu_rows(k, v, vec, b, rep, loading))
                    else:
                        entries.append(_matrix_value(k, v, vec, experts.axes(b), rep, shard, T.key, loading,
                                                     whole_param=False))
                    continue
                suffix = "" if view is None else f".block{b}"
                entries.append(_matrix_value(k, v, vec, T, rep, shard, f"{T.key}{suffix}", loading,
                                             whole_param=view is None))
    return entries


# ------------------------------------------------------------- legacy GroupedMLP (grouped GEMM)
class _Axes:
    """Stands in for a template in :func:`_prepend`: the prepended axes of one expert's vectors."""

    md_fsdp = None

    def __init__(self, key: str, shape: tuple, offset: tuple, frag: tuple):
        self.key, self.prepend = key, (shape, offset, frag)


class _GroupedExperts:
    """The per-expert geometry of a legacy ``GroupedMLP`` weight, read off the weight's own
    ShardedTensorFactory (megatron-core builds it as SequentialMLP's tensors: ``[..., E, out, in]``
    with the expert axis a data axis, and — gated — the gate and up rows as two tensors at TP
    offsets ``r`` and ``tp + r`` of ``2·ffn``). Each expert's vectors are keyed and placed exactly
    as SequentialMLP's expert ``e`` (its expert axis prepended), so the optimizer state reshards
    between grouped GEMM and SequentialMLP experts, across EP and TP."""

    def __init__(self, T, name: str, n_local: Optional[int] = None):
        built = built_tensors(T)
        if not built or len(built) > 2 or any(t.key != T.key for t in built):
            raise CheckpointError(f"--ckpt-format torch_dist: {name}: megatron-core's grouped-GEMM sharded state "
                                  f"has {len(built)} tensors ({sorted({t.key for t in built})[:3]}); expected "
                                  f"SequentialMLP-compatible '{T.key}' (no singleton_local_shards)")
        k = built[0].prepend_axis_num
        if n_local is not None and built[0].data.shape[0] != n_local:
            raise CheckpointError(f"{name}: {n_local} experts in the optimizer, {built[0].data.shape[0]} in the "
                                  "weight's sharded state")
        self.k, self.built, self.glu = k, built, len(built) == 2
        g = built[0]
        self._lead = (tuple(g.global_shape[:k]), tuple(g.global_offset[:k]), tuple(g.axis_fragmentations[:k]))
        self.n_global, self.first = int(g.global_shape[k]), int(g.global_offset[k])
        self.n_local, self.key = int(g.data.shape[0]), T.key
        #: this rank holds TP offset 0 of the expert matrices (the main copy of replicated values)
        self.first_tp_shard = all(o == 0 for o in g.global_offset[k + 1:])

    def axes(self, b: int) -> _Axes:
        shape, off, frag = self._lead
        return _Axes(self.key, shape + (self.n_global,), off + (self.first + b,), frag + (self.n_global,))

    def glu_rows(self, k, v, vec, b, rep, loading) -> list[Entry]:
        """A gated fc1's row vector as SequentialMLP's SwiGLU factory saves it: ``[2·ffn, 1]``, this
        rank's gate rows at the gate tensor's offset and its up rows at the up tensor's."""
        ShardedTensor, _, _ = sharded_types()
        shape, off, frag = self.axes(b).prepend
        out, start = [], 0
        for half in self.built:
            n = int(half.data.shape[1])  # this rank's rows of the half
            data = torch.zeros(n, 1, dtype=v.dtype, device=v.device) if loading else v.detach()[start:start + n, None]
            length, offset = int(half.global_shape[self.k + 1]), int(half.global_offset[self.k + 1])
            sh = ShardedTensor(key=f"optimizer.vec.{k}.{half.key}", data=data, dtype=data.dtype,
                               local_shape=tuple(data.shape), global_shape=shape + (length, 1),
                               global_offset=off + (offset, 0), axis_fragmentations=frag + (length // max(n, 1), 1),
                               replica_id=rep + (0,), prepend_axis_num=len(shape))
            sh.validate_metadata_integrity()

            def restore(x, k=k, a=start, n=n):
                vec[k][a:a + n].copy_(x.reshape(-1))
            out.append(Entry(sh, restore if loading else None))
            start += n
        return out


# --------------------------------------------------------------------------- Megatron-LM's seam
def wrapper_sharded_state(w, model_sharded_state_dict, is_loading: bool) -> dict:
    """``sharded_state_dict()`` of one of our Megatron wrappers, as Megatron-LM's
    ``save_checkpoint``/``load_checkpoint`` call it (``--ckpt-format torch_dist`` there): the
    entries of :func:`wrapper_entries` and, in ``common.pt``, the wrapper's merged common state.
    When loading, the entries are kept on ``w`` for :func:`wrapper_load`."""
    tmap = template_map([model_sharded_state_dict])
    cfg = getattr(w, "config", None)
    mixed = bool(getattr(cfg, "bf16", False) or getattr(cfg, "fp16", False))
    entries = wrapper_entries(w, tmap, mixed, loading=is_loading)
    if is_loading:
        w._md_pending_entries = entries
    common = None if is_loading else merge_commons([wrapper_common(w)])[0]
    return {"md_sharded": {f"e{i}": e.sharded for i, e in enumerate(entries)}, "md_common": common}


def is_wrapper_sharded_state(state_dict) -> bool:
    return isinstance(state_dict, dict) and "md_sharded" in state_dict


def wrapper_load(w, state_dict: dict) -> None:
    """Apply a loaded :func:`wrapper_sharded_state` (after ``dist_checkpointing.load``)."""
    entries = getattr(w, "_md_pending_entries", None)
    if entries is None:
        raise CheckpointError("load_state_dict of a torch_dist optimizer state without sharded_state_dict("
                              "is_loading=True) first")
    loaded = state_dict["md_sharded"]
    with torch.no_grad():
        for i, e in enumerate(entries):
            e.restore(loaded[f"e{i}"])
    apply_wrapper_common(w, state_dict["md_common"])
    if hasattr(w.optimizer, "_share_state"):
        w.optimizer._share_state()
    w._md_pending_entries = None


def _param_shaped(prefix, T, rec, t, loading) -> Entry:
    """``t`` (this rank's piece of a param-shaped value, or None) as its parameter's TP-local
    tensor: ZeRO pieces summed over the data-parallel group first."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    mp = rec.model
    if rec.fsdp_rows is not None:  # FSDP2: this rank's rows, sharded as the parameter's own tensor
        shape = tuple(mp._local_tensor.shape)
        full = (torch.zeros(shape, dtype=torch.float32, device=mp.device) if loading
                else t.detach().reshape(shape).to(torch.float32))

        def restore(v, t=t):
            t.copy_(v.view_as(t))
    elif rec.zero is not None:
        s, e = rec.zero
        full = torch.zeros(mp.numel(), dtype=torch.float32, device=mp.device)
        if not loading:
            if t is not None and e > s:
                full[s:e] = t.reshape(-1)
            dist.all_reduce(full, group=rec.dp_group)
        full = full.view(mp.shape)

        def restore(v, t=t, s=s, e=e):
            if t is not None and e > s:
                t.copy_(v.reshape(-1)[s:e].view_as(t))
    else:
        full = (torch.zeros(mp.shape, dtype=torch.float32, device=mp.device) if loading
                else t.detach().reshape(mp.shape).to(torch.float32))

        def restore(v, t=t):
            t.copy_(v.view_as(t))
    return Entry(make_sharded_optimizer_tensor(T, full, prefix), restore if loading else None)


def _partner_step(T, rep, rec, st, loading, main: Optional[bool] = None) -> Entry:
    step = st.get("step") if st is not None else None
    val = torch.zeros(1, dtype=torch.float32, device=rec.model.device)
    if not loading and step is not None:
        val += step.to(val)
    if (rec.zero is not None or rec.fsdp_rows is not None) and not loading:  # ranks without a piece hold no step
        dist.all_reduce(val, op=dist.ReduceOp.MAX, group=rec.dp_group)
    main = _first_shard(T) if main is None else main
    sh = _vector_tensor(f"optimizer.scalar.step.{T.key}", val, T, 1, 0, rep + (0 if main else 1,))

    def restore(v):
        if st is not None and "step" in st:
            st["step"].copy_(v.reshape(()).to(st["step"]))
    return Entry(sh, restore if loading else None)


def _first_shard(T) -> bool:
    """Whether this rank holds the first TP shard of ``T`` (offset 0 on every non-prepended axis)."""
    ShardedTensor, _, _ = sharded_types()
    geo = getattr(T, "md_fsdp", None)
    if not isinstance(T, ShardedTensor):
        built = built_tensors(T)
        if not built:  # an FSDP2 rank without rows of this parameter
            return False
        T = built[0]
    k = len(geo["prepend"][0]) if geo is not None else T.prepend_axis_num  # FSDP2 boxes carry them as axes
    return all(o == 0 for o in T.global_offset[k:])


def _matrix_value(k, v, vec, T, rep, shard, name, loading, whole_param=True) -> Entry:
    canon = shard.inner if isinstance(shard, FlatRange) else shard
    r0, c0 = canon.row_range[0], canon.col_range[0]
    axis = _axis(k)
    if axis is None:
        if torch.is_tensor(v) and v.ndim > 0:
            raise CheckpointError(f"{name}: optimizer vector state {k!r} has no declared axis "
                                  f"(rows: {_ROW_KEYS}, columns: {_COL_KEYS})")
        is_t = torch.is_tensor(v)
        val = (v.detach().reshape(1).to(torch.float64) if is_t else torch.tensor([float(v)], dtype=torch.float64))
        if loading:
            val = torch.zeros(1, dtype=torch.float64)
        main = r0 == 0 and c0 == 0
        sh = _vector_tensor(f"optimizer.scalar.{k}.{name}", val, T, 1, 0, rep + (0 if main else 1,))

        def restore(x, k=k, is_t=is_t):
            if is_t:
                vec[k].copy_(x.reshape(()).to(vec[k]))
            else:
                vec[k] = type(v)(x.item())
        return Entry(sh, restore if loading else None)
    key = f"optimizer.vec.{k}.{name}"
    if axis == "cols":
        data = torch.zeros_like(v) if loading else v.detach()
        sh = _vector_tensor(key, data, T, canon.shape[1], c0, rep + (0 if r0 == 0 else 1,))

        def restore(x, k=k):
            vec[k].copy_(x)
        return Entry(sh, restore if loading else None)
    # rows: reassemble a ZeRO range's partial rows to the TP-local rows first
    m = canon.local_shape[0]
    if isinstance(shard, FlatRange):
        n = canon.local_shape[1]
        lo = shard.start // n  # first local row of this rank's vector
        own0, own1 = -(-shard.start // n), -(-shard.end // n)  # rows whose first element is here
        data = torch.zeros(m, dtype=v.dtype, device=v.device)
        if not loading:
            data[own0:own1] = v[own0 - lo:own1 - lo]
            dist.all_reduce(data, group=shard.level_group)

        def restore(x, k=k, lo=lo):
            vec[k].copy_(x[lo:lo + vec[k].numel()])
    else:
        data = torch.zeros_like(v) if loading else v.detach()

        def restore(x, k=k):
            vec[k].copy_(x)
    _, Factory, _ = sharded_types()
    geo = getattr(T, "md_fsdp", None)
    if geo is not None and whole_param and geo["swiglu"]:  # FSDP2: the vector's gate and up rows, as the weight's
        from .fsdp import row_factory
        sh = row_factory(key, data[:, None], rows=(0, m), full_rows=m, tp_rank=geo["tp_rank"], tp=geo["tp"],
                         tp_axis=geo["tp_axis"], swiglu=True, prepend=geo["prepend"], replica_id=rep)
        return Entry(sh, (lambda x, f=restore: f(x.reshape(-1))) if loading else None)
    if whole_param and isinstance(T, Factory) and geo is None:  # SwiGLU fc1 as one matrix: its gate and up halves, as the
        # weight's own factory (split into gate and up blocks, each block is a plain vector)
        sh = replace(T, key=key, data=data[:, None],
                     replica_id=rep if isinstance(T.replica_id, tuple) else rep[0])
        return Entry(sh, (lambda x, f=restore: f(x.reshape(-1))) if loading else None)
    sh = _vector_tensor(key, data, T, canon.shape[0], r0, rep + (0 if c0 == 0 else 1,))
    return Entry(sh, restore if loading else None)


# --------------------------------------------------------------------------------- common state
def _plain(v):
    if torch.is_tensor(v):
        return v.detach().cpu().clone()
    return v


def _group_key(part: str, gi: int, g: dict) -> tuple:
    """A matrix/head sub-group's name in ``common.pt``: its wrapper group, radius scale and — for a
    matrix sub-group on another sphere (MD's router: rows) — that sphere (keys written before the
    router had its own group keep their form)."""
    key = (part, gi, g.get("radius_scale", 1.0))
    if part == "matrix" and g.get("sphere", "frobenius") != "frobenius":
        key += (g["sphere"],)
    return key


def _group_scalars(g: dict) -> dict:
    return {k: _plain(v) for k, v in g.items() if k != "params"}


def wrapper_common(w) -> dict:
    inner = w.optimizer
    groups = {}
    for gi, g in enumerate(inner.param_groups):
        groups[("partner", gi)] = _group_scalars(g)
    for part, links in (("matrix", inner._links), ("head", inner._head_links)):
        for g, gi in links:
            groups[_group_key(part, gi, g)] = _group_scalars(g)
    scaler = getattr(w, "grad_scaler", None)
    return {"groups": groups, "md_skipped_steps": getattr(w, "md_skipped_steps", 0),
            "skipped": {part: getattr(o, "skipped_steps", 0) for part, o in
                        (("matrix", inner._matrix), ("head", inner._head)) if o is not None},
            "grad_scaler": scaler.state_dict() if scaler is not None else None}


def merge_commons(commons: list) -> list:
    """Every rank's per-wrapper common state merged (a pipeline stage or layer-wise rank holds
    only some sub-optimizer groups; equal groups on every rank that has them)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, commons)
    out = []
    for wi in range(len(commons)):
        merged = {"groups": {}, "skipped": {}}
        for per_rank in gathered:
            c = per_rank[wi]
            for k, v in c["groups"].items():
                merged["groups"].setdefault(k, v)
            for k, v in c["skipped"].items():
                merged["skipped"].setdefault(k, v)
            merged.setdefault("md_skipped_steps", c["md_skipped_steps"])
            merged.setdefault("grad_scaler", c["grad_scaler"])
        out.append(merged)
    return out


def commons_for(n_wrappers: int, commons: list) -> list:
    """The saved per-wrapper commons for a run with ``n_wrappers`` chained optimizers, which another
    layout may split differently: megatron-core gives expert parameters their own chained optimizer at
    EP > 1 and none at EP = 1. A wrapper the checkpoint lacks, or a group key its saved entry lacks,
    takes the value saved under the same key by another wrapper: the wrappers step in lockstep, so
    their group counters (schedule-free ``k``, ``weight_sum``, ``lr_max``, ...) and hyperparameters
    agree."""
    if not commons:
        return [None] * n_wrappers
    by_key: dict = {}
    for c in commons:
        for k, v in c["groups"].items():
            by_key.setdefault(k, v)
    out = []
    for wi in range(n_wrappers):
        c = commons[wi] if wi < len(commons) else commons[0]
        out.append({**c, "groups": {**by_key, **c["groups"]}})
    return out


def apply_wrapper_common(w, c: dict) -> None:
    inner = w.optimizer
    for gi, g in enumerate(inner.param_groups):
        _set_group(g, c["groups"].get(("partner", gi)))
    for part, links in (("matrix", inner._links), ("head", inner._head_links)):
        for g, gi in links:
            _set_group(g, c["groups"].get(_group_key(part, gi, g)))
    for part, o in (("matrix", inner._matrix), ("head", inner._head)):
        if o is not None and part in c["skipped"]:
            o.skipped_steps = c["skipped"][part]
    if hasattr(w, "md_skipped_steps"):
        w.md_skipped_steps = c["md_skipped_steps"]
    if c["grad_scaler"] is not None and getattr(w, "grad_scaler", None) is not None:
        w.grad_scaler.load_state_dict(c["grad_scaler"])


def _set_group(g: dict, saved: Optional[dict]) -> None:
    if saved is None:
        return
    for k, v in saved.items():
        if torch.is_tensor(v) and torch.is_tensor(g.get(k)):
            g[k].copy_(v)
        else:
            g[k] = v
