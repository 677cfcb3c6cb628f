#!/usr/bin/env python3
"""Checkpoint save / load time and size: ``--ckpt-format torch_dist`` against ``torch``.

Runs the driver's ``pretrain`` in this process (one rank, mock data, fp32) for each optimizer:
2 iterations with ``--save`` (the final save is timed), then a run that ``--load``s it with nothing
left to train (the load is timed: verifying the manifest's sha256 of every file, reading, and
for torch_dist resharding into this run's optimizer). ``megatron_md.checkpoint.save_checkpoint`` and
``load_checkpoint`` are timed from outside (wrapped; nothing in the driver changes). Both formats
run in the same process, interleaved per optimizer; torch_dist is reported relative to torch.

    python benchmarks/checkpoint_io.py                          # hidden 512, 4 layers
    python benchmarks/checkpoint_io.py --size 128x2 --optimizers adam --repeats 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks._common import dir_bytes, emit, header  # noqa: E402

EXTRA = {"adam": ["--weight-decay", "0.1"], "muon-md": ["--weight-decay", "0"],
         "sf-normuon": ["--weight-decay", "0", "--lr-decay-style", "constant"]}


def _timed(flags: list[str], what: str) -> float:
    from megatron_md import checkpoint
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain
    fn = getattr(checkpoint, what)
    took = []

    def wrapped(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        took.append(time.perf_counter() - t0)
        return out
    setattr(checkpoint, what, wrapped)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain(parse_args(flags))
    finally:
        setattr(checkpoint, what, fn)
    return took[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="512x4", help="HIDDENxLAYERS")
    p.add_argument("--optimizers", default="adam,muon-md,sf-normuon")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "docs" / "checkpoint_io.md"), help="markdown file ('-': stdout only)")
    a = p.parse_args(argv)
    hidden, layers = (int(x) for x in a.size.lower().split("x"))
    base = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "4",
            "--seq-length", "64", "--micro-batch-size", "2", "--lr", "0.003", "--mock-data",
            "--log-interval", "1", "--eval-iters", "0", "--normalization", "RMSNorm", "--swiglu",
            "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    t_start = time.time()
    rows = []
    for opt in [o.strip() for o in a.optimizers.split(",") if o.strip()]:
        res: dict = {f: {"save": [], "load": [], "bytes": 0} for f in ("torch", "torch_dist")}
        for _ in range(a.repeats):
            for fmt in ("torch", "torch_dist"):
                d = tempfile.mkdtemp(prefix="ckpt_io_")
                try:
                    flags = base + ["--optimizer", opt, *EXTRA.get(opt, []), "--ckpt-format", fmt]
                    res[fmt]["save"].append(_timed(flags + ["--train-iters", "2", "--save", d], "save_checkpoint"))
                    res[fmt]["bytes"] = dir_bytes(os.path.join(d, "iter_0000002"))
                    res[fmt]["load"].append(_timed(flags + ["--train-iters", "2", "--load", d], "load_checkpoint"))
                finally:
                    shutil.rmtree(d, ignore_errors=True)
        t, dd = res["torch"], res["torch_dist"]
        med = {f: {k: statistics.median(res[f][k]) for k in ("save", "load")} for f in res}
        rows.append(f"| {opt} | {med['torch']['save'] * 1e3:.0f} | {med['torch_dist']['save'] * 1e3:.0f} "
                    f"({med['torch_dist']['save'] / med['torch']['save']:.2f}×) | {med['torch']['load'] * 1e3:.0f} | "
                    f"{med['torch_dist']['load'] * 1e3:.0f} ({med['torch_dist']['load'] / med['torch']['load']:.2f}×) | "
                    f"{t['bytes'] / 2**20:.1f} | {dd['bytes'] / 2**20:.1f} |")
        print(rows[-1], file=sys.stderr)
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/checkpoint_io.py " + " ".join(argv if argv is not None
                                                                                 else sys.argv[1:])
    text = "\n".join(header("Checkpoint save / load: torch_dist vs per-rank torch files (CPU, one rank)", cmd, REPO,
                            f"Wall time {time.time() - t_start:.0f} s.")
                     + [f"Hidden {hidden}, {layers} layers (Llama-style, untied head), one rank, fp32; median of "
                        f"{a.repeats} saves/loads per format. Save: the driver's whole save (state, files, fsync, "
                        "sha256 of every file, manifest, publish). Load: verification (sha256), reading and "
                        "restoring (torch_dist: through the unsharded model's coordinates).", "",
                        "| optimizer | torch save (ms) | torch_dist save (ms) | torch load (ms) | torch_dist load (ms) "
                        "| torch MiB | torch_dist MiB |", "|---|---:|---:|---:|---:|---:|---:|"] + rows)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
