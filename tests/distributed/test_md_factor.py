"""MD's ``init="factor"`` on every sharded layout equals the single-process reference.

One spawned gloo group per world size (2 and 4) reuses the layouts of
``test_sharded_optimizers.py`` (TP dim 0/1 even and uneven, ZeRO flat ranges over Whole and over
a TP shard with mid-row, empty and one-element pieces, fused GQA QKV blocks, experts stacked and
concatenated, with and without expert-TP). For AdamMD (Frobenius and rows sphere) and MuonMD:

* construction leaves every local piece of W bit for bit as it was, and the local row/column
  gains equal ``reference.factor_gains`` of the global logical matrices;
* the host's order — optimizer built on one W, other weights loaded into the parameter
  afterwards (a weights-only ``--load``) — then 3 steps: equal, after every step, the reference
  constructed directly on the loaded weights (params and gains, ``rtol=1e-5, atol=1e-6``).
"""
from __future__ import annotations

import zlib
from importlib import util
from pathlib import Path

import pytest

from megatron_md.testing.spawn import group_fixture

pytestmark = pytest.mark.distributed

WORLD_SIZES = (2, 4)
STEPS = 3
METHODS = ("AdamMD", "AdamMD_rows", "MuonMD")


def _sharded():
    """The layouts and comparison helpers of test_sharded_optimizers.py (loaded by path: the
    spawned ranks import this module on its own)."""
    spec = util.spec_from_file_location("_sharded_layouts", Path(__file__).with_name("test_sharded_optimizers.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layouts(world: int) -> list[str]:
    return _sharded().LAYOUTS[world]


def _ref(so, opt_name, mats, case):
    import torch

    from megatron_md.optim import reference as ref
    cls_name, kw = so.OPTIMIZERS[opt_name]
    kw = dict(kw, init="factor")
    if cls_name in so.NS_METHODS:
        kw["ns_dtype"] = torch.float32
    if getattr(case.layout, "same_columns", False):  # Q, K, V share one column gain (the default)
        kw["col_groups"] = [list(range(len(mats)))]
    return getattr(ref, cls_name)(mats, **kw)


def _check(env, so, opt_name, layout_name):
    import torch
    from torch import nn

    case = so._build_case(env, layout_name)
    seed = zlib.crc32(f"factor-{opt_name}-{layout_name}/w{env.world}".encode())
    W0, grads = so._data(seed, case, STEPS)
    W1, _ = so._data(seed + 1, case, 0)
    W1 = [w * (1.0 + torch.arange(w.shape[0], dtype=w.dtype)[:, None] / w.shape[0]) for w in W1]  # uneven rows
    mm = so._Mismatches()
    p = nn.Parameter(case.assemble(W0))
    opt = so._new_opt(opt_name, [p], case.layout, init="factor")
    mm.check(torch.equal(p.detach(), case.assemble(W0)), "construction changed W")
    so._compare(env, opt_name, case, opt, p, _ref(so, opt_name, W0, case), "after construction", mm)
    with torch.no_grad():
        p.copy_(case.assemble(W1))  # weights loaded after the optimizer was built
    oracle = _ref(so, opt_name, W1, case)
    for t in range(STEPS):
        p.grad = case.assemble(grads[t])
        opt.step()
        oracle.step(grads[t])
        so._compare(env, opt_name, case, opt, p, oracle, f"step {t + 1} after a load", mm)
    mm.raise_if_any()


def _rank_main(ctx):
    import torch

    torch.set_num_threads(1)
    so = _sharded()
    env = so._Env(ctx)
    for lay in so.LAYOUTS[env.world]:
        for opt_name in METHODS:
            with ctx.check(f"{opt_name}-{lay}", timeout=60):
                _check(env, so, opt_name, lay)


_OPTIONS = dict(timeout=400, stuck_grace=10.0, preload=("torch._dynamo",))
factor_w2 = group_fixture(2, _rank_main, **_OPTIONS)
factor_w4 = group_fixture(4, _rank_main, **_OPTIONS)


@pytest.mark.parametrize("world,check", [pytest.param(w, f"{o}-{lay}", id=f"w{w}-{o}-{lay}")
                                         for w in WORLD_SIZES for lay in _layouts(w) for o in METHODS])
def test_factor_init_matches_reference(request, world, check):
    request.getfixturevalue(f"factor_w{world}").assert_ok(check)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_no_errors_outside_checks(request, world):
    res = request.getfixturevalue(f"factor_w{world}")
    assert not res.errors, res.summary()
