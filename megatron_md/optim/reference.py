"""Readable single-process reference implementations (test oracles).

Every class and function here is a direct transcription of ``docs/optimizer_spec.md``.
They are written to be read, not to be fast: plain per-parameter Python loops, one formula per
line, fresh tensors instead of in-place tricks, and no imports from the rest of ``megatron_md``.
The product optimizers in ``megatron_md/optim`` are tested against these classes.

Conventions (as in the spec)
----------------------------
* ``W`` has shape ``(m, n) = (d_out, d_in)``; a *row* norm / mean is over ``n`` (``dim=-1``).
* ``t`` is the 1-based step count of a parameter (it only advances when the parameter receives
  a gradient). The schedule-free classes instead use one step counter ``k`` for the whole
  optimizer, exactly like ``schedulefree.AdamWScheduleFree`` (which keeps it per param group).
* The reference owns float32 copies of the parameters (float64 inputs stay float64) and keeps
  all of its state in that same dtype. Newton–Schulz runs in ``ns_dtype`` (default float32).
* ``step(grads)`` takes one gradient per parameter; ``None`` skips that parameter (its state is
  neither created nor advanced). No NaN skipping, no argument validation beyond the obvious.

API
---
``NS_COEFFICIENTS``, ``coefficients``, ``newton_schulz``, ``polar``, ``scale_factor`` and the
classes ``Muon, NorMuon, RMNP, AdamH, MuonH, AdamMD, MuonMD, SFAdamW, SFNorMuon, AdamW``.
Each class: ``__init__(params, **hyperparameters)``, ``step(grads)``, ``.params``.
MD classes also have ``gains(i)`` and ``direction(i)`` (and ``init="factor"``: W kept, gains from
:func:`factor_gains`); schedule-free classes also have
``eval_params()`` and keep ``z`` and ``x`` explicitly in ``state[i]``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "NS_COEFFICIENTS",
    "NS_EPS",
    "coefficients",
    "newton_schulz",
    "polar",
    "scale_factor",
    "softplus",
    "inverse_softplus_of_one",
    "inverse_softplus",
    "factor_gains",
    "Muon",
    "NorMuon",
    "RMNP",
    "AdamH",
    "MuonH",
    "AdamMD",
    "MuonMD",
    "SFAdamW",
    "SFNorMuon",
    "AdamW",
]

Triple = Tuple[float, float, float]

# ---------------------------------------------------------------------------------------------
# Newton–Schulz
# ---------------------------------------------------------------------------------------------

NS_EPS = 1e-7

NS_COEFFICIENTS: Dict[str, List[Triple]] = {
    "jordan": [(3.4445, -4.7750, 2.0315)],
    "quintic": [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
}

DEFAULT_NS_STEPS = 5


def coefficients(spec: Union[str, Sequence[Sequence[float]]], steps: Optional[int]) -> List[Triple]:
    """Resolve ``ns_coefficients`` + ``ns_steps`` into the list of (a, b, c) triples to apply.

    * ``"jordan"``: the single triple repeated ``steps`` times (``None`` -> 5).
    * ``"quintic"``: the first ``steps`` of its 5 triples; beyond 5 the last triple repeats.
    * an explicit list of triples: used as given; ``steps`` must be ``None`` or its length.
    """
    if isinstance(spec, str):
        if spec not in NS_COEFFICIENTS:
            raise ValueError(f"ns_coefficients={spec!r}: unknown coefficient set")
        n = DEFAULT_NS_STEPS if steps is None else int(steps)
        if n < 0:
            raise ValueError(f"ns_steps={steps!r}: must be >= 0")
        table = NS_COEFFICIENTS[spec]
        result: List[Triple] = []
        for i in range(n):
            if i < len(table):
                result.append(tuple(float(v) for v in table[i]))
            else:
                result.append(tuple(float(v) for v in table[-1]))
        return result
    given = [tuple(float(v) for v in triple) for triple in spec]
    for triple in given:
        if len(triple) != 3:
            raise ValueError(f"ns_coefficients: every entry must be a triple (a, b, c), got {triple}")
    if steps is not None and int(steps) != len(given):
        raise ValueError(
            f"ns_steps={steps!r}: must be None or the length ({len(given)}) of the explicit list"
        )
    return given


def newton_schulz(
    X: torch.Tensor, coefficients: Sequence[Triple], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """NS(X): approximate orthogonalization of a 2-D matrix; result is float32, shape of X."""
    assert X.dim() == 2, "newton_schulz expects a 2-D matrix"
    Y = X.to(dtype)
    Y = Y / (torch.linalg.norm(Y) + NS_EPS)  # Frobenius norm
    transposed = Y.shape[0] > Y.shape[1]
    if transposed:
        Y = Y.T  # work on the short side: Y Yᵀ is min(m, n) × min(m, n)
    for a, b, c in coefficients:
        A = Y @ Y.T
        B = b * A + c * (A @ A)
        Y = a * Y + B @ Y
    if transposed:
        Y = Y.T
    return Y.to(torch.float32).contiguous()


def polar(X: torch.Tensor) -> torch.Tensor:
    """Exact polar factor U Vᵀ of X = U Σ Vᵀ, computed by an SVD in float64."""
    U, _, Vh = torch.linalg.svd(X.to(torch.float64), full_matrices=False)
    return (U @ Vh).to(X.dtype)


# ---------------------------------------------------------------------------------------------
# Scale factors
# ---------------------------------------------------------------------------------------------


def scale_factor(name: str, d_out: int, d_in: int) -> float:
    """Update scale factor for a (d_out, d_in) matrix (use the global, unsharded shape)."""
    m = float(d_out)
    n = float(d_in)
    if name == "shape_scaling":
        return max(1.0, math.sqrt(m / n))
    if name == "unit_rms":
        return math.sqrt(m / n)
    if name == "shape_up":
        return math.sqrt(max(m / n, n / m))
    if name == "rms_match":
        return 0.2 * math.sqrt(max(m, n))
    if name == "none":
        return 1.0
    raise ValueError(f"scale={name!r}: unknown scale factor")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = log(1 + exp(x)), written as logaddexp(x, 0) to avoid overflow."""
    return torch.logaddexp(x, torch.zeros_like(x))


