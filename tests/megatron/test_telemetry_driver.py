"""Optimizer telemetry in the real driver (2 gloo ranks, megatron-core on CPU).

One spawned group runs the driver (``pretrain``) in-process with ``--log-optimizer-stats-interval 1``
and ``--log-jsonl``, on the same model, seed and global batch at different layouts:

* the reductions are exact: on the same random weights, TP (dim 0 and 1) and ZeRO flat-range
  shards give the whole matrix's values to 1e-12;
* every per-matrix value (η_eff, ‖w‖, ‖u‖, cos(u, w); MD gain statistics) at TP=2, at PP=2, at
  DP=2 + ZeRO-1 and at DP=2 layer-wise equals the unsharded layout (DP=2, each rank holding whole
  matrices) — at the first step, where the weights before the step are identical, to 1e-6
  relative plus the float32 resolution of the update (8·2⁻²⁴·‖w‖/‖u‖: the layouts' optimizer
  steps themselves differ in the last bit); over three steps to 1e-4 (the trajectories then
  differ by reduction order);
* the same at DP=2 under torch FSDP2 (each rank its rows of every matrix) against plain DP=2;
* MoE with EP=2 reports every expert once under its global name, as EP=1 does (the driver's EP=1
  and EP=2 models start from different expert weights, so values are not compared there);
* telemetry off and on give bit-identical losses (reading changes nothing);
* the record names split fused QKV into Q, K, V and carry the AdamW equilibrium predictions for
  ``--optimizer adam`` and the RMNP diagnostics for ``--optimizer rmnp``.
"""
from __future__ import annotations

import json
import math
import os

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--lr", "0.01", "--mock-data", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
        "--seed", "11", "--make-vocab-size-divisible-by", "64", "--vocab-size", "256"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
       "--moe-aux-loss-coeff", "0.01", "--disable-bias-linear"]  # megatron-core 0.16's expert bias add is in place
LAYOUTS = {"tp2": ["--tensor-model-parallel-size", "2", "--micro-batch-size", "4"],
           "pp2": ["--pipeline-model-parallel-size", "2"],
           "zero": ["--use-distributed-optimizer"],
           "layerwise": ["--dp-mode", "layer-wise"]}
OPTIMIZERS = {"adam": ["--weight-decay", "0.1"], "muon-md": [], "rmnp": []}  # muon-md: Q, K, V split (ZeRO-1 per block)
STEP_KEYS = ("eta_eff", "w_norm", "u_norm", "cos_uw")


def _records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if '"optimizer_stats"' in line]


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


#: values computed from the update u = w' - w: float32 weights resolve u only to ~2^-24 |w| per element
_FROM_UPDATE = ("eta_eff", "u_norm", "cos_uw")


def _compare(ref, got, keys, tol_first, tol_rest):
    """Largest relative difference; each key within ``tol`` (+ the float32 resolution of the
    update, 8 · 2^-24 · ‖w‖/‖u‖, for values derived from u)."""
    assert len(ref) == len(got) == 3, (len(ref), len(got))
    worst = 0.0
    for r, g in zip(ref, got):
        assert r["iteration"] == g["iteration"]
        # records with step statistics: every hidden matrix, on every layout (RMNP samples its
        # diagnostics on the first matrices of each rank's optimizer, which depend on the layout)
        step_names = lambda rec: {n for n, m in rec["matrices"].items() if "eta_eff" in m}  # noqa: E731
        assert step_names(r) == step_names(g), (sorted(step_names(r)), sorted(step_names(g)))
        base = tol_first if r["iteration"] == 1 else tol_rest
        for name, rm in r["matrices"].items():
            if name not in g["matrices"]:
                continue
            gm = g["matrices"][name]
            for k in keys:
                if k not in rm:
                    continue
                tol = base + (8 * 2.0 ** -24 * rm["w_norm"] / rm["u_norm"] if k in _FROM_UPDATE else 0.0)
                if k.endswith("_std"):  # float32 gains near 1 resolve their spread to ~2^-24 mean/std
                    tol += 8 * 2.0 ** -24 * rm[k.replace("_std", "_mean")] / rm[k]
                # cos(u, w) is near 0: compare it on the scale of 1
                err = abs(rm[k] - gm[k]) if k == "cos_uw" else _rel(gm[k], rm[k])
                assert err <= tol, (r["iteration"], name, k, rm[k], gm[k], tol)
                worst = max(worst, err)
    return worst


