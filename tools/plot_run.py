#!/usr/bin/env python3
"""Plot loss, learning rate, grad norm and effective LR of one or several runs from their
``--log-jsonl`` files, plain or ``.gz`` (or sweep run folders holding a ``log.jsonl[.gz]``).

    python tools/plot_run.py runs/a.jsonl runs/b.jsonl --out curves.png
    python tools/plot_run.py docs/lr_scaling/sweep/runs/adam-N64-D400-lr0.005-s1 --smooth 5 --out adam.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_md.experiments.plots import run_curves  # noqa: E402
from megatron_md.experiments.sweep import LOG, LOG_GZ, log_path, read_log  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="--log-jsonl files (plain or .gz) or folders containing log.jsonl[.gz]")
    p.add_argument("--out", default="run_curves.png", help="PNG file to write")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for train loss, grad norm, η_eff")
    p.add_argument("--labels", default=None, help="comma list of labels (default: file or folder names)")
    a = p.parse_args(argv)
    paths = [log_path(Path(x)) if Path(x).is_dir() else Path(x) for x in a.logs]
    labels = a.labels.split(",") if a.labels else [
        q.parent.name if q.name in (LOG, LOG_GZ) else Path(q.name.removesuffix(".gz")).stem for q in paths]
    if len(labels) != len(paths):
        p.error(f"--labels: {len(labels)} labels for {len(paths)} logs")
    runs = {}
    for lab, q in zip(labels, paths):
        if not q.exists():
            p.error(f"{q}: no such log (write one with the driver's --log-jsonl)")
        try:
            events = read_log(q)
        except ValueError as exc:
            p.error(str(exc))
        if not events:
            p.error(f"{q}: no events in this file")
        runs[lab] = events
    print(run_curves(runs, Path(a.out), smooth=a.smooth))
    return 0


if __name__ == "__main__":
    sys.exit(main())
