"""Validation, non-finite skipping, schedule-free swaps, MD invariants, routing, blocks."""
import copy
import math

import pytest
import torch
from torch import nn

from megatron_md import optim
from megatron_md.optim import reference as ref
from megatron_md.shard import Whole, concatenated_experts, fused_qkv, grouped_mlp_experts, stacked_experts

MATRIX = ["Muon", "NorMuon", "RMNP", "AdamH", "MuonH", "AdamMD", "MuonMD", "SFNorMuon"]
ALL = MATRIX + ["SFAdamW"]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in [(12, 8), (8, 20)]]


def _snapshot(opt):
    def flat(v):
        if torch.is_tensor(v):
            return [v.clone()]
        if isinstance(v, dict):
            return [x for k in sorted(v) for x in flat(v[k])]
        if isinstance(v, (list, tuple)):
            return [x for e in v for x in flat(e)]
        return [v]
    return [x for p in sorted(opt.state, key=id) for x in flat(opt.state[p])] + \
        [x for g in opt.param_groups for k in sorted(g) if k != "params" for x in flat(g[k])]


# ------------------------------------------------------------------------------------ bad input
HAS_EPS = [n for n in ALL if n not in ("Muon", "MuonH")]


@pytest.mark.parametrize("name,kw,arg", [(n, dict(lr=-1.0), "lr") for n in ALL] +
                         [(n, dict(eps=0.0), "eps") for n in HAS_EPS])
def test_invalid_hyperparameters_name_the_argument(name, kw, arg):
    with pytest.raises(ValueError, match=rf"{arg}=.*{list(kw.values())[0]}"):
        getattr(optim, name)(_params(), **kw)


@pytest.mark.parametrize("name,kw,arg", [
    ("AdamH", dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0"),
    ("AdamMD", dict(betas=(-0.1, 0.9)), r"betas\[0\]=-0.1"),
    ("SFAdamW", dict(betas=(0.9,)), r"betas=\(0.9,\)"),
    ("Muon", dict(ns_steps=0), r"ns_steps=0"),
    ("MuonMD", dict(ns_coefficients="cubic"), r"ns_coefficients='cubic'"),
    ("NorMuon", dict(scale="bogus"), r"scale='bogus'"),
    ("NorMuon", dict(step_form="other"), r"step_form='other'"),
    ("Muon", dict(momentum=1.0), r"momentum=1.0"),
    ("Muon", dict(ns_mode="scatter"), r"ns_mode='scatter'"),
    ("MuonMD", dict(weight_decay=0.1), r"weight_decay=0.1"),
    ("AdamH", dict(weight_decay=0.1), r"weight_decay=0.1"),
    ("SFAdamW", dict(warmup_steps=-3), r"warmup_steps=-3"),
    ("SFAdamW", dict(weight_decay_at="x"), r"weight_decay_at='x'"),
    ("Muon", dict(ns_coefficients=[(3.0, -3.0, 1.0)], ns_steps=5), r"ns_steps=5"),
])
def test_invalid_values(name, kw, arg):
    with pytest.raises(ValueError, match=arg):
        getattr(optim, name)(_params(), **kw)


@pytest.mark.parametrize("name", MATRIX)
def test_one_d_tensor_rejected_by_matrix_optimizers(name):
    with pytest.raises(ValueError, match=r"1-D tensor of shape \(5,\)"):
        getattr(optim, name)([nn.Parameter(torch.randn(5))])


def test_layout_shape_mismatch_rejected():
    p = nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="does not match its declared layout"):
        optim.Muon([p], shards={p: Whole((4, 6))})


# ----------------------------------------------------------------------------- non-finite grads
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_whole_step(name, bad):
    params = _params()
    opt = getattr(optim, name)(params)
    for p in params:  # one good step so the state is non-trivial
        p.grad = torch.randn_like(p)
    opt.step()
    before_p = [p.detach().clone() for p in params]
    before_s = _snapshot(opt)
    params[0].grad = torch.randn_like(params[0])
    params[1].grad = torch.randn_like(params[1])
    params[1].grad[3, 2] = bad  # only one element of the *second* param
    opt.step()
    assert opt.skipped_steps == 1
    for a, b in zip(before_p, [p.detach() for p in params]):
        assert torch.equal(a, b)
    after_s = _snapshot(opt)
    assert len(before_s) == len(after_s)
    for a, b in zip(before_s, after_s):
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b)
    # and the next finite step proceeds
    params[1].grad = torch.randn_like(params[1])
    opt.step()
    assert opt.skipped_steps == 1 and not torch.equal(before_p[1], params[1].detach())


