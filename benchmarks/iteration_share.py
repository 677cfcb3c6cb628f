#!/usr/bin/env python3
"""The optimizer's share of a whole training iteration of the megatron-core driver.

Runs ``examples/pretrain_gpt.py``'s ``pretrain`` in this process (one rank, mock data, fp32) for
each optimizer and model size, with the Megatron optimizer's ``step()`` timed from outside (the
builder's return value is wrapped; nothing in the driver changes). Per iteration after the
warm-up: the optimizer step (Megatron's wrapper: grad clipping, the non-finite check, our
matrix method and its Adam partner, the copy back to the model params) and the whole iteration
(between consecutive step ends: data, forward, backward, grad finalization, optimizer, logging).
Reports medians, the optimizer's share of the iteration, and the iteration time relative to
AdamW (``--optimizer adam``) at the same size — measured in the same process, interleaved by
size. CPU: every op is synchronous, so host time is the op's time.

    python benchmarks/iteration_share.py                                 # demo scale and hidden 512
    python benchmarks/iteration_share.py --sizes 128x4 --optimizers adam,muon-md --iters 12
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
from benchmarks._common import emit, header  # noqa: E402

ALL = "adam,muon,normuon,rmnp,adamh,muonh,adam-md,muon-md,sf-adamw,sf-normuon"
EXTRA = {"adam": ["--weight-decay", "0.1"], "muon": ["--weight-decay", "0.1"], "normuon": ["--weight-decay", "0.1"],
         "sf-adamw": ["--lr-decay-style", "constant"], "sf-normuon": ["--lr-decay-style", "constant"]}


def _timed_run(flags: list[str]) -> tuple[list[float], list[float]]:
    """(optimizer step seconds, iteration seconds) of every iteration of one driver run."""
    from megatron_md.megatron import builder
    from megatron_md.training.arguments import parse_args
    from megatron_md.training.pretrain import pretrain

    steps, ends = [], []
    original = builder.get_megatron_optimizer

    def wrapped(*args, **kwargs):
        opt = original(*args, **kwargs)
        inner_step = opt.step

        def step():
            t0 = time.perf_counter()
            out = inner_step()
            t1 = time.perf_counter()
            steps.append(t1 - t0)
            ends.append(t1)
            return out
        opt.step = step
        return opt

    builder.get_megatron_optimizer = wrapped
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain(parse_args(flags))
    finally:
        builder.get_megatron_optimizer = original
    iters = [b - a for a, b in zip(ends, ends[1:])]
    return steps[1:], iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128x4,512x2", help="comma list of HIDDENxLAYERS")
    p.add_argument("--optimizers", default=ALL)
    p.add_argument("--iters", type=int, default=10, help="iterations per run (the first two are warm-up)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=str(REPO / "docs" / "iteration_share.md"), help="markdown file ('-': stdout only)")
    a = p.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    opts = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    if "adam" not in opts:
        opts.insert(0, "adam")
    t_start = time.time()
    sections = []
    for size in a.sizes.split(","):
        hidden, layers = (int(x) for x in size.lower().split("x"))
        base = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "4",
                "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
                "--train-iters", str(a.iters), "--lr", "0.003", "--lr-warmup-iters", "0", "--mock-data",
                "--log-interval", str(a.iters), "--eval-interval", str(10 ** 6), "--eval-iters", "0",
                "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
                "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
        res = {}
        for opt in opts:
            wd = [] if opt in EXTRA and "--weight-decay" in EXTRA[opt] else ["--weight-decay", "0"]
            steps, iters = _timed_run(base + ["--optimizer", opt, *wd, *EXTRA.get(opt, [])])
            res[opt] = (statistics.median(steps[1:]), statistics.median(iters[1:]))
            print(f"{size} {opt}: optimizer {res[opt][0] * 1e3:.1f} ms of {res[opt][1] * 1e3:.1f} ms", file=sys.stderr)
        adam_it = res["adam"][1]
        rows = [f"### hidden {hidden}, {layers} layers, {a.micro_batch_size} × {a.seq_length} tokens per iteration",
                "", "| optimizer | optimizer step (ms) | iteration (ms) | optimizer share | iteration vs AdamW |",
                "|---|---:|---:|---:|---:|"]
        for opt, (st, it) in res.items():
            rows.append(f"| {opt} | {st * 1e3:.1f} | {it * 1e3:.1f} | {st / it:.0%} | {it / adam_it:.2f}× |")
        sections += rows + [""]
    from megatron_md.ops.ns_dtype import ns_dtype_decision
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/iteration_share.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:])
    text = "\n".join(header("The optimizer's share of a training iteration (megatron-core driver, CPU fp32)", cmd,
                            REPO, f"Wall time {time.time() - t_start:.0f} s.")
                     + [f"One rank, mock data, fp32 training; median over iterations 3..{a.iters} of each run. "
                        f"Newton–Schulz dtype: {ns_dtype_decision('cpu')[1]}. The optimizer step is "
                        "Megatron's `step()` (clipping, non-finite check, the method and its Adam partner, copy "
                        "to the model params); the iteration is the time between consecutive step ends.", ""]
                     + sections)
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
