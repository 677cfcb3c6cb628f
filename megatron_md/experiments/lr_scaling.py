"""Fit the optimal learning rate along data (and model) scale, in LR and in effective-LR space.

Procedure (arXiv 2606.29158, §3): for every (optimizer, width N, iterations D) with at least
three learning rates, fit the final validation loss as a quadratic (optionally cubic) in
``x = log η`` and take the minimizer ``η*``; the same in ``x = log η_eff`` (the run's mean
effective LR over its last 10% of iterations, :mod:`megatron_md.training.telemetry`, or with
``eta_key="eta_eff_mean"`` over the whole run) gives ``η*_eff``. Then fit ``log η* = a + b log D`` on the smaller D values, extrapolate to the
held-out larger ones (relative error, R² in log space) and test curvature (is the log-linear
fit rejected against a quadratic in ``log D``, F-test at 5%?); the same for ``η*_eff``, and
along N when there are several widths.

Nothing is fitted silently: a point with fewer than three learning rates, a minimum at the
edge of its grid (the best measured loss at the smallest or largest LR, or the fitted vertex
outside the grid), a fit without a minimum (concave), failed runs and grid points with no
result are reported with their reason and kept out of the scaling fit.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

#: 5% critical values of F(1, k) for k = 1..10 (the quadratic term's F-test); beyond, ~F(1, ∞)
_F_CRIT_1 = {1: 161.45, 2: 18.51, 3: 10.13, 4: 7.71, 5: 6.61, 6: 5.99, 7: 5.59, 8: 5.32, 9: 5.12, 10: 4.96}
SPACES = ("lr", "eta_eff")


@dataclass
class PointFit:
    """The LR fit at one (optimizer, N, D)."""

    optimizer: str
    hidden_size: int
    train_iters: int
    tokens: Optional[int]
    lrs: list[float]
    losses: list[float]
    eta_effs: list[Optional[float]]
    status: str = "ok"                  # ok | too_few_lrs | edge_minimum | no_minimum
    notes: list[str] = field(default_factory=list)
    best_grid_lr: Optional[float] = None
    lr_star: Optional[float] = None
    loss_star: Optional[float] = None
    eta_eff_star: Optional[float] = None
    eta_eff_status: str = "ok"
    coeffs: dict = field(default_factory=dict)   # space -> polynomial coefficients (highest first)
    seeds: int = 1                                 # most seeds at one LR (losses are seed means)
    seed_spread: float = 0.0                       # largest max - min of final loss across seeds at one LR

    @property
    def usable(self) -> bool:
        return self.status == "ok"

    def star(self, space: str) -> Optional[float]:
        return self.lr_star if space == "lr" else self.eta_eff_star


def _vertex(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[str, Optional[float], Optional[float], list]:
    """(status, x*, y*, coefficients) of a degree-2/3 polynomial fit's minimum within the grid."""
    c = np.polyfit(x, y, degree)
    lo, hi = float(x.min()), float(x.max())
    if degree == 2:
        if c[0] <= 0:
            return "no_minimum", None, None, c.tolist()
        xs = -c[1] / (2 * c[0])
    else:
        crit = [r.real for r in np.roots(np.polyder(c)) if abs(r.imag) < 1e-12]
        mins = [r for r in crit if np.polyval(np.polyder(c, 2), r) > 0]
        if not mins:
            return "no_minimum", None, None, c.tolist()
        xs = min(mins, key=lambda r: abs(r - (lo + hi) / 2))
    if not (lo <= xs <= hi):
        return "edge_minimum", float(xs), float(np.polyval(c, xs)), c.tolist()
    return "ok", float(xs), float(np.polyval(c, xs)), c.tolist()


