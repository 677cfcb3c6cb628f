"""Schedule-free optimizers: SF-AdamW (Defazio et al., 2024) and SF-NorMuon (arXiv 2605.23061).

Three iterates: fast ``z``, average ``x``, gradient point ``y = (1−β) z + β x``. The parameter
holds ``y`` during training; ``.eval()`` swaps it to ``x`` (for evaluation and checkpoint
export) and ``.train()`` swaps back (exactly: ``y`` is kept aside while in eval mode). Only
``z`` is stored; ``x`` is implicit (memory-efficient form). Averaging weights follow
``schedulefree``: ``w_k = (k+1)^r · lr_max^p``, ``c_k = w_k / Σ w``.
"""
from __future__ import annotations

import math

import torch

from ..shard import Reductions
from .base import (Mat, MatrixOptimizer, MomentumNS, SkippingOptimizer, batches, check_betas, check_lr,
                   check_nonneg_int, check_positive, check_unit, ns_defaults, put_all)


def sf_defaults(*, lr, betas, n_betas, weight_decay, warmup_steps, r, weight_lr_power, eps) -> dict:
    return dict(lr=check_lr("lr", lr), betas=check_betas(betas, n_betas), eps=check_positive("eps", eps),
                weight_decay=check_lr("weight_decay", weight_decay),
                warmup_steps=check_nonneg_int("warmup_steps", warmup_steps),
                r=check_lr("r", r), weight_lr_power=check_lr("weight_lr_power", weight_lr_power),
                k=0, lr_max=-1.0, weight_sum=0.0, train_mode=True, scheduled_lr=0.0)


