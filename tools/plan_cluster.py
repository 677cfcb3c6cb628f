#!/usr/bin/env python
"""Predict what each optimizer costs per rank and step on a cluster layout (no GPU needed).

    python tools/plan_cluster.py --model llama3-70b --tp 8 --pp 4 --dp 64 --dp-mode zero1
    python tools/plan_cluster.py --model qwen3-30b-a3b --ep 8 --dp 8 --dp-mode zero1 --global-batch 512
    python tools/plan_cluster.py --model llama3-70b --tp 8 --pp 4 --sweep-dp 8,32,128,512,2048,4096 \\
        --optimizers muon,rmnp --plot overhead.png

Prints one row per optimizer (and DP size): Newton–Schulz TFLOP of the busiest rank and the mean,
owner imbalance (max / mean over ranks), elementwise GFLOP, optimizer state, bytes and collectives
of the busiest rank, predicted times (NS, elementwise, communication, total; AdamW's total) and
the share of the step (model step = 6·N_active·tokens at --mfu). ``--detail`` adds the per-rank
collectives of the busiest rank per tag, kind and process group. The model and what it leaves
out: megatron_md/planning/cost.py; its counts equal shard.METER in real runs
(tests/megatron/test_plan_cluster.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_md.planning.cost import OPTIMIZERS, Hardware, Layout, plan, summary, times  # noqa: E402
from megatron_md.planning.model import PRESETS  # noqa: E402

COLUMNS = [("optimizer", "optimizer", "{}"), ("dp", "DP", "{}"), ("gpus", "GPUs", "{}"),
           ("ns_tflop_max", "NS TFLOP max", "{:.3f}"), ("ns_tflop_mean", "NS TFLOP mean", "{:.3f}"),
           ("imbalance", "max/mean", "{:.1f}"), ("owner_share", "owners", "{:.1%}"),
           ("elem_gflop_max", "elem GFLOP", "{:.2f}"), ("state_gb_max", "state GB", "{:.2f}"),
           ("bytes_sent_max_mb", "sent MB", "{:.1f}"), ("calls_max", "calls", "{}"),
           ("t_ns_ms", "NS ms", "{:.2f}"), ("t_elem_ms", "elem ms", "{:.2f}"), ("t_comm_ms", "comm ms", "{:.2f}"),
           ("t_opt_ms", "opt ms", "{:.2f}"), ("t_adamw_ms", "AdamW ms", "{:.2f}"), ("t_step_s", "step s", "{:.3f}"),
           ("share", "share", "{:.2%}"), ("overhead", "vs AdamW", "{:.2%}"),
           ("t_opt_piped_ms", "opt ms piped", "{:.2f}"), ("overhead_piped", "vs AdamW piped", "{:.2%}"),
           ("ns_vs_model", "NS/model FLOPs", "{:.2%}")]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--optimizers", default=",".join(o for o in OPTIMIZERS if o != "adam"),
                    help="comma-separated --optimizer values (default: every matrix method and sf-adamw)")
    lay = ap.add_argument_group("layout")
    for f in ("tp", "pp", "vpp", "ep", "dp"):
        lay.add_argument(f"--{f}", type=int, default=1)
    lay.add_argument("--etp", type=int, default=None, help="expert TP (default: --tp)")
    lay.add_argument("--dp-mode", choices=["ddp", "zero1", "layer-wise", "fsdp"], default="zero1")
    lay.add_argument("--ns-mode", choices=["owner", "gather"], default="owner")
    lay.add_argument("--ns-dtype", choices=["bf16", "fp32"], default="bf16")
    lay.add_argument("--no-split-qkv", action="store_true")
    lay.add_argument("--split-fc1", action="store_true", help="SwiGLU's gate and up as separate matrices")
    lay.add_argument("--ns-split", action="store_true",
                     help="owner NS may split a matrix over its TP group (the product's --ns-split)")
    lay.add_argument("--global-batch", type=int, default=1024, help="sequences per step")
    lay.add_argument("--seq", type=int, default=4096)
    lay.add_argument("--bucket-size", type=int, default=None, help="DDP bucket size in elements (ZeRO-1 ranges)")
    lay.add_argument("--sweep-dp", default=None, help="comma-separated DP sizes (replaces --dp)")
    hw = ap.add_argument_group("hardware (per GPU; defaults: H100 SXM)")
    for f in dataclasses.fields(Hardware):
        flag = "--hw-name" if f.name == "name" else "--" + f.name.replace("_", "-")
        hw.add_argument(flag, dest=f.name, type=type(f.default), default=f.default)
    ap.add_argument("--detail", action="store_true", help="collectives of the busiest rank per tag/kind/group")
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    ap.add_argument("--plot", default=None, help="PNG: share of the step vs DP (with --sweep-dp)")
    return ap.parse_args(argv)


def _row(r):
    return "| " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |"


def main(argv=None):
    a = parse(argv)
    spec = PRESETS[a.model]
    hw = Hardware(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Hardware)})
    dps = [int(x) for x in a.sweep_dp.split(",")] if a.sweep_dp else [a.dp]
    opts = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    total, active = spec.params()
    print(f"{spec.name}: {total / 1e9:.1f}B parameters ({active / 1e9:.1f}B active); TP {a.tp} PP {a.pp} "
          f"VPP {a.vpp} EP {a.ep} ETP {a.etp or a.tp}; {a.dp_mode}, NS {a.ns_mode}{' split' if a.ns_split else ''} "
          f"{a.ns_dtype}; "
          f"{a.global_batch} × {a.seq} tokens; {hw.name}: bf16 {hw.bf16_tflops:g} TFLOP/s × {hw.matmul_fraction:g}, "
          f"MFU {hw.mfu:g}, NVLink {hw.nvlink_gbs:g} GB/s, IB {hw.ib_gbs:g} GB/s")
    print("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    rows = []
    for dp in dps:
        lay = Layout(tp=a.tp, pp=a.pp, vpp=a.vpp, ep=a.ep, etp=a.etp, dp=dp, dp_mode=a.dp_mode, ns_mode=a.ns_mode,
                     ns_dtype=a.ns_dtype, split_qkv=not a.no_split_qkv, split_fc1=a.split_fc1, global_batch=a.global_batch, seq=a.seq,
                     bucket_size=a.bucket_size, ns_split=a.ns_split)
        base = times(plan(spec, lay, "adam"), hw)
        for o in opts:
            r = summary(spec, lay, o, hw, baseline=base)
            rows.append(r)
            print(_row(r), flush=True)
            if a.detail:
                _detail(spec, lay, o)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.plot:
        _plot(rows, a, spec)
    return rows


def _detail(spec, lay, o):
    p = plan(spec, lay, o)
    busiest = max(range(len(p.stages)), key=lambda s: p.stages[s].ns_flops.max())
    st = p.stages[busiest]
    rank = int(st.ns_flops.argmax())
    print(f"  {o}: stage {busiest}, rank {rank} of the stage — calls / sent / received per (tag, kind, group):")
    for key in sorted(st.traffic.calls, key=str):
        print(f"    {key}: {int(st.traffic.calls[key][rank])} / {int(st.traffic.sent[key][rank])} / "
              f"{int(st.traffic.received[key][rank])}")


def _plot(rows, a, spec):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in dict.fromkeys(r["optimizer"] for r in rows):
        pts = [(r["gpus"], 100 * r["overhead"]) for r in rows if r["optimizer"] == o]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=o)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"GPUs (TP {a.tp} × PP {a.pp} × DP; EP {a.ep})")
    ax.set_ylabel("predicted step-time overhead vs AdamW (%)")
    ax.set_title(f"{spec.name}, {a.dp_mode}, NS {a.ns_mode} {a.ns_dtype}, {a.global_batch}×{a.seq} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.plot, dpi=120)
    print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
