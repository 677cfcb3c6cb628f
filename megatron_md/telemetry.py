"""Effective-learning-rate telemetry: what one optimizer step did to each logical matrix.

Pure math on local tensors plus the :class:`~megatron_md.shard.MatrixShard` reductions that
make it exact on any layout (TP, EP, ZeRO-1 flat ranges, fused-QKV and expert blocks); no
Megatron here (the driver's glue is :mod:`megatron_md.training.telemetry`).

Per matrix, from the weight before the step ``w`` and after it ``w'`` (``u = w' − w``, the
applied update, weight decay and retraction included)::

    η_eff = ‖ŵ' − ŵ‖_F,  ŵ = w/‖w‖_F            (arXiv 2606.29158: the angular step)
    ‖w'‖_F,  ‖u‖_F,  cos(u, w) = ⟨u, w⟩ / (‖u‖_F ‖w‖_F)

All four come from three complete sums ``S = (⟨w,w⟩, ⟨u,u⟩, ⟨w,u⟩)`` (local partial sums in
float64, completed with one ``total_sums`` per matrix). ``η_eff`` is evaluated as
``(‖u‖² − (‖w'‖ − ‖w‖)²) / (‖w‖ ‖w'‖)`` with ``‖w'‖ − ‖w‖ = (2⟨w,u⟩ + ‖u‖²)/(‖w‖ + ‖w'‖)``,
which equals ``2 − 2 cos(w, w')`` without its cancellation (a step of 1e-4 would otherwise
be lost in float32 rounding of the cosine).

Method diagnostics:

* MD (AdamMD/MuonMD): mean and standard deviation of the row gains ``softplus(g_r)`` over the
  ``d_out`` rows and of the column gains over the ``d_in`` columns (exact on flat ranges, whose
  row vectors overlap at range boundaries: the sums run over elements, each row counted
  ``d_in`` times).
* RMNP (arXiv 2603.20527, App. C): on sampled matrices, with ``V`` the momentum,
  ``‖U_NS − U_row‖_F / ‖U_NS‖_F`` between ``U_NS = NS(V)`` and the row-normalized
  ``U_row = V / ‖V_i,:‖``, and the row diagonal-dominance ratios of ``G = V Vᵀ``:
  ``r_i = G_ii / (Σ_{j≠i} |G_ij| / (m − 1))`` summarized as mean / min / max over rows.
  ``row_vs_ns_matched`` is the same distance with ``U_row`` rescaled to ``‖U_NS‖_F`` (a tall
  matrix's polar factor has rows shorter than 1, so the literal distance exceeds 1 there
  whatever the directions).

AdamW equilibrium predictions (arXiv 2606.29158, §4) for a matrix of ``d`` elements at LR η,
decoupled weight decay λ and β1: ``‖w_∞‖² ≈ η d / (2λ)``, steady
``η_eff ≈ sqrt(2ηλ (1−β1)/(1+β1))``, transient ≈ ``1/(2ηλ)`` steps.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .ops import newton_schulz, resolve_coefficients
from .shard import MatrixShard
from .shard.orthogonalize import gather_full

__all__ = ["step_sums", "step_stats", "matrix_step_stats", "gain_stats", "rmnp_diagnostics",
           "adamw_equilibrium", "STEP_KEYS"]

#: keys of :func:`step_stats`
STEP_KEYS = ("eta_eff", "w_norm", "u_norm", "cos_uw")


# ------------------------------------------------------------------------------ pure math
def step_sums(w_before: torch.Tensor, w_after: torch.Tensor) -> list[torch.Tensor]:
    """Element-wise float64 terms whose totals are ``(⟨w,w⟩, ⟨u,u⟩, ⟨w,u⟩)``, ``u = w' − w``."""
    a = w_before.to(torch.float64)
    u = w_after.to(torch.float64) - a
    return [a * a, u * u, a * u]


