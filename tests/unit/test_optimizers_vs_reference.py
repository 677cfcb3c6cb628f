"""Every optimizer equals its line-by-line reference for >= 10 steps (fp32, rtol 1e-5)."""
import pytest
import torch

from megatron_md import optim
from megatron_md.optim import reference as ref

SHAPES = [(48, 16), (16, 40), (24, 24)]  # tall, wide, square
STEPS = 10
RTOL, ATOL = 1e-5, 1e-6

CASES = {
    "Muon": dict(lr=0.02, weight_decay=0.1),
    "Muon-quintic-nonesterov": dict(lr=0.02, nesterov=False, ns_coefficients="quintic", scale="rms_match"),
    "NorMuon": dict(lr=0.02, weight_decay=0.1),
    "NorMuon-rms_match": dict(lr=0.02, step_form="rms_match", weight_decay=0.05),
    "RMNP": dict(lr=3e-3, weight_decay=0.1),
    "AdamH": dict(lr=0.01),
    "MuonH": dict(lr=0.01),
    "AdamMD": dict(lr=3e-3, gains_lr=1e-2),
    "AdamMD-rows": dict(lr=3e-3, gains_lr=1e-2, sphere="rows"),  # MD's output-head rule
    "MuonMD": dict(lr=0.01),
    "MuonMD-jordan": dict(lr=0.01, ns_coefficients="jordan"),
    "MuonMD-rows": dict(lr=0.01, sphere="rows", scale="none"),  # the authors' MoE-router rule
    # a radius scale ρ: the step of D scales with it (default) or not
    "MuonMD-radius": dict(lr=0.01, radius_scale=0.5, gains_lr=3e-3),
    "MuonMD-radius-unscaled": dict(lr=0.01, radius_scale=0.5, radius_scales_update=False),
    "AdamMD-radius-unscaled": dict(lr=3e-3, radius_scale=0.5, radius_scales_update=False),
    "SFAdamW": dict(lr=0.01, weight_decay=0.1, warmup_steps=3),
    "SFNorMuon": dict(lr=0.01, weight_decay=0.05, warmup_steps=4),
    "SFNorMuon-nesterov-r": dict(lr=0.01, nesterov=True, r=1.0, weight_decay=0.1),
}


def _cls(name):
    return name.split("-")[0]


