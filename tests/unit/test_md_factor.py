"""MD's ``init="factor"`` (W kept, gains factored from it) and the ``to-md`` conversion, single process.

* ``reference.factor_gains``: W = diag(s_r) D diag(s_c) with ‖D‖_F = R and rows of equal norm
  (unit rows for the rows sphere), column gains 1, zero rows gain ``ZERO_ROW_GAIN`` (~0);
* AdamMD / MuonMD / AdamMD(sphere="rows") with ``init="factor"`` on Whole, fused-QKV and expert
  blocks: W bit for bit unchanged, gains equal the reference, 4 steps equal the reference (the
  multi-tensor and the per-matrix step); weights loaded after construction are factored before
  the first step; a restored state that has stepped is not factored again;
* validation: ``init`` values, ``--md-init factor`` with ``--md-embedding-unit-norm``, a to-md
  checkpoint loaded without its flags (Megatron-LM directories are left alone);
* ``checkpoint.md.to_md`` on a hand-built driver checkpoint: the same bytes of weights, no optimizer
  state, a verified manifest with the record; MD, schedule-free, converted and missing inputs and
  an existing output are refused.
"""
from __future__ import annotations

import argparse
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_md.optim import AdamMD, MuonMD
from megatron_md.optim import reference as ref
from megatron_md.shard import fused_qkv, stacked_experts

