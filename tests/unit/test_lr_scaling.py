"""LR-scaling fit (megatron_md.experiments.lr_scaling, tools/fit_lr_scaling.py) on synthetic sweeps
whose optimum is known, and its handling of bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_md.experiments import lr_scaling as ls
from megatron_md.experiments.sweep import RunSpec, SweepConfig

REPO = Path(__file__).resolve().parents[2]
DS = [100, 200, 400, 800, 1600]


def _eta_star(d, curved=False):
    x = math.log(d)
    return math.exp(-2.0 - 0.3 * x + (0.15 * (x - math.log(400)) ** 2 if curved else 0.0))


def _rows(ds=DS, curved=False, lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0), noise=0.0, optimizer="adam", seed=0):
    """Loss = L(D) + 0.2 (log lr - log η*(D))^2 on a grid centred near η*; η_eff = 0.3 lr^0.8."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in ds:
        star = _eta_star(d, curved)
        centre = 2 ** round(math.log2(star))  # a grid of powers of two around the optimum
        for f in lr_factors:
            lr = centre * f
            loss = 5.0 - 0.3 * math.log(d) + 0.2 * (math.log(lr) - math.log(star)) ** 2 + noise * rng.standard_normal()
            rows.append({"run_id": f"{optimizer}-N64-D{d}-lr{lr:.4g}-s1", "optimizer": optimizer, "hidden_size": 64,
                         "train_iters": d, "lr": lr, "seed": 1, "status": "ok", "final_val_loss": loss,
                         "eta_eff_last10": 0.3 * lr ** 0.8, "tokens": d * 1024})
    return rows


def test_exact_quadratic_recovers_the_optimum_and_the_log_linear_law():
    res = ls.fit_sweep(_rows(), holdout=1)
    for p in res["points"]:
        assert p.status == "ok", p.notes
        assert p.lr_star == pytest.approx(_eta_star(p.train_iters), rel=1e-6)
        # η_eff = 0.3 η^0.8 is monotone: its optimum is the image of η*
        assert p.eta_eff_star == pytest.approx(0.3 * _eta_star(p.train_iters) ** 0.8, rel=1e-6)
    lr_fit = next(a for a in res["axes"] if a.axis == "D" and a.space == "lr")
    assert lr_fit.b == pytest.approx(-0.3, abs=1e-6)
    assert lr_fit.n_fit == len(DS) - 1 and lr_fit.heldout[0]["scale"] == 1600
    assert abs(lr_fit.heldout[0]["rel_error"]) < 1e-6
    eff_fit = next(a for a in res["axes"] if a.axis == "D" and a.space == "eta_eff")
    assert eff_fit.b == pytest.approx(-0.3 * 0.8, abs=1e-6)


def test_curvature_is_detected_and_hurts_extrapolation():
    noisy = ls.fit_sweep(_rows(noise=1e-3, seed=1), holdout=1)
    lin = next(a for a in noisy["axes"] if a.space == "lr")
    assert lin.curvature is not None and not lin.curvature["rejected"], lin.curvature
    curved = ls.fit_sweep(_rows(curved=True, noise=1e-3, seed=1), holdout=1)
    cur = next(a for a in curved["axes"] if a.space == "lr")
    assert cur.curvature["rejected"], cur.curvature
    assert cur.curvature["quadratic_coeff"] == pytest.approx(0.15, rel=0.2)
    # the log-linear fit on the small D under-predicts an upward-curving optimum
    assert cur.heldout[0]["rel_error"] < -0.2


def test_exact_log_linear_data_is_not_called_curved():
    c = ls.curvature_test([1, 2, 4, 8], [1.0, 0.5, 0.25, 0.125])
    assert c["F"] == 0 and not c["rejected"]
    assert ls.curvature_test([1, 2, 4], [1, 2, 3]) is None


