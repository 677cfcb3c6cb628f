#!/usr/bin/env python
"""On a CUDA device: measured bf16 matmul peak, Newton–Schulz TFLOP/s (batched, bf16) and the
optimizer step-time table in bf16 NS; prints markdown (used by benchmarks/gpu_all.sh)."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def cuda_time(fn, reps=20):
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def main() -> int:
    import torch

    from megatron_md.ops import newton_schulz, ns_flops, resolve_coefficients

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    out = [f"## Device: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})", "",
           "### bf16 matmul peak (measured) and Newton–Schulz throughput", "",
           "| work | ms | TFLOP/s | of measured peak |", "|---|---:|---:|---:|"]
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ a)
    peak = 2 * n ** 3 / t / 1e12
    out.append(f"| bf16 matmul {n}³ | {1e3 * t:.2f} | {peak:.1f} | 100% |")
    coeffs = resolve_coefficients("jordan", 5)
    for (m, k, b) in [(4096, 1024, 1), (1024, 4096, 8), (2048, 8192, 1), (8192, 2048, 4), (4096, 4096, 4)]:
        x = torch.randn(b, m, k, device=dev)
        t = cuda_time(lambda: newton_schulz(x, coeffs, dtype=torch.bfloat16), reps=10)
        tf = b * ns_flops(m, k, 5) / t / 1e12
        out.append(f"| NS bf16 jordan×5, batch {b} × {m}×{k} | {1e3 * t:.2f} | {tf:.1f} | {100 * tf / peak:.0f}% |")
    from step_time import OPTIMIZERS, build_params, make_pair, med, time_pair

    for h in (1024, 2048):
        out += ["", f"### Step time vs torch.optim.AdamW(fused=True), hidden {h}, bf16 NS, fp32 params", "",
                "| optimizer | step ms | AdamW ms | ratio |", "|---|---:|---:|---:|"]
        spec = [(w.to(dev), g.to(dev), lay) for w, g, lay in build_params(h, 2, 0)]
        for name in OPTIMIZERS:
            opt, _ = make_pair(name, spec, ns_dtype=torch.bfloat16)
            base = torch.optim.AdamW([torch.nn.Parameter(w.clone()) for w, _, _ in spec], fused=True)
            for p, (_, g, _) in zip(base.param_groups[0]["params"], spec):
                p.grad = g.clone()
            t_opt, t_base = time_pair(opt, base, 3, 10, sync=torch.cuda.synchronize)
            out.append(f"| {name} | {1e3 * med(t_opt):.2f} | {1e3 * med(t_base):.2f} | {med(t_opt) / med(t_base):.2f}× |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