def test_optimizer_set_skips_both_optimizers():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    opt = optim.build_optimizer(model, "muon", lr=0.02, adam_lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[2].weight.grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert all(len(o.state) == 0 or name != "adamw" for name, o in opt.optimizers.items())


# ------------------------------------------------------------------------------ schedule-free
@pytest.mark.parametrize("name", ["SFAdamW", "SFNorMuon"])
def test_eval_then_train_restores_exactly(name):
    params = _params()
    opt = getattr(optim, name)(params, lr=0.01)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    y = [p.detach().clone() for p in params]
    opt.eval()
    x = [p.detach().clone() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    opt.train()
    assert all(torch.equal(a, p.detach()) for a, p in zip(y, params))
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()


# ------------------------------------------------------------------------------- MD invariants
@pytest.mark.parametrize("name", ["AdamMD", "MuonMD"])
def test_md_sphere_and_fused_weight(name):
    params = _params()
    opt = getattr(optim, name)(params, lr=0.02)
    for p in params:  # projected at construction
        R = math.sqrt(max(p.shape))
        assert abs(p.detach().norm().item() - R) < 1e-4 * R
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        for p in params:
            s_r, s_c = opt.gains(p)
            D = opt.direction(p)
            R = math.sqrt(max(p.shape))
            assert abs(D.norm().item() - R) < 1e-5 * R
            torch.testing.assert_close(s_r[:, None] * D * s_c[None, :], p.detach(), rtol=1e-6, atol=1e-7)
    assert any((opt.gains(p)[0] - 1).abs().max() > 1e-4 for p in params)


# ------------------------------------------------------------------------------------- routing
class TinyGPT(nn.Module):
    def __init__(self, tie=False):
        super().__init__()
        self.tok_emb = nn.Embedding(50, 16)
        self.qkv = nn.Linear(16, 48)
        self.fc1 = nn.Linear(16, 32, bias=False)
        self.ln_f = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.pos = nn.Parameter(torch.zeros(8, 16))  # a raw 2-D parameter: not a hidden matrix
        if tie:
            self.lm_head.weight = self.tok_emb.weight


def test_routing_rules():
    roles = {r: [n for n, _ in ps] for r, ps in optim.classify(TinyGPT()).items()}
    assert roles["matrix"] == ["qkv.weight", "fc1.weight"]
    assert roles["embedding"] == ["tok_emb.weight"]
    assert roles["output"] == ["lm_head.weight"]
    assert roles["vector"] == ["qkv.bias", "ln_f.weight", "ln_f.bias"]
    assert roles["other"] == ["pos"]  # 2-D, but not a Linear weight: never guessed to be a matrix
    tied = {r: [n for n, _ in ps] for r, ps in optim.classify(TinyGPT(tie=True)).items()}
    assert tied["embedding"] == ["tok_emb.weight"] and tied["output"] == []


def test_build_optimizer_routes_every_param_once():
    model = TinyGPT()
    for name in optim.OPTIMIZER_NAMES:
        opt = optim.build_optimizer(model, name, lr=0.01, adam_lr=1e-3)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters()), name
    with pytest.raises(ValueError, match="optimizer='lion'"):
        optim.build_optimizer(model, "lion", lr=0.01)


# --------------------------------------------------------------------------- blocks (1 process)
def _block_matrices(blocks, t):
    return [v.get(t).clone() for v in blocks.views]


@pytest.mark.parametrize("name", ["Muon", "NorMuon", "MuonMD", "AdamMD", "AdamH", "SFNorMuon"])
@pytest.mark.parametrize("layout", ["qkv", "stacked", "concat0", "concat1", "grouped"])
def test_blocks_equal_reference_per_logical_matrix(name, layout):
    torch.manual_seed(3)
    if layout == "qkv":  # 8 query heads, 2 groups (GQA), head dim 4, hidden 32
        blocks = fused_qkv(num_query_groups=2, heads_per_group=4, head_dim=4, d_in=32)
    elif layout == "stacked":
        blocks = stacked_experts(3, 12, 8)
    elif layout == "concat0":
        blocks = concatenated_experts(3, 12, 8, dim=0)
    elif layout == "concat1":
        blocks = concatenated_experts(3, 12, 8, dim=1)
    else:
        blocks = grouped_mlp_experts(3, 12, 8, stored_shape=(8, 36))
    p = nn.Parameter(torch.randn(blocks.local_shape) * 0.1)
    kw = dict(ns_dtype=torch.float32) if name in ("Muon", "NorMuon", "MuonMD", "SFNorMuon") else {}
    opt = getattr(optim, name)([p], lr=0.01, shards={p: blocks}, **kw)
    # MD: Q, K, V of a fused QKV share one column gain (the default): the reference's col_groups
    shared = dict(col_groups=[[0, 1, 2]]) if name in ("MuonMD", "AdamMD") and layout == "qkv" else {}
    oracle = getattr(ref, name)(_block_matrices(blocks, p.detach()), lr=0.01, **shared)
    if name in ("MuonMD", "AdamMD"):  # both projected each block onto its own sphere
        for a, b in zip(_block_matrices(blocks, p.detach()), oracle.params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for t in range(5):
        g = torch.randn(blocks.local_shape)
        p.grad = g
        opt.step()
        oracle.step(_block_matrices(blocks, g))
        for a, b in zip(_block_matrices(blocks, p.detach()), oracle.params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["MuonMD", "NorMuon", "AdamH"])
def test_state_is_flat_and_named_per_block(name):
    """Every state value of a fused-QKV param (its Q, K and V blocks; 2 query groups) is one tensor or
    scalar under a flat string key: param-shaped tensors by name, per-block state as
    ``block<b>.<key>``; a state dict of the nested layout (``"mats"``: a list of dicts) of
    earlier releases loads into the same state, and both continue identically."""
    torch.manual_seed(5)
    blocks = fused_qkv(num_query_groups=2, heads_per_group=2, head_dim=4, d_in=16)
    def make():
        p = nn.Parameter(torch.randn(blocks.local_shape) * 0.1)
        kw = dict(ns_dtype=torch.float32) if name != "AdamH" else {}
        return p, getattr(optim, name)([p], lr=0.01, shards={p: blocks}, **kw)
    p, opt = make()
    for _ in range(2):
        p.grad = torch.randn(blocks.local_shape)
        opt.step()
    st = opt.state[p]
    assert all(isinstance(k, str) for k in st)
    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in st.values()), st
    nblocks = len(blocks.views)
    per_block = {k.split(".", 1)[1] for k in st if k.startswith("block")}
    blocks_seen = {k.split(".", 1)[0] for k in st if k.startswith("block")}
    assert per_block and blocks_seen == {f"block{b}" for b in range(nblocks)}
    assert all(f"block{b}.{k}" in st for b in range(nblocks) for k in per_block)
    assert all(st[f"block{b}.step"] == 2 for b in range(nblocks))
    assert any(torch.is_tensor(v) and v.shape == p.shape for v in st.values())  # param-shaped state kept whole

    sd = copy.deepcopy(opt.state_dict())  # torch's load_state_dict keeps (aliases) the tensors it is given
    legacy = {**sd, "state": {}}
    for i, s in sd["state"].items():
        flat = {k: v for k, v in s.items() if not k.startswith("block")}
        flat["mats"] = [{k.split(".", 1)[1]: v for k, v in s.items() if k.startswith(f"block{b}.")}
                        for b in range(nblocks)]
        legacy["state"][i] = flat
    q, new = make()
    q2, old = make()
    with torch.no_grad():
        q.copy_(p)
        q2.copy_(p)
    new.load_state_dict(copy.deepcopy(sd))
    old.load_state_dict(copy.deepcopy(legacy))
    assert old.state[q2].keys() == new.state[q].keys() == st.keys()
    g = torch.randn(blocks.local_shape)
    for x, o in ((p, opt), (q, new), (q2, old)):
        x.grad = g.clone()
        o.step()
    assert torch.equal(q, p) and torch.equal(q2, p)
