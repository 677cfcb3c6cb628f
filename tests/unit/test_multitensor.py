"""The multi-tensor step (``foreach=True``, the default) equals the per-matrix step
(``foreach=False``) over several steps: mixed shapes, mixed dtypes, parameters holding several
logical matrices (fused QKV with row-index views, stacked and transposed experts), two param
groups with different hyperparameters, and a parameter without a gradient. (Empty ZeRO ranges
need several ranks: tests/distributed/test_bucketed.py.)"""
import pytest
import torch

from megatron_md import optim
from megatron_md.shard import Reductions, Whole, fused_qkv, grouped_mlp_experts, stacked_experts

STEPS = 6
NS = {"Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon"}
CASES = {
    "Muon": dict(weight_decay=0.1),
    "Muon-plain": dict(nesterov=False, scale="rms_match"),
    "NorMuon": dict(weight_decay=0.1),
    "NorMuon-rms_match": dict(step_form="rms_match", weight_decay=0.05),
    "RMNP": dict(weight_decay=0.1),
    "RMNP-plain": dict(nesterov=False),
    "AdamH": dict(),
    "MuonH": dict(),
    "AdamMD": dict(gains_lr=1e-2),
    "AdamMD-rows": dict(gains_lr=1e-2, sphere="rows"),
    "MuonMD": dict(),
    "SFNorMuon": dict(weight_decay=0.05, warmup_steps=2),
    "SFNorMuon-nesterov": dict(nesterov=True),
}


def _params(dtype_mix):
    """(tensors, layouts): plain matrices of several shapes/dtypes and three Blocks params."""
    g = torch.Generator().manual_seed(0)
    ts, lays = [], []
    for i, shape in enumerate([(24, 16), (16, 40), (24, 16), (9, 9), (1, 7)]):
        dt = dtype_mix[i % len(dtype_mix)]
        ts.append(torch.randn(shape, generator=g).to(dt) * 0.3)
        lays.append(Whole(shape))
    qkv = fused_qkv(num_query_groups=2, heads_per_group=2, head_dim=3, d_in=10)   # Q 12×10, K, V 6×10
    ts.append(torch.randn(qkv.local_shape, generator=g) * 0.3)
    lays.append(qkv)
    ex = stacked_experts(3, 5, 8)
    ts.append(torch.randn(ex.local_shape, generator=g) * 0.3)
    lays.append(ex)
    gm = grouped_mlp_experts(2, 6, 4, stored_shape=(4, 12))                       # transposed views
    ts.append(torch.randn(gm.local_shape, generator=g) * 0.3)
    lays.append(gm)
    return ts, lays


def _build(name, ts, lays, foreach):
    cls = name.split("-")[0]
    kw = dict(CASES[name])
    if cls in NS:
        kw["ns_dtype"] = torch.float32
    ps = [torch.nn.Parameter(t.clone()) for t in ts]
    second = dict(lr=0.5 * (0.02 if cls in NS else 0.01))
    if "radius_scale" in getattr(optim, cls)(  # MD methods: a second group with another radius
            [torch.nn.Parameter(torch.randn(4, 4))], **kw).defaults:
        second["radius_scale"] = 0.7
    groups = [{"params": ps[:3]}, {"params": ps[3:], **second}]
    opt = getattr(optim, cls)(groups, shards=dict(zip(ps, lays)), **kw)
    opt.foreach = foreach
    return opt, ps


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)], ids=["fp32", "fp32+fp64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_multi_tensor_equals_per_matrix(name, dtypes):
    ts, lays = _params(dtypes)
    fast, p_fast = _build(name, ts, lays, True)
    slow, p_slow = _build(name, ts, lays, False)
    g = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        grads = [torch.randn(x.shape, generator=g).to(x.dtype) for x in ts]
        for i, (a, b) in enumerate(zip(p_fast, p_slow)):
            # param 3 has no gradient at odd steps: its state must not advance in either path
            a.grad = None if (i == 3 and t % 2) else grads[i].clone()
            b.grad = None if (i == 3 and t % 2) else grads[i].clone()
        fast.step()
        slow.step()
        for i, (a, b) in enumerate(zip(p_fast, p_slow)):
            assert a.dtype == b.dtype == ts[i].dtype
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} step {t} param {i}: {m}")
    for a, x in zip(p_fast, ts):
        assert (a.detach() - x).abs().max() > 1e-4, f"{name}: a parameter did not move"
    sd_fast, sd_slow = fast.state_dict()["state"], slow.state_dict()["state"]
    for k in sd_slow:
        assert sd_fast[k].keys() == sd_slow[k].keys()
        for key, v in sd_slow[k].items():  # param-shaped and per-block ("block<b>.<key>") state
            torch.testing.assert_close(torch.as_tensor(sd_fast[k][key]), torch.as_tensor(v), rtol=1e-5, atol=1e-6)


def test_sfadamw_multi_tensor_keeps_per_param_semantics():
    """SF-AdamW runs one foreach per group; a param without grad keeps its state unchanged."""
    g = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 3), (7,), (2, 2)]]
    opt = optim.SFAdamW(ps, lr=0.01, weight_decay=0.1)
    z1 = opt.state[ps[1]]["z"].clone()
    for p in (ps[0], ps[2]):
        p.grad = torch.randn(p.shape, generator=g)
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert torch.equal(opt.state[ps[1]]["z"], z1) and torch.equal(ps[1].detach(), before[1])
    assert not torch.equal(ps[0].detach(), before[0]) and not torch.equal(ps[2].detach(), before[2])


def test_reductions_bucket_equals_immediate_single_process():
    """Without process groups a bucket is the plain local reduction (rows, cols, totals, squares)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) for s in [(4, 6), (3, 3), (6, 2)]]
    red = Reductions()
    pend = [(red.row_sum(Whole(x.shape), x), red.col_sum(Whole(x.shape), x, square=True),
             red.total_sums(Whole(x.shape), [x, x.abs()], square=True)) for x in xs]
    with pytest.raises(RuntimeError, match="before Reductions.flush"):
        pend[0][0].value
    red.flush()
    for x, (r, c, t) in zip(xs, pend):
        torch.testing.assert_close(r.value, x.sum(-1))
        torch.testing.assert_close(c.value, (x * x).sum(0))
        torch.testing.assert_close(t.value, torch.stack([(x * x).sum(), (x * x).sum()]))