def _checks(ctx):
    import torch.distributed as dist

    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    def run(tag, flags):
        path = os.path.join(ctx.tmpdir, f"{tag}.jsonl")
        summary = pretrain(parse_args(BASE + flags + ["--log-jsonl", path, "--log-optimizer-stats-interval", "1"]))
        dist.barrier() if dist.is_initialized() else None
        return summary, path

    with ctx.check("sharded_sums_equal_whole"):
        # the reductions themselves: TP dim 0/1 and ZeRO flat ranges (mid-row cuts, one empty)
        # against the whole matrix, on the same fresh random weights
        import torch

        from megatron_md import telemetry as tm
        from megatron_md.shard import FlatRange, TensorParallel, Whole
        g = torch.Generator().manual_seed(5)
        w0 = torch.randn(13, 10, generator=g)
        w1 = w0 + 1e-3 * torch.randn(13, 10, generator=g)
        gr_, gc_ = torch.randn(13, generator=g), torch.randn(10, generator=g)
        whole = tm.matrix_step_stats(Whole((13, 10)), w0, w1)
        whole_g = tm.gain_stats(Whole((13, 10)), gr_, gc_)
        grp = dist.group.WORLD
        r = ctx.rank
        for dim in (0, 1):
            sh = TensorParallel((13, 10), dim=dim, group=grp)
            take = (lambda t: t.tensor_split(2, dim=dim)[r])
            got = tm.matrix_step_stats(sh, take(w0), take(w1))
            for k in whole:
                assert got[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), (dim, k)
        for cut in (57, 0, 130):
            a, b = (0, cut) if r == 0 else (cut, 130)
            sh = FlatRange(a, b, grp, Whole((13, 10)))
            got = tm.matrix_step_stats(sh, w0.reshape(-1)[a:b], w1.reshape(-1)[a:b])
            r0, r1 = sh.row_range
            got_g = tm.gain_stats(sh, gr_[r0:r1], gc_)
            for k in whole:
                assert got[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), (cut, k)
            for k in whole_g:
                assert got_g[k] == pytest.approx(whole_g[k], rel=1e-12), (cut, k)

    for opt, oflags in OPTIMIZERS.items():
        flags = ["--optimizer", opt, *oflags]
        _, ref_path = run(f"{opt}_dp2", flags)
        ref = _records(ref_path) if ctx.rank == 0 else None
        for lay, lflags in LAYOUTS.items():
            if opt == "adam" and lay == "layerwise":
                continue  # AdamW has no matrix optimizer to distribute
            with ctx.check(f"{opt}_{lay}_equals_unsharded"):
                _, path = run(f"{opt}_{lay}", flags + lflags)
                if ctx.rank == 0:
                    keys = STEP_KEYS + (("gain_row_mean", "gain_row_std", "gain_col_mean", "gain_col_std")
                                        if opt == "muon-md" else ())
                    worst = _compare(ref, _records(path), keys, 1e-6, 1e-4)
                    ctx.record(f"{opt}_{lay}_worst", worst)
        if ctx.rank == 0:
            with ctx.check(f"{opt}_record_contents"):
                names = set(ref[0]["matrices"])
                assert {"decoder.layers.1.self_attention.linear_qkv.weight/q",
                        "decoder.layers.1.self_attention.linear_qkv.weight/k",
                        "decoder.layers.0.mlp.linear_fc2.weight"} <= names, sorted(names)
                # (an optimizer that keeps fused QKV whole reports its gains under the unsplit name)
                step = [m for m in ref[0]["matrices"].values() if "eta_eff" in m]
                assert len(step) == 2 * 6 and all(math.isfinite(m["eta_eff"]) and m["eta_eff"] > 0 for m in step)
                if opt == "adam":
                    eq = ref[0]["adamw_equilibrium"]
                    assert eq["eta_eff"] == pytest.approx(math.sqrt(2 * 0.01 * 0.1 * 0.1 / 1.9), rel=1e-6)
                if opt == "rmnp":
                    assert "row_vs_ns" in ref[0]["overall"] and ref[0]["overall"]["dd_avg"] > 0
                if opt == "muon-md":
                    assert 0.5 < ref[-1]["overall"]["gain_row_mean"] < 2
        else:
            with ctx.check(f"{opt}_record_contents"):
                pass

    # FSDP2 and Megatron-FSDP (megatron-core's wrappers need an untied head): each rank reads its rows of
    # every matrix (Megatron-FSDP's uneven rows, as the optimizer bound them)
    for opt in ("muon-md", "rmnp"):
        flags = ["--optimizer", opt, "--untie-embeddings-and-output-weights"]
        ref_path = None
        for kind, flag in (("fsdp2", "--use-torch-fsdp2"), ("megatron-fsdp", "--use-megatron-fsdp")):
            with ctx.check(f"{opt}_{kind}_equals_unsharded"):
                if ref_path is None:
                    _, ref_path = run(f"{opt}_dp2_untied", flags)
                _, path = run(f"{opt}_{kind}", flags + [flag])
                if ctx.rank == 0:
                    keys = STEP_KEYS + (("gain_row_mean", "gain_row_std", "gain_col_mean", "gain_col_std")
                                        if opt == "muon-md" else ())
                    ctx.record(f"{opt}_{kind}_worst", _compare(_records(ref_path), _records(path), keys, 1e-6, 1e-4))

    with ctx.check("moe_ep2_equals_ep1"):
        flags = ["--optimizer", "muon", "--weight-decay", "0.0", *MOE]
        _, p1 = run("moe_ep1", flags)
        _, p2 = run("moe_ep2", flags + ["--expert-model-parallel-size", "2"])
        if ctx.rank == 0:
            r1, r2 = _records(p1), _records(p2)
            experts = {n for n in r1[0]["matrices"] if ".experts." in n}
            assert len(experts) == 2 * 2 * 4, sorted(experts)  # layers x (fc1, fc2) x experts, global indices
            assert "decoder.layers.1.mlp.experts.3.linear_fc2.weight" in experts
            # the driver draws expert weights from per-EP-rank RNG streams, so EP=1 and EP=2 start
            # from different experts and their values are not comparable; what EP changes for the
            # telemetry is where each (whole) expert lives: every global expert is reported once,
            # from the rank that holds it
            for a, b in zip(r1, r2):
                assert set(a["matrices"]) == set(b["matrices"])
                assert all(math.isfinite(b["matrices"][n]["eta_eff"]) and b["matrices"][n]["eta_eff"] > 0
                           for n in experts)

    with ctx.check("telemetry_changes_no_bit"):
        flags = ["--optimizer", "muon-md", "--tensor-model-parallel-size", "2", "--micro-batch-size", "4"]
        on, _ = run("on", flags)
        off = pretrain(parse_args(BASE + flags))
        for k in ("train_loss_history", "val_loss_history", "final_val_loss"):
            assert on[k] == off[k], (k, on[k], off[k])


telemetry_group = group_fixture(2, _checks, megatron=True, timeout=600)

CHECKS = ([f"{o}_{lay}_equals_unsharded" for o in OPTIMIZERS for lay in LAYOUTS if not (o == "adam" and lay == "layerwise")]
          + [f"{o}_record_contents" for o in OPTIMIZERS]
          + ["sharded_sums_equal_whole", "moe_ep2_equals_ep1", "telemetry_changes_no_bit", "muon-md_fsdp2_equals_unsharded",
             "rmnp_fsdp2_equals_unsharded", "muon-md_megatron-fsdp_equals_unsharded",
             "rmnp_megatron-fsdp_equals_unsharded"])


@pytest.mark.parametrize("name", CHECKS)
def test_telemetry(telemetry_group, name):
    telemetry_group.assert_ok(name)
