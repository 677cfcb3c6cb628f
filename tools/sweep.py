#!/usr/bin/env python3
"""Run a resumable grid of short megatron-core driver runs and tabulate them.

Grid: learning rate (per optimizer) × train iterations D × width N (--hidden-size) × optimizer
× seed. Every finished run is kept (``<out>/runs/<id>/result.json``) and never rerun; failed
runs are recorded with their error (``--retry-failed`` reruns them); ``<out>/results.csv`` and
``results.jsonl`` hold final validation loss, mean effective LR of the last 10% of iterations,
tokens, wall time and the command of every run. Flags after ``--`` go to every driver run. A
finished run keeps its driver log gzip-compressed (``log.jsonl.gz``); ``--compress-logs`` does that
for the runs of a sweep written before.

Examples::

    # from a TOML file (see docs/lr_scaling/sweep.toml)
    python tools/sweep.py --config docs/lr_scaling/sweep.toml --out runs/lr_scaling

    # from flags: AdamW and AdamH, 3 lengths x 5 LRs, the real corpus, 2 runs at a time
    python tools/sweep.py --out runs/mysweep --optimizers adam,adamh \\
        --lrs "adam=1e-3,2e-3,4e-3,8e-3,1.6e-2;adamh=5e-3,1e-2,2e-2,4e-2,8e-2" \\
        --train-iters 100,200,400 --hidden-sizes 64 --jobs 2 -- \\
        --num-layers 2 --num-attention-heads 4 --seq-length 128 --micro-batch-size 8 \\
        --eval-interval 100000 --eval-iters 8 --log-interval 50

    python tools/sweep.py --out runs/mysweep --dry-run     # list pending runs and their commands
    python tools/sweep.py --out runs/oldsweep --compress-logs   # gzip the plain logs of its finished runs
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_md.experiments.sweep import (SweepConfig, compress_logs, driver_command, load_config, pending,  # noqa: E402
                                           run_sweep)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _lrs(s: str) -> dict[str, list[float]]:
    if "=" not in s:
        return {"*": _floats(s)}  # one list for every optimizer
    out = {}
    for part in s.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"--lrs: expected 'optimizer=lr1,lr2;...', got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = _floats(v)
    return out


def parse(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    driver = []
    if "--" in argv:
        i = argv.index("--")
        argv, driver = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="sweep directory (created; reused to resume)")
    p.add_argument("--config", help="TOML file with [sweep], [lrs], [optimizer_args] tables")
    p.add_argument("--optimizers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
    p.add_argument("--lrs", type=_lrs, help="'adam=1e-3,3e-3;adamh=1e-2,3e-2' (or one list for all: '1e-3,3e-3')")
    p.add_argument("--train-iters", type=_ints, help="comma list of D (iterations)")
    p.add_argument("--hidden-sizes", type=_ints, help="comma list of N (--hidden-size)")
    p.add_argument("--seeds", type=_ints)
    p.add_argument("--jobs", type=int, help="runs at once (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--nproc", type=int, help="ranks per run (torchrun when > 1; default 1)")
    p.add_argument("--stats-interval", type=int, help="--log-optimizer-stats-interval (default D // 40)")
    p.add_argument("--data", help="'corpus' (default: the real-text dataset of tools/preprocess_data.py), "
                   "'mock', or a --data-path prefix")
    p.add_argument("--optimizer-args", action="append", default=[], metavar="OPT=FLAGS",
                   help="extra driver flags for one optimizer, e.g. 'adam=--weight-decay 0.1' (repeatable)")
    p.add_argument("--in-process", action="store_true", default=None,
                   help="run the driver inside this process, one run after another (nproc 1, jobs 1; imports "
                   "megatron-core once)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="print the pending runs' commands and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compress-logs", action="store_true",
                   help="only replace the plain log.jsonl of every finished run in --out by log.jsonl.gz, and exit")
    a = p.parse_args(argv)
    if a.compress_logs:
        if not (Path(a.out) / "runs").is_dir():
            p.error(f"--compress-logs: {a.out} is not a sweep directory (no runs/)")
        return a, None
    kw = load_config(a.config) if a.config else {}
    for key in ("optimizers", "train_iters", "hidden_sizes", "seeds", "jobs", "nproc", "stats_interval", "data", "in_process",
                "threads"):
        v = getattr(a, key)
        if v is not None:
            kw[key] = v
    if a.lrs is not None:
        kw["lrs"] = {o: a.lrs["*"] for o in kw.get("optimizers", [])} if "*" in a.lrs else a.lrs
    if driver:
        kw["base_args"] = list(kw.get("base_args", [])) + driver
    for item in a.optimizer_args:
        k, v = item.split("=", 1)
        kw.setdefault("optimizer_args", {})[k] = shlex.split(v)
    for need in ("optimizers", "lrs", "train_iters", "hidden_sizes"):
        if need not in kw:
            p.error(f"--{need.replace('_', '-')} (or the [sweep]/[lrs] table of --config) is required")
    try:
        cfg = SweepConfig(**kw)
        cfg.validate()
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    return a, cfg


def main(argv=None) -> int:
    a, cfg = parse(argv)
    if a.compress_logs:
        done = compress_logs(Path(a.out))
        print(f"sweep {a.out}: {len(done)} logs compressed")
        return 0
    if a.dry_run:
        todo, done = pending(cfg, Path(a.out), a.retry_failed)
        print(f"{len(cfg.grid())} grid points: {done} finished, {len(todo)} pending")
        data = ["--data-path", "<prefix>"] if cfg.data == "corpus" else (
            ["--mock-data"] if cfg.data == "mock" else ["--data-path", cfg.data])
        for spec in todo:
            print(f"{spec.run_id}: {shlex.join(driver_command(cfg, spec, Path(a.out) / 'runs' / spec.run_id, data))}")
        return 0
    counts = run_sweep(cfg, a.out, retry_failed=a.retry_failed, progress=not a.no_progress)
    print(f"sweep {a.out}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} already finished; "
          f"table: {Path(a.out) / 'results.csv'}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
