#!/usr/bin/env python
"""The cost model's predicted optimizer step time on this CPU beside the measured one.

    PYTHONPATH=. .venv/bin/python benchmarks/plan_vs_measured.py --hidden 512,1024

One process, one GQA layer of ``hidden`` (benchmarks/step_time.py's parameters: fused QKV with 32
heads / 8 groups, proj, fc1 4h, fc2), every matrix method, Newton–Schulz in fp32. Prediction =
NS FLOPs / (this CPU's measured fp32 matmul rate) + elementwise passes × elements × 12 bytes /
(its measured elementwise bandwidth): the NS FLOPs and passes are the cost model's
(:func:`megatron_md.planning.cost.plan` on the same layer; passes traced from the real classes),
the two rates measured right before each timed step (``torch.mm`` at 4h × h × h; ``a.add_(b)`` on 4 M
floats), the ratio per step, medians reported.
Measured = median step of the product's optimizer (step_time.py's harness). No communication
(one process): the model's bytes are checked exactly elsewhere (tests/megatron/test_plan_cluster.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_time import HEADS, QUERY_GROUPS, OPTIMIZERS, build_params, make_pair, time_pair  # noqa: E402

#: class name → --optimizer value
FLAG = {"Muon": "muon", "NorMuon": "normuon", "RMNP": "rmnp", "AdamH": "adamh", "MuonH": "muonh",
        "AdamMD": "adam-md", "MuonMD": "muon-md", "SFNorMuon": "sf-normuon"}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a name is informational
        return platform.processor() or "unknown CPU"


def matmul_rate(h: int, repeats: int = 5) -> float:
    import torch
    a, b = torch.randn(4 * h, h), torch.randn(h, h)
    torch.mm(a, b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * 4 * h * h * h / statistics.median(ts)


def elementwise_bw(n: int = 1 << 24, repeats: int = 5) -> float:
    import torch
    a, b = torch.randn(n), torch.randn(n)
    a.add_(b)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.add_(b)
        ts.append(time.perf_counter() - t0)
    return 12 * n / statistics.median(ts)


def predicted(name: str, h: int, rate: float, bw: float) -> tuple[float, float, float]:
    """(NS seconds, elementwise seconds, NS FLOPs) of one step of ``name`` on one layer."""
    from megatron_md.planning.cost import Layout, plan
    from megatron_md.planning.model import ModelSpec
    from megatron_md.planning.trace import trace_method

    spec = ModelSpec("layer", h, 1, HEADS, QUERY_GROUPS, h // HEADS, 4 * h, 128, swiglu=False)
    p = plan(spec, Layout(ns_dtype="fp32"), FLAG[name])
    ns = int(p.stages[0].ns_flops[0])
    numel = (QUERY_GROUPS * (HEADS // QUERY_GROUPS + 2) * (h // HEADS) * h) + h * h + 8 * h * h
    elem = trace_method(FLAG[name]).elementwise_passes * numel * 12
    return ns / rate, elem / bw, ns


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    a = ap.parse_args(argv)
    import torch
    torch.manual_seed(0)
    print(f"CPU: {cpu_name()}; {torch.get_num_threads()} torch thread(s); torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print()
    for h in (int(x) for x in a.hidden.split(",")):
        print(f"hidden {h}: the rates are measured right before every timed step (the machine is shared: "
              f"a rate measured once drifts from the step's); each row: medians over {a.repeats} steps")
        print()
        print("| optimizer | NS GFLOP (model) | matmul GFLOP/s | elementwise GB/s | predicted ms | "
              "measured ms | measured / predicted |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        spec = build_params(h, 1, seed=0)
        for name in a.optimizers.split(","):
            opt, base = make_pair(name, spec, ns_dtype=torch.float32)
            time_pair(opt, base, 1, 0)
            rates, bws, preds, meas, ratios = [], [], [], [], []
            for _ in range(a.repeats):
                rate, bw = matmul_rate(h, 3), elementwise_bw(1 << 22, 3)
                t_ns, t_el, ns = predicted(name, h, rate, bw)
                t_opt, _ = time_pair(opt, base, 0, 1)
                rates.append(rate)
                bws.append(bw)
                preds.append(t_ns + t_el)
                meas.append(t_opt[0])
                ratios.append(t_opt[0] / (t_ns + t_el))
            med = statistics.median
            print(f"| {name} | {ns / 1e9:.2f} | {med(rates) / 1e9:.0f} | {med(bws) / 1e9:.1f} | {med(preds) * 1e3:.1f} | "
                  f"{med(meas) * 1e3:.1f} | {med(ratios):.2f} |", flush=True)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