KINDS = {
    "AdamMD": (AdamMD, ref.AdamMD, dict(lr=0.01)),
    "AdamMD_rows": (AdamMD, ref.AdamMD, dict(lr=0.01, sphere="rows")),
    "MuonMD": (MuonMD, ref.MuonMD, dict(lr=0.02, ns_dtype=torch.float32)),
}


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _trained_like(shape, seed, zero_row=None):
    """A matrix with row norms spread over two decades (as training leaves them)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * torch.logspace(-1, 1, shape[0])[:, None]
    if zero_row is not None:
        W[zero_row] = 0
    return W


# ------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("shape", [(13, 10), (10, 13)])
@pytest.mark.parametrize("sphere", ["frobenius", "rows"])
def test_reference_factoring_keeps_w_and_puts_d_on_the_sphere(shape, sphere):
    W = _trained_like(shape, 0, zero_row=4)
    R = 1.0 if sphere == "rows" else math.sqrt(max(shape)) * 0.7
    g_r, g_c = ref.factor_gains(W, R, sphere)
    s_r, s_c = F.softplus(g_r), F.softplus(g_c)
    D = W / (s_r[:, None] * s_c[None, :])
    _close(s_r[:, None] * D * s_c[None, :], W, "W = s_r D s_c")
    _close(s_c, torch.ones(shape[1]), "column gains")
    assert s_r[4].item() == pytest.approx(ref.ZERO_ROW_GAIN, rel=1e-3) and not D[4].any()
    norms = D.norm(dim=1)[torch.arange(shape[0]) != 4]
    if sphere == "rows":
        _close(norms, torch.full_like(norms, R), "unit rows")
    else:
        _close(D.norm(), torch.tensor(R), "‖D‖_F")
        _close(norms, torch.full_like(norms, norms[0].item()), "equal rows")
    assert torch.isfinite(g_r).all()


def test_reference_project_and_factor_differ_only_in_the_start():
    W = _trained_like((8, 6), 1)
    proj, fact = ref.AdamMD([W], lr=0.01), ref.AdamMD([W], lr=0.01, init="factor")
    assert torch.equal(fact.params[0], W) and not torch.allclose(proj.params[0], W)
    _close(fact.direction(0).norm(), torch.tensor(math.sqrt(8.0)), "‖D‖_F")
    with pytest.raises(ValueError, match="init"):
        ref.AdamMD([W], lr=0.01, init="keep")


# --------------------------------------------------------------------------------- the product
def _blocks_case(kind):
    """(layout or None, global param tensor, logical blocks of it)."""
    if kind == "whole":
        W = _trained_like((13, 10), 2, zero_row=3)
        return None, W, [W]
    if kind == "qkv":  # 2 query groups of 2 heads, head dim 3 (GQA): per group [q q k v]
        groups, heads, hd, d_in = 2, 2, 3, 7
        lay = fused_qkv(num_query_groups=groups, heads_per_group=heads, head_dim=hd, d_in=d_in)
        q, k, v = (_trained_like((groups * n * hd, d_in), s) for s, n in ((3, heads), (4, 1), (5, 1)))
        rows = [torch.cat([q[g * heads * hd:(g + 1) * heads * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]])
                for g in range(groups)]
        return lay, torch.cat(rows), [q, k, v]
    lay = stacked_experts(3, 5, 4)
    experts = [_trained_like((5, 4), 6 + e) for e in range(3)]
    return lay, torch.stack(experts), experts


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_zero_row_stays_near_zero_while_its_direction_moves(name):
    """A zero row (an imported head's padded vocabulary row) gets a ~0 gain: after 3 steps W's row is
    still ~0 — also on the rows sphere, where the step renormalizes the direction's row to the
    sphere's norm — and the other rows moved as usual."""
    cls, _, kw = KINDS[name]
    W = _trained_like((13, 10), 2, zero_row=3)
    p = nn.Parameter(W.clone())
    opt = cls([p], init="factor", **kw)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        p.grad = torch.randn(W.shape, generator=g)
        opt.step()
    if kw.get("sphere") == "rows":
        assert opt.direction(p, 0)[3].norm() > 0.1, "the direction's zero row did not move"
    assert p.detach()[3].abs().max() < 1e-9, p.detach()[3]
    assert (p.detach() - W).abs().max() > 1e-3


@pytest.mark.parametrize("foreach", [True, False], ids=["multi-tensor", "per-matrix"])
@pytest.mark.parametrize("kind", ["whole", "qkv", "experts"])
@pytest.mark.parametrize("name", sorted(KINDS))
def test_factor_init_equals_reference(name, kind, foreach):
    cls, ref_cls, kw = KINDS[name]
    lay, W, blocks = _blocks_case(kind)
    p = nn.Parameter(W.clone())
    opt = cls([p], init="factor", shards={p: lay} if lay is not None else None, **kw)
    opt.foreach = foreach
    # Q, K, V share one column gain (the default): the reference's col_groups
    oracle = ref_cls(blocks, init="factor", col_groups=[[0, 1, 2]] if kind == "qkv" else [], **kw)
    assert torch.equal(p.detach(), W), "construction changed W"
    g = torch.Generator().manual_seed(9)
    for t in range(5):
        for k in range(len(blocks)):
            s_r, s_c = opt.gains(p, k)
            _close(s_r, oracle.gains(k)[0], f"t={t} block {k} row gains")
            _close(s_c, oracle.gains(k)[1], f"t={t} block {k} col gains")
            _close(opt.direction(p, k).detach(), oracle.direction(k), f"t={t} block {k} D")
        if t == 4:
            break
        grads = [torch.randn(b.shape, generator=g) for b in blocks]
        full = _blocks_case(kind)[1].clone()  # the same layout, filled with the block gradients
        if kind == "whole":
            full = grads[0]
        else:
            for k, gr in enumerate(grads):
                lay.views[k].put(full, gr)
        p.grad = full
        opt.step()
        oracle.step(grads)
    for k in range(len(blocks)):
        got = lay.views[k].get(p.detach()) if lay is not None else p.detach()
        _close(got, oracle.params[k], f"block {k} W after 4 steps")


@pytest.mark.parametrize("name", sorted(KINDS))
def test_weights_loaded_after_construction_are_factored_before_the_first_step(name):
    cls, ref_cls, kw = KINDS[name]
    W_init, W_loaded = _trained_like((9, 12), 11), _trained_like((9, 12), 12, zero_row=0)
    p = nn.Parameter(W_init.clone())
    opt = cls([p], init="factor", **kw)
    with torch.no_grad():
        p.copy_(W_loaded)  # the driver's --load comes after the optimizer is built
    oracle = ref_cls([W_loaded], init="factor", **kw)
    g = torch.Generator().manual_seed(3)
    for t in range(3):
        G = torch.randn(9, 12, generator=g)
        p.grad = G.clone()
        opt.step()
        oracle.step([G])
        _close(p.detach(), oracle.params[0], f"W after step {t + 1}")
        _close(opt.gains(p)[0], oracle.gains(0)[0], f"row gains after step {t + 1}")


def test_zero_gradient_step_keeps_the_factored_model():
    W = _trained_like((9, 12), 13)
    p = nn.Parameter(W.clone())
    opt = MuonMD([p], lr=0.05, init="factor", ns_dtype=torch.float32)
    s_r = opt.gains(p)[0].clone()
    p.grad = torch.zeros_like(W)
    opt.step()
    _close(p.detach(), W, "W after a zero-gradient step")
    assert torch.equal(opt.gains(p)[0], s_r)
    proj = nn.Parameter(W.clone())  # the paper's start: onto the sphere, a different model
    MuonMD([proj], lr=0.05, ns_dtype=torch.float32)
    assert (proj.detach() - W).norm() > 0.5 * W.norm()


def test_restored_state_that_has_stepped_is_not_factored_again():
    W = _trained_like((9, 12), 14)
    p = nn.Parameter(W.clone())
    opt = AdamMD([p], lr=0.01, init="factor")
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(9, 12, generator=g) for _ in range(4)]
    for G in grads[:2]:
        p.grad = G.clone()
        opt.step()
    saved_w, saved = p.detach().clone(), copy.deepcopy(opt.state_dict())
    for G in grads[2:]:
        p.grad = G.clone()
        opt.step()
    q = nn.Parameter(torch.randn(9, 12))  # a fresh run: built on other weights, then restored
    opt2 = AdamMD([q], lr=0.01, init="factor")
    with torch.no_grad():
        q.copy_(saved_w)
    opt2.load_state_dict(saved)
    for G in grads[2:]:
        q.grad = G.clone()
        opt2.step()
    assert torch.equal(q.detach(), p.detach())


