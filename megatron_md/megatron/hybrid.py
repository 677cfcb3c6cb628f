"""The inner optimizer that Megatron's wrappers hold: a matrix method plus its Adam partner.

Megatron's FP32Optimizer / Float16OptimizerWithFloat16Params / DistributedOptimizer replace
the parameters of the optimizer they wrap (fp32 main copies, ZeRO-1 flat shards) *after* it
is constructed. So this optimizer binds late: it is built over Megatron-style param groups
tagged ``md_role`` (``"matrix"`` or ``"adam"``), the wrapper is built around it, and then
:meth:`HybridOptimizer.bind` receives, for every logical matrix in a global order shared by
all ranks, the local main parameter (or ``None`` where this rank holds no piece) and its
MatrixShard layout; the matrix optimizer is created then, over the final parameters.

MD's recipe adds two roles: ``"embedding"`` groups are stepped by the Adam partner and then
have every row projected back to unit norm; ``"head"`` groups (the untied output head) get
their own :class:`~megatron_md.optim.AdamMD` with one unit sphere per row and row/column gains.

Megatron's LR scheduler writes ``lr``/``weight_decay`` into this optimizer's groups; they are
forwarded to the matrix (and head) optimizer's groups at every step. Optimizer state of local main
params lives in ``self.state`` (so Megatron sees it); ranks with an empty piece of a matrix
keep a zero-size placeholder parameter, which only takes part in the collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..ops import ns_flops
from ..optim import AdamMD, SFAdamW
from ..optim.md import project_rows_
from ..shard import Blocks, FlatRange, comm
from ..shard.orthogonalize import assign_owners


#: param-group roles: hidden matrices, the Adam partner, MD's unit-row embedding and row-sphere head
ROLES = ("matrix", "adam", "embedding", "head")
_PARTNER_ROLES = ("adam", "embedding")


@dataclass
class MatrixItem:
    """One matrix parameter of the model, as this rank's optimizer sees it."""

    group_index: int
    name: str
    main: Optional[torch.Tensor]     # local fp32 main param (or ZeRO shard); None: no local piece
    layout: Any                      # MatrixShard | Blocks for ``main`` (or the placeholder)
    radius_scale: float = 1.0
    #: matrix-optimizer param-group keys of this matrix only (MD's router: ``sphere="rows"``, ``scale="none"``)
    overrides: tuple = ()