def test_too_few_lrs_and_edge_minima_are_reported_not_fitted():
    rows = _rows(ds=[100, 200, 400])
    few = [r for r in rows if r["train_iters"] == 100][:2]
    # D=400: only LRs above the optimum -> the best is the smallest LR of the grid
    edge = [dict(r, lr=r["lr"] * 8, final_val_loss=5.0 + 0.2 * (math.log(r["lr"] * 8 / _eta_star(400))) ** 2)
            for r in rows if r["train_iters"] == 400]
    mid = [r for r in rows if r["train_iters"] == 200]
    res = ls.fit_sweep(few + mid + edge, holdout=0)
    by_d = {p.train_iters: p for p in res["points"]}
    assert by_d[100].status == "too_few_lrs" and by_d[100].lr_star is None
    assert by_d[400].status == "edge_minimum" and by_d[400].lr_star is None
    assert "smallest LR" in by_d[400].notes[0]
    assert by_d[200].status == "ok"
    ax = next(a for a in res["axes"] if a.space == "lr")
    assert ax.scales == [200] and ax.status == "too_few_points"  # nothing fitted silently
    concave = ls.fit_point("adam", 64, 100, [{"lr": lr, "final_val_loss": -math.log(lr) ** 2} for lr in (1e-3, 1e-2, 1e-1)])
    assert concave.status in ("no_minimum", "edge_minimum") and concave.lr_star is None


def _write_sweep(root: Path, rows, extra_grid_lr=None):
    (root / "runs").mkdir(parents=True)
    for r in rows:
        d = root / "runs" / r["run_id"]
        d.mkdir()
        (d / "result.json").write_text(json.dumps(r))
        events = [{"event": "train", "iteration": i, "loss": 6.0 - i / 1000, "lr": r["lr"], "grad_norm": 1.0}
                  for i in (10, 20)]
        events += [{"event": "optimizer_stats", "iteration": 20, "overall": {"eta_eff": r.get("eta_eff_last10") or 0.01},
                    "by_type": {}}]
        (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    lrs = sorted({r["lr"] for r in rows}) + ([extra_grid_lr] if extra_grid_lr else [])
    cfg = SweepConfig(optimizers=["adam"], lrs={"adam": lrs}, train_iters=sorted({r["train_iters"] for r in rows}),
                      hidden_sizes=[64])
    from dataclasses import asdict
    (root / "sweep.json").write_text(json.dumps({"config": asdict(cfg), "commit": "test"}))


def test_fit_tool_reports_failed_and_missing_runs_and_writes_plots(tmp_path):
    rows = _rows(ds=[100, 200, 400])
    bad = dict(rows[3], status="failed", error="exit code 1: boom", final_val_loss=None)
    rows[3] = bad
    _write_sweep(tmp_path / "sw", rows, extra_grid_lr=1.0)
    out = tmp_path / "fit"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fit_lr_scaling.py"), str(tmp_path / "sw"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    assert "**failed** `" + bad["run_id"] + "`: exit code 1: boom" in report
    missing = RunSpec("adam", 1.0, 100, 64, 1).run_id
    assert f"**missing** (no result yet) `{missing}`" in report
    for png in ("loss_vs_lr.png", "loss_vs_eta_eff.png", "lr_star_vs_D.png", "eta_eff_traces.png"):
        assert (out / png).stat().st_size > 10_000, png
    fit = json.loads((out / "fit.json").read_text())
    assert fit["failed"] == [bad["run_id"]] and missing in fit["missing"]
    # not a sweep directory: a clear error
    r = subprocess.run([sys.executable, str(REPO / "tools" / "fit_lr_scaling.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a sweep directory" in r.stderr


def test_plot_run_tool(tmp_path):
    _write_sweep(tmp_path / "sw", _rows(ds=[100]))
    run = next((tmp_path / "sw" / "runs").iterdir())
    out = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), str(run), str(run / "log.jsonl"),
                        "--labels", "a,b", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10_000
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path / "nope.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such log" in r.stderr


def test_seeds_are_averaged_per_lr():
    one = _rows(ds=[200])
    two = [dict(r, seed=2, run_id=r["run_id"].replace("-s1", "-s2"), final_val_loss=r["final_val_loss"] + d)
           for r, d in zip(one, (0.02, -0.01, 0.03, 0.0, -0.02))]
    p = ls.fit_point("adam", 64, 200, one + two)
    assert p.seeds == 2 and p.seed_spread == pytest.approx(0.03)
    assert p.losses == pytest.approx([r["final_val_loss"] + d / 2 for r, d in zip(one, (0.02, -0.01, 0.03, 0.0, -0.02))])
    assert len(p.lrs) == 5 and p.status == "ok"