def inverse_softplus_of_one() -> float:
    """softplus⁻¹(1) = log(e − 1) ≈ 0.5413."""
    return math.log(math.e - 1.0)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _momentum_direction(M: torch.Tensor, G: torch.Tensor, mu: float, nesterov: bool):
    """EMA momentum ``M ← μ M + (1−μ) G``; returns (new M, U) with U Nesterov or plain."""
    M_new = mu * M + (1.0 - mu) * G
    if nesterov:
        U = (1.0 - mu) * G + mu * M_new
    else:
        U = M_new
    return M_new, U


def _adam_direction(m, v, g, beta1, beta2, eps, t):
    """Adam moments and bias-corrected direction m̂ / (sqrt(v̂) + eps). Returns (m, v, u)."""
    m_new = beta1 * m + (1.0 - beta1) * g
    v_new = beta2 * v + (1.0 - beta2) * g * g
    m_hat = m_new / (1.0 - beta1**t)
    v_hat = v_new / (1.0 - beta2**t)
    u = m_hat / (torch.sqrt(v_hat) + eps)
    return m_new, v_new, u


def _frobenius(X: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.sum(X * X))


class _Reference:
    """Common bookkeeping: owned parameter copies, per-parameter state dicts, step loop."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self._params: List[torch.Tensor] = []
        for p in params:
            p = p.detach()
            self._params.append(p.clone().to(_work_dtype(p)))
        self.state: List[dict] = [dict() for _ in self._params]

    @property
    def params(self) -> List[torch.Tensor]:
        return [p.clone() for p in self._params]

    def _check_grads(self, grads):
        if len(grads) != len(self._params):
            raise ValueError(f"expected {len(self._params)} gradients, got {len(grads)}")

    def step(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        self._check_grads(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(self._params[i].dtype)
            self._step_param(i, g)

    def _step_param(self, i: int, G: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------


class Muon(_Reference):
    """W ← (1−ηλ) W;  W ← W − η · scale · NS(U)."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_coefficients="jordan",
        ns_steps: Optional[int] = None,
        ns_dtype: torch.dtype = torch.float32,
        scale: str = "shape_scaling",
    ):
        super().__init__(params)
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.ns_coefficients = coefficients(ns_coefficients, ns_steps)
        self.ns_dtype = ns_dtype
        self.scale = scale

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(W)
            state["step"] = 0
        state["step"] += 1
        m, n = W.shape
        eta = self.lr
        lam = self.weight_decay

        W = (1.0 - eta * lam) * W
        M, U = _momentum_direction(state["momentum_buffer"], G, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        O = newton_schulz(U, self.ns_coefficients, self.ns_dtype).to(W.dtype)
        W = W - eta * scale_factor(self.scale, m, n) * O
        self._params[i] = W


# ---------------------------------------------------------------------------------------------
# NorMuon
# ---------------------------------------------------------------------------------------------


def _single_beta2(betas) -> float:
    """NorMuon's ``betas=(β2,)``; a bare float or an Adam-style pair (β1, β2) also works."""
    if isinstance(betas, (int, float)):
        return float(betas)
    betas = tuple(betas)
    return float(betas[-1])


class NorMuon(_Reference):
    """O = NS(U); row second moment v; Ô = O / (sqrt(v) + eps); rescale or rms_match step."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas=(0.95,),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_coefficients="jordan",
        ns_steps: Optional[int] = None,
        ns_dtype: torch.dtype = torch.float32,
        scale: str = "shape_scaling",
        step_form: str = "rescale",
    ):
        super().__init__(params)
        if step_form not in ("rescale", "rms_match"):
            raise ValueError(f"step_form={step_form!r}: must be 'rescale' or 'rms_match'")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.beta2 = _single_beta2(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.ns_coefficients = coefficients(ns_coefficients, ns_steps)
        self.ns_dtype = ns_dtype
        self.scale = scale
        self.step_form = step_form

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        m, n = W.shape
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(W)
            state["row_second_moment"] = torch.zeros(m, dtype=W.dtype)
            state["step"] = 0
        state["step"] += 1
        eta = self.lr
        lam = self.weight_decay
        beta2 = self.beta2

        M, U = _momentum_direction(state["momentum_buffer"], G, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        O = newton_schulz(U, self.ns_coefficients, self.ns_dtype).to(W.dtype)

        row_mean_sq = torch.mean(O * O, dim=-1)  # shape (m,)
        v = beta2 * state["row_second_moment"] + (1.0 - beta2) * row_mean_sq
        state["row_second_moment"] = v
        O_hat = O / (torch.sqrt(v)[:, None] + self.eps)

        if self.step_form == "rescale":
            O_hat = O_hat * (_frobenius(O) / _frobenius(O_hat))
            W = (1.0 - eta * lam) * W - eta * scale_factor(self.scale, m, n) * O_hat
        else:  # "rms_match"
            eta_hat = 0.2 * eta * math.sqrt(m * n) / _frobenius(O_hat)
            W = (1.0 - eta * lam) * W - eta_hat * O_hat
        self._params[i] = W


# ---------------------------------------------------------------------------------------------
# RMNP
# ---------------------------------------------------------------------------------------------


class RMNP(_Reference):
    """R = U / (‖U_i,:‖₂ + eps) row by row;  W ← (1−ηλ) W − η · scale · R."""

    def __init__(
        self,
        params,
        *,
        lr: float = 3e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scale: str = "shape_scaling",
    ):
        super().__init__(params)
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.eps = eps
        self.weight_decay = weight_decay
        self.scale = scale

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(W)
            state["step"] = 0
        state["step"] += 1
        m, n = W.shape
        eta = self.lr
        lam = self.weight_decay

        M, U = _momentum_direction(state["momentum_buffer"], G, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        row_norms = torch.sqrt(torch.sum(U * U, dim=-1))  # shape (m,), norm over d_in
        R = U / (row_norms[:, None] + self.eps)
        W = (1.0 - eta * lam) * W - eta * scale_factor(self.scale, m, n) * R
        self._params[i] = W


# ---------------------------------------------------------------------------------------------
# AdamH / MuonH (hyperball retraction)
# ---------------------------------------------------------------------------------------------


def _hyperball_retraction(W: torch.Tensor, u: torch.Tensor, eta: float, rho: torch.Tensor):
    """W' = W − η ρ u/‖u‖_F;  W ← ρ W'/‖W'‖_F.

    (choice) if ‖u‖_F = 0 the direction u/‖u‖_F is taken as 0 instead of NaN.
    """
    u_norm = _frobenius(u)
    if float(u_norm) == 0.0:
        direction = torch.zeros_like(u)
    else:
        direction = u / u_norm
    W_prime = W - eta * rho * direction
    return rho * W_prime / _frobenius(W_prime)


class AdamH(_Reference):
    """Adam direction, retracted onto the Frobenius sphere of radius ρ = ‖W₀‖_F."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.01,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params)
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay!r}: AdamH has no weight decay")
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        for i, W in enumerate(self._params):
            self.state[i]["radius"] = _frobenius(W)

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(W)
            state["exp_avg_sq"] = torch.zeros_like(W)
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = self.betas

        m, v, u = _adam_direction(state["exp_avg"], state["exp_avg_sq"], G, beta1, beta2, self.eps, t)
        state["exp_avg"] = m
        state["exp_avg_sq"] = v
        self._params[i] = _hyperball_retraction(W, u, self.lr, state["radius"])