def step_stats(ww: float, uu: float, wu: float) -> dict:
    """η_eff, ‖w'‖, ‖u‖ and cos(u, w) from the complete sums (see module docstring)."""
    w0 = math.sqrt(max(ww, 0.0))
    w1_sq = max(ww + 2.0 * wu + uu, 0.0)
    w1 = math.sqrt(w1_sq)
    un = math.sqrt(max(uu, 0.0))
    if w0 == 0.0 or w1 == 0.0:
        eta = float("nan")
    else:
        dn = (2.0 * wu + uu) / (w0 + w1)
        eta = math.sqrt(max(uu - dn * dn, 0.0) / (w0 * w1))
    cos = wu / (un * w0) if un > 0 and w0 > 0 else 0.0
    return {"eta_eff": eta, "w_norm": w1, "u_norm": un, "cos_uw": cos}


def adamw_equilibrium(lr: float, weight_decay: float, beta1: float, numel: int) -> Optional[dict]:
    """AdamW's predicted equilibrium for a matrix of ``numel`` elements (None without decay)."""
    if lr <= 0 or weight_decay <= 0:
        return None
    return {"w_norm": math.sqrt(lr * numel / (2.0 * weight_decay)),
            "eta_eff": math.sqrt(2.0 * lr * weight_decay * (1.0 - beta1) / (1.0 + beta1)),
            "transient_steps": 1.0 / (2.0 * lr * weight_decay)}


def _diag_dominance(V: torch.Tensor) -> tuple[float, float, float]:
    G = V @ V.mT
    m = G.shape[0]
    if m < 2:
        return float("nan"), float("nan"), float("nan")
    diag = G.diagonal()
    off = (G.abs().sum(dim=1) - diag.abs()) / (m - 1)
    r = diag / off.clamp_min(torch.finfo(G.dtype).tiny)
    return float(r.mean()), float(r.min()), float(r.max())


# --------------------------------------------------------------------- on (sharded) matrices
def matrix_step_stats(shard: MatrixShard, w_before: torch.Tensor, w_after: torch.Tensor) -> dict:
    """:func:`step_stats` of one logical matrix from this rank's local pieces (a collective
    over the shard's groups: every rank of them calls it, in the same order)."""
    sums = shard.total_sums(step_sums(w_before, w_after))
    return step_stats(*(float(s) for s in sums.tolist()))


def gain_stats(shard: MatrixShard, g_r: torch.Tensor, g_c: torch.Tensor) -> dict:
    """Mean and standard deviation of ``softplus(g_r)`` over rows and ``softplus(g_c)`` over
    columns (local gain vectors of ``shard``'s ``row_range``/``col_range``; a collective)."""
    local = tuple(shard.local_shape)
    s_r = torch.broadcast_to(shard.rows(F.softplus(g_r.to(torch.float64))), local)
    s_c = torch.broadcast_to(shard.cols(F.softplus(g_c.to(torch.float64))), local)
    sums = shard.total_sums([s_r, s_r * s_r, s_c, s_c * s_c]).tolist()
    n = shard.d_out * shard.d_in
    out = {}
    for key, (s1, s2) in (("gain_row", sums[0:2]), ("gain_col", sums[2:4])):
        mean = s1 / n
        out[key + "_mean"] = mean
        out[key + "_std"] = math.sqrt(max(s2 / n - mean * mean, 0.0))
    return out


def rmnp_diagnostics(shard: MatrixShard, momentum: torch.Tensor, *, eps: float = 1e-8,
                     ns_coefficients: Sequence | str = "jordan") -> dict:
    """Row-normalization vs Newton–Schulz distance and diagonal dominance of ``V Vᵀ`` for one
    logical matrix (``momentum``: this rank's local piece; gathers the whole matrix)."""
    V = gather_full(shard, momentum).to(torch.float32)
    U_ns = newton_schulz(V, resolve_coefficients(ns_coefficients), dtype=torch.float32)
    U_row = V / (V.norm(dim=-1, keepdim=True) + eps)
    ns_norm, row_norm = float(U_ns.norm()), float(U_row.norm())
    if ns_norm > 0 and row_norm > 0:
        dist = float((U_ns - U_row).norm()) / ns_norm
        matched = float((U_ns - U_row * (ns_norm / row_norm)).norm()) / ns_norm
    else:
        dist = matched = float("nan")
    r_avg, r_min, r_max = _diag_dominance(V.to(torch.float64))
    return {"row_vs_ns": dist, "row_vs_ns_matched": matched, "dd_avg": r_avg, "dd_min": r_min, "dd_max": r_max}
