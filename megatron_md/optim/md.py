"""MD decoupling: magnitude (row/column gains) and direction (a Frobenius sphere), arXiv 2606.25971.

Each hidden matrix is seen by the model as one fused weight
``W = diag(softplus(g_r)) · D · diag(softplus(g_c))`` with ``‖D‖_F = R = ρ·sqrt(max(m, n))``
(ρ = ``radius_scale``, a param-group key; e.g. ``sqrt(1/(2L))`` for residual outputs). With
``radius_scales_update`` (default, as the authors' optimizer) the step of D is ``η·ρ·U``, so a
radius scale leaves the angular step unchanged; off, only R shrinks (the step is ``η·U`` on a
smaller sphere: a larger angle). The gains are optimizer state (initialized to softplus⁻¹(1):
gains = 1); D is recovered from W.

``sphere="rows"`` (a param-group key) replaces the Frobenius sphere by one unit sphere per row,
``‖D_i,:‖ = radius_scale``: MD's recipe for the untied output head (Adam base, row-normalized,
row and column gains).

``init`` (a param-group key) says how a matrix enters MD:

* ``"project"`` (the paper's recipe, default): W is projected onto its sphere at construction
  (gains = 1, so W = D). Right for a fresh model; it changes a trained one.
* ``"factor"``: W is left unchanged and the gains are factored from it, ``s_c = 1`` and
  ``s_r,i = ‖W_i,:‖ / ρ`` with ``ρ = R / ‖Ŵ‖_F`` (Ŵ: W with unit rows; ``sphere="rows"``:
  ``ρ = radius_scale``), so that ``W = diag(s_r) D diag(s_c)`` holds with every row of D of equal
  norm and ‖D‖_F = R (unit rows for the rows sphere). A zero row gets gain ``ZERO_ROW_GAIN``
  (1e-12; its direction is zero), so W's row stays ~0 once its direction moves onto the sphere
  (e.g. the zero-padded vocabulary rows of an imported Hugging Face head). This keeps a trained model's outputs (``tools/convert_checkpoint.py to-md``). The
  factoring runs at construction and again, from the then current W, before the first step of
  every matrix that has not stepped yet: hosts (Megatron-LM, our driver) build the optimizer
  *before* they load a checkpoint's weights. It is a function of W alone, so repeating it on an
  unchanged W changes nothing.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ops import UNIT_GAIN, check_scale, inv_softplus, scale_factor
from ..shard import Blocks, Reductions, comm
from .base import (Mat, MatrixOptimizer, adam_direction, batches, block_states, check_betas, check_lr,
                   check_positive, check_unit, foreach_vector_adam, momentum_direction, momentum_directions,
                   ns_defaults, put_all, vector_adam)

#: ``sphere`` values: one Frobenius sphere per matrix, or one unit sphere per row
SPHERES = ("frobenius", "rows")
#: ``init`` values: project W onto its sphere (gains 1), or keep W and factor the gains from it
INITS = ("project", "factor")
#: floor of a squared norm before its inverse square root (a zero row stays zero, not NaN)
_TINY = 1e-30
#: ``init="factor"``: the row gain of a zero row (W's row stays ~0 when D's row is renormalized)
ZERO_ROW_GAIN = 1e-12


class _MD(MatrixOptimizer):
    r"""Shared MD machinery. Per step, with the old gains ``s_r = softplus(g_r)``, ``s_c``::

        D = W / (s_r s_cᵀ);  P = D ⊙ G
        ∇g_r = sigmoid(g_r) ⊙ (P s_c);   ∇g_c = sigmoid(g_c) ⊙ (Pᵀ s_r)
        G_D = G ⊙ (s_r s_cᵀ);   U = base(G_D)
        D ← D − η ρ U;   D ← R · D / ‖D‖_F        (retraction; no tangent projection;
                                                   ρ = radius_scale, or 1 without radius_scales_update)
                       (sphere="rows": D_i,: ← r · D_i,: / ‖D_i,:‖ for every row i)
        g_r, g_c ← Adam(∇g, lr = gains_lr), no weight decay
        W ← softplus(g_r) D softplus(g_c)ᵀ

    ``shared_qkv_col_gains`` (default, as the authors' code: one column gain per fused parameter):
    Q, K and V of a fused QKV share one ``g_c`` whose gradient is the sum of theirs.

    ``gains_lr`` keeps its ratio to ``lr``, so an LR schedule applied to ``lr`` scales both.
    """

    def __init__(self, params, defaults, **kw):
        self._shared_grad_c: dict = {}  # per-matrix path: id(param) → the summed column-gain gradient
        super().__init__(params, defaults, **kw)  # creates all state (init="project": projects W)
        with torch.no_grad(), comm.metered(type(self).__name__):
            self._factor([m for g in self.param_groups if g.get("init") == "factor"
                          for p in g["params"] for m in self.mats_of(p, g)])

    def _md_defaults(self, lr, gains_lr, betas, eps, weight_decay, radius_scale, sphere="frobenius",
                     init="project", radius_scales_update=True, shared_qkv_col_gains=True):
        if weight_decay:
            raise ValueError(f"weight_decay={weight_decay!r}: MD decoupling uses no weight decay (the sphere fixes ‖D‖_F)")
        lr = check_lr("lr", lr)
        gains_lr = lr if gains_lr is None else check_lr("gains_lr", gains_lr)
        if lr == 0 and gains_lr != 0:
            raise ValueError("gains_lr: must be 0 (or None) when lr=0 (it is kept as a ratio of lr)")
        if sphere not in SPHERES:
            raise ValueError(f"sphere={sphere!r}: expected one of {SPHERES}")
        if init not in INITS:
            raise ValueError(f"init={init!r}: expected one of {INITS}")
        return dict(lr=lr, gains_lr_ratio=(gains_lr / lr) if lr else 1.0, betas=check_betas(betas),
                    eps=check_positive("eps", eps), radius_scale=check_positive("radius_scale", radius_scale),
                    radius_scales_update=bool(radius_scales_update), shared_qkv_col_gains=bool(shared_qkv_col_gains),
                    sphere=sphere, init=init)

    @staticmethod
    def step_lr(group: dict) -> float:
        """The LR of D's step: ``lr · radius_scale`` with ``radius_scales_update``, else ``lr``."""
        return group["lr"] * (group["radius_scale"] if group.get("radius_scales_update", True) else 1.0)

    def _col_share_groups(self, mats: list[Mat]) -> list[list[int]]:
        """Indices into ``mats`` of the blocks that share one column gain: the blocks of one parameter
        whose layout reads the same columns (Q, K, V of a fused QKV: ``Blocks.same_columns``) when the
        group's ``shared_qkv_col_gains`` is on. Their ``g_c`` (and its Adam moments) start equal and
        get the same summed gradient, so they stay one vector."""
        by: dict = {}
        for i, m in enumerate(mats):
            lay = self._layouts[m.param]
            if m.group.get("shared_qkv_col_gains", True) and isinstance(lay, Blocks) and lay.same_columns:
                by.setdefault(id(m.param), []).append(i)
        groups = [ix for ix in by.values() if len(ix) > 1]
        for ix in groups:
            if len({mats[i].shard.col_range for i in ix}) != 1:
                raise ValueError("shared_qkv_col_gains: the Q, K and V blocks of a parameter hold different column "
                                 "ranges on this rank; pass shared_qkv_col_gains=False (--<method>-no-shared-qkv-col-gains)")
        return groups

    def radius(self, m: Mat) -> float:
        """R of the Frobenius sphere, or each row's radius for ``sphere="rows"``."""
        if m.group.get("sphere", "frobenius") == "rows":
            return m.group["radius_scale"]
        return math.sqrt(max(m.d_out, m.d_in)) * m.group["radius_scale"]

    def _retraction(self, m: Mat, sq) -> torch.Tensor:
        """The factor that puts D back on its sphere, given ``sq``: ‖D‖²_F (a scalar) or, for
        ``sphere="rows"``, the local rows' ‖D_i,:‖² (broadcast over the rows' elements)."""
        if m.group.get("sphere", "frobenius") == "rows":
            return m.shard.rows(self.radius(m) / sq.clamp_min(_TINY).sqrt())
        return self.radius(m) / sq.sqrt()

    def _sq_norm(self, m: Mat, D: torch.Tensor) -> torch.Tensor:
        if m.group.get("sphere", "frobenius") == "rows":
            return m.shard.row_sum(D * D)
        return m.shard.total_sum(D * D)

    def _init_mat_state(self, m: Mat) -> None:
        r0, r1 = m.shard.row_range
        c0, c1 = m.shard.col_range
        dev = m.param.device
        v = m.vec
        v["step"] = 0
        for name, n in (("g_r", r1 - r0), ("g_c", c1 - c0)):
            v[name] = torch.full((n,), UNIT_GAIN, dtype=torch.float32, device=dev)
            v[name + "_exp_avg"] = torch.zeros(n, dtype=torch.float32, device=dev)
            v[name + "_exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=dev)
        if m.group.get("init", "project") == "factor":
            return  # W stays; the gains are factored from it once all matrices exist (__init__)
        # project onto the sphere (gains are 1, so W = D)
        W = m.W
        W.mul_(self._retraction(m, self._sq_norm(m, W)))
        m.put(m.param, W)

    # -- init="factor": gains from W, W unchanged ------------------------------------------
    def _factor(self, mats: list[Mat]) -> None:
        r"""``s_c = 1``, ``s_r,i = ‖W_i,:‖ / ρ`` (zero rows: ``ZERO_ROW_GAIN``), ``ρ = R / ‖Ŵ‖_F`` with Ŵ the
        row-normalized W (rows sphere: ``ρ = r``), so D = W / (s_r s_cᵀ) = ρ Ŵ lies on the sphere
        and W is untouched. Two bucketed rounds of reductions (row norms, then ‖Ŵ‖²_F) for all
        matrices together; exact on every layout (TP, ZeRO flat ranges, blocks)."""
        if not mats:
            return
        red = Reductions()
        Ws = [m.W for m in mats]
        rows = [red.row_sum(m.shard, W, square=True) for m, W in zip(mats, Ws)]
        red.flush()
        sqs = [r.value.float() for r in rows]
        nonzero = [sq > _TINY for sq in sqs]
        fro = [m.group.get("sphere", "frobenius") != "rows" for m in mats]
        hat = [red.total_sums(m.shard, [W * m.shard.rows(torch.where(nz, sq.clamp_min(_TINY).rsqrt(), 0.0))],
                              square=True) if f else None
               for m, W, sq, nz, f in zip(mats, Ws, sqs, nonzero, fro)]
        red.flush()
        for m, sq, nz, h in zip(mats, sqs, nonzero, hat):
            rho = self.radius(m) if h is None else self.radius(m) / h.value.float().reshape(()).sqrt()
            s_r = torch.where(nz, sq.sqrt() / rho, ZERO_ROW_GAIN)
            m.vec["g_r"].copy_(inv_softplus(s_r))
            m.vec["g_c"].fill_(UNIT_GAIN)

    def factor_gains_(self, params=None) -> None:
        """``init="factor"`` now: the gains of every matrix of ``params`` (default: all) factored
        from its current W (W unchanged; the gains' Adam moments are kept). Collective: every rank
        of a shard group must call it with the same parameters."""
        wanted = None if params is None else {id(p) for p in params}
        with torch.no_grad(), comm.metered(type(self).__name__):
            self._factor([m for g in self.param_groups for p in g["params"]
                          if wanted is None or id(p) in wanted for m in self.mats_of(p, g)])

    def _step(self):
        # init="factor": matrices that have not stepped yet are factored again from their W now —
        # weights loaded after construction (a weights-only --load) are what the gains must fit
        if any(g.get("init") == "factor" and any(v.get("step", 0) == 0 for p in g["params"]
                                              for v in block_states(self.state[p]))
               for g in self.param_groups):
            fresh = [m for m in self._active_mats() if m.vec["step"] == 0 and m.group.get("init") == "factor"]
            with comm.metered(type(self).__name__):
                self._factor(fresh)
        self._shared_grad_c = {}
        if not self.foreach:
            with comm.metered(type(self).__name__):
                self._share_col_grads()
        super()._step()
        self._shared_grad_c = {}

    # -- the MD step, split around the base update ----------------------------------------
    @staticmethod
    def _old_gains_and_p(m: Mat):
        """``(s_r, s_c, G, P)``: the old gains, the gradient and ``P = D ⊙ G`` with ``D = W / (s_r s_cᵀ)``."""
        sh, v, G = m.shard, m.vec, m.G
        s_r, s_c = F.softplus(v["g_r"]), F.softplus(v["g_c"])
        return s_r, s_c, G, (m.W / (sh.rows(s_r) * sh.cols(s_c))).mul_(G)

    @staticmethod
    def _col_gain_grad(m: Mat, P: torch.Tensor, s_r: torch.Tensor) -> torch.Tensor:
        """``∇g_c = sigmoid(g_c) ⊙ (Pᵀ s_r)`` (one column reduction)."""
        return torch.sigmoid(m.vec["g_c"]) * m.shard.col_sum(P * m.shard.rows(s_r))

    def _gains_and_base_input(self, m: Mat) -> torch.Tensor:
        sh, v = m.shard, m.vec
        s_r, s_c, G, P = self._old_gains_and_p(m)
        m.scratch["grad_g_r"] = torch.sigmoid(v["g_r"]) * sh.row_sum(P * sh.cols(s_c))
        shared = self._shared_grad_c.get(id(m.param))
        m.scratch["grad_g_c"] = shared if shared is not None else self._col_gain_grad(m, P, s_r)
        return G * (sh.rows(s_r) * sh.cols(s_c))

    def _share_col_grads(self) -> None:
        """Per-matrix path: the summed column-gain gradient of every shared group, from the old
        gains, before any block of it is updated (one column reduction per block)."""
        self._shared_grad_c = {}
        mats = self._active_mats()
        for ix in self._col_share_groups(mats):
            total = 0
            for i in ix:
                s_r, _, _, P = self._old_gains_and_p(mats[i])
                total = total + self._col_gain_grad(mats[i], P, s_r)
            self._shared_grad_c[id(mats[ix[0]].param)] = total

    def _apply(self, m: Mat, U: torch.Tensor) -> None:
        g, sh, v = m.group, m.shard, m.vec
        S = sh.rows(F.softplus(v["g_r"])) * sh.cols(F.softplus(v["g_c"]))
        W = m.W
        D = W / S
        D.sub_(U, alpha=self.step_lr(g))
        D.mul_(self._retraction(m, self._sq_norm(m, D)))
        t, gains_lr = v["step"], g["lr"] * g["gains_lr_ratio"]
        vector_adam(v, "g_r", m.scratch.pop("grad_g_r"), gains_lr, g["betas"], g["eps"], t)
        vector_adam(v, "g_c", m.scratch.pop("grad_g_c"), gains_lr, g["betas"], g["eps"], t)
        W.copy_(D.mul_(sh.rows(F.softplus(v["g_r"])) * sh.cols(F.softplus(v["g_c"]))))
        m.put(m.param, W)

    # -- the multi-tensor MD step: one bucketed reduction round ------------------------------
    # ∇g_r = sigmoid(g_r) ⊙ (P s_c) with P = (W/(s_r s_cᵀ)) ⊙ G equals sigmoid(g_r)/s_r ⊙ rowsum(W ⊙ G)
    # (and the column analogue), so the gains' gradients need one product W⊙G and no D; the new
    # direction D' does not depend on them, so ‖D'‖_F joins the same round of collectives.
    def _md_prepare(self, mats: list[Mat], red: Reductions) -> list[dict]:
        """Per matrix: old gains, G_D = G ⊙ s_r s_cᵀ and the pending gain-gradient sums.

        One matrix-sized temporary per matrix and no other (on CPU a fresh matrix-sized buffer
        costs as much in page faults as the arithmetic): G_D overwrites W ⊙ G once its row and
        column sums are taken (local sums are computed when issued); S = s_r s_cᵀ is never
        materialized (two broadcast passes instead); the caller reuses G_D, and D is formed in
        the matrix's own storage (W is rewritten from D at the end of the step anyway)."""
        out = []
        Ws, Gs = [m.W for m in mats], [m.G for m in mats]
        WG = torch._foreach_mul(Ws, Gs)
        for m, W, G, wg in zip(mats, Ws, Gs, WG):
            v, sh = m.vec, m.shard
            s_r, s_c = F.softplus(v["g_r"]), F.softplus(v["g_c"])
            d = dict(W=W, s_r=s_r, s_c=s_c, rows=red.row_sum(sh, wg), cols=red.col_sum(sh, wg))
            d["G_D"] = torch.mul(G, sh.rows(s_r), out=wg).mul_(sh.cols(s_c))
            out.append(d)
        return out

    @staticmethod
    def _direction_in_place(m: Mat, d: dict) -> torch.Tensor:
        """D = W / (s_r s_cᵀ), written over ``d["W"]`` (returned)."""
        return d["W"].div_(m.shard.rows(d["s_r"])).div_(m.shard.cols(d["s_c"]))

    def _md_finish(self, mats: list[Mat], prep: list[dict], Ds: list[torch.Tensor], red: Reductions) -> None:
        """Given the unretracted new directions D' (pending ‖D'‖² in ``red``): flush, gains Adam,
        ``W ← (R/‖D'‖_F) · softplus(g_r) D' softplus(g_c)ᵀ``."""
        norms = [red.row_sum(m.shard, D, square=True) if m.group.get("sphere", "frobenius") == "rows"
                 else red.total_sums(m.shard, [D], square=True) for m, D in zip(mats, Ds)]
        red.flush()
        cols = [d["cols"].value for d in prep]
        for ix in self._col_share_groups(mats):
            total = sum(cols[i] for i in ix)
            for i in ix:
                cols[i] = total
        for g, t, idx in batches(mats):
            vecs, names, grads = [], [], []
            for i in idx:
                m, d = mats[i], prep[i]
                v = m.vec
                vecs += [v, v]
                names += ["g_r", "g_c"]
                grads += [torch.sigmoid(v["g_r"]).div_(d["s_r"]).mul_(d["rows"].value),
                          torch.sigmoid(v["g_c"]).div_(d["s_c"]).mul_(cols[i])]
            foreach_vector_adam(vecs, names, grads, g["lr"] * g["gains_lr_ratio"], g["betas"], g["eps"], t)
        for m, d, D, n in zip(mats, prep, Ds, norms):
            v, sh = m.vec, m.shard
            # the retraction folds into the row gains: one factor per row (rows sphere) or one for all
            r = n.value.reshape(-1) if m.group.get("sphere", "frobenius") == "rows" else n.value
            s_r = F.softplus(v["g_r"]).mul_(self.radius(m) / r.clamp_min(_TINY).sqrt())
            torch.mul(D, sh.rows(s_r), out=d["W"]).mul_(sh.cols(F.softplus(v["g_c"])))  # D may be d["W"]
            m.put(m.param, d["W"])

    # -- introspection -------------------------------------------------------------------
    def gains(self, param: torch.Tensor, block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softplus(g_r), softplus(g_c))`` of ``param`` (its ``block``-th logical matrix),
        for this rank's local rows/columns."""
        v = self.mats_of(param)[block].vec
        return F.softplus(v["g_r"]), F.softplus(v["g_c"])

    def direction(self, param: torch.Tensor, block: int = 0) -> torch.Tensor:
        """``D = W / (s_r s_cᵀ)`` (local piece)."""
        m = self.mats_of(param)[block]
        s_r, s_c = self.gains(param, block)
        return m.W / (m.shard.rows(s_r) * m.shard.cols(s_c))


class AdamMD(_MD):
    r"""AdamMD: MD decoupling over an Adam base (``U`` = bias-corrected Adam direction of G_D,
    betas (0.9, 0.99), ε 1e-8); the gains use Adam with the same betas. See :class:`_MD`.
    ``sphere="rows"``: each row of D on its own sphere (MD's output-head rule)."""

    def __init__(self, params, *, lr: float = 3e-3, gains_lr=None, betas=(0.9, 0.99), eps: float = 1e-8,
                 weight_decay: float = 0.0, radius_scale: float = 1.0, radius_scales_update: bool = True,
                 shared_qkv_col_gains: bool = True, sphere: str = "frobenius", init: str = "project", shards=None,
                 nonfinite_group=None):
        defaults = self._md_defaults(lr, gains_lr, betas, eps, weight_decay, radius_scale, sphere, init,
                                     radius_scales_update, shared_qkv_col_gains)
        super().__init__(params, defaults, shards=shards, nonfinite_group=nonfinite_group)

    def _init_param_state(self, p, group, state):
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)

    def _update(self, m: Mat) -> None:
        G_D = self._gains_and_base_input(m)
        self._apply(m, adam_direction(m, G_D, m.group["betas"], m.group["eps"], m.vec["step"]))

    def _update_many(self, mats: list[Mat]) -> None:
        red = Reductions()
        prep = self._md_prepare(mats, red)
        Ds: list = [None] * len(mats)
        for g, t, idx in batches(mats):
            ms, b1, b2 = [mats[i] for i in idx], *g["betas"]
            GD = [prep[i]["G_D"] for i in idx]
            Ms = [m.get(m.state["exp_avg"]) for m in ms]
            Vs = [m.get(m.state["exp_avg_sq"]) for m in ms]
            torch._foreach_lerp_(Ms, GD, 1 - b1)
            torch._foreach_mul_(Vs, b2)
            torch._foreach_addcmul_(Vs, GD, GD, value=1 - b2)
            put_all(ms, "exp_avg", Ms)
            put_all(ms, "exp_avg_sq", Vs)
            denom = [torch.sqrt(V, out=gd) for V, gd in zip(Vs, GD)]       # G_D is consumed: reuse it
            torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
            torch._foreach_add_(denom, g["eps"])
            D = [self._direction_in_place(mats[i], prep[i]) for i in idx]
            torch._foreach_addcdiv_(D, Ms, denom, value=-self.step_lr(g) / (1 - b1 ** t))
            for i, d in zip(idx, D):
                Ds[i] = d
        self._md_finish(mats, prep, Ds, red)


class MuonMD(_MD):
    r"""MuonMD: MD decoupling over a Muon base (``U = scale · NS(Nesterov momentum of G_D)``,
    ``scale="shape_up"`` by default, μ 0.95, the 5-triple "quintic" Newton–Schulz schedule as the
    authors' optimizer); gains on Adam (betas (0.9, 0.99), ε 1e-8). ``sphere="rows"`` (a group
    key; with ``scale="none"``): one unit sphere per row — the authors' rule for an MoE router.
    See :class:`_MD`. Best matrix LR ≈ 1.1e-2 at 181M in the paper; no warmup."""

    uses_ns = True

    def __init__(self, params, *, lr: float = 0.01, gains_lr=None, momentum: float = 0.95, nesterov: bool = True,
                 betas=(0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.0, radius_scale: float = 1.0,
                 radius_scales_update: bool = True, shared_qkv_col_gains: bool = True, ns_coefficients="quintic",
                 ns_steps=None, ns_dtype=None, scale: str = "shape_up", ns_mode: str = "owner", init: str = "project",
                 sphere: str = "frobenius", shards=None, nonfinite_group=None):
        defaults = self._md_defaults(lr, gains_lr, betas, eps, weight_decay, radius_scale, sphere=sphere, init=init,
                                     radius_scales_update=radius_scales_update,
                                     shared_qkv_col_gains=shared_qkv_col_gains)
        defaults.update(momentum=check_unit("momentum", momentum), nesterov=bool(nesterov), scale=check_scale(scale),
                        **ns_defaults(ns_coefficients, ns_steps, ns_dtype, ns_mode))
        super().__init__(params, defaults, shards=shards, ns_mode=ns_mode, nonfinite_group=nonfinite_group)

    def _init_param_state(self, p, group, state):
        state["momentum_buffer"] = torch.zeros_like(p)

    def _pre_ns(self, m: Mat) -> torch.Tensor:
        G_D = self._gains_and_base_input(m)
        return momentum_direction(m, G_D, "momentum_buffer", m.group["momentum"], m.group["nesterov"])

    def _post_ns(self, m: Mat, o: torch.Tensor) -> None:
        self._apply(m, o.mul_(scale_factor(m.group["scale"], m.d_out, m.d_in)))

    # multi-tensor: the gain-gradient sums issued before NS are flushed with ‖D'‖² after it
    def _pre_ns_many(self, mats: list[Mat]) -> list[torch.Tensor]:
        red = Reductions()
        prep = self._md_prepare(mats, red)
        self._md_pending = (red, prep)
        out: list = [None] * len(mats)
        for g, _, idx in batches(mats):
            U = momentum_directions([mats[i] for i in idx], "momentum_buffer", g["momentum"], g["nesterov"],
                                    grads=[prep[i]["G_D"] for i in idx])
            for i, u in zip(idx, U):
                out[i] = u
        return out

    def _post_ns_many(self, mats: list[Mat], outs: list[torch.Tensor]) -> None:
        red, prep = self._md_pending
        del self._md_pending
        Ds = [self._direction_in_place(m, d) for m, d in zip(mats, prep)]
        for D, o, m in zip(Ds, outs, mats):
            D.add_(o, alpha=-self.step_lr(m.group) * scale_factor(m.group["scale"], m.d_out, m.d_in))
        self._md_finish(mats, prep, Ds, red)


@torch.no_grad()
def project_rows_(tensors: Sequence[torch.Tensor], shards: Sequence, radius: float = 1.0) -> None:
    """In place: every row of every matrix to norm ``radius`` (MD's embedding rule, applied
    after the embedding's Adam step): ``W_i,: ← radius · W_i,: / ‖W_i,:‖``.

    ``shards``: each tensor's MatrixShard (rows split by a ZeRO flat range are completed by one
    bucketed round of reductions for all tensors). Rows are local under vocab-parallel TP.
    """
    red = Reductions()
    sums = [red.row_sum(sh, W, square=True) for W, sh in zip(tensors, shards)]
    red.flush()
    for W, sh, sq in zip(tensors, shards, sums):
        W.mul_(sh.rows(radius / sq.value.clamp_min(_TINY).sqrt()))