class HybridOptimizer(torch.optim.AdamW):
    """Matrix optimizer on ``md_role="matrix"`` groups, AdamW/SF-AdamW on ``md_role="adam"``.

    Subclasses ``torch.optim.AdamW`` only because Megatron's DistributedOptimizer accepts
    nothing else (an ``isinstance`` check); every method that does work is overridden here,
    and AdamW's own constructor is not run.
    """

    def __init__(self, param_groups: Sequence[dict], *, matrix_cls=None, matrix_kwargs: Optional[dict] = None,
                 partner: str = "adamw", partner_kwargs: Optional[dict] = None, ns_mode: str = "owner",
                 head_kwargs: Optional[dict] = None, ns_split: Optional[bool] = None):
        if partner not in ("adamw", "sf-adamw"):
            raise ValueError(f"partner={partner!r}: expected 'adamw' or 'sf-adamw'")
        groups = [dict(g) for g in param_groups]
        for g in groups:
            if g.get("md_role") not in ROLES:
                raise ValueError(f"every param group needs md_role in {ROLES}")
            g.setdefault("lr", 0.0)
            g.setdefault("weight_decay", 0.0)
        torch.optim.Optimizer.__init__(self, groups, dict(lr=0.0, weight_decay=0.0))
        self.matrix_cls, self.matrix_kwargs = matrix_cls, dict(matrix_kwargs or {})
        self.ns_mode = ns_mode
        self.ns_split = ns_split  # None: MEGATRON_MD_NS_SPLIT decides
        if any(g["md_role"] == "matrix" and g["params"] for g in self.param_groups) and matrix_cls is None:
            raise ValueError("matrix_cls is required when there are matrix parameters")
        pk = dict(partner_kwargs or {})
        dummy = [torch.zeros(1, requires_grad=True)]
        self._partner = (SFAdamW(dummy, **pk) if partner == "sf-adamw" else torch.optim.AdamW(dummy, **pk))
        for g in self.param_groups:
            if g["md_role"] in _PARTNER_ROLES:
                for k, v in self._partner.defaults.items():
                    g.setdefault(k, v)
        #: MD output head: AdamMD(sphere="rows") keywords (betas, eps: the partner's Adam)
        self.head_kwargs = dict(head_kwargs or {})
        self._head = None
        self._head_links: list[tuple[dict, int]] = []
        self._unit_rows: list[tuple[torch.Tensor, Any]] = []   # embedding (main or placeholder, layout)
        self._matrix = None
        self._placeholders: list[torch.Tensor] = []
        self._links: list[tuple[dict, int]] = []
        self._local_mains: list[tuple[torch.Tensor, torch.Tensor]] = []  # (wrapper's param, ours)
        self._head_mains: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._layerwise = None  # (dp_group, [(main, owner)])
        #: the matrix optimizer's params (local main params, ZeRO pieces, placeholders) → model name
        self.matrix_names: dict = {}
        #: model name → the tensor the matrix or head optimizer steps for it on this rank (absent:
        #: another rank owns it, layer-wise DP)
        self.local_params: dict = {}

    # ----------------------------------------------------------------------------- binding
    def bind(self, items: Sequence[MatrixItem], *, layerwise_group=None) -> None:
        """Create the matrix optimizer over the ``matrix`` items (same order on every rank of a
        group), MD's head optimizer over the ``head`` items and the embedding projection over
        the ``embedding`` items (each item's role is its param group's ``md_role``).

        ``layerwise_group``: distribute whole matrices over this data-parallel group instead
        of sharding them: each matrix is updated by one owner (balanced by cost) and
        broadcast afterwards; optimizer state exists only on the owner. Head and embedding
        are small next to the hidden matrices and stay replicated (every rank updates them).
        """
        by_role: dict = {r: [] for r in ROLES}
        for it in items:
            by_role[self.param_groups[it.group_index]["md_role"]].append(it)
        if by_role["adam"]:
            raise ValueError(f"bind(): {by_role['adam'][0].name} is in an 'adam' group (the partner needs no binding)")
        self._bind_matrix(by_role["matrix"], layerwise_group)
        self._bind_head(by_role["head"])
        for it in by_role["embedding"]:
            t = torch.empty(0, dtype=torch.float32) if it.main is None else it.main.detach()
            if _flat_layout(it.layout):
                t = t.view(-1)
            self._unit_rows.append((t, it.layout))

    def _local(self, it: MatrixItem, mains: list) -> torch.Tensor:
        """The tensor a sub-optimizer steps for ``it``: the main param, a detached alias of a
        ZeRO view (grads mirrored at each step), or a zero-size placeholder of an empty range."""
        p = it.main
        if p is None:
            p = torch.empty(0, dtype=torch.float32)
            flat = [v.shard for v in it.layout.views] if isinstance(it.layout, Blocks) else [it.layout]
            if not all(isinstance(f, FlatRange) for f in flat):
                raise ValueError(f"{it.name}: only a FlatRange layout may have an empty local piece")
            self._placeholders.append(p)
        elif not p.is_leaf or _flat_layout(it.layout) and p.ndim != 1:
            # ZeRO-1 shards of fp32 params are views into the model param (non-leaf), an FSDP2
            # shard is a whole-rows 2-D piece of a flat range: the sub-optimizer gets a detached
            # (flat) alias of the same storage, grads mirrored
            p = p.detach().view(-1) if _flat_layout(it.layout) else p.detach()
            mains.append((it.main, p))
        else:
            mains.append((p, p))
        return p

    def _bind_matrix(self, items: Sequence[MatrixItem], layerwise_group) -> None:
        if self.matrix_cls is None:
            if items:
                raise ValueError("bind(): matrix items given but no matrix_cls")
            return
        owners = None
        if layerwise_group is not None and comm.group_size(layerwise_group) > 1:
            costs = [_cost(it) for it in items]
            owners = assign_owners(costs, comm.group_size(layerwise_group))
            me = comm.group_rank(layerwise_group)
            self._layerwise = (layerwise_group, [(it.main, o) for it, o in zip(items, owners)])
        sub_groups: dict = {}
        shards = {}
        for k, it in enumerate(items):
            if owners is not None and owners[k] != me:
                continue
            p = self._local(it, self._local_mains)
            shards[p] = it.layout
            self.matrix_names[p] = it.name
            self.local_params[it.name] = p
            key = (it.group_index, it.radius_scale, it.overrides)
            if key not in sub_groups:
                hg = self.param_groups[it.group_index]
                g = {"params": [], "lr": hg["lr"], **dict(it.overrides)}
                if it.radius_scale != 1.0:
                    g["radius_scale"] = it.radius_scale
                sub_groups[key] = g
            sub_groups[key]["params"].append(p)
        groups = list(sub_groups.values())
        if not groups:
            return
        self._matrix = self.matrix_cls(groups, shards=shards, **self._ns_kw(), **self.matrix_kwargs)
        self._matrix.check_finite = False
        if hasattr(self._matrix, "ns_split"):
            self._matrix.ns_split = self.ns_split
        for (gi, *_), g in zip(sub_groups.keys(), self._matrix.param_groups):
            self._links.append((g, gi))
        self._sync_hparams()
        self._share_state()

    def _bind_head(self, items: Sequence[MatrixItem]) -> None:
        sub_groups: dict = {}
        shards = {}
        for it in items:
            p = self._local(it, self._head_mains)
            shards[p] = it.layout
            self.local_params[it.name] = p
            sub_groups.setdefault(it.group_index, {"params": [], "lr": self.param_groups[it.group_index]["lr"]})
            sub_groups[it.group_index]["params"].append(p)
        if not sub_groups:
            return
        self._head = AdamMD(list(sub_groups.values()), shards=shards, sphere="rows", **self.head_kwargs)
        self._head.check_finite = False
        self._head_links = list(zip(self._head.param_groups, sub_groups.keys()))
        self._sync_hparams()
        self._share_state()

    def _ns_kw(self):
        import inspect
        return {"ns_mode": self.ns_mode} if "ns_mode" in inspect.signature(self.matrix_cls).parameters else {}

    def _sync_hparams(self):
        for g, gi in self._links + self._head_links:
            hg = self.param_groups[gi]
            g["lr"] = hg["lr"]
            if "weight_decay" in g:  # methods without weight decay have no such key
                g["weight_decay"] = hg["weight_decay"]

    def _share_state(self):
        """Local main params' matrix (and head) state *is* this optimizer's state (Megatron sees it)."""
        for opt, mains in ((self._matrix, self._local_mains), (self._head, self._head_mains)):
            for p, q in mains:
                if self.state.get(p):
                    opt.state[q] = self.state[p]
                else:
                    self.state[p] = opt.state[q]

    def sub_optimizer_of(self, name: str):
        """The matrix or head optimizer that steps model param ``name`` here (None: neither)."""
        p = self.local_params.get(name)
        for opt in (self._matrix, self._head):
            if p is not None and opt is not None and p in opt.state:
                return opt
        return None

    def ensure_partner_state(self) -> None:
        """Create the Adam partner's state of every param that has none yet (torch's AdamW and
        SF-AdamW create it at their first step), so that a checkpoint written or loaded before
        the first step holds every tensor; the values are those of the first step's creation."""
        sf = isinstance(self._partner, SFAdamW)
        for g in self.param_groups:
            if g["md_role"] not in _PARTNER_ROLES:
                continue
            for p in g["params"]:
                if self.state.get(p):
                    continue
                if sf:
                    self.state[p] = {"z": p.detach().clone(), "exp_avg_sq": torch.zeros_like(p)}
                else:
                    on = p.device if (g.get("fused") or g.get("capturable")) else torch.device("cpu")
                    self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=on),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    # ------------------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._sync_hparams()
        self._share_state()
        for p in self._placeholders:
            p.grad = torch.empty(0, dtype=torch.float32)
        for p, q in self._local_mains + self._head_mains:
            if q is not p:
                q.grad = p.grad if p.grad is None or p.grad.shape == q.shape else p.grad.view(q.shape)
        if self._matrix is not None:
            self._matrix.step()
        if self._head is not None:
            self._head.step()
        if self._layerwise is not None:
            group, pairs = self._layerwise
            with comm.metered("layer-wise"):
                _broadcast_coalesced(pairs, group)
        adam_groups = [g for g in self.param_groups if g["md_role"] in _PARTNER_ROLES]
        if adam_groups:
            self._partner.param_groups = adam_groups
            self._partner.state = self.state
            if isinstance(self._partner, SFAdamW):
                self._partner._step()
            else:
                self._partner.step()
        if self._unit_rows:  # MD's embedding rule: after its Adam step, every row back to unit norm
            project_rows_([t for t, _ in self._unit_rows], [lay for _, lay in self._unit_rows])
        return loss

    # ------------------------------------------------------------------------ checkpointing
    def __setstate__(self, state):
        # AdamW's __setstate__ expects an Adam 'step' in every state entry; ours hold the
        # matrix state too. The partner groups already carry every AdamW default key.
        torch.optim.Optimizer.__setstate__(self, state)

    def state_dict(self):
        """torch's state dict of this optimizer plus, under ``"md_matrix"``, the matrix
        optimizer's own (its param groups carry e.g. schedule-free counters; placeholders of
        ZeRO ranges without a local piece have state only there)."""
        sd = super().state_dict()
        if self._matrix is not None:
            sd["md_matrix"] = self._matrix.state_dict()
        if self._head is not None:
            sd["md_head"] = self._head.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        matrix_sd = state_dict.pop("md_matrix", None)
        head_sd = state_dict.pop("md_head", None)
        for have, sd, what in ((self._matrix, matrix_sd, "matrix-optimizer"), (self._head, head_sd, "MD output-head")):
            if (have is None) != (sd is None):
                raise RuntimeError(f"HybridOptimizer.load_state_dict: the checkpoint {'has no' if sd is None else 'has'} "
                                   f"{what} state but this optimizer {'needs' if sd is None else 'has none'} "
                                   "(saved by a different optimizer or MD recipe?)")
        super().load_state_dict(state_dict)
        # torch rebuilds a sub-optimizer's group dicts: re-link them, and let the loaded state
        # be the state Megatron sees
        if self._matrix is not None:
            self._matrix.load_state_dict(matrix_sd)
            self._links = [(g, gi) for g, (_, gi) in zip(self._matrix.param_groups, self._links)]
            for p, q in self._local_mains:
                self.state[p] = self._matrix.state[q]
        if self._head is not None:
            self._head.load_state_dict(head_sd)
            self._head_links = [(g, gi) for g, (_, gi) in zip(self._head.param_groups, self._head_links)]
            for p, q in self._head_mains:
                self.state[p] = self._head.state[q]

    # -------------------------------------------------------------------- schedule-free swaps
    def eval(self):
        for o in self._sf_parts():
            o.eval()
        self._sync_layerwise_swap()

    def train(self):
        for o in self._sf_parts():
            o.train()
        self._sync_layerwise_swap()

    def _sync_layerwise_swap(self):
        """Layer-wise DP: only a matrix's owner holds its schedule-free state and swaps it, so
        the swapped values travel to the other replicas like an update does (without this an
        evaluation would mix x on owned matrices with y on all others)."""
        if self._layerwise is not None and hasattr(self.matrix_cls, "eval"):
            group, pairs = self._layerwise
            with comm.metered("layer-wise"):
                _broadcast_coalesced(pairs, group)

    def _sf_parts(self):
        out = []
        if self._matrix is not None and hasattr(self._matrix, "eval"):
            self._share_state()
            out.append(self._matrix)
        if isinstance(self._partner, SFAdamW):
            self._partner.param_groups = [g for g in self.param_groups if g["md_role"] in _PARTNER_ROLES]
            self._partner.state = self.state
            out.append(self._partner)
        return out

    @property
    def matrix_optimizer(self):
        return self._matrix

    @property
    def head_optimizer(self):
        """MD's output-head optimizer (``AdamMD(sphere="rows")``), or None."""
        return self._head