def test_factor_gains_method_refactors_now():
    W = _trained_like((6, 5), 15)
    p = nn.Parameter(W.clone())
    opt = AdamMD([p], lr=0.01)  # projected: W on the sphere, gains 1
    with torch.no_grad():
        p.copy_(W)
    opt.factor_gains_()
    _close(opt.gains(p)[0], F.softplus(ref.factor_gains(W, math.sqrt(6.0))[0]), "row gains")
    with pytest.raises(ValueError, match="init='keep'"):
        AdamMD([nn.Parameter(W.clone())], lr=0.01, init="keep")


# ------------------------------------------------------------------------------ configuration
def test_md_init_flag_and_its_incompatible_embedding_rule():
    from megatron_md.megatron.config import MDConfig, validate
    md = MDConfig(optimizer="muon-md", md_init="factor")
    with pytest.raises(ValueError, match="--no-md-embedding-unit-norm") as err:
        validate(md)
    assert "--md-init factor" in str(err.value)
    validate(MDConfig(optimizer="muon-md", md_init="factor", md_embedding_unit_norm=False))
    validate(MDConfig(optimizer="adam", md_init="factor"))  # MD's recipe flags do not concern AdamW
    with pytest.raises(ValueError, match="--md-init"):
        MDConfig(md_init="keep")


def _fake_checkpoint(root, optimizer="adam", iteration=3, extra_topology=None, world=2):
    """A driver checkpoint directory as save_checkpoint writes it (two rank files)."""
    from megatron_md.checkpoint import integrity as ck
    topo = {"layout": {"world_size": world, "tp": world, "pp": 1, "vpp": None, "ep": 1, "etp": 1, "dp": 1},
            "optim": {"optimizer": optimizer, "use_distributed_optimizer": False, "dp_mode": "auto",
                      "split_qkv": True, "precision": "fp32"},
            "model": {"num_layers": 1}, "info": {}, **(extra_topology or {})}
    staging = ck.checkpoint_dir(root, iteration) + ".tmp1"
    os.makedirs(staging)
    files, weights = {}, []
    for r in range(world):
        w = {"decoder.layers.0.mlp.linear_fc1.weight": torch.randn(4, 3), "embedding.word_embeddings.weight":
             torch.randn(5, 3)}
        weights.append(w)
        state = {"format": ck.FORMAT, "iteration": iteration, "topology": topo, "coords": {"tp": r},
                 "model": [w], "optimizer": [{"inner": {"state": {0: torch.ones(2)}}}], "scheduler": {"x": 1},
                 "rng": {"torch": torch.get_rng_state()}, "extra": {"train": {1: 2.0}}, "model_x": None}
        path = os.path.join(staging, f"rank_{r:05d}.pt")
        ck.atomic_torch_save(state, path)
        files[f"rank_{r:05d}.pt"] = {"bytes": os.path.getsize(path), "sha256": ck.sha256(path)}
    ck.publish(root, iteration, staging, ck.checkpoint_dir(root, iteration),
                {"format": ck.FORMAT, "iteration": iteration, "topology": topo, "files": files})
    return weights