def _grads(seed, step):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case):
    torch.manual_seed(0)
    init = [torch.randn(s) * 0.1 for s in SHAPES]
    kw = CASES[case]
    ours_params = [torch.nn.Parameter(w.clone()) for w in init]
    kw_ours = dict(kw)
    if _cls(case) in ("Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon"):
        kw_ours["ns_dtype"] = torch.float32
    opt = getattr(optim, _cls(case))(ours_params, **kw_ours)
    oracle = getattr(ref, _cls(case))([w.clone() for w in init], **kw)
    for t in range(STEPS):
        grads = _grads(1, t)
        for p, g in zip(ours_params, grads):
            p.grad = g.clone()
        opt.step()
        oracle.step([g.clone() for g in grads])
        for i, (p, q) in enumerate(zip(ours_params, oracle.params)):
            torch.testing.assert_close(p.detach(), q, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{case} step {t} param {i} {SHAPES[i]}: {m}")
    for p, w in zip(ours_params, init):
        assert (p.detach() - w).abs().max() > 1e-4, f"{case}: parameters did not move"
    if hasattr(oracle, "eval_params"):
        opt.eval()
        for p, q in zip(ours_params, oracle.eval_params()):
            torch.testing.assert_close(p.detach(), q, rtol=RTOL, atol=ATOL)
    if hasattr(oracle, "gains"):
        for i, p in enumerate(ours_params):
            for a, b in zip(opt.gains(p), oracle.gains(i)):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(opt.direction(p), oracle.direction(i), rtol=RTOL, atol=ATOL)


def test_unit_row_embedding_matches_reference():
    """MD's embedding rule as the Megatron builder runs it (torch AdamW foreach + project_rows_)
    equals the reference UnitRowAdam; every row has unit norm after every step."""
    from megatron_md.optim.md import project_rows_
    from megatron_md.shard import Whole

    torch.manual_seed(0)
    init = [torch.randn(s) * 0.1 for s in SHAPES]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    shards = [Whole(s) for s in SHAPES]
    with torch.no_grad():
        project_rows_(params, shards)
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=True)
    oracle = ref.UnitRowAdam([w.clone() for w in init], lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for t in range(STEPS):
        grads = _grads(2, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        project_rows_(params, shards)
        oracle.step([g.clone() for g in grads])
        for p, q in zip(params, oracle.params):
            torch.testing.assert_close(p.detach(), q, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(p.detach().norm(dim=1), torch.ones(p.shape[0]), rtol=1e-6, atol=1e-6)
    assert all((p.detach() - w / w.norm(dim=1, keepdim=True)).abs().max() > 1e-4 for p, w in zip(params, init))


def test_rows_sphere_head_keeps_unit_rows_and_moves_gains():
    """AdamMD(sphere="rows"): D's rows stay unit-norm, the fused W = s_r D s_c changes row norms."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 16))
    opt = optim.AdamMD([p], lr=3e-3, sphere="rows")
    for t in range(5):
        p.grad = torch.randn(24, 16)
        opt.step()
        torch.testing.assert_close(opt.direction(p).norm(dim=1), torch.ones(24), rtol=1e-5, atol=1e-6)
    s_r, s_c = opt.gains(p)
    assert (s_r - 1).abs().max() > 1e-3 and (s_c - 1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sphere"):
        optim.AdamMD([torch.nn.Parameter(torch.randn(4, 4))], sphere="ball")



@pytest.mark.parametrize("cls", ["MuonMD", "AdamMD"])
def test_radius_scale_keeps_the_angular_step(cls):
    """With the gains frozen and the same gradients, D/‖D‖ follows the same path at radius scale 1
    and 0.25 when the step scales with the radius (the authors' rule): only the radius differs. With
    ``radius_scales_update=False`` the smaller sphere takes larger angular steps."""
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]

    def run(rho, scaled):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        kw = dict(lr=0.02, gains_lr=0.0, radius_scale=rho, radius_scales_update=scaled)
        if cls == "MuonMD":
            kw["ns_dtype"] = torch.float32
        opt = getattr(optim, cls)(params, **kw)
        for t in range(5):
            for p, g in zip(params, _grads(3, t)):
                p.grad = g
            opt.step()
        return [opt.direction(p) / opt.direction(p).norm() for p in params]

    same = run(1.0, True)
    for a, b in zip(same, run(0.25, True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(same, run(0.25, False))) > 1e-3


@pytest.mark.parametrize("cls", ["MuonMD", "AdamMD"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("foreach", [True, False])
def test_fused_qkv_column_gains_match_reference(cls, shared, foreach):
    """Q, K, V of a fused GQA weight (one parameter, Megatron's interleaved rows) against the
    reference on the three separate matrices: with ``shared_qkv_col_gains`` one column gain for all
    three (the reference's ``col_groups``), else one each; multi-tensor and per-matrix paths."""
    from megatron_md.shard import fused_qkv

    groups, heads, hd, d_in = 2, 2, 4, 12
    blocks = fused_qkv(num_query_groups=groups, heads_per_group=heads, head_dim=hd, d_in=d_in)
    shapes = [(groups * heads * hd, d_in), (groups * hd, d_in), (groups * hd, d_in)]

    def fuse(q, k, v):
        return torch.cat([torch.cat([q[g * heads * hd:(g + 1) * heads * hd], k[g * hd:(g + 1) * hd],
                                     v[g * hd:(g + 1) * hd]]) for g in range(groups)])

    torch.manual_seed(0)
    init = [torch.randn(s) * 0.3 for s in shapes]
    p = torch.nn.Parameter(fuse(*init))
    kw = dict(lr=0.02, gains_lr=0.01)
    if cls == "MuonMD":
        kw["ns_dtype"] = torch.float32
    opt = getattr(optim, cls)([p], shards={p: blocks}, shared_qkv_col_gains=shared, **kw)
    opt.foreach = foreach
    oracle = getattr(ref, cls)([w.clone() for w in init], col_groups=[[0, 1, 2]] if shared else [], **kw)
    g = torch.Generator().manual_seed(5)
    for t in range(6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        p.grad = fuse(*grads)
        opt.step()
        oracle.step(grads)
        torch.testing.assert_close(p.detach(), fuse(*oracle.params), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"step {t}: {m}")
    cols = [opt.gains(p, b)[1] for b in range(3)]
    assert (cols[0] - 1).abs().max() > 1e-3, "column gains did not move"
    assert all(torch.equal(c, cols[0]) for c in cols) == shared
    for b in range(3):
        for a, r in zip(opt.gains(p, b), oracle.gains(b)):
            torch.testing.assert_close(a, r, rtol=RTOL, atol=ATOL)
