"""Muon and NorMuon (Newton–Schulz baselines), written once against MatrixShard."""
from __future__ import annotations

import math

import torch

from ..ops import check_scale, scale_factor
from ..shard import Reductions
from .base import (Mat, MatrixOptimizer, MomentumNS, batches, check_betas, check_lr, check_positive, check_unit,
                   ns_defaults, params_of, put_all)


def _decay_params(mats: list[Mat]) -> None:
    """Decoupled weight decay ``W ← (1 − ηλ) W`` on whole parameters, one foreach per group."""
    for g, _, idx in batches(mats):
        if g.get("weight_decay"):
            torch._foreach_mul_(params_of([mats[i] for i in idx]), 1 - g["lr"] * g["weight_decay"])


def muon_defaults(*, lr, momentum, nesterov, weight_decay, ns_coefficients, ns_steps, ns_dtype, scale,
                  ns_mode) -> dict:
    """Validated defaults shared by every momentum + Newton–Schulz optimizer."""
    return dict(lr=check_lr("lr", lr), momentum=check_unit("momentum", momentum), nesterov=bool(nesterov),
                weight_decay=check_lr("weight_decay", weight_decay), scale=check_scale(scale),
                **ns_defaults(ns_coefficients, ns_steps, ns_dtype, ns_mode))


class Muon(MomentumNS, MatrixOptimizer):
    r"""Muon: momentum, then Newton–Schulz orthogonalization (Jordan et al., 2024).

    Update, per logical matrix ``W ∈ R^{m×n}``::

        M ← μ M + (1−μ) G;   U = (1−μ) G + μ M  (Nesterov)  or  U = M
        W ← (1 − ηλ) W − η · scale(m, n) · NS(U)

    ``scale`` is one of ``shape_scaling`` (default, ``max(1, sqrt(m/n))``), ``unit_rms``,
    ``shape_up``, ``rms_match``, ``none`` (see :mod:`megatron_md.ops.scaling`), always on the
    logical (unsharded) shape. With ``ns_coefficients="jordan"``, ``scale="shape_scaling"`` and
    ``ns_dtype=torch.bfloat16`` this is ``torch.optim.Muon``.

    Warning: for hidden 2-D matrices only; embeddings, output head and 1-D params belong
    to an Adam-family optimizer (:func:`megatron_md.optim.param_groups`).
    """

    def __init__(self, params, *, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_coefficients="jordan", ns_steps=None, ns_dtype=None,
                 scale: str = "shape_scaling", ns_mode: str = "owner", shards=None, nonfinite_group=None):
        defaults = muon_defaults(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                 ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype,
                                 scale=scale, ns_mode=ns_mode)
        super().__init__(params, defaults, shards=shards, ns_mode=ns_mode, nonfinite_group=nonfinite_group)

    def _post_ns(self, m: Mat, o: torch.Tensor) -> None:
        g = m.group
        W = m.W
        if g["weight_decay"]:
            W.mul_(1 - g["lr"] * g["weight_decay"])
        W.add_(o, alpha=-g["lr"] * scale_factor(g["scale"], m.d_out, m.d_in))
        m.put(m.param, W)

    def _post_ns_many(self, mats: list[Mat], outs: list[torch.Tensor]) -> None:
        _decay_params(mats)
        Ws = [m.W for m in mats]
        torch._foreach_mul_(outs, [-m.group["lr"] * scale_factor(m.group["scale"], m.d_out, m.d_in) for m in mats])
        torch._foreach_add_(Ws, outs)
        put_all(mats, None, Ws)


