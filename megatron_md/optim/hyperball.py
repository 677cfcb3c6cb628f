"""AdamH and MuonH: optimization on the hyperball ‖W‖_F = ‖W₀‖_F (arXiv 2606.29158).

With the weight norm fixed, the learning rate *is* the angular step: ``‖ŵ_{t+1} − ŵ_t‖_F ≈ η``.
Mapping from AdamW: ``η_AdamH ≈ sqrt(η_AdamW · λ)``. No weight decay.
"""
from __future__ import annotations

import torch

from .base import (Mat, MatrixOptimizer, MomentumNS, adam_direction, check_betas, check_lr, check_positive,
                   check_unit, ns_defaults)


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