class MuonH(_Reference):
    """u = NS(U) (Nesterov momentum), retracted onto the sphere of radius ρ = ‖W₀‖_F.

    A positive scale factor would cancel in u/‖u‖_F, so MuonH takes no ``scale`` argument.
    """

    def __init__(
        self,
        params,
        *,
        lr: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_coefficients="jordan",
        ns_steps: Optional[int] = None,
        ns_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(params)
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay!r}: MuonH has no weight decay")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.ns_coefficients = coefficients(ns_coefficients, ns_steps)
        self.ns_dtype = ns_dtype
        for i, W in enumerate(self._params):
            self.state[i]["radius"] = _frobenius(W)

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(W)
            state["step"] = 0
        state["step"] += 1

        M, U = _momentum_direction(state["momentum_buffer"], G, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        u = newton_schulz(U, self.ns_coefficients, self.ns_dtype).to(W.dtype)
        self._params[i] = _hyperball_retraction(W, u, self.lr, state["radius"])


# ---------------------------------------------------------------------------------------------
# MD decoupling: AdamMD / MuonMD
# ---------------------------------------------------------------------------------------------


#: a row whose squared norm is at most this counts as zero (it keeps gain 1)
ZERO_ROW_SQ = 1e-30
#: the row gain a zero row of W gets when factored: W's row stays ~0 however D's row moves on its
#: sphere (a padded vocabulary row of an imported head); Adam on the gains can still grow it
ZERO_ROW_GAIN = 1e-12


def inverse_softplus(s: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(s) = log(exp(s) − 1), written as s + log(1 − exp(−s)) for large s."""
    return s + torch.log(-torch.expm1(-s))


def factor_gains(W: torch.Tensor, R: float, sphere: str = "frobenius") -> Tuple[torch.Tensor, torch.Tensor]:
    """MD's gains of a given W with W unchanged: ``(g_r, g_c)`` with
    ``W = diag(softplus(g_r)) · D · diag(softplus(g_c))`` and D on the sphere.

    Column gains are 1. Row i's gain is its norm over ρ, so every row of D = ρ · (row i of W)/‖W_i‖
    has norm ρ; ρ = R/‖Ŵ‖_F puts D on the Frobenius sphere ‖D‖_F = R (Ŵ: the rows of W scaled
    to unit norm, so ‖Ŵ‖²_F is the number of nonzero rows); ``sphere="rows"``: ρ = R, the
    radius of each row. A zero row gets gain ``ZERO_ROW_GAIN`` (1e-12; its D row is zero): once D's
    row moves onto the sphere, W's row stays ~0 instead of jumping to the sphere's norm.
    """
    m, n = W.shape
    row_sq = torch.sum(W * W, dim=1)
    nonzero = row_sq > ZERO_ROW_SQ
    row_norm = torch.sqrt(row_sq)
    W_hat = torch.where(nonzero[:, None], W / row_norm[:, None], torch.zeros_like(W))
    if sphere == "rows":
        rho = R
    else:
        rho = R / _frobenius(W_hat)
    s_r = torch.where(nonzero, row_norm / rho, torch.full_like(row_norm, ZERO_ROW_GAIN))
    g_r = inverse_softplus(s_r)
    g_c = torch.full((n,), inverse_softplus_of_one(), dtype=W.dtype)
    return g_r, g_c


class _MDBase(_Reference):
    """W = diag(softplus(g_r)) · D · diag(softplus(g_c)), ‖D‖_F = R = sqrt(max(m, n))·radius_scale.

    ``radius_scale`` ρ is a float (all params) or a sequence with one value per param; with
    ``radius_scales_update`` the step is ``D ← D − lr·ρ·U`` (else ``lr·U``). ``col_groups``: lists
    of parameter indices (matrices with the same columns, e.g. Q, K, V) that share one column gain
    vector ``g_c``: its gradient is the sum of the members' ``sigmoid(g_c) ⊙ (P_bᵀ s_r,b)``.
    The parameter W is what is stored; D is recovered as W / (s_r s_cᵀ) (as in the spec).
    ``sphere="rows"``: every row of D has norm ``radius_scale`` instead (the output-head rule).
    ``init="project"``: W is projected onto its sphere, gains 1; ``init="factor"``: W is kept and
    the gains are factored from it (:func:`factor_gains`).
    """

    def __init__(self, params, *, lr, gains_lr, betas, eps, weight_decay, radius_scale, sphere="frobenius",
                 init="project", radius_scales_update=True, col_groups=()):
        super().__init__(params)
        self.radius_scales_update = radius_scales_update
        #: groups of parameter indices that share one column gain vector (Q, K, V of a fused QKV)
        self.col_groups = [list(g) for g in col_groups]
        self._col_owner = {i: g[0] for g in self.col_groups for i in g}
        self.sphere = sphere
        if weight_decay != 0:
            raise ValueError(f"weight_decay={weight_decay!r}: MD optimizers have no weight decay")
        if init not in ("project", "factor"):
            raise ValueError(f"init={init!r}: expected 'project' or 'factor'")
        self.lr = lr
        self.gains_lr = lr if gains_lr is None else gains_lr
        self.betas = tuple(betas)
        self.eps = eps
        if isinstance(radius_scale, (int, float)):
            radius_scales = [float(radius_scale)] * len(self._params)
        else:
            radius_scales = [float(r) for r in radius_scale]
            if len(radius_scales) != len(self._params):
                raise ValueError("radius_scale: need one value per parameter")
        g0 = inverse_softplus_of_one()
        for i, W in enumerate(self._params):
            m, n = W.shape
            R = radius_scales[i] if sphere == "rows" else math.sqrt(max(m, n)) * radius_scales[i]
            state = self.state[i]
            state["R"] = R
            state["rho"] = radius_scales[i]
            if init == "factor":
                # W stays; W = diag(s_r) D diag(s_c) with D on the sphere
                state["g_r"], state["g_c"] = factor_gains(W, R, sphere)
                continue
            # Project onto the sphere (gains are 1 at this point, so D = W).
            self._params[i] = self._retract(W, R)
            state["g_r"] = torch.full((m,), g0, dtype=W.dtype)
            state["g_c"] = torch.full((n,), g0, dtype=W.dtype)

    def _retract(self, D: torch.Tensor, R: float) -> torch.Tensor:
        if self.sphere == "rows":
            return R * D / D.norm(dim=1, keepdim=True)
        return R * D / _frobenius(D)

    def gains(self, i: int):
        state = self.state[i]
        return softplus(state["g_r"]), softplus(state["g_c"])

    def direction(self, i: int) -> torch.Tensor:
        s_r, s_c = self.gains(i)
        return self._params[i] / (s_r[:, None] * s_c[None, :])

    def _base_update(self, i: int, G_D: torch.Tensor, t: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def step(self, grads) -> None:
        """One MD step of every parameter with a gradient. Everything is computed from the old
        gains first; a column gain shared by a ``col_groups`` group gets the sum of its members'
        gradients and one Adam update (one vector, one set of moments)."""
        self._check_grads(grads)
        live = [i for i, g in enumerate(grads) if g is not None]
        parts = {i: self._md_parts(i, grads[i].detach().to(self._params[i].dtype)) for i in live}
        for group in self.col_groups:
            members = [i for i in group if i in parts]
            if members:
                total = sum(parts[i]["grad_g_c"] for i in members)
                for i in members:
                    parts[i]["grad_g_c"] = total
        for i in live:  # gains Adam (a shared column gain: once, at the group's first member)
            self._gains_adam(i, "g_r", parts[i]["grad_g_r"])
            if self._col_owner.get(i, i) == i:
                self._gains_adam(i, "g_c", parts[i]["grad_g_c"])
        for i, j in self._col_owner.items():
            self.state[i]["g_c"] = self.state[j]["g_c"]
        for i in live:
            state = self.state[i]
            self._params[i] = softplus(state["g_r"])[:, None] * parts[i]["D"] * softplus(state["g_c"])[None, :]

    def _gains_adam(self, i: int, name: str, grad: torch.Tensor) -> None:
        state = self.state[i]
        key = name + "_exp_avg"
        if key not in state:
            state[key] = torch.zeros_like(state[name])
            state[key + "_sq"] = torch.zeros_like(state[name])
        beta1, beta2 = self.betas
        m, v, u = _adam_direction(state[key], state[key + "_sq"], grad, beta1, beta2, self.eps, state["step"])
        state[key], state[key + "_sq"] = m, v
        state[name] = state[name] - self.gains_lr * u

    def _md_parts(self, i: int, G: torch.Tensor) -> dict:
        """The step of parameter ``i`` from its old gains: the gains' gradients and the new,
        retracted direction D."""
        W = self._params[i]
        state = self.state[i]
        state["step"] = state.get("step", 0) + 1
        t = state["step"]
        s_r = softplus(state["g_r"])  # old gains
        s_c = softplus(state["g_c"])
        D = W / (s_r[:, None] * s_c[None, :])
        P = D * G
        out = dict(grad_g_r=torch.sigmoid(state["g_r"]) * (P @ s_c), grad_g_c=torch.sigmoid(state["g_c"]) * (P.T @ s_r))
        G_D = G * (s_r[:, None] * s_c[None, :])
        U = self._base_update(i, G_D, t)
        # the step of D scales with the radius (the angular step stays), or not
        D = D - self.lr * (state["rho"] if self.radius_scales_update else 1.0) * U
        out["D"] = self._retract(D, state["R"])
        return out


class AdamMD(_MDBase):
    """MD decoupling with the Adam direction on G_D (bias-corrected, no weight decay)."""

    def __init__(
        self,
        params,
        *,
        lr: float = 3e-3,
        gains_lr: Optional[float] = None,
        betas=(0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        radius_scale=1.0,
        radius_scales_update: bool = True,
        sphere: str = "frobenius",
        init: str = "project",
        col_groups=(),
    ):
        super().__init__(
            params,
            lr=lr,
            gains_lr=gains_lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            radius_scale=radius_scale,
            radius_scales_update=radius_scales_update,
            sphere=sphere,
            init=init,
            col_groups=col_groups,
        )

    def _base_update(self, i, G_D, t):
        state = self.state[i]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(G_D)
            state["exp_avg_sq"] = torch.zeros_like(G_D)
        beta1, beta2 = self.betas
        m, v, u = _adam_direction(state["exp_avg"], state["exp_avg_sq"], G_D, beta1, beta2, self.eps, t)
        state["exp_avg"] = m
        state["exp_avg_sq"] = v
        return u


class MuonMD(_MDBase):
    """MD decoupling with U = scale · NS(Nesterov momentum of G_D); gains on Adam."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.01,
        gains_lr: Optional[float] = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas=(0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_coefficients="quintic",
        ns_steps: Optional[int] = None,
        ns_dtype: torch.dtype = torch.float32,
        scale: str = "shape_up",
        radius_scale=1.0,
        radius_scales_update: bool = True,
        init: str = "project",
        col_groups=(),
        sphere: str = "frobenius",
    ):
        super().__init__(
            params,
            lr=lr,
            gains_lr=gains_lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            radius_scale=radius_scale,
            radius_scales_update=radius_scales_update,
            init=init,
            col_groups=col_groups,
            sphere=sphere,
        )
        self.momentum = momentum
        self.nesterov = nesterov
        self.ns_coefficients = coefficients(ns_coefficients, ns_steps)
        self.ns_dtype = ns_dtype
        self.scale = scale

    def _base_update(self, i, G_D, t):
        state = self.state[i]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(G_D)
        M, U = _momentum_direction(state["momentum_buffer"], G_D, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        m, n = G_D.shape
        O = newton_schulz(U, self.ns_coefficients, self.ns_dtype).to(G_D.dtype)
        return scale_factor(self.scale, m, n) * O


# ---------------------------------------------------------------------------------------------
# Schedule-free: explicit three-iterate form (z, x stored; y = (1−β) z + β x)
# ---------------------------------------------------------------------------------------------


class _ScheduleFreeBase(_Reference):
    """Shared schedule (warmup, lr_max, polynomial weights, c) and the z/x/y bookkeeping.

    The step counter ``k``, ``lr_max`` and ``weight_sum`` belong to the optimizer (one
    "param group"), as in ``schedulefree.AdamWScheduleFree``: they advance on every ``step``
    call, also for parameters whose gradient is None.
    """

    def __init__(self, params, *, lr, beta, warmup_steps, r, weight_lr_power):
        super().__init__(params)
        self.lr = lr
        self.beta = beta  # interpolation β: y = (1−β) z + β x
        self.warmup_steps = warmup_steps
        self.r = r
        self.weight_lr_power = weight_lr_power
        self.k = 0  # number of steps taken so far
        self.lr_max = -1.0
        self.weight_sum = 0.0
        self.scheduled_lr = 0.0

    def _schedule(self):
        """Returns (η_t, c) for the step about to be taken and advances lr_max / weight_sum."""
        k = self.k
        if k < self.warmup_steps:
            sched = (k + 1) / self.warmup_steps
        else:
            sched = 1.0
        eta_t = self.lr * sched
        self.lr_max = max(self.lr_max, eta_t)
        weight = ((k + 1) ** self.r) * (self.lr_max**self.weight_lr_power)
        self.weight_sum = self.weight_sum + weight
        if self.weight_sum == 0:
            c = 0.0
        else:
            c = weight / self.weight_sum
        return eta_t, c

    def _init_iterates(self, i):
        state = self.state[i]
        if "z" not in state:
            y = self._params[i]
            state["z"] = y.clone()
            state["x"] = y.clone()

    def _advance_iterates(self, i, z_new, c):
        """x ← (1−c) x + c z';  y ← (1−β) z' + β x';  the param holds y."""
        state = self.state[i]
        x_new = (1.0 - c) * state["x"] + c * z_new
        y_new = (1.0 - self.beta) * z_new + self.beta * x_new
        state["z"] = z_new
        state["x"] = x_new
        self._params[i] = y_new

    def step(self, grads):
        self._check_grads(grads)
        eta_t, c = self._schedule()
        self.scheduled_lr = eta_t
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(self._params[i].dtype)
            self._init_iterates(i)
            self._sf_step_param(i, g, eta_t, c)
        self.k = self.k + 1

    def eval_params(self) -> List[torch.Tensor]:
        """The averaged iterate x (what evaluation / checkpoint export should see)."""
        result = []
        for i, y in enumerate(self._params):
            state = self.state[i]
            if "x" in state:
                result.append(state["x"].clone())
            else:
                result.append(y.clone())  # never stepped: x = y = z = initial value
        return result

    def _sf_step_param(self, i, g, eta_t, c):  # pragma: no cover - abstract
        raise NotImplementedError


class SFAdamW(_ScheduleFreeBase):
    """Schedule-free AdamW (same rule as ``schedulefree.AdamWScheduleFree``)."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.0025,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        weight_decay_at: str = "y",
    ):
        betas = tuple(betas)
        super().__init__(
            params, lr=lr, beta=betas[0], warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power
        )
        if weight_decay_at not in ("y", "z"):
            raise ValueError(f"weight_decay_at={weight_decay_at!r}: must be 'y' or 'z'")
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.weight_decay_at = weight_decay_at

    def _sf_step_param(self, i, g, eta_t, c):
        state = self.state[i]
        if "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(g)
        beta2 = self.betas[1]
        k = self.k
        y = self._params[i]
        z = state["z"]

        v = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
        state["exp_avg_sq"] = v
        u = g / (torch.sqrt(v / (1.0 - beta2 ** (k + 1))) + self.eps)
        if self.weight_decay_at == "y":
            u = u + self.weight_decay * y
        else:
            u = u + self.weight_decay * z

        z_new = z - eta_t * u
        self._advance_iterates(i, z_new, c)


class SFNorMuon(_ScheduleFreeBase):
    """Schedule-free NorMuon: NorMuon direction (rms_match form) driving the fast iterate z."""

    def __init__(
        self,
        params,
        *,
        lr: float = 0.01,
        betas=(0.9, 0.95),
        momentum: float = 0.95,
        nesterov: bool = False,
        eps: float = 1e-8,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        ns_coefficients="jordan",
        ns_steps: Optional[int] = None,
        ns_dtype: torch.dtype = torch.float32,
    ):
        betas = tuple(betas)
        super().__init__(
            params, lr=lr, beta=betas[0], warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power
        )
        self.betas = betas
        self.momentum = momentum
        self.nesterov = nesterov
        self.eps = eps
        self.weight_decay = weight_decay
        self.ns_coefficients = coefficients(ns_coefficients, ns_steps)
        self.ns_dtype = ns_dtype

    def _sf_step_param(self, i, g, eta_t, c):
        state = self.state[i]
        m, n = g.shape
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
            state["row_second_moment"] = torch.zeros(m, dtype=g.dtype)
        beta2 = self.betas[1]
        lam = self.weight_decay
        z = state["z"]

        M, U = _momentum_direction(state["momentum_buffer"], g, self.momentum, self.nesterov)
        state["momentum_buffer"] = M
        P = newton_schulz(U, self.ns_coefficients, self.ns_dtype).to(g.dtype)
        v = beta2 * state["row_second_moment"] + (1.0 - beta2) * torch.mean(P * P, dim=-1)
        state["row_second_moment"] = v
        P_hat = P / (torch.sqrt(v)[:, None] + self.eps)
        eta_hat = 0.2 * eta_t * math.sqrt(m * n) / _frobenius(P_hat)

        delta = -eta_t * lam * z - eta_hat * P_hat  # weight decay on the fast iterate z
        z_new = z + delta
        self._advance_iterates(i, z_new, c)


# ---------------------------------------------------------------------------------------------
# AdamW (torch.optim.AdamW semantics, for completeness)
# ---------------------------------------------------------------------------------------------


class AdamW(_Reference):
    """W ← (1 − η λ) W;  W ← W − η m̂ / (sqrt(v̂) + eps)."""

    def __init__(
        self,
        params,
        *,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params)
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay

    def _step_param(self, i, G):
        W = self._params[i]
        state = self.state[i]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(W)
            state["exp_avg_sq"] = torch.zeros_like(W)
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        beta1, beta2 = self.betas

        W = (1.0 - self.lr * self.weight_decay) * W
        m, v, u = _adam_direction(state["exp_avg"], state["exp_avg_sq"], G, beta1, beta2, self.eps, t)
        state["exp_avg"] = m
        state["exp_avg_sq"] = v
        W = W - self.lr * u
        self._params[i] = W


# ---------------------------------------------------------------------------------------------
# MD's embedding rule: Adam, then every vocabulary row back to unit norm
# ---------------------------------------------------------------------------------------------


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Each row of ``W`` divided by its L2 norm (MD's embedding projection)."""
    return W / W.norm(dim=1, keepdim=True)


class UnitRowAdam(AdamW):
    """MD's embedding rule: rows projected to unit norm at construction, then per step the
    AdamW update (no weight decay) followed by ``W_i,: ← W_i,: / ‖W_i,:‖`` for every row."""

    def __init__(self, params, *, lr: float = 3e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        self._params = [unit_rows(W) for W in self._params]

    def _step_param(self, i, G):
        super()._step_param(i, G)
        self._params[i] = unit_rows(self._params[i])
