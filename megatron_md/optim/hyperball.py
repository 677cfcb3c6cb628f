"""AdamH and MuonH: optimization on the hyperball ‖W‖_F = ‖W₀‖_F (arXiv 2606.29158).

With the weight norm fixed, the learning rate *is* the angular step: ``‖ŵ_{t+1} − ŵ_t‖_F ≈ η``.
Mapping from AdamW: ``η_AdamH ≈ sqrt(η_AdamW · λ)``. No weight decay.
"""
from __future__ import annotations

import math

import torch

from .base import (Mat, MatrixOptimizer, MomentumNS, adam_direction, batches, check_betas, check_lr,
                   check_positive, check_unit, hyperball_retract_many, ns_defaults)


def _reject_weight_decay(weight_decay):
    if weight_decay:
        raise ValueError(f"weight_decay={weight_decay!r}: hyperball optimizers fix ‖W‖_F and take no weight decay")


class _Hyperball(MatrixOptimizer):
    def _init_mat_state(self, m: Mat) -> None:
        m.vec["step"] = 0
        W = m.W
        m.vec["radius"] = m.shard.total_sum(W * W).sqrt().reshape(())

    def _retract(self, m: Mat, u: torch.Tensor) -> None:
        """``W' = W − η ρ u/‖u‖_F;  W ← ρ W'/‖W'‖_F`` (a zero ``u`` leaves W unchanged)."""
        g, sh = m.group, m.shard
        rho = m.vec["radius"]
        unorm = sh.total_sum(u * u).sqrt()
        W = m.W
        W.sub_(u * (g["lr"] * rho / unorm.clamp_min(torch.finfo(unorm.dtype).tiny)))
        W.mul_(rho / sh.total_sum(W * W).sqrt())
        m.put(m.param, W)


class AdamH(_Hyperball):
    r"""AdamH: Adam direction, fixed-norm (hyperball) retraction.

    ::

        u = m̂ / (sqrt(v̂) + ε)                     (bias-corrected Adam, betas (0.9, 0.95))
        W' = W − η ρ u / ‖u‖_F;   W ← ρ W' / ‖W'‖_F,   ρ = ‖W₀‖_F (recorded at construction)
    """

    def __init__(self, params, *, lr: float = 0.01, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, shards=None, nonfinite_group=None):
        _reject_weight_decay(weight_decay)
        defaults = dict(lr=check_lr("lr", lr), betas=check_betas(betas), eps=check_positive("eps", eps))
        super().__init__(params, defaults, shards=shards, nonfinite_group=nonfinite_group)

    def _init_param_state(self, p, group, state):
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)

    def _update(self, m: Mat) -> None:
        g = m.group
        u = adam_direction(m, m.G, g["betas"], g["eps"], m.vec["step"])
        self._retract(m, u)

    def _update_many(self, mats: list[Mat]) -> None:
        us: list = [None] * len(mats)
        for g, t, idx in batches(mats):
            ms = [mats[i] for i in idx]
            b1, b2 = g["betas"]
            states = list({id(m.param): (m.param, m.state) for m in ms}.values())
            Ms = [st["exp_avg"] for _, st in states]
            Vs = [st["exp_avg_sq"] for _, st in states]
            Gs = [p.grad for p, _ in states]
            torch._foreach_lerp_(Ms, Gs, 1 - b1)
            torch._foreach_mul_(Vs, b2)
            torch._foreach_addcmul_(Vs, Gs, Gs, value=1 - b2)
            # u ∝ m̂/(sqrt(v̂)+ε) = (sqrt(1−β2^t)/(1−β1^t)) · m/(sqrt(v) + ε sqrt(1−β2^t)); the
            # retraction only uses u/‖u‖_F, so the positive factor in front is dropped
            denom = torch._foreach_sqrt(Vs)
            torch._foreach_add_(denom, g["eps"] * math.sqrt(1 - b2 ** t))
            # u = m / denom written over denom (no second matrix-sized temporary)
            u_param = dict(zip((id(p) for p, _ in states), [torch.div(M, d, out=d) for M, d in zip(Ms, denom)]))
            for i, m in zip(idx, ms):
                us[i] = m.get(u_param[id(m.param)])
        hyperball_retract_many(mats, us)


class MuonH(MomentumNS, _Hyperball):
    r"""MuonH: Muon direction (momentum + Newton–Schulz), fixed-norm retraction.

    ::

        u = NS(U),  U = Nesterov momentum of G
        W' = W − η ρ u / ‖u‖_F;   W ← ρ W' / ‖W'‖_F,   ρ = ‖W₀‖_F
    """

    def __init__(self, params, *, lr: float = 0.01, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_coefficients="jordan", ns_steps=None, ns_dtype=None,
                 ns_mode: str = "owner", shards=None, nonfinite_group=None):
        _reject_weight_decay(weight_decay)
        defaults = dict(lr=check_lr("lr", lr), momentum=check_unit("momentum", momentum), nesterov=bool(nesterov),
                        **ns_defaults(ns_coefficients, ns_steps, ns_dtype, ns_mode))
        super().__init__(params, defaults, shards=shards, ns_mode=ns_mode, nonfinite_group=nonfinite_group)

    def _post_ns(self, m: Mat, o: torch.Tensor) -> None:
        self._retract(m, o)

    def _post_ns_many(self, mats: list[Mat], outs: list[torch.Tensor]) -> None:
        hyperball_retract_many(mats, outs)
