#!/usr/bin/env python3
"""The quality table of docs/RESULTS.md from a ``tools/sweep.py`` directory.

Per optimizer: LRs swept, best LR (flagged when it lies at the grid's edge), final validation
loss at the best LR (mean ± half-range over its seeds), the verdict against the baseline
(better / worse / within seed noise), and the fraction of the baseline's steps needed to reach
the baseline's final training loss. Writes ``<out>/quality.md`` and the plots
``loss_vs_step.png`` and ``loss_vs_lr.png``.

    python tools/results_table.py docs/results/quality --out docs/results
    python tools/results_table.py docs/results/quality --out docs/results --best-lrs --optimizers adam,muon-md
    python tools/results_table.py docs/results/quality --out docs/results --edge-lrs
    python tools/results_table.py docs/results --out docs/results --claims docs/results/claims.toml
    python tools/results_table.py docs/results/quality --out docs/results --fill docs/RESULTS.md   # refresh the page
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_md.experiments import results as res  # noqa: E402

ORDER = ["adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md", "sf-adamw", "sf-normuon"]


def _command(argv) -> str:
    """This invocation, as a page records it."""
    return f"python tools/results_table.py {shlex.join(sys.argv[1:] if argv is None else argv)}"


def _images(plots, out: Path, page_dir: Path = None) -> list[str]:
    """Markdown image lines of ``plots`` (under ``out``), relative to ``page_dir`` (default ``out``)."""
    rel = "" if page_dir is None else os.path.relpath(out, page_dir) + "/"
    return [f"![{q.stem}]({rel}{q.relative_to(out).as_posix()})" for q in plots]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="sweep directory (tools/sweep.py --out); with --claims: the folder "
                   "the claims' directories are relative to")
    p.add_argument("--out", type=Path, required=True, help="folder for quality.md and the plots")
    p.add_argument("--baseline", default="adam")
    p.add_argument("--optimizers", default=",".join(ORDER), help="row order (comma list)")
    p.add_argument("--name", default="quality", help="basename of the markdown file, the plots folder and the --fill block")
    p.add_argument("--best-lrs", action="store_true",
                   help="only print each optimizer's best LR as tools/sweep.py --lrs ('adam=0.004;muon=0.02'), "
                   "leaving out optimizers whose best lies at the grid's edge (extend those first)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only the runs with this setting (repeatable), e.g. hidden_size=256: --best-lrs / --edge-lrs "
                        "of one width of a width sweep")
    p.add_argument("--edge-lrs", action="store_true",
                   help="only print, for each optimizer whose best LR lies at an end of its grid, the next two LRs "
                   "beyond that end (x2 / /2 steps) as tools/sweep.py --lrs ('muon=0.0025,0.00125'); empty when none")
    p.add_argument("--fill", type=Path, metavar="MD",
                   help="also refresh this page's <!-- BEGIN quality/claims --> blocks (with --claims: the claims "
                   "block, else the quality block)")
    p.add_argument("--claims", type=Path, metavar="TOML",
                   help="instead: the pairwise claims of this file ([[claim]] tables), written to <out>/claims.md")
    p.add_argument("--by", choices=sorted(res.SCALING_KEYS),
                   help="instead: a table along width (hidden_size) or run length (train_iters) — each value's "
                   "own LR sweep and best LR — written to <out>/<name>.md with a loss-vs-LR plot per optimizer")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="DIR",
                   help="with --by: more sweep directories to take runs from (e.g. the quality sweep at the "
                   "base width)")
    a = p.parse_args(argv)
    if a.by is not None:
        names = [o.strip() for o in a.optimizers.split(",") if o.strip()]
        rows = res.scaling_rows([a.sweep, *a.also], names, a.by)
        if not rows:
            p.error(f"{a.sweep}: no runs of {a.optimizers}")
        plots = res.plot_scaling(rows, a.by, a.out / "plots" / a.name)
        table = res.scaling_table(rows, a.by)
        a.out.mkdir(parents=True, exist_ok=True)
        lines = [f"# Along {a.by}: {a.sweep}", "", f"Command: `{_command(argv)}` ({time.strftime('%Y-%m-%d %H:%M')}).",
                 "", table, "", *_images(plots, a.out)]
        (a.out / f"{a.name}.md").write_text("\n".join(lines) + "\n")
        if a.fill is not None:
            block = "\n".join([table, "", *_images(plots, a.out, a.fill.parent)])
            a.fill.write_text(res.fill_blocks(a.fill.read_text(), {a.name: block}))
        print("\n".join(lines))
        return 0
    if a.claims is not None:
        import tomllib
        claims = tomllib.loads(a.claims.read_text()).get("claim", [])
        if not claims:
            p.error(f"{a.claims}: no [[claim]] tables")
        text = (f"# Claims: {a.claims}\n\nCommand: `{_command(argv)}` ({time.strftime('%Y-%m-%d %H:%M')}). "
                "Each side: the optimizer's best-LR final validation loss in its directory (mean ± half-range over "
                "seeds). Verdicts: *pending* (no finished run), *inconclusive* (a best LR at the grid's edge, or "
                "the difference within both seed half-ranges), *holds* / *does not hold*.\n\n"
                + res.claims_table(a.sweep, claims) + "\n")
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "claims.md").write_text(text)
        if a.fill is not None:
            a.fill.write_text(res.fill_blocks(a.fill.read_text(), {"claims": res.claims_table(a.sweep, claims)}))
        print(text)
        return 0
    if not (a.sweep / "runs").is_dir():
        p.error(f"{a.sweep}: not a sweep directory (no runs/)")
    where = dict(w.split("=", 1) for w in a.where) if a.where else None
    rows = res.quality_rows(a.sweep, [o.strip() for o in a.optimizers.split(",") if o.strip()], a.baseline, where)
    if not rows:
        p.error(f"{a.sweep}: no runs of {a.optimizers}")
    if a.edge_lrs:
        out = []
        for r in rows:
            if r.best_lr is None or not r.edge or len(r.lrs) < 2:
                continue
            low = r.best_lr == r.lrs[0]
            step = r.lrs[0] / r.lrs[1] if low else r.lrs[-1] / r.lrs[-2]
            out.append(f"{r.optimizer}=" + ",".join(f"{r.best_lr * step ** k:.4g}" for k in (1, 2)))
        print(";".join(out))
        return 0
    if a.best_lrs:
        print(";".join(f"{r.optimizer}={r.best_lr:g}" for r in rows if r.best_lr is not None and not r.edge))
        return 0
    plots = res.plot_quality(rows, a.sweep, a.out / "plots" / a.name)
    meta = json.loads((a.sweep / "sweep.json").read_text()) if (a.sweep / "sweep.json").exists() else {}
    iters = sorted({r.train_iters for r in rows})
    lines = [f"# Quality table: {a.sweep}", "",
             f"Command: `{_command(argv)}` "
             f"({time.strftime('%Y-%m-%d %H:%M')}); last sweep step at commit {meta.get('commit', '?')} (each run's own: its command.json); "
             f"{iters} iterations per run. Every run's command and log: `{a.sweep}/runs/<run>/`.", "",
             res.markdown_table(rows, a.baseline), "",
             "Final validation loss: the driver's evaluation at the last iteration. Seeds at the best LR: mean ± "
             "half-range; a difference from the baseline within both half-ranges together is *within seed noise*. "
             f"Fraction of steps: first iteration at which the training loss (logged as the mean over each log "
             f"interval, averaged over the seeds at the best LR, interpolated between log points) reaches "
             f"{a.baseline}'s final one at its best LR, over the run length.", ""]
    lines += _images(plots, a.out)
    out = a.out / f"{a.name}.md"
    a.out.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if a.fill is not None:
        block = "\n".join(lines[4:-len(plots)] + _images(plots, a.out, a.fill.parent))
        a.fill.write_text(res.fill_blocks(a.fill.read_text(), {a.name: block}))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