class ScheduleFreeMixin:
    """Schedule (warmup only), averaging weights and the y ⇄ x swap, shared by SF optimizers."""

    def _advance_schedule(self, group: dict) -> None:
        """Set ``group['scheduled_lr']`` (η_t) and ``group['_c']`` (averaging weight c) for this
        step and advance the counters, exactly like ``schedulefree``."""
        k, warm = group["k"], group["warmup_steps"]
        lr = group["lr"] * ((k + 1) / warm if k < warm else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = lr_max = max(lr, group["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        group["weight_sum"] = group["weight_sum"] + weight
        group["_c"] = weight / group["weight_sum"] if group["weight_sum"] else 0.0
        group["k"] = k + 1

    def _check_train_mode(self):
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() called in eval mode; call optimizer.train() first")

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters ← x = y + (1 − 1/β)(z − y); y is kept to be restored by :meth:`train`."""
        for g in self.param_groups:
            if not g["train_mode"]:
                continue
            beta = g["betas"][0]
            for p in g["params"]:
                st = self.state.get(p, {})
                if "z" in st:
                    st["y_stash"] = p.detach().clone()
                    p.lerp_(st["z"], 1 - 1 / beta)
            g["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters ← y (restored bit-exactly from the copy taken by :meth:`eval`)."""
        for g in self.param_groups:
            if g["train_mode"]:
                continue
            beta = g["betas"][0]
            for p in g["params"]:
                st = self.state.get(p, {})
                if "y_stash" in st:
                    p.copy_(st.pop("y_stash"))
                elif "z" in st:
                    p.lerp_(st["z"], 1 - beta)
            g["train_mode"] = True


class SFAdamW(ScheduleFreeMixin, SkippingOptimizer):
    r"""Schedule-free AdamW — step for step equal to ``schedulefree.AdamWScheduleFree``.

    With ``k`` steps taken, ``η_t = lr · min(1, (k+1)/warmup)``, ``c`` the averaging weight::

        v ← β2 v + (1−β2) g²;   u = g / (sqrt(v / (1 − β2^{k+1})) + ε)
        u ← u + λ y   (weight_decay_at="y", as schedulefree)   or   u ← u + λ z   ("z")
        y ← (1−c) y + c z + η_t (β1 (1−c) − 1) u;   z ← z − η_t u

    ``betas = (β1, β2)``: β1 is the interpolation ``y = (1−β1) z + β1 x`` (no first moment).
    Warning: without decay SF-AdamW can diverge on long runs; SF-NorMuon decays z.
    """

    def __init__(self, params, *, lr: float = 0.0025, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, weight_decay_at: str = "y", warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, nonfinite_group=None):
        if weight_decay_at not in ("y", "z"):
            raise ValueError(f"weight_decay_at={weight_decay_at!r}: expected 'y' or 'z'")
        defaults = sf_defaults(lr=lr, betas=betas, n_betas=2, weight_decay=weight_decay, warmup_steps=warmup_steps,
                               r=r, weight_lr_power=weight_lr_power, eps=eps)
        defaults["weight_decay_at"] = weight_decay_at
        super().__init__(params, defaults, nonfinite_group=nonfinite_group)
        for g in self.param_groups:
            for p in g["params"]:
                self.state[p]["z"] = p.detach().clone()
                self.state[p]["exp_avg_sq"] = torch.zeros_like(p)

    def _step(self) -> None:
        self._check_train_mode()
        for g in self.param_groups:
            self._advance_schedule(g)
            lr, c = g["scheduled_lr"], g["_c"]
            beta1, beta2 = g["betas"]
            bias2 = 1 - beta2 ** g["k"]
            ys = [y for y in g["params"] if y.grad is not None]
            for y in ys:
                st = self.state[y]
                if "z" not in st:  # params swapped in after construction (Megatron main params)
                    st["z"] = y.detach().clone()
                    st["exp_avg_sq"] = torch.zeros_like(y)
            if not ys:
                continue
            zs = [self.state[y]["z"] for y in ys]
            vs = [self.state[y]["exp_avg_sq"] for y in ys]
            grads = [y.grad for y in ys]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            # u = g / (sqrt(v/b) + ε) = sqrt(b) · g / (sqrt(v) + ε sqrt(b)), b = 1 − β2^{k+1}:
            # the factor sqrt(b) moves into the scalars below (no v/b temporary)
            rb = math.sqrt(bias2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, g["eps"] * rb)
            us = [torch.div(gr, d, out=d) for gr, d in zip(grads, denom)]   # over denom: no second temporary
            if g["weight_decay"]:
                torch._foreach_add_(us, ys if g["weight_decay_at"] == "y" else zs, alpha=g["weight_decay"] / rb)
            torch._foreach_lerp_(ys, zs, c)
            torch._foreach_add_(ys, us, alpha=lr * (beta1 * (1 - c) - 1) * rb)
            torch._foreach_sub_(zs, us, alpha=lr * rb)


class SFNorMuon(ScheduleFreeMixin, MomentumNS, MatrixOptimizer):
    r"""Schedule-free NorMuon: NorMuon's direction, weight decay on the fast iterate z.

    ``betas = (β, β2)`` (interpolation, row moment); momentum μ; schedule and averaging
    weight c as :class:`SFAdamW`. Per matrix, gradient g taken at y::

        m ← μ m + (1−μ) g;   P = NS(m)          (NS of the Nesterov direction if nesterov=True)
        v ← β2 v + (1−β2) mean_over_d_in(P⊙P);   P̂ = P / (sqrt(v)[:,None] + ε)
        η̂ = 0.2 · η_t · sqrt(m n) / ‖P̂‖_F
        Δ = −η_t λ z − η̂ P̂
        y ← (1−c) y + c z + (1 − β(1−c)) Δ;   z ← z + Δ

    (equivalently ``z' = z + Δ; x' = (1−c) x + c z'; y' = (1−β) z' + β x'``). A usable
    checkpoint exists at any step: export ``x`` (``.eval()``).
    """

    uses_ns = True

    def __init__(self, params, *, lr: float = 0.01, betas=(0.9, 0.95), momentum: float = 0.95,
                 nesterov: bool = False, eps: float = 1e-8, weight_decay: float = 0.05, warmup_steps: int = 0,
                 r: float = 0.0, weight_lr_power: float = 2.0, ns_coefficients="jordan", ns_steps=None,
                 ns_dtype=None, ns_mode: str = "owner", shards=None, nonfinite_group=None):
        defaults = sf_defaults(lr=lr, betas=betas, n_betas=2, weight_decay=weight_decay, warmup_steps=warmup_steps,
                               r=r, weight_lr_power=weight_lr_power, eps=eps)
        defaults.update(momentum=check_unit("momentum", momentum), nesterov=bool(nesterov),
                        **ns_defaults(ns_coefficients, ns_steps, ns_dtype, ns_mode))
        super().__init__(params, defaults, shards=shards, ns_mode=ns_mode, nonfinite_group=nonfinite_group)

    def _init_param_state(self, p, group, state):
        state["z"] = p.detach().clone()
        state["momentum_buffer"] = torch.zeros_like(p)

    def _init_mat_state(self, m: Mat) -> None:
        r0, r1 = m.shard.row_range
        m.vec["step"] = 0
        m.vec["row_moment"] = torch.zeros(r1 - r0, dtype=torch.float32, device=m.param.device)

    def _step(self) -> None:
        self._check_train_mode()
        for g in self.param_groups:
            self._advance_schedule(g)
        super()._step()

    def _post_ns(self, m: Mat, P: torch.Tensor) -> None:
        g, sh = m.group, m.shard
        beta, beta2 = g["betas"]
        lr, c = g["scheduled_lr"], g["_c"]
        v = m.vec["row_moment"]
        v.mul_(beta2).add_(sh.row_sum(P * P), alpha=(1 - beta2) / m.d_in)
        P_hat = P / (sh.rows(v.sqrt()) + g["eps"])
        eta_hat = 0.2 * lr * math.sqrt(m.d_out * m.d_in) / sh.total_sum(P_hat * P_hat).sqrt()
        Z, Y = m.get(m.state["z"]), m.W
        delta = P_hat.mul_(-eta_hat)
        if g["weight_decay"]:
            delta.add_(Z, alpha=-lr * g["weight_decay"])
        Y.lerp_(Z, c).add_(delta, alpha=1 - beta * (1 - c))
        Z.add_(delta)
        m.put(m.param, Y)
        m.put(m.state["z"], Z)

    def _post_ns_many(self, mats: list[Mat], outs: list[torch.Tensor]) -> None:
        # round 1: row sums of P²; round 2: ‖P̂‖²
        red = Reductions()
        rows = [red.row_sum(m.shard, P, square=True) for m, P in zip(mats, outs)]
        red.flush()
        inv = []
        for m, r in zip(mats, rows):
            g, v = m.group, m.vec["row_moment"]
            beta2 = g["betas"][1]
            v.mul_(beta2).add_(r.value, alpha=(1 - beta2) / m.d_in)
            inv.append(m.shard.rows(v.sqrt().add_(g["eps"]).reciprocal_()))
        P_hat = torch._foreach_mul(outs, inv)
        sq_hat = [red.total_sums(m.shard, [x], square=True) for m, x in zip(mats, P_hat)]
        red.flush()
        for g, _, idx in batches(mats):
            ms = [mats[i] for i in idx]
            beta, lr, c = g["betas"][0], g["scheduled_lr"], g["_c"]
            delta = [P_hat[i] for i in idx]
            torch._foreach_mul_(delta, [(-0.2 * lr * math.sqrt(m.d_out * m.d_in)) / sq_hat[i].value.sqrt()
                                        for i, m in zip(idx, ms)])
            Zs, Ys = [m.get(m.state["z"]) for m in ms], [m.W for m in ms]
            if g["weight_decay"]:
                torch._foreach_add_(delta, Zs, alpha=-lr * g["weight_decay"])
            torch._foreach_lerp_(Ys, Zs, c)
            torch._foreach_add_(Ys, delta, alpha=1 - beta * (1 - c))
            torch._foreach_add_(Zs, delta)
            put_all(ms, None, Ys)
            put_all(ms, "z", Zs)