def test_to_md_writes_the_same_weights_without_optimizer_state(tmp_path):
    from megatron_md.checkpoint.md import RESUME_FLAGS, TO_MD_KEY, to_md
    from megatron_md.checkpoint import integrity as ck
    src, out = str(tmp_path / "adam"), str(tmp_path / "md")
    weights = _fake_checkpoint(src)
    got = to_md(src, out)
    assert got["iteration"] == 3 and got["from"] == "adam" and got["resume_flags"] == list(RESUME_FLAGS)
    man = ck.read_manifest(out, 3)
    assert man["topology"][TO_MD_KEY]["from"] == "adam" and man["topology"]["optim"]["optimizer"].startswith("none")
    for r, w in enumerate(weights):
        name = f"rank_{r:05d}.pt"
        state = ck.load_verified(os.path.join(ck.checkpoint_dir(out, 3), name), man["files"][name])
        assert state["optimizer"] is None and state["scheduler"] is None and state["coords"] == {"tp": r}
        assert all(torch.equal(state["model"][0][k], v) for k, v in w.items())


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"), ("muon-md", "already MD"), ("sf-normuon", "sf-to-x first"),
    ("converted", "already MD-ready"), ("existing_out", "already a checkpoint directory")])
def test_to_md_refuses(tmp_path, case, needle):
    from megatron_md.checkpoint.md import TO_MD_KEY, to_md
    from megatron_md.errors import CheckpointError
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    if case in ("muon-md", "sf-normuon"):
        _fake_checkpoint(src, optimizer=case)
    elif case == "converted":
        _fake_checkpoint(src, extra_topology={TO_MD_KEY: {"from": "adam"}})
    elif case == "existing_out":
        _fake_checkpoint(src)
        _fake_checkpoint(out)
    with pytest.raises(CheckpointError, match=needle) as err:
        to_md(src, out)
    assert "\n" not in str(err.value)


def _ns(load, **kw):
    return argparse.Namespace(load=load, ckpt_step=None, no_load_optim=False, **kw)


def test_a_to_md_checkpoint_names_the_flags_it_needs(tmp_path):
    from megatron_md.checkpoint.md import check_resume, to_md
    from megatron_md.megatron.config import MDConfig
    src, out = str(tmp_path / "adam"), str(tmp_path / "md")
    _fake_checkpoint(src)
    to_md(src, out)
    md = MDConfig(optimizer="muon-md")
    with pytest.raises(ValueError) as err:
        check_resume(md, _ns(out))
    for flag in ("--no-load-optim", "--md-init factor", "--no-md-embedding-unit-norm", "to-md"):
        assert flag in str(err.value)
    ok = MDConfig(optimizer="muon-md", md_init="factor", md_embedding_unit_norm=False)
    with pytest.raises(ValueError, match="pass --no-load-optim"):
        check_resume(ok, _ns(out))
    check_resume(ok, argparse.Namespace(load=out, ckpt_step=3, no_load_optim=True))
    check_resume(MDConfig(optimizer="adam"), argparse.Namespace(load=out, ckpt_step=None, no_load_optim=True))
    check_resume(md, _ns(src))  # not converted: the driver's own checks apply


def test_other_load_directories_are_left_to_their_loaders(tmp_path):
    from megatron_md.checkpoint.md import check_resume
    from megatron_md.megatron.config import MDConfig
    md = MDConfig(optimizer="muon-md")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")  # Megatron-LM's tracker
    check_resume(md, _ns(str(tmp_path)))
    check_resume(md, _ns(str(tmp_path / "nothing")))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    os.makedirs(tmp_path / "iter_0000005")
    (tmp_path / "iter_0000005" / "manifest.json").write_text("{not json")
    check_resume(md, _ns(str(tmp_path)))


def test_a_to_md_checkpoint_resumes_in_bf16_with_its_flags(tmp_path):
    """A weights-only load refreshes the bf16 wrapper's fp32 main copies (checkpointing calls
    reload_model_params; tests/megatron/test_checkpoint_failures.py shows the weights survive),
    so bf16 needs no extra flag; the to-md flags are still required."""
    from megatron_md.checkpoint.md import check_resume, to_md
    from megatron_md.megatron.config import MDConfig
    src, out = str(tmp_path / "adam"), str(tmp_path / "md")
    _fake_checkpoint(src)
    to_md(src, out)
    ok = MDConfig(optimizer="muon-md", md_init="factor", md_embedding_unit_norm=False)
    check_resume(ok, argparse.Namespace(load=out, ckpt_step=None, no_load_optim=True, bf16=True))
    with pytest.raises(ValueError, match="--md-init factor"):
        check_resume(MDConfig(optimizer="muon-md", md_embedding_unit_norm=False),
                 argparse.Namespace(load=out, ckpt_step=None, no_load_optim=True, bf16=True))