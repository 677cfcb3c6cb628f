"""RMNP: Row-Momentum Normalized Preconditioning (arXiv 2603.20527)."""
from __future__ import annotations

import torch

from ..ops import check_scale, scale_factor
from ..shard import Reductions
from .base import (Mat, MatrixOptimizer, batches, check_lr, check_positive, check_unit, momentum_direction,
                   momentum_directions, params_of, put_all)


class RMNP(MatrixOptimizer):
    r"""RMNP: momentum, then row-wise L2 normalization over the input dimension; O(mn) per step.

    ::

        M ← μ M + (1−μ) G;   U = (1−μ) G + μ M  (Nesterov, default)  or  U = M
        R = U / (‖U_{i,:}‖₂ + ε)  row by row   (rows = output neurons; no transpose)
        W ← (1 − ηλ) W − η · scale(m, n) · R

    Sharding: column-parallel shards hold whole rows (no communication); row-parallel and
    flat shards all-reduce a d_out-vector of partial sums of squares. Fused QKV/SwiGLU need no
    split. Typical LRs 2e-3–5e-3 with AdamW at 1e-3–3e-3 for the other params.
    """

    def __init__(self, params, *, lr: float = 3e-3, momentum: float = 0.95, nesterov: bool = True,
                 eps: float = 1e-8, weight_decay: float = 0.0, scale: str = "shape_scaling", shards=None,
                 nonfinite_group=None):
        defaults = dict(lr=check_lr("lr", lr), momentum=check_unit("momentum", momentum), nesterov=bool(nesterov),
                        eps=check_positive("eps", eps), weight_decay=check_lr("weight_decay", weight_decay),
                        scale=check_scale(scale))
        super().__init__(params, defaults, shards=shards, nonfinite_group=nonfinite_group)

    def _init_param_state(self, p, group, state):
        state["momentum_buffer"] = torch.zeros_like(p)

    def _update(self, m: Mat) -> None:
        g, sh = m.group, m.shard
        U = momentum_direction(m, m.G, "momentum_buffer", g["momentum"], g["nesterov"])
        row_norm = sh.row_sum(U * U).sqrt_()
        R = U.div_(sh.rows(row_norm).add(g["eps"]))
        W = m.W
        if g["weight_decay"]:
            W.mul_(1 - g["lr"] * g["weight_decay"])
        W.add_(R, alpha=-g["lr"] * scale_factor(g["scale"], m.d_out, m.d_in))
        m.put(m.param, W)

    def _update_many(self, mats: list[Mat]) -> None:
        # round 1: every matrix's squared row norms, one collective per process group
        red, work = Reductions(), []
        for g, _, idx in batches(mats):
            ms = [mats[i] for i in idx]
            if g["weight_decay"]:
                torch._foreach_mul_(params_of(ms), 1 - g["lr"] * g["weight_decay"])
            U = momentum_directions(ms, "momentum_buffer", g["momentum"], g["nesterov"])
            work.append((g, ms, U, [red.row_sum(m.shard, u, square=True) for m, u in zip(ms, U)]))
        red.flush()
        # W ← W − η·scale·U/(‖U_i‖ + ε): one addcmul per matrix with a per-row factor
        for g, ms, U, pend in work:
            Ws = [m.W for m in ms]
            facs = [m.shard.rows((-g["lr"] * scale_factor(g["scale"], m.d_out, m.d_in)) / p.value.sqrt().add_(g["eps"]))
                    for m, p in zip(ms, pend)]
            torch._foreach_addcmul_(Ws, U, facs)
            put_all(ms, None, Ws)
