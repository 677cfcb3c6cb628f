"""PNG plots (matplotlib, Agg backend) for sweeps, LR-scaling fits and run logs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np



def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_vs_lr(points, path: Path, space: str = "lr") -> Path:
    """Loss against LR (or effective LR) per D, one panel per (optimizer, N), with the fits."""
    plt = _plt()
    panels = sorted({(p.optimizer, p.hidden_size) for p in points})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (opt, n) in zip(axes[0], panels):
        mine = sorted((p for p in points if (p.optimizer, p.hidden_size) == (opt, n)), key=lambda p: p.train_iters)
        cmap = plt.get_cmap("viridis", max(2, len(mine)))
        for i, p in enumerate(mine):
            xs = p.lrs if space == "lr" else p.eta_effs
            if any(x is None for x in xs):
                continue
            ax.plot(xs, p.losses, "o", color=cmap(i), label=f"D={p.train_iters} ({p.status})")
            c = p.coeffs.get(space)
            if c:
                grid = np.linspace(math.log(min(xs)), math.log(max(xs)), 100)
                ax.plot(np.exp(grid), np.polyval(c, grid), "-", color=cmap(i), alpha=0.6)
            star = p.star(space)
            if star:
                ax.plot([star], [np.polyval(p.coeffs[space], math.log(star))], "*", ms=14, color=cmap(i),
                        markeredgecolor="k")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate η" if space == "lr" else "effective LR η_eff of the run")
        ax.set_ylabel("final validation loss")
        ax.set_title(f"{opt}, hidden {n}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def star_vs_scale(axes_fits, path: Path, axis: str = "D") -> Path:
    """η* and η*_eff against D (or N), log-log, with the fit on the small scales and the
    held-out points; one panel per space, a line per optimizer."""
    plt = _plt()
    fits = [a for a in axes_fits if a.axis == axis]
    spaces = sorted({a.space for a in fits}, key=["lr", "eta_eff"].index)
    fig, axs = plt.subplots(1, max(1, len(spaces)), figsize=(5.5 * max(1, len(spaces)), 4), squeeze=False)
    for ax, space in zip(axs[0], spaces):
        for j, a in enumerate(f for f in fits if f.space == space):
            color = f"C{j}"
            if not a.scales:
                continue
            nf = a.n_fit
            ax.plot(a.scales[:nf], a.stars[:nf], "o", color=color, label=f"{a.optimizer} ({'N' if axis == 'D' else 'D'}={a.fixed}) fit points")
            if len(a.scales) > nf:
                ax.plot(a.scales[nf:], a.stars[nf:], "s", mfc="none", color=color, ms=9, label=f"{a.optimizer} held out")
            if a.b is not None:
                s = np.geomspace(min(a.scales), max(a.scales), 50)
                ax.plot(s, [a.predict(v) for v in s], "--", color=color,
                        label=f"{a.optimizer}: log-linear fit, slope {a.b:+.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train iterations D" if axis == "D" else "hidden size N")
        ax.set_ylabel("η*" if space == "lr" else "η*_eff")
        ax.set_title(("optimal LR" if space == "lr" else "optimal effective LR") + f" vs {axis}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _smooth(y: Sequence[float], k: int) -> list[float]:
    if k <= 1 or len(y) < k:
        return list(y)
    c = np.convolve(np.asarray(y, float), np.ones(k) / k, mode="valid")
    return [float("nan")] * (k - 1) + c.tolist()


def run_curves(runs: dict[str, list[dict]], path: Path, *, smooth: int = 1) -> Path:
    """Train/validation loss, LR, grad norm and η_eff over iterations for several run logs
    (``{label: events of a --log-jsonl file}``)."""
    plt = _plt()
    fig, axs = plt.subplots(2, 2, figsize=(11, 7.5))
    (a_loss, a_lr), (a_gn, a_eta) = axs
    for j, (label, events) in enumerate(runs.items()):
        color = f"C{j % 10}"
        tr = [e for e in events if e.get("event") == "train"]
        va = [e for e in events if e.get("event") == "valid"]
        st = [e for e in events if e.get("event") == "optimizer_stats"]
        if tr:
            it = [e["iteration"] for e in tr]
            a_loss.plot(it, _smooth([e["loss"] for e in tr], smooth), color=color, label=f"{label} train")
            a_lr.plot(it, [e["lr"] for e in tr], color=color, label=label)
            a_gn.plot(it, _smooth([e["grad_norm"] for e in tr], smooth), color=color, label=label)
        if va:
            a_loss.plot([e["iteration"] for e in va], [e["loss"] for e in va], "o--", color=color, ms=4,
                        label=f"{label} valid")
        if st:
            a_eta.plot([e["iteration"] for e in st], _smooth([e["overall"]["eta_eff"] for e in st], smooth),
                       color=color, label=label)
    for ax, title, log in ((a_loss, "loss", False), (a_lr, "learning rate", False), (a_gn, "grad norm", True),
                           (a_eta, "effective LR η_eff (mean over hidden matrices)", True)):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