def fit_point(optimizer: str, hidden_size: int, train_iters: int, rows: Sequence[dict], *, degree: int = 2,
              tokens: Optional[int] = None, eta_key: str = "eta_eff_last10") -> PointFit:
    """Fit one (optimizer, N, D) from its ok runs (``lr``, ``final_val_loss``, ``eta_eff_last10``);
    runs of several seeds at one LR are averaged (``seed_spread``: the largest max − min)."""
    by_lr: dict = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r)
    lrs = sorted(by_lr)
    mean = lambda xs: None if any(x is None for x in xs) else sum(xs) / len(xs)  # noqa: E731
    losses = [mean([r["final_val_loss"] for r in by_lr[lr]]) for lr in lrs]
    etas = [mean([r.get(eta_key) for r in by_lr[lr]]) for lr in lrs]
    rows = [{"lr": lr} for lr in lrs]
    pf = PointFit(optimizer, hidden_size, train_iters, tokens, lrs, losses, etas)
    pf.seeds = max(len(v) for v in by_lr.values()) if by_lr else 0
    pf.seed_spread = max((max(r["final_val_loss"] for r in v) - min(r["final_val_loss"] for r in v)
                          for v in by_lr.values()), default=0.0)
    if len(rows) < max(3, degree + 1):
        pf.status = "too_few_lrs"
        pf.notes.append(f"{len(rows)} learning rate(s); a degree-{degree} fit needs at least {max(3, degree + 1)}")
        return pf
    losses = np.array(pf.losses)
    i_best = int(losses.argmin())
    pf.best_grid_lr = pf.lrs[i_best]
    x = np.log(np.array(pf.lrs))
    status, xs, ys, c = _vertex(x, losses, degree)
    pf.coeffs["lr"] = c
    if i_best in (0, len(rows) - 1):
        status = "edge_minimum"
        pf.notes.append(f"the best loss is at the {'smallest' if i_best == 0 else 'largest'} LR of the grid "
                        f"({pf.best_grid_lr:g}): extend the grid")
    elif status == "edge_minimum":
        pf.notes.append(f"the fitted minimum η={math.exp(xs):.3g} lies outside the grid")
    elif status == "no_minimum":
        pf.notes.append("the fitted curve has no minimum (concave)")
    pf.status = status
    if status == "ok":
        pf.lr_star, pf.loss_star = math.exp(xs), ys
    etas = pf.eta_effs
    if any(e is None or not (e > 0) for e in etas):
        pf.eta_eff_status = "missing"
        pf.notes.append("some runs have no effective-LR telemetry")
    else:
        s2, xe, _, ce = _vertex(np.log(np.array(etas)), losses, degree)
        pf.coeffs["eta_eff"] = ce
        order = np.argsort(etas)
        if int(np.argmin(losses[order])) in (0, len(rows) - 1):
            s2 = "edge_minimum"
        pf.eta_eff_status = s2
        if s2 == "ok" and status == "ok":
            pf.eta_eff_star = math.exp(xe)
        elif s2 != "ok":
            pf.notes.append(f"effective-LR fit: {s2}")
    return pf


@dataclass
class AxisFit:
    """``log y* = a + b log s`` along one scale axis (D or N), fitted on the smaller values."""

    optimizer: str
    axis: str                 # "D" or "N"
    space: str                # "lr" or "eta_eff"
    fixed: int                # the other axis' value
    scales: list[float]
    stars: list[float]
    n_fit: int
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    a: Optional[float] = None
    b: Optional[float] = None
    r2_fit: Optional[float] = None
    heldout: list[dict] = field(default_factory=list)   # scale, actual, predicted, rel_error
    r2_heldout: Optional[float] = None
    curvature: Optional[dict] = None                    # quadratic term, F, F_crit, rejected

    def predict(self, s: float) -> float:
        return math.exp(self.a + self.b * math.log(s))


def _r2(y, yhat) -> Optional[float]:
    y, yhat = np.asarray(y), np.asarray(yhat)
    ss = float(((y - y.mean()) ** 2).sum())
    return None if ss == 0 or len(y) < 2 else 1.0 - float(((y - yhat) ** 2).sum()) / ss


def curvature_test(s: Sequence[float], y: Sequence[float]) -> Optional[dict]:
    """F-test of a quadratic term in ``log s`` for ``log y`` (None with fewer than 4 points)."""
    n = len(s)
    if n < 4:
        return None
    x, ly = np.log(np.asarray(s, float)), np.log(np.asarray(y, float))
    r1 = ly - np.polyval(np.polyfit(x, ly, 1), x)
    c2 = np.polyfit(x, ly, 2)
    r2 = ly - np.polyval(c2, x)
    rss1, rss2, dof = float(r1 @ r1), float(r2 @ r2), n - 3
    scale = float(ly @ ly) or 1.0
    if rss1 - rss2 <= 1e-12 * scale:
        F = 0.0  # the quadratic term explains nothing (exact log-linear data included)
    else:
        F = (rss1 - rss2) / (rss2 / dof) if rss2 > 1e-15 * scale else math.inf
    crit = _F_CRIT_1.get(dof, 3.84)
    return {"quadratic_coeff": float(c2[0]), "F": F, "F_crit_5pct": crit, "dof": dof, "rejected": bool(F > crit)}


