#!/usr/bin/env python
"""Side by side in one process: our optimizers against what users would otherwise run.

* our ``Muon`` vs ``torch.optim.Muon`` with identical settings (lr 0.02, momentum 0.95, Nesterov,
  weight decay 0.1, jordan × 5, ``adjust_lr_fn="original"`` = our ``shape_scaling``, bf16 NS — torch's
  NS is always bf16); our Muon with this machine's automatic NS dtype as a third column;
* our ``SFAdamW`` vs ``schedulefree.AdamWScheduleFree(foreach=True)``;
* the AdamW partner as the builders make it (``torch.optim.AdamW(fused=True)`` where torch has the
  fused kernel) vs ``foreach=True`` and ``foreach=False`` (torch's CPU default).

Parameters: the four weight matrices of one GPT layer of hidden ``h`` (QKV 1.5h × h as one
matrix, proj h × h, fc1 4h × h, fc2 h × 4h), fp32, the same gradients every step. All variants of
a row step round-robin (median of ``--repeats`` after ``--warmup``), so machine load hits all alike.
Benchmark only; nothing is asserted.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/side_by_side.py [--hidden 512]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import header, interleaved  # noqa: E402


def shapes(h):
    return [(3 * h // 2, h), (h, h), (4 * h, h), (h, 4 * h)]


def params(h, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g) * 0.02 for s in shapes(h)]
    grads = [torch.randn(s, generator=g) for s in shapes(h)]

    def fresh():
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps
    return fresh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "side_by_side.md"))
    args = ap.parse_args(argv)
    import torch

    import megatron_md.optim as optim
    from megatron_md.ops.ns_dtype import ns_dtype_decision

    fresh = params(args.hidden)
    auto_dt, why = ns_dtype_decision("cpu")
    muon_kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    rows_spec = []
    variants = {
        "ours, bf16 NS": optim.Muon(fresh(), **muon_kw, scale="shape_scaling", ns_dtype=torch.bfloat16).step,
        "torch.optim.Muon": torch.optim.Muon(fresh(), **muon_kw, adjust_lr_fn="original").step,
        f"ours, auto NS ({str(auto_dt).replace('torch.', '')})": optim.Muon(fresh(), **muon_kw).step,
    }
    rows_spec.append(("Muon", variants, "torch.optim.Muon"))
    try:
        import schedulefree
        theirs = schedulefree.AdamWScheduleFree(fresh(), lr=0.0025, weight_decay=0.1, foreach=True)
        theirs.train()  # schedulefree starts in eval mode
        sf = {"ours SFAdamW": optim.SFAdamW(fresh(), lr=0.0025, weight_decay=0.1).step,
              "schedulefree.AdamWScheduleFree(foreach)": theirs.step}
        rows_spec.append(("SF-AdamW", sf, "schedulefree.AdamWScheduleFree(foreach)"))
    except ImportError:
        print("schedulefree not installed: SF-AdamW row skipped", file=sys.stderr)
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    from megatron_md.optim.builder import fused_adamw_kwargs
    partner = ", ".join(f"{k}={v}" for k, v in fused_adamw_kwargs().items())
    rows_spec.append(("AdamW", {
        f"partner ({partner}, as the builders make it)": torch.optim.AdamW(fresh(), **fused_adamw_kwargs(), **kw).step,
        "torch AdamW foreach=True": torch.optim.AdamW(fresh(), foreach=True, **kw).step,
        "torch AdamW foreach=False": torch.optim.AdamW(fresh(), foreach=False, **kw).step,
    }, "torch AdamW foreach=True"))
    body = [f"Parameters: the 4 matrices of one hidden-{args.hidden} layer ({sum(a * b for a, b in shapes(args.hidden)) / 1e6:.2f} M "
            f"weights, fp32). Median (min) of {args.repeats} steps after {args.warmup} warm-up rounds, the variants of "
            f"a row interleaved; *ratio* = variant / the row's reference (last column named). Automatic NS dtype "
            f"here: {why}.", "",
            "| method | variant | step ms (median) | min ms | ratio (medians) | ratio (mins) | reference |",
            "|---|---|---:|---:|---:|---:|---|"]
    for method, steps, ref in rows_spec:
        t = interleaved(steps, args.warmup, args.repeats)
        r_med, r_min = statistics.median(t[ref]), min(t[ref])
        for k, v in t.items():
            body.append(f"| {method} | {k} | {1e3 * statistics.median(v):.2f} | {1e3 * min(v):.2f} | "
                        f"{statistics.median(v) / r_med:.2f}× | {min(v) / r_min:.2f}× | {ref} |")
            print(body[-1], file=sys.stderr)
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/side_by_side.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(header("Side by side: our optimizers vs torch.optim.Muon, schedulefree, torch AdamW", cmd, ROOT)
                     + body) + "\n"
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
