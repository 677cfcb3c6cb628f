"""Effective-LR telemetry math (megatron_md.telemetry) on constructed cases and real optimizers."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_md import telemetry as tm
from megatron_md.optim import RMNP, AdamH, MuonMD
from megatron_md.shard import Whole


def _stats(w0, w1):
    return tm.matrix_step_stats(Whole(w0.shape), w0, w1)


def _orthonormal_pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    a /= a.norm()
    b -= (a * b).sum() * a
    b /= b.norm()
    return a, b


@pytest.mark.parametrize("theta", [1e-4, 1e-2, 0.3, 1.0, 2.5])
def test_rotation_by_theta_gives_two_sin_half_theta(theta):
    a, b = _orthonormal_pair((24, 40), 0)
    r = 3.7
    w0 = (r * a).float()
    w1 = (r * (math.cos(theta) * a + math.sin(theta) * b)).float()
    s = _stats(w0, w1)
    # float32 weights: the rotation itself is represented to ~1e-7 of |w| per element
    assert s["eta_eff"] == pytest.approx(2 * math.sin(theta / 2), rel=2e-3 if theta < 1e-3 else 1e-5)
    assert s["w_norm"] == pytest.approx(r, rel=1e-6)
    # u = w1 - w0 makes the angle (pi + theta)/2 with w0
    assert s["cos_uw"] == pytest.approx(math.cos((math.pi + theta) / 2), abs=2e-3 if theta < 1e-3 else 1e-5)


@pytest.mark.parametrize("c", [0.5, 0.999, 1.0, 1.7])
def test_pure_rescaling_has_zero_effective_lr(c):
    w0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    s = _stats(w0, w0 * c)
    assert s["eta_eff"] == pytest.approx(0.0, abs=1e-6)
    assert s["w_norm"] == pytest.approx(c * float(w0.double().norm()), rel=1e-6)
    if c != 1.0:
        assert abs(s["cos_uw"]) == pytest.approx(1.0, abs=1e-6)


def test_small_step_is_not_lost_to_cancellation():
    # a naive sqrt(2 - 2 cos) in float32 would return 0 or ~3e-4 for this 1e-6 step
    a, b = _orthonormal_pair((64, 64), 2)
    w0, w1 = a, (math.cos(1e-6) * a + math.sin(1e-6) * b)
    assert _stats(w0, w1)["eta_eff"] == pytest.approx(1e-6, rel=1e-6)


def test_adamh_effective_lr_equals_its_lr_to_first_order():
    torch.manual_seed(0)
    lr = 1e-3
    W = torch.nn.Parameter(torch.randn(96, 64) * 0.05)
    opt = AdamH([W], lr=lr)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        before = W.detach().clone()
        opt.step()
        s = _stats(before, W.detach())
        # first order: eta * |u_perp| / |u| = eta * sqrt(1 - cos^2); second order: O(eta^2)
        cos = s["cos_uw"]
        assert s["eta_eff"] == pytest.approx(lr, rel=0.02)
        assert s["w_norm"] == pytest.approx(float(before.double().norm()), rel=1e-6)  # the hyperball
        assert abs(cos) < lr  # the retraction's update is nearly tangent


def test_adamw_equilibrium_predictions_match_a_simulated_adamw():
    """Pure-noise gradients: AdamW's weight norm and effective LR settle where the formulas say."""
    torch.manual_seed(0)
    lr, wd, beta1 = 0.01, 0.5, 0.9
    W = torch.nn.Parameter(torch.randn(32, 32) * 0.01)
    opt = torch.optim.AdamW([W], lr=lr, weight_decay=wd, betas=(beta1, 0.999))
    pred = tm.adamw_equilibrium(lr, wd, beta1, W.numel())
    assert pred["transient_steps"] == pytest.approx(100.0)
    etas, norms = [], []
    for t in range(1500):
        W.grad = torch.randn_like(W)
        before = W.detach().clone()
        opt.step()
        if t >= 1000:
            s = _stats(before, W.detach())
            etas.append(s["eta_eff"])
            norms.append(s["w_norm"])
    assert sum(norms) / len(norms) == pytest.approx(pred["w_norm"], rel=0.1)
    assert sum(etas) / len(etas) == pytest.approx(pred["eta_eff"], rel=0.1)
    assert tm.adamw_equilibrium(lr, 0.0, beta1, 10) is None


def test_md_gain_statistics():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(12, 20))
    opt = MuonMD([W], lr=0.05)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        opt.step()
    m = opt.mats_of(W)[0]
    s = tm.gain_stats(m.shard, m.vec["g_r"], m.vec["g_c"])
    s_r, s_c = (torch.nn.functional.softplus(m.vec[k].double()) for k in ("g_r", "g_c"))
    assert torch.allclose(s_r.float(), opt.gains(W)[0])
    assert s["gain_row_mean"] == pytest.approx(float(s_r.mean()), rel=1e-12)
    assert s["gain_row_std"] == pytest.approx(float(s_r.std(unbiased=False)), rel=1e-9)
    assert s["gain_col_mean"] == pytest.approx(float(s_c.mean()), rel=1e-12)
    assert s["gain_col_std"] == pytest.approx(float(s_c.std(unbiased=False)), rel=1e-9)
    assert s["gain_row_std"] > 0  # the gains moved


def test_rmnp_diagnostics_on_constructed_and_trained_matrices():
    # orthogonal rows: V V^T is diagonal (infinitely dominant), and NS(V) ~ the row-normalized V
    q, _ = torch.linalg.qr(torch.randn(40, 10, dtype=torch.float64))
    V = (q.T * torch.linspace(0.5, 2.0, 10, dtype=torch.float64)[:, None]).float()   # 10 x 40, orthogonal rows
    d = tm.rmnp_diagnostics(Whole(V.shape), V)
    assert d["dd_min"] > 1e4
    assert d["row_vs_ns"] < 0.35 and d["row_vs_ns_matched"] < 0.35  # jordan NS: singular values in [0.68, 1.14]
    # the ratios by their definition, with explicit loops
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 9))
    opt = RMNP([W], lr=0.01)
    for _ in range(2):
        W.grad = torch.randn_like(W)
        opt.step()
    M = opt.mats_of(W)[0].state["momentum_buffer"].double()
    G = M @ M.T
    r = [float(G[i, i]) / (sum(abs(float(G[i, j])) for j in range(6) if j != i) / 5) for i in range(6)]
    d = tm.rmnp_diagnostics(Whole(W.shape), opt.mats_of(W)[0].state["momentum_buffer"])
    assert d["dd_avg"] == pytest.approx(sum(r) / 6, rel=1e-6)
    assert d["dd_min"] == pytest.approx(min(r), rel=1e-6) and d["dd_max"] == pytest.approx(max(r), rel=1e-6)
    # wide matrix: rows of the polar factor have unit norm, so both distances agree
    assert d["row_vs_ns"] == pytest.approx(d["row_vs_ns_matched"], rel=0.2)