#: layer-wise DP: the updated matrices of one owner travel in broadcasts of at most this many elements
BROADCAST_BUCKET_NUMEL = 1 << 24


def _broadcast_coalesced(pairs, group) -> None:
    """Every ``(param, owner)``: the owner's updated value to every rank of ``group`` — one
    broadcast per owner and dtype (a flat buffer of up to :data:`BROADCAST_BUCKET_NUMEL`
    elements) instead of one per matrix. Order and bucketing depend only on ``pairs``, which is
    the same on every rank."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    me = comm.group_rank(group)
    buckets: dict = {}
    for p, owner in pairs:
        t = p.data
        lst = buckets.setdefault((owner, t.dtype), [[]])
        if lst[-1] and sum(x.numel() for x in lst[-1]) + t.numel() > BROADCAST_BUCKET_NUMEL:
            lst.append([])
        lst[-1].append(t)
    for (owner, _), lists in sorted(buckets.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        for ts in lists:
            if len(ts) == 1:
                comm.broadcast(ts[0], owner, group)
                continue
            flat = _flatten_dense_tensors(ts)
            comm.broadcast(flat, owner, group)
            if me != owner:
                for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                    t.copy_(v)


def _flat_layout(layout) -> bool:
    """Whether ``layout`` is a flat range (ZeRO-1, FSDP2), or blocks of flat ranges."""
    if isinstance(layout, Blocks):
        return all(isinstance(v.shard, FlatRange) for v in layout.views)
    return isinstance(layout, FlatRange)


def _cost(it: MatrixItem) -> int:
    shape = getattr(it.layout, "shape", None)
    if shape is not None:
        return ns_flops(shape[0], shape[1], 5)
    return sum(ns_flops(*v.shard.shape, 5) for v in it.layout.views)
