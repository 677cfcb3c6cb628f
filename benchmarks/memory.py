#!/usr/bin/env python
"""Optimizer-state bytes per parameter, counted from the state tensors.

For every optimizer (and torch AdamW / our SF-AdamW as baselines) on the weight matrices of one
GPT layer of hidden ``h`` (fused QKV as ``fused_qkv`` Blocks, as in the Megatron driver), sum
``numel × element_size`` of every tensor in ``optimizer.state`` (param-shaped moments, the
per-matrix vectors flat in ``state[p]["block<b>.<key>"]``: row moments, gains and their Adam moments, radii,
step counters stored as tensors) after one step, and divide by the number of weights. The
matrix-sized part and the O(d_out + d_in) vector part are reported separately.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/memory.py [--hidden 512,1024]``.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import header  # noqa: E402
from step_time import NS_OPTIMIZERS, OPTIMIZERS, build_params  # noqa: E402


def state_bytes(opt, params) -> tuple[int, int]:
    """(bytes in tensors shaped like a param, bytes in every other state tensor)."""
    import torch

    shapes = {id(p): p.shape for p in params}
    big = small = 0

    def walk(x, owner_shape):
        nonlocal big, small
        if torch.is_tensor(x):
            n = x.numel() * x.element_size()
            if x.shape == owner_shape and x.numel() > 1:
                big += n
            else:
                small += n
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, owner_shape)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, owner_shape)

    for p, st in opt.state.items():
        walk(st, shapes.get(id(p)))
    return big, small


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", default="512,1024")
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory.md"))
    args = ap.parse_args(argv)
    import torch

    import megatron_md.optim as optim

    body = ["Bytes per weight = state bytes / number of weights (fp32 weights: 4 B each). *vector part*: "
            "state that is not param-shaped (per-matrix row/column vectors, scalars). Targets (issue 9): "
            "Muon/RMNP 4 B/param, MD adds only O(d_out + d_in) per matrix, SF-NorMuon ≤ 8 B/param.", "",
            "| hidden | optimizer | state MB | B / weight | param-shaped B / weight | vector part (KB) | vector part B / weight |",
            "|---:|---|---:|---:|---:|---:|---:|"]
    for h in [int(x) for x in args.hidden.split(",")]:
        spec = build_params(h, 1, 0)
        n = sum(w.numel() for w, _, _ in spec)
        names = ["AdamW (torch)", "SFAdamW"] + list(OPTIMIZERS)
        for name in names:
            ps = [torch.nn.Parameter(w.clone()) for w, _, _ in spec]
            for p, (_, g, _) in zip(ps, spec):
                p.grad = g.clone()
            if name == "AdamW (torch)":
                opt = torch.optim.AdamW(ps, foreach=True)
            elif name == "SFAdamW":
                opt = optim.SFAdamW(ps)
            else:
                kw = dict(ns_dtype=torch.float32) if name in NS_OPTIMIZERS else {}
                opt = getattr(optim, name)(ps, shards={p: lay for p, (_, _, lay) in zip(ps, spec)}, **kw)
            opt.step()
            big, small = state_bytes(opt, ps)
            body.append(f"| {h} | {name} | {(big + small) / 1e6:.2f} | {(big + small) / n:.3f} | {big / n:.2f} | "
                        f"{small / 1e3:.1f} | {small / n:.4f} |")
            print(body[-1], file=sys.stderr)
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(header("Optimizer-state memory per parameter", cmd, ROOT,
                            "Counts, not timings: the load does not matter.") + body) + "\n"
    print(text)
    if args.out != "-":
        out = Path(args.out)
        old = out.read_text() if out.exists() else ""
        kept = re.search(r"<!-- BEGIN memory_per_rank -->.*?<!-- END memory_per_rank -->", old, flags=re.S)
        out.write_text(text + ("\n" + kept.group(0) + "\n" if kept else ""))  # benchmarks/memory_per_rank.py's
    return 0


if __name__ == "__main__":
    sys.exit(main())