def fit_axis(optimizer: str, axis: str, space: str, fixed: int, points: Sequence[tuple[float, float]],
             holdout: int = 1) -> AxisFit:
    """Fit ``log star = a + b log scale`` on all but the ``holdout`` largest scales."""
    points = sorted(points)
    af = AxisFit(optimizer, axis, space, fixed, [p[0] for p in points], [p[1] for p in points],
                 max(0, len(points) - holdout))
    if af.n_fit < 2:
        af.status = "too_few_points"
        af.notes.append(f"{len(points)} usable {axis} value(s): fitting 2+ and holding out {holdout} needs "
                        f"{2 + holdout}")
        return af
    x = np.log(np.array(af.scales))
    y = np.log(np.array(af.stars))
    xf, yf = x[:af.n_fit], y[:af.n_fit]
    af.b, af.a = (float(v) for v in np.polyfit(xf, yf, 1))
    af.r2_fit = _r2(yf, af.a + af.b * xf) if af.n_fit > 2 else None
    for s, st in zip(af.scales[af.n_fit:], af.stars[af.n_fit:]):
        pred = af.predict(s)
        af.heldout.append({"scale": s, "actual": st, "predicted": pred, "rel_error": (pred - st) / st})
    if len(af.heldout) >= 2:
        xh, yh = x[af.n_fit:], y[af.n_fit:]
        af.r2_heldout = _r2(yh, af.a + af.b * xh)
    af.curvature = curvature_test(af.scales, af.stars)
    return af


# ----------------------------------------------------------------------------- from a sweep
def load_sweep(root: str) -> tuple[list[dict], list[dict], list[str]]:
    """(ok rows, failed rows, missing run ids) of a :mod:`.sweep` directory."""
    from .sweep import SweepConfig, collect
    root = Path(root)
    if not (root / "runs").is_dir():
        raise FileNotFoundError(f"{root}: not a sweep directory (no runs/ folder; run tools/sweep.py --out {root})")
    rows = collect(root)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    missing = []
    meta = root / "sweep.json"
    if meta.exists():
        cfg = SweepConfig(**json.loads(meta.read_text())["config"])
        have = {r["run_id"] for r in rows}
        missing = [s.run_id for s in cfg.grid() if s.run_id not in have]
    return ok, failed, missing


def fit_sweep(ok: Sequence[dict], *, degree: int = 2, holdout: int = 1, eta_key: str = "eta_eff_last10") -> dict:
    """Point fits per (optimizer, N, D) and axis fits along D (per N) and N (per D), both spaces."""
    groups: dict = {}
    for r in ok:
        groups.setdefault((r["optimizer"], r["hidden_size"], r["train_iters"]), []).append(r)
    points = [fit_point(o, n, d, rs, degree=degree, tokens=rs[0].get("tokens"), eta_key=eta_key)
              for (o, n, d), rs in sorted(groups.items())]
    axes = []
    for o in sorted({p.optimizer for p in points}):
        mine = [p for p in points if p.optimizer == o]
        for space in SPACES:
            for n in sorted({p.hidden_size for p in mine}):
                pts = [(p.train_iters, p.star(space)) for p in mine if p.hidden_size == n and p.star(space)]
                axes.append(fit_axis(o, "D", space, n, pts, holdout))
            ns = sorted({p.hidden_size for p in mine})
            if len(ns) > 1:
                for d in sorted({p.train_iters for p in mine}):
                    pts = [(p.hidden_size, p.star(space)) for p in mine if p.train_iters == d and p.star(space)]
                    axes.append(fit_axis(o, "N", space, d, pts, holdout))
    return {"points": points, "axes": axes}


def to_json(result: dict) -> dict:
    return {"points": [asdict(p) for p in result["points"]], "axes": [asdict(a) for a in result["axes"]]}
