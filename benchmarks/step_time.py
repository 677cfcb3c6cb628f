#!/usr/bin/env python
"""Optimizer step time relative to ``torch.optim.AdamW(foreach=True)`` on the same parameters.

A GPT-like set of weight matrices: ``--layers`` transformer layers of hidden ``h`` (GQA 32 query
heads / 8 groups, head dim h/32): fused QKV (1.5h × h, a ``fused_qkv`` Blocks, i.e. Q, K, V are
separate logical matrices), attention out-proj h × h, MLP fc1 4h × h and fc2 h × 4h; fp32.

Sections (all times are medians of ``--repeats`` steps after ``--warmup`` steps; the optimizer and
its AdamW baseline are stepped alternately, so machine-load drift hits both alike):

1. single process: every matrix optimizer vs AdamW(foreach=True) on the same parameter set;
2. single process: Muon with Newton–Schulz in fp32 vs bf16 (bf16 matmul is very slow on this
   CPU: a much smaller layer, ``--bf16-hidden``, is used);
3. single process: ``megatron_md.shard.orthogonalize`` batched (same-shape matrices stacked into
   one batched NS call, the optimizers' default) vs unbatched, on the same matrices;
4. TP=2: two spawned gloo ranks, each with its Megatron TP shards; NS methods in both NS modes
   (``owner``/``gather``), owner also without its pipelined round (``owner-serial``:
   ``MEGATRON_MD_NS_OVERLAP=0``); AdamW measured in the same ranks on the same local shards.

These are benchmarks, not tests: nothing is asserted about time. The machine is shared: compare
ratios rather than absolute times, and rerun if the load changed.

Run: ``.venv/bin/python benchmarks/step_time.py [--hidden 512] [--layers 1] [--repeats 5]``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import csv_subset, git_rev  # noqa: E402

OPTIMIZERS = ("Muon", "NorMuon", "RMNP", "AdamH", "MuonH", "AdamMD", "MuonMD", "SFNorMuon")
NS_OPTIMIZERS = ("Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon")
SECTIONS = ("single", "dtype", "batch", "tp2")
HEADS, QUERY_GROUPS = 32, 8


# ------------------------------------------------------------------------------ parameters
def layer_specs(h: int) -> list[dict]:
    if h % HEADS:
        raise ValueError(f"hidden {h}: must be divisible by {HEADS} heads")
    head_dim = h // HEADS
    return [
        dict(name="qkv", shape=(QUERY_GROUPS * (HEADS // QUERY_GROUPS + 2) * head_dim, h), tp_dim=0, fused=True),
        dict(name="proj", shape=(h, h), tp_dim=1, fused=False),
        dict(name="fc1", shape=(4 * h, h), tp_dim=0, fused=False),
        dict(name="fc2", shape=(h, 4 * h), tp_dim=1, fused=False),
    ]


def build_params(h: int, layers: int, seed: int, tp_group=None, tp_rank: int = 0, tp_size: int = 1):
    """Local weights, grads and layouts: [(init, grad, layout)] (TP shards when tp_group is given)."""
    import torch

    from megatron_md.shard import TensorParallel, Whole, fused_qkv

    out = []
    for layer in range(layers):
        for i, s in enumerate(layer_specs(h)):
            gen = torch.Generator().manual_seed(seed * 1000 + layer * 10 + i)
            w = torch.randn(s["shape"], generator=gen) * 0.02
            g = torch.randn(s["shape"], generator=gen)
            if tp_group is not None:
                w = torch.tensor_split(w, tp_size, dim=s["tp_dim"])[tp_rank].contiguous()
                g = torch.tensor_split(g, tp_size, dim=s["tp_dim"])[tp_rank].contiguous()
            if s["fused"]:
                lay = fused_qkv(num_query_groups=QUERY_GROUPS, heads_per_group=HEADS // QUERY_GROUPS,
                                head_dim=h // HEADS, d_in=h, tp_group=tp_group, tp_size=tp_size)
            elif tp_group is not None:
                lay = TensorParallel(s["shape"], dim=s["tp_dim"], group=tp_group)
            else:
                lay = Whole(s["shape"])
            out.append((w, g, lay))
    return out


def make_pair(name: str, spec, *, mode: str = "owner", ns_dtype=None, foreach: bool = True):
    """(matrix optimizer, AdamW) on two independent copies of the same params and grads."""
    import torch

    import megatron_md.optim as optim

    ps, qs, shards = [], [], {}
    for w, g, lay in spec:
        p = torch.nn.Parameter(w.clone())
        p.grad = g.clone()
        q = torch.nn.Parameter(w.clone())
        q.grad = g.clone()
        ps.append(p)
        qs.append(q)
        shards[p] = lay
    kw = dict(shards=shards)
    if name in NS_OPTIMIZERS:
        kw.update(ns_mode=mode, ns_dtype=ns_dtype)
    opt = getattr(optim, name)(ps, **kw)
    base = torch.optim.AdamW(qs, lr=1e-3, weight_decay=0.01, foreach=foreach)
    return opt, base


def time_pair(opt, base, warmup: int, repeats: int, sync=lambda: None) -> tuple[list[float], list[float]]:
    """Alternate steps of ``base`` and ``opt``; returns (opt times, base times) in seconds."""
    for _ in range(warmup):
        base.step()
        opt.step()
    t_opt, t_base = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        base.step()
        t_base.append(time.perf_counter() - t0)
        sync()
        t0 = time.perf_counter()
        opt.step()
        t_opt.append(time.perf_counter() - t0)
    return t_opt, t_base


def med(xs) -> float:
    return statistics.median(xs)


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×"


# ------------------------------------------------------------------------------ sections
def section_single(args) -> list[str]:
    lines = []
    for h in args.hiddens:
        lines += _single(args, h)
    return lines


def _single(args, hidden) -> list[str]:
    from megatron_md.ops.ns_dtype import ns_dtype_decision

    spec = build_params(hidden, args.layers, args.seed)
    n = sum(w.numel() for w, _, _ in spec)
    dt, why = ns_dtype_decision("cpu")
    lines = ["", f"## 1. Single process, hidden {hidden}: step time vs AdamW(foreach=True)", "",
             f"hidden {hidden}, {args.layers} layer(s), {len(spec)} params, {n / 1e6:.2f} M weights, "
             f"{args.threads} thread(s); NS: jordan × 5, batched, default dtype on this machine = "
             f"{str(dt).replace('torch.', '')} ({why}). Multi-tensor step (`foreach=True`, the default).", "",
             "| optimizer | step (ms) | AdamW step (ms) | ratio | min step (ms) | min AdamW (ms) | ratio of mins |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.optimizers:
        opt, base = make_pair(name, spec)
        t_opt, t_base = time_pair(opt, base, args.warmup, args.repeats)
        lines.append(f"| {name} | {1e3 * med(t_opt):.1f} | {1e3 * med(t_base):.2f} | {fmt_ratio(med(t_opt) / med(t_base))} "
                     f"| {1e3 * min(t_opt):.1f} | {1e3 * min(t_base):.2f} | {fmt_ratio(min(t_opt) / min(t_base))} |")
        print(lines[-1], file=sys.stderr)
        del opt, base
    return lines


def section_dtype(args) -> list[str]:
    """The automatic NS dtype on this machine, and bf16 vs fp32 measured: Newton–Schulz on one
    4h × h matrix, and a training-style matmul (nn.Linear h → 4h, forward + backward)."""
    import torch

    from megatron_md.ops import newton_schulz, ns_flops, resolve_coefficients
    from megatron_md.ops.ns_dtype import cpu_flags, ns_dtype_decision, probe_bf16_speedup

    sys.path.insert(0, str(HERE))
    from _common import interleaved

    h = args.hidden
    dt, why = ns_dtype_decision("cpu")
    flags = sorted({"avx512_bf16", "amx_bf16", "avx512f", "avx2"} & (cpu_flags() or set()))
    f32, b16, sp = probe_bf16_speedup()
    coeffs = resolve_coefficients("jordan", 5)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(4 * h, h, generator=g)
    lin = {d: torch.nn.Linear(h, 4 * h).to(d) for d in (torch.float32, torch.bfloat16)}
    tokens = args.tokens
    inp = {d: torch.randn(tokens, h, generator=g).to(d) for d in lin}

    def ns(d):
        return lambda: newton_schulz(x, coeffs, dtype=d)

    def train(d):
        def f():
            lin[d].zero_grad(set_to_none=True)
            lin[d](inp[d]).float().square().mean().backward()
        return f

    reps = min(args.repeats, 3)
    t = interleaved({"ns32": ns(torch.float32), "ns16": ns(torch.bfloat16), "mm32": train(torch.float32),
                     "mm16": train(torch.bfloat16)}, 1, reps)
    flops_ns = ns_flops(4 * h, h, 5)
    flops_mm = 3 * 2 * tokens * h * 4 * h  # forward + input grad + weight grad
    rows = []
    for label, k32, k16, fl in (("Newton–Schulz, jordan × 5, on 4h × h", "ns32", "ns16", flops_ns),
                                (f"nn.Linear h→4h forward+backward, {tokens} tokens", "mm32", "mm16", flops_mm)):
        a, b = med(t[k32]), med(t[k16])
        rows.append(f"| {label} | {1e3 * a:.1f} ({fl / a / 1e9:.0f} GFLOP/s) | {1e3 * b:.1f} ({fl / b / 1e9:.0f} GFLOP/s) "
                    f"| {a / b:.2f}× |")
        print(rows[-1], file=sys.stderr)
    return ["", "## 2. bf16 vs fp32 on this CPU (the NS dtype default, and training matmuls)", "",
            f"CPU flags: {', '.join(flags) or 'none of avx512_bf16/amx_bf16'}. Automatic NS dtype: "
            f"**{str(dt).replace('torch.', '')}** — {why}. A fresh probe now: fp32 {1e3 * f32:.2f} ms, "
            f"bf16 {1e3 * b16:.2f} ms ({sp:.2f}×).", "",
            f"hidden {h}; median of {reps} after 1 warm-up, the four variants interleaved.", "",
            "| work | fp32 ms | bf16 ms | fp32 / bf16 (> 1: bf16 faster) |", "|---|---:|---:|---:|", *rows]


def section_batch(args) -> list[str]:
    import torch

    from megatron_md.ops import resolve_coefficients
    from megatron_md.shard import Whole, orthogonalize

    coeffs = resolve_coefficients("jordan", 5)
    gen = torch.Generator().manual_seed(args.seed)
    items = []
    for _ in range(args.batch_layers):
        for s in layer_specs(args.hidden):
            shapes = [s["shape"]]
            if s["fused"]:  # Q, K, V as the optimizers see them
                hd = args.hidden // HEADS
                shapes = [(HEADS * hd, args.hidden), (QUERY_GROUPS * hd, args.hidden), (QUERY_GROUPS * hd, args.hidden)]
            items += [(Whole(sh), torch.randn(sh, generator=gen)) for sh in shapes]
    n_shapes = len({tuple(x.shape) for _, x in items})
    times = {True: [], False: []}
    for b in (True, False):  # warm-up
        orthogonalize(items, coefficients=coeffs, batch=b)
    for _ in range(args.repeats):
        for b in (True, False):
            t0 = time.perf_counter()
            orthogonalize(items, coefficients=coeffs, batch=b)
            times[b].append(time.perf_counter() - t0)
    tb, tu = med(times[True]), med(times[False])
    return ["", "## 3. Single process: batched vs unbatched Newton–Schulz", "",
            f"`orthogonalize` on the {len(items)} logical matrices of {args.batch_layers} layer(s) of hidden "
            f"{args.hidden} ({n_shapes} distinct shapes; K and V share a shape), fp32, jordan × 5, "
            f"{args.threads} thread(s); median of {args.repeats} after 1 warm-up, the two variants alternating.", "",
            "| NS call | median (ms) | min (ms) |", "|---|---:|---:|",
            f"| batched (stack same shapes) | {1e3 * tb:.1f} | {1e3 * min(times[True]):.1f} |",
            f"| unbatched (one call per matrix) | {1e3 * tu:.1f} | {1e3 * min(times[False]):.1f} |",
            "", f"batched / unbatched: {tb / tu:.2f} (medians), {min(times[True]) / min(times[False]):.2f} (mins)"]


def tp_rank_main(ctx, *, hidden, layers, optimizers, warmup, repeats, seed):
    """Runs in each of the two spawned ranks: TP=2 shards, every optimizer (and NS mode) vs AdamW."""
    import torch.distributed as dist

    tp = dist.new_group([0, 1])
    spec = build_params(hidden, layers, seed, tp_group=tp, tp_rank=ctx.rank, tp_size=2)

    def sync():
        dist.barrier(group=tp)

    from megatron_md.shard.orthogonalize import OVERLAP_ENV
    for name in optimizers:
        for mode in (TP2_NS_MODES if name in NS_OPTIMIZERS else ("-",)):
            key = f"{name}|{mode}"
            with ctx.check(key):
                # "owner-serial": the owner round without the pipelining (transfers, then compute, then returns)
                os.environ[OVERLAP_ENV] = "0" if mode == "owner-serial" else "1"
                try:
                    opt, base = make_pair(name, spec, mode="gather" if mode == "gather" else "owner")
                    ctx.record(key, time_pair(opt, base, warmup, repeats, sync))
                finally:
                    os.environ.pop(OVERLAP_ENV, None)
    return "done"


#: section 4's Newton–Schulz transports: owner (pipelined, the default), owner without pipelining, gather
TP2_NS_MODES = ("owner", "owner-serial", "gather")


def section_tp2(args) -> list[str]:
    from megatron_md.testing.spawn import run_group

    res = run_group(2, f"{Path(__file__).stem}:tp_rank_main", timeout=args.timeout, threads=1,
                    hidden=args.hidden, layers=args.layers, optimizers=args.optimizers, warmup=args.warmup,
                    repeats=args.repeats, seed=args.seed)
    lines = ["", "## 4. TP=2 (two gloo ranks, 1 thread each): step time vs AdamW on the same local shards", "",
             f"hidden {args.hidden}, {args.layers} layer(s), Megatron TP layouts (QKV/fc1 column-parallel, "
             "proj/fc2 row-parallel, fused QKV as Blocks). Per rank: median over repeats; shown: the slower "
             "rank. The ranks are barrier-synchronized before each timed step.", "",
             "| optimizer | NS mode | step (ms) | AdamW step (ms) | ratio | min step (ms) | min AdamW (ms) | ratio of mins |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.optimizers:
        for mode in (TP2_NS_MODES if name in NS_OPTIMIZERS else ("-",)):
            per_rank = [v[f"{name}|{mode}"] for v in res.values]
            t_opt = max(med(t) for t, _ in per_rank)
            t_base = max(med(b) for _, b in per_rank)
            m_opt = max(min(t) for t, _ in per_rank)
            m_base = max(min(b) for _, b in per_rank)
            lines.append(f"| {name} | {mode} | {1e3 * t_opt:.1f} | {1e3 * t_base:.2f} | {fmt_ratio(t_opt / t_base)} "
                         f"| {1e3 * m_opt:.1f} | {1e3 * m_base:.2f} | {fmt_ratio(m_opt / m_base)} |")
    return lines


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hidden", default="512,1024", help="hidden size(s), comma-separated (section 1 runs each; "
                   "the other sections use the first)")
    p.add_argument("--layers", type=int, default=1, help="transformer layers in the parameter set")
    p.add_argument("--batch-layers", type=int, default=2, help="layers of matrices in the batched-vs-unbatched "
                   "NS comparison (same-shape matrices of different layers are what batching stacks)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the bf16-vs-fp32 training matmul")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the single-process sections "
                   "(default: torch's default); TP ranks use 1 thread each")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of %(default)s")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="wall-clock limit of the TP=2 group (s)")
    p.add_argument("--out", default=str(ROOT / "docs" / "step_time.md"), help="markdown output ('-': none)")
    args = p.parse_args(argv)
    args.optimizers = csv_subset(p, "--optimizers", args.optimizers, OPTIMIZERS)
    args.sections = csv_subset(p, "--sections", args.sections, SECTIONS)
    try:
        args.hiddens = [int(h) for h in args.hidden.split(",") if h]
    except ValueError:
        p.error(f"--hidden {args.hidden!r}: expected comma-separated integers")
    if not args.hiddens:
        p.error("--hidden: at least one size")
    args.hidden = args.hiddens[0]
    for h in args.hiddens:
        layer_specs(h)
    if args.repeats < 1 or args.warmup < 0 or args.layers < 1 or args.batch_layers < 1:
        p.error("--repeats >= 1, --warmup >= 0, --layers >= 1 and --batch-layers >= 1 are required")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for path in (str(HERE), str(ROOT)):  # the TP ranks import this file and megatron_md
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    body = []
    for s in args.sections:
        t1 = time.perf_counter()
        body += {"single": section_single, "dtype": section_dtype, "batch": section_batch, "tp2": section_tp2}[s](args)
        print(f"# section {s}: {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/step_time.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    head = ["# Optimizer step time vs torch.optim.AdamW(foreach=True)", "",
            f"Command: `{cmd.strip()}` (repository at {git_rev(ROOT)})  ",
            f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
            f"machine: {os.cpu_count()} vCPU {cpu}, shared with other jobs while measured (noisy; load "
            f"average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end); {args.threads} torch thread(s); "
            f"wall time {time.perf_counter() - t0:.0f} s.  ",
            f"Median of {args.repeats} steps after {args.warmup} warm-up step(s); optimizer and AdamW steps "
            "alternate; *ratio* = median / median. Minimums are shown too: on a loaded machine a burst can "
            "hit a whole median, and the ratio of minimums is then the steadier number. Benchmarks only: "
            "no timing is asserted anywhere.", ""]
    text = "\n".join(head + body) + "\n"
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