class NorMuon(Muon):
    r"""NorMuon: Muon with a per-row second moment of the orthogonalized update.

    ::

        O = NS(U);  v ← β2 v + (1−β2) · mean_over_d_in(O ⊙ O)      (v ∈ R^{d_out})
        Ô = O / (sqrt(v)[:, None] + ε)
        step_form="rescale" (default, official code): Ô ← Ô · ‖O‖_F/‖Ô‖_F;
                                                    W ← (1−ηλ)W − η·scale·Ô
        step_form="rms_match" (paper):             W ← (1−ηλ)W − η̂ Ô, η̂ = 0.2 η sqrt(mn)/‖Ô‖_F

    ``betas=(β2,)``. Row sums and norms are complete over the logical matrix on any layout
    (O(d_out) numbers communicated); only NS needs the whole matrix.
    """

    def __init__(self, params, *, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 betas=(0.95,), eps: float = 1e-8, weight_decay: float = 0.0, step_form: str = "rescale",
                 ns_coefficients="jordan", ns_steps=None, ns_dtype=None, scale: str = "shape_scaling",
                 ns_mode: str = "owner", shards=None, nonfinite_group=None):
        if step_form not in ("rescale", "rms_match"):
            raise ValueError(f"step_form={step_form!r}: expected 'rescale' or 'rms_match'")
        (beta2,) = check_betas(betas, 1)
        defaults = muon_defaults(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                 ns_coefficients=ns_coefficients, ns_steps=ns_steps, ns_dtype=ns_dtype,
                                 scale=scale, ns_mode=ns_mode)
        defaults.update(beta2=beta2, eps=check_positive("eps", eps), step_form=step_form)
        MatrixOptimizer.__init__(self, params, defaults, shards=shards, ns_mode=ns_mode,
                                 nonfinite_group=nonfinite_group)

    def _init_mat_state(self, m: Mat):
        r0, r1 = m.shard.row_range
        m.vec["step"] = 0
        m.vec["row_moment"] = torch.zeros(r1 - r0, dtype=torch.float32, device=m.param.device)

    def _post_ns(self, m: Mat, o: torch.Tensor) -> None:
        g = m.group
        sh = m.shard
        v = m.vec["row_moment"]
        v.mul_(g["beta2"]).add_(sh.row_sum(o * o), alpha=(1 - g["beta2"]) / m.d_in)
        o_hat = o / (sh.rows(v.sqrt()) + g["eps"])
        sq_o, sq_hat = sh.total_sums([o * o, o_hat * o_hat])
        W = m.W
        if g["weight_decay"]:
            W.mul_(1 - g["lr"] * g["weight_decay"])
        if g["step_form"] == "rescale":
            step = g["lr"] * scale_factor(g["scale"], m.d_out, m.d_in) * (sq_o.sqrt() / sq_hat.sqrt())
        else:
            step = 0.2 * g["lr"] * math.sqrt(m.d_out * m.d_in) / sq_hat.sqrt()
        W.sub_(o_hat * step)
        m.put(m.param, W)

    def _post_ns_many(self, mats: list[Mat], outs: list[torch.Tensor]) -> None:
        # round 1: row sums of O² and ‖O‖²; round 2: ‖Ô‖² (Ô needs the new row moments)
        red = Reductions()
        rows = [red.row_sum(m.shard, o, square=True) for m, o in zip(mats, outs)]
        sq_o = [red.total_sums(m.shard, [o], square=True) for m, o in zip(mats, outs)]
        red.flush()
        inv = []
        for m, r in zip(mats, rows):
            g, v = m.group, m.vec["row_moment"]
            v.mul_(g["beta2"]).add_(r.value, alpha=(1 - g["beta2"]) / m.d_in)
            inv.append(m.shard.rows(v.sqrt().add_(g["eps"]).reciprocal_()))
        o_hat = torch._foreach_mul(outs, inv)
        sq_hat = [red.total_sums(m.shard, [x], square=True) for m, x in zip(mats, o_hat)]
        red.flush()
        _decay_params(mats)
        steps = []
        for m, so, sh in zip(mats, sq_o, sq_hat):
            g = m.group
            if g["step_form"] == "rescale":
                step = g["lr"] * scale_factor(g["scale"], m.d_out, m.d_in) * (so.value.sqrt() / sh.value.sqrt())
            else:
                step = 0.2 * g["lr"] * math.sqrt(m.d_out * m.d_in) / sh.value.sqrt()
            steps.append(step.neg_())
        Ws = [m.W for m in mats]
        torch._foreach_addcmul_(Ws, o_hat, steps)
        put_all(mats, None, Ws)
