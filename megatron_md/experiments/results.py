"""The quality table of docs/RESULTS.md, computed from ``tools/sweep.py`` directories.

Per optimizer (one width, one token budget): the final validation loss at every LR of the sweep
(its lowest seed), the best LR by that sweep, whether it lies at an end of the grid (then the grid must
be extended before the row counts), the seeds at the best LR (mean and half-range), and the
fraction of the baseline's steps that the optimizer needs to reach the baseline's final training
loss (the training-loss curves averaged over the seeds at the best LR, linearly interpolated
between log points; ``None``: not reached within the run). A difference from the baseline no larger than the two half-ranges
together is reported as within seed noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .sweep import collect, log_path, read_log


@dataclass
class Row:
    optimizer: str
    lrs: list[float]
    losses: list[float]                  # final val loss per LR of the sweep's (lowest) seed
    best_lr: Optional[float] = None
    edge: bool = False                   # best LR at an end of the grid
    seeds: list[int] = field(default_factory=list)
    seed_losses: list[float] = field(default_factory=list)
    #: first iteration at which the seed-mean training curve at the best LR reaches the baseline's
    #: seed-mean final training loss, over the run length (None: not reached)
    fraction_of_baseline_steps: Optional[float] = None
    reached: int = 0                     # 1 if that curve reaches the baseline's final loss
    train_iters: int = 0
    failed: list[str] = field(default_factory=list)
    #: the LRs run at every seed of the best LR (when there are ≥2 such seeds and ≥2 such LRs), with
    #: their seed-mean losses: a best LR that does not rest on one seed's noise (see ``mean_best_lr``)
    mean_lrs: list[float] = field(default_factory=list)
    mean_losses: list[float] = field(default_factory=list)

    @property
    def mean(self) -> Optional[float]:
        return sum(self.seed_losses) / len(self.seed_losses) if self.seed_losses else None

    @property
    def half_range(self) -> Optional[float]:
        if len(self.seed_losses) < 2:
            return None
        return (max(self.seed_losses) - min(self.seed_losses)) / 2

    @property
    def mean_best_lr(self) -> Optional[float]:
        """The best LR by the seed-mean loss over ``mean_lrs`` (None when fewer than two LRs have
        all the seeds)."""
        if len(self.mean_lrs) < 2:
            return None
        return self.mean_lrs[min(range(len(self.mean_lrs)), key=self.mean_losses.__getitem__)]


def train_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(iteration, train loss)`` of a run's log (each point the mean over its log interval)."""
    return [(e["iteration"], e["loss"]) for e in read_log(log_path(run_dir))
            if e.get("event") == "train" and isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> Optional[float]:
    """First iteration at which the curve reaches ``target`` (linear interpolation between log
    points); None if it never does."""
    prev = None
    for it, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(it)
            (i0, l0) = prev
            return i0 + (l0 - target) / (l0 - loss) * (it - i0)
        prev = (it, loss)
    return None


def _mean_curve(sweep_dir: Path, runs: list[dict], optimizer: str, lr: float) -> list[tuple[int, float]]:
    """The training-loss curve averaged over the seeds run at ``lr`` (log points every run has)."""
    curves = [dict(train_curve(sweep_dir / "runs" / r["run_id"])) for r in runs
              if r["optimizer"] == optimizer and r["status"] == "ok" and float(r["lr"]) == lr]
    curves = [c for c in curves if c]
    if not curves:
        return []
    its = sorted(set.intersection(*(set(c) for c in curves)))
    return [(it, sum(c[it] for c in curves) / len(curves)) for it in its]


def _row(name: str, mine: list[dict]) -> Row:
    """The :class:`Row` of one optimizer's runs (one width, one run length)."""
    ok = [r for r in mine if r["status"] == "ok" and r.get("final_val_loss") is not None
          and math.isfinite(r["final_val_loss"])]
    by_lr: dict[float, list[dict]] = {}
    for r in ok:
        by_lr.setdefault(float(r["lr"]), []).append(r)
    # the LR sweep is the lowest seed's (the protocol: sweep with one seed, then more seeds at
    # its best LR); comparing a several-seed mean with single-seed points would favour noise
    sweep_seed = min((int(r["seed"]) for r in ok), default=None)
    lrs = sorted(lr for lr, rs in by_lr.items() if any(int(r["seed"]) == sweep_seed for r in rs))
    losses = [next(float(r["final_val_loss"]) for r in by_lr[lr] if int(r["seed"]) == sweep_seed) for lr in lrs]
    row = Row(name, lrs, losses, failed=[r["run_id"] for r in mine if r not in ok],
              train_iters=max((int(r["train_iters"]) for r in mine), default=0))
    if lrs:
        k = min(range(len(lrs)), key=losses.__getitem__)
        row.best_lr, row.edge = lrs[k], len(lrs) < 3 or k in (0, len(lrs) - 1)
        best = sorted(by_lr[lrs[k]], key=lambda r: r["seed"])
        row.seeds = [int(r["seed"]) for r in best]
        row.seed_losses = [float(r["final_val_loss"]) for r in best]
        if len(row.seeds) >= 2:       # the LRs that have every seed of the best LR
            for lr in sorted(by_lr):
                got = {int(r["seed"]): float(r["final_val_loss"]) for r in by_lr[lr]}
                if all(s in got for s in row.seeds):
                    row.mean_lrs.append(lr)
                    row.mean_losses.append(sum(got[s] for s in row.seeds) / len(row.seeds))
            if len(row.mean_lrs) < 2:
                row.mean_lrs, row.mean_losses = [], []
    return row


def quality_rows(sweep_dir: Path, optimizers: Sequence[str], baseline: str = "adam",
                 where: Optional[dict] = None) -> list[Row]:
    """One :class:`Row` per optimizer present in the sweep, in ``optimizers`` order; ``where``
    (e.g. ``{"hidden_size": 256}``) keeps only the runs with those settings."""
    sweep_dir = Path(sweep_dir)
    runs = [r for r in collect(sweep_dir) if all(str(r.get(k)) == str(v) for k, v in (where or {}).items())]
    rows: dict[str, Row] = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        if mine:
            rows[name] = _row(name, mine)
    base = rows.get(baseline)
    if base is not None and base.best_lr is not None:
        base_curve = _mean_curve(sweep_dir, runs, baseline, base.best_lr)
        if base_curve:
            target = base_curve[-1][1]
            for row in rows.values():
                if row.best_lr is None:
                    continue
                curve = _mean_curve(sweep_dir, runs, row.optimizer, row.best_lr)
                s = steps_to_reach(curve, target) if curve else None
                row.reached = int(s is not None)
                row.fraction_of_baseline_steps = None if s is None else s / row.train_iters
    return [rows[n] for n in optimizers if n in rows]


def noise_verdict(row: Row, base: Row) -> str:
    """"better" / "worse" / "within seed noise" / "one seed" against the baseline row."""
    if row.mean is None or base.mean is None:
        return "—"
    if row.half_range is None or base.half_range is None:
        return "one seed"
    diff = row.mean - base.mean
    if abs(diff) <= row.half_range + base.half_range:
        return "within seed noise"
    return "better" if diff < 0 else "worse"


def _loss_text(r: Row) -> str:
    """A row's final validation loss at its best LR: mean ± half-range over its seeds."""
    if r.mean is None:
        return "—"
    if r.half_range is None:
        return f"{r.mean:.4f} (1 seed)"
    return f"{r.mean:.4f} ± {r.half_range:.4f} ({len(r.seeds)} seeds)"


def _grid_text(r: Row) -> str:
    return ", ".join(f"{lr:g}" for lr in r.lrs)


def markdown_table(rows: Sequence[Row], baseline: str = "adam") -> str:
    base = next((r for r in rows if r.optimizer == baseline), None)
    out = ["| optimizer | LRs swept | best LR | final val loss (mean ± half-range, seeds) | vs "
           f"{baseline} | fraction of {baseline}'s steps to its final train loss | note |",
           "|---|---|---:|---|---|---:|---|"]
    for r in rows:
        grid = _grid_text(r)
        loss = _loss_text(r)
        frac = ("—" if base is None or r.best_lr is None
                else "not reached" if r.fraction_of_baseline_steps is None
                else f"{r.fraction_of_baseline_steps:.2f}")
        notes = []
        if r.edge:
            notes.append("best LR at the grid's edge: extend the grid")
        if r.failed:
            notes.append(f"{len(r.failed)} failed run(s)")
        verdict = noise_verdict(r, base) if base is not None and r is not base else "—"
        out.append(f"| {r.optimizer} | {grid} | {r.best_lr:g} | {loss} | {verdict} | {frac} | {'; '.join(notes)} |"
                   if r.best_lr is not None else f"| {r.optimizer} | {grid} | — | — | — | — | no finished run |")
    return "\n".join(out)


def plot_quality(rows: Sequence[Row], sweep_dir: Path, out_dir: Path) -> list[Path]:
    """``loss_vs_step.png`` (training loss at each optimizer's best LR, every seed) and
    ``loss_vs_lr.png`` (final validation loss against LR, one panel per optimizer)."""
    from .plots import _plt

    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = collect(sweep_dir)
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        if r.best_lr is None:
            continue
        for j, run in enumerate(x for x in runs if x["optimizer"] == r.optimizer and x["status"] == "ok"
                                and float(x["lr"]) == r.best_lr):
            c = train_curve(sweep_dir / "runs" / run["run_id"])
            if c:
                ax.plot(*zip(*c), color=cmap(i % 10), alpha=0.9 if j == 0 else 0.45,
                        label=f"{r.optimizer} (lr {r.best_lr:g})" if j == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss (mean over the log interval)")
    ax.set_ylim(top=min(7.5, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    p1 = out_dir / "loss_vs_step.png"
    fig.tight_layout()
    fig.savefig(p1, dpi=110)
    plt.close(fig)
    n = len(rows)
    cols = min(5, n) or 1
    fig, axes = plt.subplots((n + cols - 1) // cols or 1, cols, figsize=(3.4 * cols, 3 * ((n + cols - 1) // cols or 1)),
                             squeeze=False, sharey=True)
    for ax, r in zip(axes.flat, rows):
        ax.plot(r.lrs, r.losses, "o-")
        if r.best_lr is not None:
            ax.plot([r.best_lr], [min(r.losses)], "*", ms=12, color="C3")
        ax.set_xscale("log")
        ax.set_title(r.optimizer, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("final val loss")
    p2 = out_dir / "loss_vs_lr.png"
    fig.tight_layout()
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


# ---------------------------------------------------------------------- along width / horizon
#: the run fields a scaling table can go along, with their column titles
SCALING_KEYS = {"hidden_size": "hidden", "train_iters": "iterations"}


def scaling_rows(sweep_dirs: Sequence[Path], optimizers: Sequence[str], by: str) -> dict[tuple[str, int], Row]:
    """One :class:`Row` per (optimizer, value of ``by``) over the runs of several sweep
    directories (e.g. a width sweep and the quality sweep at the base width): each its own LR
    sweep, best LR and seeds, as in the quality table."""
    if by not in SCALING_KEYS:
        raise ValueError(f"by={by!r}: expected one of {sorted(SCALING_KEYS)}")
    runs = [r for d in sweep_dirs for r in collect(Path(d)) if r["optimizer"] in optimizers]
    out: dict[tuple[str, int], Row] = {}
    for name in optimizers:
        for v in sorted({int(r[by]) for r in runs if r["optimizer"] == name}):
            out[(name, v)] = _row(name, [r for r in runs if r["optimizer"] == name and int(r[by]) == v])
    return out


def scaling_table(rows: dict[tuple[str, int], Row], by: str) -> str:
    """Markdown: per optimizer and value of ``by``, the grid swept, the best LR (``[edge]`` when
    at an end of its grid, ``(one LR)`` for a fixed configuration) and its final validation loss
    (mean ± half-range over seeds)."""
    values = sorted({v for _, v in rows})
    names = list(dict.fromkeys(n for n, _ in rows))
    means = any(r.mean_best_lr is not None for r in rows.values())
    head = f"| optimizer | {SCALING_KEYS[by]} | LRs swept | best LR | final val loss |"
    rule = "|---|---:|---|---:|---|"
    if means:   # a second opinion on the best LR, from the LRs run at every seed
        head += " seed-mean loss at the LRs with every seed (best starred) |"
        rule += "---|"
    out = [head, rule]
    for n in names:
        for v in values:
            r = rows.get((n, v))
            if r is None:
                continue
            if r.best_lr is None:
                out.append(f"| {n} | {v} | {_grid_text(r)} | — | no finished run |" + (" — |" if means else ""))
                continue
            edge = " (one LR)" if len(r.lrs) == 1 else " [edge]" if r.edge else ""
            line = f"| {n} | {v} | {_grid_text(r)} | {r.best_lr:g}{edge} | {_loss_text(r)} |"
            if means:
                line += (" " + ", ".join(f"{lr:g}: {m:.4f}" + ("*" if lr == r.mean_best_lr else "")
                                         for lr, m in zip(r.mean_lrs, r.mean_losses)) + " |"
                         if r.mean_best_lr is not None else " — |")
            out.append(line)
    return "\n".join(out)


def plot_scaling(rows: dict[tuple[str, int], Row], by: str, out_dir: Path) -> list[Path]:
    """``loss_vs_lr.png``: final validation loss against LR, one panel per optimizer, one curve
    per value of ``by`` (the best LR of each starred)."""
    from .plots import _plt

    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(n for n, _ in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, n in zip(axes[0], names):
        for i, ((_, v), r) in enumerate((k, r) for k, r in rows.items() if k[0] == n):
            if not r.lrs:
                continue
            ax.plot(r.lrs, r.losses, "o-", color=f"C{i}", label=f"{SCALING_KEYS[by]} {v}")
            if r.best_lr is not None:
                ax.plot([r.best_lr], [min(r.losses)], "*", ms=12, color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("LR")
        ax.set_title(n, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("final val loss")
    p = out_dir / "loss_vs_lr.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


# ----------------------------------------------------------------------------------- claims
@dataclass
class Side:
    """One side of a claim: an optimizer in a sweep directory (``fixed_lr``: a single-LR run
    set, e.g. seeds at a chosen LR — no grid-edge check; ``where``: only the runs with these
    settings, e.g. ``{"hidden_size": 256}`` of a width sweep)."""

    dir: str
    optimizer: str
    fixed_lr: bool = False
    where: Optional[dict] = None


def claim_verdict(root: Path, treatment: Side, control: Side, expect: str = "lower",
                  baseline: str = "adam") -> dict:
    """Compare the best-LR final validation loss of two sides; ``expect="lower"``: the claim is
    that the treatment's loss is lower. Returns the rows and a verdict: ``pending`` (a side has
    no finished run), ``inconclusive`` (a best LR at a grid edge, or the difference within both
    seed half-ranges), ``holds`` / ``does not hold`` (with ``one seed`` noted when a side has a
    single seed)."""
    rows = []
    for side in (treatment, control):
        found = quality_rows(Path(root) / side.dir, [side.optimizer], baseline, side.where)
        rows.append(found[0] if found and found[0].best_lr is not None else None)
    out = {"rows": rows, "diff": None, "verdict": "pending", "why": "no finished run"}
    a, b = rows
    if a is None or b is None:
        return out
    out["diff"] = diff = a.mean - b.mean
    edges = [s.optimizer for s, r in zip((treatment, control), rows) if r.edge and not s.fixed_lr]
    if edges:
        out.update(verdict="inconclusive", why=f"best LR at the grid's edge ({', '.join(edges)})")
        return out
    noise = (a.half_range or 0.0) + (b.half_range or 0.0)   # the seed spread measured so far
    single = a.half_range is None or b.half_range is None
    if noise and abs(diff) <= noise:
        out.update(verdict="inconclusive", why=f"within seed noise (|Δ| {abs(diff):.3f} ≤ {noise:.3f})")
        return out
    good = diff < 0 if expect == "lower" else diff > 0
    verdict = "holds" if good else "does not hold"
    if single:
        out.update(verdict=verdict + " (preliminary)", why="one seed on a side"
                   + (f"; |Δ| beyond the other side's spread {noise:.3f}" if noise else ""))
    else:
        out.update(verdict=verdict, why=f"beyond seed noise ({noise:.3f})")
    return out


def _describe(r: Optional[Row]) -> str:
    if r is None:
        return "—"
    if r.half_range is None:
        return f"{r.mean:.3f} (LR {r.best_lr:g}, 1 seed)"
    return f"{r.mean:.3f} ± {r.half_range:.3f} (LR {r.best_lr:g}, {len(r.seeds)} seeds)"


def claims_table(root: Path, claims: Sequence[dict]) -> str:
    """Markdown rows for claims given as dicts with ``id``, ``claim``, ``treatment``, ``control``
    (each ``{"dir", "optimizer", "fixed_lr"?}``) and optional ``expect``."""
    lines = ["| # | claim | treatment | control | Δ (treatment − control) | verdict |",
             "|---|---|---|---|---:|---|"]
    for c in claims:
        t, k = Side(**c["treatment"]), Side(**c["control"])
        v = claim_verdict(root, t, k, c.get("expect", "lower"))
        a, b = v["rows"]
        diff = "—" if v["diff"] is None else f"{v['diff']:+.3f}"
        def at(s):
            return f"`{s.dir}`" + "".join(f" ({key} {val})" for key, val in (s.where or {}).items())
        lines.append(f"| {c['id']} | {c['claim']} | {t.optimizer} in {at(t)}: {_describe(a)} | "
                     f"{k.optimizer} in {at(k)}: {_describe(b)} | {diff} | **{v['verdict']}** ({v['why']}) |")
    return "\n".join(lines)


def fill_blocks(text: str, blocks: dict) -> str:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` for every
    ``name`` in ``blocks`` (the markers stay, so a page can be refreshed again)."""
    import re
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        if not pat.search(text):
            raise ValueError(f"no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        text = pat.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)
    return text
