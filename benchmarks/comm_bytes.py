#!/usr/bin/env python
"""Bytes per optimizer step per rank, measured with the real byte meter over real gloo collectives.

One GPT-like transformer layer (hidden ``h``; GQA with 32 query heads in 8 groups, head dim h/32):

* ``linear_qkv``  fused QKV, (1.5h) × h, column-parallel (TP splits query groups);
* ``linear_proj`` attention output, h × h, row-parallel;
* ``fc1``         MLP up, 4h × h, column-parallel;
* ``fc2``         MLP down, h × 4h, row-parallel.

Every optimizer (Muon, NorMuon, RMNP, AdamH, MuonH, AdamMD, MuonMD, SFNorMuon) × layout × NS mode
(``owner``/``gather``, NS methods only) is built on that layer in spawned gloo ranks, takes one
warm-up step, then one measured step: ``megatron_md.shard.METER`` totals of the measured step
(every tag, i.e. including the non-finite-gradient agreement) are the result.

Layouts (world size in brackets):

* ``tp2``    [2] TensorParallel as Megatron assigns it (QKV/fc1 dim 0, proj/fc2 dim 1); the fused
             QKV is a ``fused_qkv`` Blocks (Q, K, V are separate logical matrices) for *every*
             optimizer (row methods give the same result either way; hyperball/MD use per-block
             norms/gains, which is the intended semantics).
* ``dp2``    [2] FlatRange ZeRO-1 shards over DP=2, every matrix split once at a mid-row point
             (``numel/2 + d_in/2``). QKV is one plain 1.5h × h matrix (Blocks cannot be laid
             over a 1-D flat range).
* ``dp2buf`` [2] FlatRange as Megatron's distributed optimizer hands it out: params in one
             contiguous buffer in reverse order (fc2, fc1, proj, qkv), split evenly over DP=2;
             a param lies wholly on one rank unless the boundary falls inside it.
* ``tp2dp2`` [4] TP=2 × DP=2 (Megatron rank order: TP groups {0,1},{2,3}; DP groups {0,2},{1,3});
             FlatRange over each TP shard, mid-row split as in ``dp2``; QKV plain.
* ``fsdp2``  [2] torch FSDP2's rows over DP=2 (``torch.chunk``: rank 0 the first ⌈m/2⌉ rows of every
             matrix), bound as the driver binds them (megatron_md.megatron.fsdp): a row-aligned
             FlatRange per matrix, the fused QKV one FlatRange per block (Q, K, V: ``flat_blocks``).

Baseline: the bytes that an all-gather of every *full* matrix over the ranks it is sharded across
would move per rank under the same counting model (``comm.py``): ``(w−1)/w × matrix bytes`` sent
and received per rank, summed over the matrices. ``ratio`` = max over ranks of max(sent, received)
of the measured step / that baseline. ``group Σrecv/M``: bytes received by all ranks together
(= bytes sent by all ranks together) / bytes of the matrices (fp32).

Targets (printed PASS/FAIL): (1) row/column/sphere methods (RMNP, AdamH, AdamMD) ≤ 1% of the
gather baseline, for the h × h matrix alone (per-matrix pass) and for the whole layer;
(2) NS methods in owner mode: for every logical matrix, bytes received summed over the group
≤ 2 × the matrix bytes.

The NS compute does not change any byte count, so ``--ns-steps`` defaults to 1 (the real
``newton_schulz`` still runs, 1 iteration instead of 5) and ``--fake-ns`` replaces the NS math
by a Frobenius normalization (all communication code unchanged) for large ``--hidden``.

Run: ``.venv/bin/python benchmarks/comm_bytes.py [--hidden 1024] [--layouts tp2,dp2,...]``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import cpu_name, csv_subset, git_rev  # noqa: E402

OPTIMIZERS = ("Muon", "NorMuon", "RMNP", "AdamH", "MuonH", "AdamMD", "MuonMD", "SFNorMuon")
NS_OPTIMIZERS = ("Muon", "NorMuon", "MuonH", "MuonMD", "SFNorMuon")
ROW_OPTIMIZERS = ("RMNP", "AdamH", "AdamMD")
LAYOUTS = {"tp2": 2, "dp2": 2, "dp2buf": 2, "tp2dp2": 4, "fsdp2": 2}
HEADS, QUERY_GROUPS = 32, 8
FLOAT_BYTES = 4  # fp32 params, grads and collectives


# ------------------------------------------------------------------------------ the layer
def layer_specs(h: int) -> list[dict]:
    """The four weight matrices of one layer: name, logical shape, Megatron TP dim."""
    if h % HEADS:
        raise ValueError(f"--hidden {h}: must be divisible by {HEADS} heads")
    head_dim = h // HEADS
    qkv_rows = QUERY_GROUPS * (HEADS // QUERY_GROUPS + 2) * head_dim
    return [
        dict(name="qkv", shape=(qkv_rows, h), tp_dim=0, fused=True),
        dict(name="proj", shape=(h, h), tp_dim=1, fused=False),
        dict(name="fc1", shape=(4 * h, h), tp_dim=0, fused=False),
        dict(name="fc2", shape=(h, 4 * h), tp_dim=1, fused=False),
    ]


def logical_matrices(layout: str, h: int) -> list[tuple[str, tuple[int, int], int]]:
    """(label, logical shape, number of ranks it is sharded over) for every logical matrix."""
    w = LAYOUTS[layout]
    out = []
    head_dim = h // HEADS
    for s in layer_specs(h):
        if s["fused"] and layout in ("tp2", "fsdp2"):
            out += [("Q", (HEADS * head_dim, h), w), ("K", (QUERY_GROUPS * head_dim, h), w),
                    ("V", (QUERY_GROUPS * head_dim, h), w)]
        else:
            out.append((s["name"], s["shape"], w))
    return out


def matrix_bytes(shape) -> int:
    return shape[0] * shape[1] * FLOAT_BYTES


def gather_baseline(mats) -> float:
    """Per-rank bytes (sent = received) of an all-gather of every full matrix (comm.py model)."""
    return sum((w - 1) / w * matrix_bytes(shape) for _, shape, w in mats)


# ------------------------------------------------------------------------------ rank side
def _cheap_ns(x, coefficients, *, dtype=None, eps=1e-7):
    """Stand-in for newton_schulz (``--fake-ns``): same shapes/dtypes, O(mn) work."""
    import torch

    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
    return x / (norm + eps)


def _groups(world: int):
    """(tp_group, dp_group, tp_rank, dp_rank) of this rank; every rank creates every group."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if world == 2:
        tp = dist.new_group([0, 1])
        dp = dist.new_group([0, 1])
        return tp, dp, rank, rank
    tps = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    dps = [dist.new_group([j, j + 2]) for j in range(2)]
    return tps[rank // 2], dps[rank % 2], rank % 2, rank // 2


def _build_layer(layout: str, h: int, seed: int, tp, dp, tp_rank: int, dp_rank: int) -> list[dict]:
    """This rank's local pieces of the layer and their layouts.

    Returns one dict per param: ``init`` (local weights), ``grad``, ``layout`` (MatrixShard or
    Blocks), ``subsets``: [(label, layout restricted to that logical matrix)].
    """
    import torch

    from megatron_md.shard import Blocks, FlatRange, TensorParallel, Whole, flat_blocks, fused_qkv

    specs = layer_specs(h)
    # Megatron's contiguous buffer (reverse param order) for dp2buf
    buf_ranges = {}
    if layout == "dp2buf":
        order = list(reversed(specs))
        total = sum(s["shape"][0] * s["shape"][1] for s in order)
        lo, hi = dp_rank * total // 2, (dp_rank + 1) * total // 2
        pos = 0
        for s in order:
            n = s["shape"][0] * s["shape"][1]
            a, b = min(max(lo - pos, 0), n), min(max(hi - pos, 0), n)
            buf_ranges[s["name"]] = (a, max(a, b))
            pos += n
    out = []
    for i, s in enumerate(specs):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        full_w = torch.randn(s["shape"], generator=gen) * 0.02
        full_g = torch.randn(s["shape"], generator=gen)
        if layout in ("tp2", "tp2dp2"):
            w_loc = torch.tensor_split(full_w, 2, dim=s["tp_dim"])[tp_rank].contiguous()
            g_loc = torch.tensor_split(full_g, 2, dim=s["tp_dim"])[tp_rank].contiguous()
        else:
            w_loc, g_loc = full_w, full_g
        del full_w, full_g
        if layout == "fsdp2":
            m, n = s["shape"]
            chunk = -(-m // 2)
            r0 = min(dp_rank * chunk, m)
            a, b = r0 * n, min(r0 + chunk, m) * n
            if s["fused"]:
                inner = fused_qkv(num_query_groups=QUERY_GROUPS, heads_per_group=HEADS // QUERY_GROUPS,
                                  head_dim=h // HEADS, d_in=h)
                lay = flat_blocks(inner, a, b, dp)
                subsets = [(lab, Blocks([v], lay.local_shape)) for lab, v in zip("QKV", lay.views)]
            else:
                lay = FlatRange(a, b, dp, Whole(s["shape"]))
                subsets = [(s["name"], lay)]
            w_loc = w_loc.reshape(-1)[a:b].clone()
            g_loc = g_loc.reshape(-1)[a:b].clone()
        elif layout == "tp2":
            if s["fused"]:
                lay = fused_qkv(num_query_groups=QUERY_GROUPS, heads_per_group=HEADS // QUERY_GROUPS,
                                head_dim=h // HEADS, d_in=h, tp_group=tp, tp_size=2)
                subsets = [(lab, Blocks([v], lay.local_shape)) for lab, v in zip("QKV", lay.views)]
            else:
                lay = TensorParallel(s["shape"], dim=s["tp_dim"], group=tp)
                subsets = [(s["name"], lay)]
        else:
            inner = TensorParallel(s["shape"], dim=s["tp_dim"], group=tp) if layout == "tp2dp2" else Whole(s["shape"])
            m, n = inner.local_shape
            numel = m * n
            if layout == "dp2buf":
                a, b = buf_ranges[s["name"]]
            else:
                cut = numel // 2 + n // 2  # mid-row (n ≥ 2), nearly even
                a, b = (0, cut) if dp_rank == 0 else (cut, numel)
            lay = FlatRange(a, b, dp, inner)
            w_loc = w_loc.reshape(-1)[a:b].clone()
            g_loc = g_loc.reshape(-1)[a:b].clone()
            subsets = [(s["name"], lay)]
        out.append(dict(name=s["name"], init=w_loc, grad=g_loc, layout=lay, subsets=subsets))
    return out


def _make_optimizer(name: str, params, shards, mode: str, ns_steps):
    import megatron_md.optim as optim

    kw = dict(shards=shards)
    if name in NS_OPTIMIZERS:
        kw.update(ns_mode=mode, ns_steps=ns_steps)
    return getattr(optim, name)(params, **kw)


def _measure(name: str, mode: str, entries: list[tuple[dict, object]], ns_steps):
    """Warm-up step, then one metered step. Returns (result dict, local params after)."""
    import torch

    from megatron_md.shard import METER

    params, shards = [], {}
    for e, lay in entries:
        p = torch.nn.Parameter(e["init"].clone())
        p.grad = e["grad"].clone()
        params.append(p)
        shards[p] = lay
    opt = _make_optimizer(name, params, shards, mode, ns_steps)
    opt.step()  # warm-up
    METER.reset()
    t0 = time.perf_counter()
    opt.step()
    dt = time.perf_counter() - t0
    sent, recv = METER.total()
    kinds = {}
    for tag, kind, calls, s, r in METER.table():
        k = kinds.setdefault(kind, [0, 0, 0])
        k[0] += calls
        k[1] += s
        k[2] += r
    after = [p.detach().clone() for p in params]
    return dict(sent=sent, recv=recv, kinds=kinds, step_s=dt), after


def rank_main(ctx, *, layouts, hidden, optimizers, ns_steps, fake_ns, per_matrix, seed):
    """Runs in every spawned rank: all measurements of the given layouts, recorded per key."""
    if fake_ns:
        import megatron_md.shard.orthogonalize as orth

        orth.newton_schulz = _cheap_ns
    tp, dp, tp_rank, dp_rank = _groups(ctx.world_size)
    for layout in layouts:
        layer = _build_layer(layout, hidden, seed, tp, dp, tp_rank, dp_rank)
        runs = [("layer", [(e, e["layout"]) for e in layer])]
        if per_matrix:
            runs += [(lab, [(e, lay)]) for e in layer for lab, lay in e["subsets"]]
        for name in optimizers:
            modes = ("owner", "gather") if name in NS_OPTIMIZERS else ("-",)
            for subset, entries in runs:
                kept = {}
                for mode in modes:
                    key = f"{layout}|{name}|{mode}|{subset}"
                    with ctx.check(key):
                        res, after = _measure(name, mode, entries, ns_steps)
                        kept[mode] = after
                        ctx.record(key, res)
                if len(kept) == 2:
                    with ctx.check(f"{layout}|{name}|diff|{subset}"):
                        d = max(((a - b).abs().max().item() if a.numel() else 0.0)
                                for a, b in zip(kept["owner"], kept["gather"]))
                        ctx.record(f"{layout}|{name}|diff|{subset}", d)
        del layer
    return "done"


# ------------------------------------------------------------------------------ parent side
def _fmt_bytes(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{int(b)} B"


NS_KINDS = ("gather", "scatter", "all_gather")  # the collectives only Newton–Schulz issues in a step


def _ns_recv(res: dict) -> int:
    return sum(v[2] for k, v in res["kinds"].items() if k in NS_KINDS)


def _kinds_str(kinds: dict) -> str:
    short = {"all_reduce": "ar", "all_gather": "ag", "gather": "g", "scatter": "s"}
    return " ".join(f"{short.get(k, k)}×{v[0]}" for k, v in sorted(kinds.items())) or "none"


def run_all(args) -> dict:
    from megatron_md.testing.spawn import run_group

    values = {}
    for world in sorted({LAYOUTS[lay] for lay in args.layouts}):
        lays = [lay for lay in args.layouts if LAYOUTS[lay] == world]
        t0 = time.perf_counter()
        res = run_group(world, f"{Path(__file__).stem}:rank_main", timeout=args.timeout, threads=1,
                        layouts=lays, hidden=args.hidden, optimizers=args.optimizers, ns_steps=args.ns_steps,
                        fake_ns=args.fake_ns, per_matrix=not args.no_per_matrix, seed=args.seed)
        print(f"# world {world} ({', '.join(lays)}): {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        values[world] = res.values
    return values


def summarize(args, values) -> tuple[list[str], list[tuple[str, bool]]]:
    h = args.hidden
    lines, targets = [], []
    lines += ["## Whole layer, one optimizer step", "",
              "| layout | optimizer | NS mode | max sent/rank | max recv/rank | gather baseline/rank | ratio | "
              "group Σrecv / Σ M | collectives/rank (rank 0) | owner vs gather max abs Δ |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    per_matrix_rows = []
    for layout in args.layouts:
        w = LAYOUTS[layout]
        vals = values[w]
        mats = logical_matrices(layout, h)
        base_layer = gather_baseline(mats)
        total_m = sum(matrix_bytes(s) for _, s, _ in mats)
        for name in args.optimizers:
            modes = ("owner", "gather") if name in NS_OPTIMIZERS else ("-",)
            for mode in modes:
                key = f"{layout}|{name}|{mode}|layer"
                rs = [v[key] for v in vals]
                smax, rmax = max(r["sent"] for r in rs), max(r["recv"] for r in rs)
                tot = sum(r["recv"] for r in rs)
                ratio = max(smax, rmax) / base_layer
                diff = vals[0].get(f"{layout}|{name}|diff|layer") if mode == "owner" else None
                diff_s = "" if diff is None else f"{max(v.get(f'{layout}|{name}|diff|layer', 0) for v in vals):.1e}"
                lines.append(f"| {layout} | {name} | {mode} | {_fmt_bytes(smax)} | {_fmt_bytes(rmax)} | "
                             f"{_fmt_bytes(base_layer)} | {ratio:.4f} | {tot / total_m:.4f} | "
                             f"{_kinds_str(rs[0]['kinds'])} | {diff_s} |")
                if name in ROW_OPTIMIZERS:
                    targets.append((f"{layout} {name}: whole layer ≤ 1% of gather baseline "
                                    f"({100 * ratio:.3f}%)", ratio <= 0.01))
                if args.no_per_matrix:
                    continue
                cells, worst = [], 0.0
                for lab, shape, wm in mats:
                    k = f"{layout}|{name}|{mode}|{lab}"
                    rs_m = [v[k] for v in vals]
                    tot_m = sum(r["recv"] for r in rs_m) / matrix_bytes(shape)
                    ns_m = sum(_ns_recv(r) for r in rs_m) / matrix_bytes(shape)
                    rat_m = max(max(r["sent"], r["recv"]) for r in rs_m) / gather_baseline([(lab, shape, wm)])
                    worst = max(worst, ns_m)
                    ns_s = f"NS {ns_m:.4f}; " if name in NS_OPTIMIZERS else ""
                    cells.append(f"{lab} {tot_m:.4f} ({ns_s}{100 * rat_m:.2f}%)")
                    if name in ROW_OPTIMIZERS and shape == (h, h) and lab == "proj":
                        targets.append((f"{layout} {name}: {h}×{h} matrix alone ≤ 1% of gather baseline "
                                        f"({100 * rat_m:.3f}%)", rat_m <= 0.01))
                if mode == "owner":
                    targets.append((f"{layout} {name} owner: every matrix, NS bytes received by the group "
                                    f"≤ 2 × M (worst {worst:.4f} × M)", worst <= 2.0))
                per_matrix_rows.append(f"| {layout} | {name} | {mode} | {' · '.join(cells)} |")
    if per_matrix_rows:
        lines += ["", "## Per logical matrix (each matrix alone in its own optimizer, one step)", "",
                  "Each cell: `label  group Σrecv / M  (NS: the same for the NS collectives only — gather,",
                  "scatter, all_gather; per-rank max of max(sent, recv) / that matrix's gather baseline)`.", "",
                  "| layout | optimizer | NS mode | matrices |", "|---|---|---|---|", *per_matrix_rows]
    return lines, targets


def render(args, values, elapsed: float) -> str:
    import torch

    h = args.hidden
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/comm_bytes.py " + " ".join(sys.argv[1:])
    head = [
        "# Optimizer communication: bytes per step per rank", "",
        f"Command: `{cmd.strip()}` (repository at {git_rev(ROOT)})  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; "
        f"machine: {os.cpu_count()} vCPU {cpu_name()} (shared; load average {args.load:.1f} at start), "
        f"1 thread per rank; gloo over 127.0.0.1; wall time {elapsed:.0f} s.  ",
        f"Layer: hidden {h}, GQA {HEADS} heads / {QUERY_GROUPS} groups (head dim {h // HEADS}); "
        "fp32. Matrices: " + ", ".join(f"{s['name']} {s['shape'][0]}×{s['shape'][1]}" for s in layer_specs(h)) + ".  ",
        f"NS: {'--fake-ns (Frobenius normalization stand-in)' if args.fake_ns else 'real newton_schulz'}, "
        f"ns_steps={args.ns_steps} (byte counts do not depend on either).", "",
        "Bytes are the counts of `megatron_md.shard.METER` (the counting model of `shard/comm.py`) over",
        "the second of two steps, every tag included (the non-finite-gradient agreement is a 4-byte",
        "all-reduce per shard group). *gather baseline/rank*: an all-gather of every full matrix over",
        "the ranks it is sharded across, `(w−1)/w × bytes` per matrix. *ratio*: max over ranks of",
        "max(sent, received) / that baseline. *group Σrecv / Σ M*: bytes received by all ranks",
        "together (= sent) / bytes of the matrices. Collectives: ar all_reduce, ag all_gather,",
        "g gather, s scatter. *owner vs gather*: max |Δ| between the local params after 2 steps in the",
        "two NS modes (same inputs).", "",
        "Layouts: `tp2` Megatron TP=2 (fused QKV as `fused_qkv` Blocks → Q, K, V for every optimizer);",
        "`dp2` FlatRange over DP=2, each matrix cut at `numel/2 + d_in/2` (mid-row), fused QKV as one",
        "plain matrix; `dp2buf` FlatRange cut of Megatron's contiguous buffer (reverse param order)",
        "into 2 equal halves, params mostly whole on one rank; `tp2dp2` world 4, FlatRange (mid-row",
        "cut) of each TP shard, QKV plain; `fsdp2` torch FSDP2's rows over DP=2 (rank 0 the first ⌈m/2⌉",
        "rows of every matrix) as `--use-torch-fsdp2` binds them: a row-aligned FlatRange per matrix, Q, K, V",
        "one per block.", "",
    ]
    body, targets = summarize(args, values)
    tail = ["", "## Targets", "",
            "How to read the owner-mode numbers: the group moves each matrix's pieces to an owner and back,",
            "so one level of sharding costs 2·(M − P_owner) in total (P_owner: the owner's own piece; M at",
            "w=2 with even halves, 0 when one rank holds it all); two levels (a FlatRange of a TP shard,",
            "`tp2dp2`) cost ≈ 2·M, because each TP half moves once inside its DP group and once more in the",
            "TP group. Gather mode all-gathers pieces padded to the largest piece P of a level: (w−1)·P",
            "per rank, w·(w−1)·P in total.", ""]
    tail += [f"- {'PASS' if ok else 'FAIL'} — {what}" for what, ok in targets]
    if not targets:
        tail.append("- (none evaluated: target checks need the per-matrix pass and the row/NS methods)")
    return "\n".join(head + body + tail) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Layouts: " + ", ".join(f"{k} (world {v})" for k, v in LAYOUTS.items()))
    p.add_argument("--hidden", type=int, default=1024, help="hidden size h (1024 default; 4096 is slow and "
                   "needs ~10 GB RAM: combine with --fake-ns)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of %(default)s")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of %(default)s")
    p.add_argument("--ns-steps", type=int, default=1, help="Newton–Schulz iterations (bytes do not depend on it)")
    p.add_argument("--fake-ns", action="store_true", help="replace the NS math by a cheap normalization "
                   "(communication path unchanged)")
    p.add_argument("--no-per-matrix", action="store_true", help="skip the per-logical-matrix pass (and the "
                   "targets that need it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="wall-clock limit per spawned group (s)")
    p.add_argument("--out", default=str(ROOT / "docs" / "comm_bytes.md"), help="markdown output ('-': none)")
    args = p.parse_args(argv)
    args.layouts = csv_subset(p, "--layouts", args.layouts, LAYOUTS)
    args.optimizers = csv_subset(p, "--optimizers", args.optimizers, OPTIMIZERS)
    layer_specs(args.hidden)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # the spawned ranks import this file as a module and megatron_md from the repo root
    for path in (str(HERE), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    args.load = os.getloadavg()[0]
    t0 = time.perf_counter()
    values = run_all(args)
    text = render(args, values, time.perf_counter() - t0)
    print(text)
    if args.out != "-":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}", file=sys.stderr)
    return 0  # a benchmark: FAIL lines are reported, not turned into an exit status


if __name__ == "__main__":
    sys.exit(main())
