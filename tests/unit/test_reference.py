"""Sanity tests of the readable reference optimizers alone (no product code involved)."""

import math

import pytest
import torch

from megatron_md.optim import reference as ref

SHAPES = [(24, 12), (12, 24), (16, 16)]  # tall, wide, square
STEPS = 10


def _well_conditioned(m, n, cond, seed, dtype=torch.float32):
    """Random m×n matrix with singular values log-spaced in [1/cond, 1]."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0.0, -math.log10(cond), k, dtype=torch.float64)
    return ((U * s) @ V.T).to(dtype)


def _scalar_band(coeffs, lo):
    """Range of the scalar NS polynomial iterates over starting singular values in [lo, 1]."""
    x = torch.linspace(lo, 1.0, 100001, dtype=torch.float64)
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x.min().item(), x.max().item()


def _grads(shapes, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(steps)]


def _params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen) for s in shapes]


# ----------------------------------------------------------------------------------------------
# coefficients / scale factors / polar
# ----------------------------------------------------------------------------------------------


def test_coefficients_resolution():
    jordan = (3.4445, -4.7750, 2.0315)
    assert ref.NS_COEFFICIENTS["jordan"] == [jordan]
    assert len(ref.NS_COEFFICIENTS["quintic"]) == 5
    assert ref.coefficients("jordan", None) == [jordan] * 5
    assert ref.coefficients("jordan", 3) == [jordan] * 3
    q = ref.NS_COEFFICIENTS["quintic"]
    assert ref.coefficients("quintic", None) == q
    assert ref.coefficients("quintic", 2) == q[:2]
    assert ref.coefficients("quintic", 7) == q + [q[-1], q[-1]]
    explicit = [(1.5, -0.5, 0.0), (2.0, -1.0, 0.0)]
    assert ref.coefficients(explicit, None) == explicit
    assert ref.coefficients(explicit, 2) == explicit
    with pytest.raises(ValueError):
        ref.coefficients(explicit, 3)
    with pytest.raises(ValueError):
        ref.coefficients("nope", 5)


def test_scale_factors():
    assert ref.scale_factor("shape_scaling", 64, 16) == pytest.approx(2.0)
    assert ref.scale_factor("shape_scaling", 16, 64) == pytest.approx(1.0)
    assert ref.scale_factor("unit_rms", 16, 64) == pytest.approx(0.5)
    assert ref.scale_factor("shape_up", 16, 64) == pytest.approx(2.0)
    assert ref.scale_factor("shape_up", 64, 16) == pytest.approx(2.0)
    assert ref.scale_factor("rms_match", 16, 64) == pytest.approx(0.2 * 8.0)
    assert ref.scale_factor("none", 3, 5) == 1.0
    with pytest.raises(ValueError):
        ref.scale_factor("bogus", 2, 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_is_exact_polar_factor(shape):
    X = _well_conditioned(*shape, cond=50.0, seed=1, dtype=torch.float64)
    Q = ref.polar(X)
    assert Q.dtype == X.dtype and Q.shape == X.shape
    k = min(shape)
    gram = Q.T @ Q if shape[0] >= shape[1] else Q @ Q.T
    torch.testing.assert_close(gram, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-10)
    # X = Q H with H = Qᵀ X symmetric positive semi-definite (tall/square case); wide: X = H Q.
    H = Q.T @ X if shape[0] >= shape[1] else X @ Q.T
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(H).min() > 0


# ----------------------------------------------------------------------------------------------
# Newton–Schulz
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(64, 8)])
@pytest.mark.parametrize("name", ["jordan", "quintic"])
def test_newton_schulz_singular_value_band(shape, name):
    # cond ≤ 10 and min(m, n) ≤ 16 give normalized singular values σ/‖X‖_F ≥ 1/(10·4) > 0.02,
    # where the scalar polynomial iteration maps [0.02, 1] into
    #   jordan  [0.6818, 1.1344]   (a wide band: the jordan coefficients do not converge to 1)
    #   quintic [0.9778, 1.0318]   (much tighter near 1).
    coeffs = ref.coefficients(name, None)
    lo, hi = _scalar_band(coeffs, 0.02)
    if name == "jordan":
        assert 0.68 < lo < 0.69 and 1.13 < hi < 1.14
    else:
        assert 0.97 < lo < 0.98 and 1.03 < hi < 1.04
    tol = 2e-3  # fp32 rounding
    for seed, cond in [(0, 1.5), (1, 10.0)]:
        X = _well_conditioned(*shape, cond=cond, seed=seed)
        O = ref.newton_schulz(X, coeffs)
        assert O.dtype == torch.float32 and O.shape == X.shape
        s = torch.linalg.svdvals(O.double())
        assert s.min().item() > lo - tol, (shape, name, s.min().item())
        assert s.max().item() < hi + tol, (shape, name, s.max().item())
    # Random Gaussian inputs of aspect ratio ≥ 2 are well conditioned as well.
    if shape[0] != shape[1]:
        torch.manual_seed(3)
        s = torch.linalg.svdvals(ref.newton_schulz(torch.randn(*shape), coeffs).double())
        assert lo - tol < s.min().item() and s.max().item() < hi + tol


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_cubic_converges_to_polar(shape):
    X = _well_conditioned(*shape, cond=20.0, seed=4)
    cubic = [(1.5, -0.5, 0.0)] * 40
    O = ref.newton_schulz(X, cubic)
    torch.testing.assert_close(O, ref.polar(X.double()).float(), rtol=0, atol=1e-4)


def test_newton_schulz_bf16_runs_and_is_close():
    X = _well_conditioned(16, 32, cond=5.0, seed=5)
    coeffs = ref.coefficients("quintic", None)
    O32 = ref.newton_schulz(X, coeffs)
    O16 = ref.newton_schulz(X, coeffs, dtype=torch.bfloat16)
    assert O16.dtype == torch.float32
    assert (O16 - O32).norm() / O32.norm() < 5e-2


def test_newton_schulz_is_scale_invariant_and_transposes():
    X = _well_conditioned(20, 12, cond=5.0, seed=6)
    coeffs = ref.coefficients("jordan", None)
    torch.testing.assert_close(ref.newton_schulz(3.0 * X, coeffs), ref.newton_schulz(X, coeffs))
    torch.testing.assert_close(ref.newton_schulz(X.T, coeffs), ref.newton_schulz(X, coeffs).T)


# ----------------------------------------------------------------------------------------------
# Muon family: single-step properties
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_muon_first_step(shape):
    W0 = _params([shape], 10)[0]
    G = _grads([shape], 1, 11)[0][0]
    lr, wd = 0.02, 0.1
    opt = ref.Muon([W0], lr=lr, weight_decay=wd, momentum=0.0, nesterov=False)
    opt.step([G])
    O = ref.newton_schulz(G, ref.coefficients("jordan", 5))
    expected = (1 - lr * wd) * W0 - lr * ref.scale_factor("shape_scaling", *shape) * O
    torch.testing.assert_close(opt.params[0], expected)


def test_muon_nesterov_momentum_direction():
    shape = (12, 24)
    W0 = _params([shape], 12)[0]
    g1, g2 = (gs[0] for gs in _grads([shape], 2, 13))
    mu = 0.9
    opt = ref.Muon([W0], momentum=mu, scale="none", lr=0.1)
    opt.step([g1])
    opt.step([g2])
    M1 = (1 - mu) * g1
    M2 = mu * M1 + (1 - mu) * g2
    U2 = (1 - mu) * g2 + mu * M2
    U1 = (1 - mu) * g1 + mu * M1
    coeffs = ref.coefficients("jordan", None)
    expected = W0 - 0.1 * ref.newton_schulz(U1, coeffs) - 0.1 * ref.newton_schulz(U2, coeffs)
    torch.testing.assert_close(opt.params[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[0]["momentum_buffer"], M2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("step_form", ["rescale", "rms_match"])
def test_normuon_update_norm(shape, step_form):
    W0 = _params([shape], 14)[0]
    lr = 0.02
    opt = ref.NorMuon([W0], lr=lr, step_form=step_form)
    W = W0.clone()
    for (G,) in _grads([shape], 3, 15):
        opt.step([G])
        delta = opt.params[0] - W
        W = opt.params[0]
        m, n = shape
        if step_form == "rms_match":
            # η̂ = 0.2 η sqrt(mn)/‖Ô‖_F, so the step norm is exactly 0.2 η sqrt(mn).
            assert delta.norm().item() == pytest.approx(0.2 * lr * math.sqrt(m * n), rel=1e-5)
        else:
            # ‖Ô‖ is rescaled to ‖O‖; O = NS(U) has ‖O‖_F ≈ sqrt(min(m, n)) within the NS band.
            scale = ref.scale_factor("shape_scaling", m, n)
            r = delta.norm().item() / (lr * scale * math.sqrt(min(m, n)))
            assert 0.6 < r < 1.2
    assert opt.state[0]["row_second_moment"].shape == (shape[0],)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmnp_rows_have_unit_norm_update(shape):
    W0 = _params([shape], 16)[0]
    lr, wd = 3e-3, 0.1
    opt = ref.RMNP([W0], lr=lr, weight_decay=wd)
    (G,) = _grads([shape], 1, 17)[0]
    opt.step([G])
    delta = opt.params[0] - (1 - lr * wd) * W0
    row_norms = delta.norm(dim=-1)
    scale = ref.scale_factor("shape_scaling", *shape)
    torch.testing.assert_close(row_norms, torch.full_like(row_norms, lr * scale), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------------------------
# Hyperball (AdamH / MuonH)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ref.AdamH, ref.MuonH])
def test_hyperball_keeps_radius(cls):
    params = _params(SHAPES, 18)
    radii = [p.norm().item() for p in params]
    opt = cls(params, lr=0.05)
    for grads in _grads(SHAPES, STEPS, 19):
        before = opt.params
        opt.step(grads)
        for p, b, r in zip(opt.params, before, radii):
            assert p.norm().item() == pytest.approx(r, rel=1e-5)
            assert not torch.equal(p, b)


def test_adamh_first_step_angle():
    # Step 1 of Adam: u = g/(|g| + eps) ≈ sign(g); W' = W − η ρ u/‖u‖, so the angle moved is
    # atan(η) when u ⟂ W, and in any case the step is a rotation of at most η radians.
    shape = (16, 16)
    W0 = _params([shape], 20)[0]
    opt = ref.AdamH([W0], lr=0.01)
    opt.step(_grads([shape], 1, 21)[0])
    W1 = opt.params[0]
    cos = (W0 * W1).sum() / (W0.norm() * W1.norm())
    assert 0 < torch.arccos(cos.clamp(-1, 1)).item() <= 0.01 + 1e-4


# ----------------------------------------------------------------------------------------------
# MD decoupling (AdamMD / MuonMD)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ref.AdamMD, ref.MuonMD])
@pytest.mark.parametrize("radius_scale", [1.0, 0.25])
def test_md_sphere_and_factorization(cls, radius_scale):
    params = _params(SHAPES, 22)
    opt = cls(params, lr=0.02, radius_scale=radius_scale)
    radii = [math.sqrt(max(s)) * radius_scale for s in SHAPES]
    # Construction: projected onto the sphere, gains = 1 (g = softplus⁻¹(1) = log(e − 1)).
    for i, (p, R) in enumerate(zip(opt.params, radii)):
        assert p.norm().item() == pytest.approx(R, rel=1e-6)
        s_r, s_c = opt.gains(i)
        torch.testing.assert_close(s_r, torch.ones_like(s_r))
        torch.testing.assert_close(s_c, torch.ones_like(s_c))
        torch.testing.assert_close(opt.direction(i), p)
        assert opt.state[i]["g_r"][0].item() == pytest.approx(math.log(math.e - 1), rel=1e-6)
    for grads in _grads(SHAPES, STEPS, 23):
        opt.step(grads)
        for i, (p, R) in enumerate(zip(opt.params, radii)):
            D = opt.direction(i)
            s_r, s_c = opt.gains(i)
            assert D.norm().item() == pytest.approx(R, rel=1e-5)
            torch.testing.assert_close(p, s_r[:, None] * D * s_c[None, :], rtol=1e-5, atol=1e-6)
    # The gains moved away from 1.
    s_r, s_c = opt.gains(0)
    assert (s_r - 1).abs().max() > 1e-3 and (s_c - 1).abs().max() > 1e-3


def test_md_gain_gradient_matches_autograd():
    # ∇g_r = sigmoid(g_r) ⊙ (P @ s_c) and ∇g_c = sigmoid(g_c) ⊙ (Pᵀ @ s_r), P = D ⊙ G, are
    # dL/dg for W = s_r D s_cᵀ and L = <G, W>. With β1 = 0 the gains' first moment after one
    # step is exactly that gradient, so compare it with autograd.
    shape = (12, 24)
    W0 = _params([shape], 24)[0]
    opt = ref.AdamMD([W0], betas=(0.0, 0.99))
    (G,) = _grads([shape], 1, 25)[0]
    D = opt.direction(0).clone()
    g_r = opt.state[0]["g_r"].clone().requires_grad_(True)
    g_c = opt.state[0]["g_c"].clone().requires_grad_(True)
    W = torch.nn.functional.softplus(g_r)[:, None] * D * torch.nn.functional.softplus(g_c)[None, :]
    (W * G).sum().backward()
    opt.step([G])
    torch.testing.assert_close(opt.state[0]["g_r_exp_avg"], g_r.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[0]["g_c_exp_avg"], g_c.grad, rtol=1e-5, atol=1e-6)


def test_md_rejects_weight_decay():
    with pytest.raises(ValueError):
        ref.AdamMD([torch.randn(4, 4)], weight_decay=0.1)
    with pytest.raises(ValueError):
        ref.MuonMD([torch.randn(4, 4)], weight_decay=0.1)


# ----------------------------------------------------------------------------------------------
# Schedule-free
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(lr=0.01, weight_decay=0.1, warmup_steps=4),
        dict(lr=0.005, betas=(0.8, 0.99), weight_decay=0.05, r=1.0, weight_lr_power=1.0),
    ],
)
def test_sf_adamw_matches_schedulefree(kwargs):
    schedulefree = pytest.importorskip("schedulefree")
    shapes = SHAPES + [(7,)]
    init = _params(shapes, 26)
    torch_params = [torch.nn.Parameter(p.clone()) for p in init]
    sf = schedulefree.AdamWScheduleFree(torch_params, **kwargs)
    sf.train()
    opt = ref.SFAdamW(init, **kwargs)
    for grads in _grads(shapes, STEPS, 27):
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()  # schedulefree divides .grad in place
        sf.step()
        opt.step(grads)
        for a, b in zip(opt.params, torch_params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
        for i, p in enumerate(torch_params):
            torch.testing.assert_close(opt.state[i]["z"], sf.state[p]["z"], rtol=1e-5, atol=1e-6)
    sf.eval()
    for a, b in zip(opt.eval_params(), torch_params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    # params (y) are unaffected by reading eval_params.
    sf.train()
    for a, b in zip(opt.params, torch_params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_sf_adamw_weight_decay_at_z_differs_and_is_consistent():
    shape = (8, 8)
    init = _params([shape], 28)
    grads = _grads([shape], 3, 29)
    at_y = ref.SFAdamW(init, lr=0.01, weight_decay=0.5, weight_decay_at="y")
    at_z = ref.SFAdamW(init, lr=0.01, weight_decay=0.5, weight_decay_at="z")
    # Step 1: y = z = x, so the placement does not matter.
    at_y.step(grads[0])
    at_z.step(grads[0])
    torch.testing.assert_close(at_y.params[0], at_z.params[0])
    for g in grads[1:]:
        at_y.step(g)
        at_z.step(g)
    assert not torch.allclose(at_y.params[0], at_z.params[0])


def _sf_identity_check(opt, beta):
    for i, y in enumerate(opt.params):
        z = opt.state[i]["z"]
        x = opt.eval_params()[i]
        torch.testing.assert_close(y, (1 - beta) * z + beta * x)


@pytest.mark.parametrize("shape", SHAPES)
def test_sf_normuon_first_step_and_iterates(shape):
    m, n = shape
    W0 = _params([shape], 30)[0]
    lr, wd = 0.01, 0.05
    opt = ref.SFNorMuon([W0], lr=lr, weight_decay=wd)
    grads = _grads([shape], STEPS, 31)
    opt.step(grads[0])
    # Step 1: c = 1 so x = y = z = (1 − ηλ) W0 − η̂ P̂ with ‖η̂ P̂‖_F = 0.2 η sqrt(mn).
    y1 = opt.params[0]
    torch.testing.assert_close(y1, opt.state[0]["z"])
    torch.testing.assert_close(y1, opt.eval_params()[0])
    step = y1 - (1 - lr * wd) * W0
    assert step.norm().item() == pytest.approx(0.2 * lr * math.sqrt(m * n), rel=1e-5)
    for g in grads[1:]:
        opt.step(g)
        _sf_identity_check(opt, 0.9)
    assert opt.k == STEPS


def test_sf_normuon_matches_memory_efficient_form():
    # The spec's y-only update y ← (1−c) y + c z + (1 − β(1−c)) Δ, z ← z + Δ, driven by the
    # reference's own Δ = z_new − z_old, must reproduce the explicit three-iterate reference.
    shape = (12, 24)
    W0 = _params([shape], 32)[0]
    beta = 0.9
    opt = ref.SFNorMuon([W0], lr=0.02, warmup_steps=3)
    y = W0.clone()
    z = W0.clone()
    weight_sum, lr_max = 0.0, 0.0
    for k, g in enumerate(_grads([shape], STEPS, 33)):
        z_old = opt.state[0]["z"].clone() if "z" in opt.state[0] else W0.clone()
        opt.step(g)
        delta = opt.state[0]["z"] - z_old
        eta_t = 0.02 * min(1.0, (k + 1) / 3)
        lr_max = max(lr_max, eta_t)
        weight_sum += lr_max**2
        c = lr_max**2 / weight_sum
        y = (1 - c) * y + c * z + (1 - beta * (1 - c)) * delta
        z = z + delta
        torch.testing.assert_close(opt.params[0], y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [ref.SFAdamW, ref.SFNorMuon])
def test_sf_none_grad_skips_param(cls):
    params = _params([(8, 4), (4, 8)], 34)
    opt = cls(params)
    grads = _grads([(8, 4), (4, 8)], 2, 35)
    opt.step([grads[0][0], None])
    torch.testing.assert_close(opt.params[1], params[1], rtol=0, atol=0)
    assert "z" not in opt.state[1]
    assert opt.k == 1
    opt.step(grads[1])
    assert "z" in opt.state[1]


# ----------------------------------------------------------------------------------------------
# AdamW and None-grad handling
# ----------------------------------------------------------------------------------------------


def test_adamw_matches_torch():
    shapes = SHAPES + [(5,)]
    init = _params(shapes, 36)
    torch_params = [torch.nn.Parameter(p.clone()) for p in init]
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    topt = torch.optim.AdamW(torch_params, **kwargs)
    opt = ref.AdamW(init, **kwargs)
    for step, grads in enumerate(_grads(shapes, STEPS, 37)):
        if step % 3 == 1:
            grads = list(grads)
            grads[1] = None  # skipped: no state advance on either side
        for p, g in zip(torch_params, grads):
            p.grad = None if g is None else g.clone()
        topt.step()
        opt.step(grads)
        for a, b in zip(opt.params, torch_params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert opt.state[1]["step"] == topt.state[torch_params[1]]["step"].item()


@pytest.mark.parametrize(
    "cls", [ref.Muon, ref.NorMuon, ref.RMNP, ref.AdamH, ref.MuonH, ref.AdamMD, ref.MuonMD, ref.AdamW]
)
def test_none_grad_skips_param(cls):
    shapes = [(8, 4), (4, 8)]
    params = _params(shapes, 38)
    opt = cls(params)
    before = opt.params
    (g0, _), _ = _grads(shapes, 2, 39)
    opt.step([g0, None])
    torch.testing.assert_close(opt.params[1], before[1], rtol=0, atol=0)
    assert "step" not in opt.state[1]
    assert not torch.equal(opt.params[0], before[0])
    assert opt.state[0]["step"] == 1


def test_reference_owns_its_copies():
    p = torch.randn(6, 3)
    keep = p.clone()
    opt = ref.Muon([p])
    opt.step([torch.randn(6, 3)])
    torch.testing.assert_close(p, keep, rtol=0, atol=0)
    out = opt.params
    out[0].zero_()
    assert opt.params[0].abs().sum() > 0
