"""Oracles nobody here wrote: torch.optim.Muon, schedulefree, the SVD polar factor."""
import pytest
import torch

from megatron_md import optim
from megatron_md.ops import newton_schulz, resolve_coefficients
from megatron_md.optim import reference as ref

SHAPES = [(64, 32), (32, 80), (48, 48)]


def _well_conditioned(m, n, cond=8.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k)
    return (u[:, :k] * s) @ v[:, :k].T


@pytest.mark.parametrize("shape", SHAPES)
def test_muon_follows_torch_optim_muon_bf16(shape):
    torch.manual_seed(1)
    w0 = torch.randn(shape) * 0.05
    ours = torch.nn.Parameter(w0.clone())
    theirs = torch.nn.Parameter(w0.clone())
    a = optim.Muon([ours], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, ns_coefficients="jordan",
                   scale="shape_scaling", ns_dtype=torch.bfloat16)
    b = torch.optim.Muon([theirs], lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True,
                         adjust_lr_fn="original")
    for t in range(10):
        g = torch.randn(shape)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
        # same bf16 op sequence as torch's NS: equal up to fp32 rounding of the update
        torch.testing.assert_close(ours.detach() - w0, theirs.detach() - w0, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, warmup_steps=3), dict(r=1.0, weight_lr_power=1.0)])
def test_sfadamw_equals_schedulefree(kw):
    schedulefree = pytest.importorskip("schedulefree", reason="schedulefree (test extra) is the oracle")
    torch.manual_seed(2)
    init = [torch.randn(s) for s in [(16, 8), (8,), (4, 4, 3)]]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    a = optim.SFAdamW(ours, lr=0.01, **kw)
    b = schedulefree.AdamWScheduleFree(theirs, lr=0.01, foreach=False, **kw)
    a.train()
    b.train()
    for t in range(12):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
        if t % 4 == 3:  # eval mode (x) agrees too, and train() comes back
            a.eval()
            b.eval()
            for p, q in zip(ours, theirs):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
            a.train()
            b.train()


@pytest.mark.parametrize("shape", SHAPES + [(5, 200)])
@pytest.mark.parametrize("coeffs", ["jordan", "quintic"])
def test_newton_schulz_band_and_polar(shape, coeffs):
    x = _well_conditioned(*shape, cond=8.0)
    y = newton_schulz(x, resolve_coefficients(coeffs), dtype=torch.float32)
    s = torch.linalg.svdvals(y)
    lo, hi = {"jordan": (0.68, 1.14), "quintic": (0.97, 1.04)}[coeffs]
    assert lo <= s.min() and s.max() <= hi, (s.min(), s.max())
    # the polar factor U Vᵀ: every singular value is mapped into the band, vectors are kept
    polar = ref.polar(x)
    rel = (y - polar).norm() / polar.norm()
    # jordan deliberately stops short of convergence: singular values in [0.68, 1.14]
    assert rel < {"jordan": 0.32, "quintic": 0.03}[coeffs], rel
    # a convergent cubic schedule reaches the polar factor to fp32 precision
    y40 = newton_schulz(x, [(1.5, -0.5, 0.0)] * 40)
    torch.testing.assert_close(y40, polar, atol=1e-4, rtol=1e-4)


def test_newton_schulz_batched_equals_loop():
    x = torch.randn(3, 24, 40)
    c = resolve_coefficients("quintic")
    torch.testing.assert_close(newton_schulz(x, c), torch.stack([newton_schulz(m, c) for m in x]),
                               rtol=1e-5, atol=1e-5)


def test_newton_schulz_matches_reference_bf16():
    x = torch.randn(32, 48)
    c = resolve_coefficients("jordan")
    ours = newton_schulz(x, c, dtype=torch.bfloat16)
    theirs = ref.newton_schulz(x, list(c), dtype=torch.bfloat16)
    assert ours.dtype == torch.float32
    # two bf16 op orders differ by a few bf16 ulps amplified through 5 iterations
    assert (ours - theirs).norm() / theirs.norm() < 6e-2
