#!/usr/bin/env python3
"""Cost of the optimizer telemetry (``--log-optimizer-stats-interval``) in the megatron-core driver.

Runs the driver in this process (one rank, mock data) for each optimizer with telemetry off and
at interval 1 (every step), interleaved (off, on, off, on, ...) so that machine load affects
both alike, and reports the training time per iteration (``train_s`` of the run's summary,
telemetry included) and the added cost per telemetry step as a fraction of an iteration;
interval K costs about 1/K of that on average. Also checks the off/on runs' losses are equal.

    python benchmarks/telemetry_cost.py                           # demo-scale GPT, 4 optimizers
    python benchmarks/telemetry_cost.py --hidden 512 --optimizers adam,rmnp --iters 10
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks._common import header  # noqa: E402

OPT_FLAGS = {"adam": ["--weight-decay", "0.1"], "muon-md": [], "rmnp": [], "adamh": [], "sf-normuon": [],
             "muon": ["--weight-decay", "0"]}


def _run(flags):
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain
    with contextlib.redirect_stdout(io.StringIO()):
        return pretrain(parse_args(flags))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="off/on pairs per optimizer")
    p.add_argument("--optimizers", default="adam,muon-md,rmnp,adamh")
    p.add_argument("--out", default=str(REPO / "docs" / "telemetry_cost.md"), help="markdown file ('-': stdout only)")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    base = ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", "4",
            "--seq-length", "128", "--micro-batch-size", "16", "--train-iters", str(a.iters), "--lr", "0.003",
            "--mock-data", "--log-interval", str(a.iters), "--eval-interval", str(10 ** 6), "--eval-iters", "0"]
    rows = []
    t0 = time.time()
    load0 = os.getloadavg()[0]
    for opt in a.optimizers.split(","):
        flags = base + ["--optimizer", opt, *OPT_FLAGS.get(opt, [])]
        off, on = [], []
        same = True
        for _ in range(a.repeats):
            s_off = _run(flags)
            s_on = _run(flags + ["--log-optimizer-stats-interval", "1"])
            off.append(s_off["train_s"] / a.iters)
            on.append(s_on["train_s"] / a.iters)
            same &= s_off["train_loss_history"] == s_on["train_loss_history"]
        m_off, m_on = statistics.median(off), statistics.median(on)
        rows.append((opt, 1000 * m_off, 1000 * m_on, (m_on - m_off) / m_off, same))
        print(f"{opt}: {1000 * m_off:.1f} ms/iter off, {1000 * m_on:.1f} ms/iter with telemetry every step "
              f"(+{100 * (m_on - m_off) / m_off:.1f}%), losses identical: {same}", flush=True)
    cmd = "python benchmarks/telemetry_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = header("Cost of the optimizer telemetry", cmd, REPO,
                   f"Load average {load0:.1f} at the start; compare the columns of one row, which were measured "
                   "interleaved.") + [
        f"Megatron-Core GPT, {a.layers} layers, hidden {a.hidden}, seq 128, batch 16, fp32, one rank, mock data; "
        f"{a.iters} iterations per run, median of {a.repeats} interleaved off/on pairs. *Telemetry every step* "
        f"is `--log-optimizer-stats-interval 1`; at interval K the average cost is about 1/K of the last column; "
        f"off (`0`, the default) does no work at all.", "",
        "| optimizer | ms/iter, telemetry off | ms/iter, every step | added per telemetry step | losses off == on |",
        "|---|---:|---:|---:|---|"]
    for opt, t_off, t_on, frac, same in rows:
        lines.append(f"| {opt} | {t_off:.1f} | {t_on:.1f} | {100 * frac:+.1f}% of an iteration | {same} |")
    lines.append(f"\n(total {time.time() - t0:.0f} s)\n")
    text = "\n".join(lines)
    print(text)
    if a.out != "-":
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
