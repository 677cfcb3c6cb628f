#!/usr/bin/env python3
"""Peak memory of ``to-hf`` on a torch_dist checkpoint: streaming (one layer's tensor at a time)
against reading the whole model, and against the checkpoint's size.

Writes a torch_dist checkpoint with the driver (one rank, AdamW, one iteration: weights plus the
two Adam moments), then runs each conversion in a fresh process and reads that process's peak
resident set (``VmHWM``) and its resident set after the imports (``VmRSS``): the difference is
what the conversion itself held. ``stream``: ``tools/convert_checkpoint.py to-hf`` (the torch_dist
reader loads one layer's slice of one key per access; the safetensors writer streams).
``whole``: every model tensor read into one dict first (what a merge of per-rank files, or
``dist_checkpointing.load_plain_tensors``, holds), then converted.

    python benchmarks/convert_memory.py                         # hidden 1024, ffn 4096, 8 layers
    python benchmarks/convert_memory.py --size 256x2 --out -    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks._common import dir_bytes, emit, header  # noqa: E402

#: run in a fresh interpreter: imports, then the conversion; prints a JSON line of RSS figures
CHILD = r"""
import json, sys
sys.path.insert(0, {repo!r})
import torch, safetensors.torch, torch.distributed.checkpoint  # noqa: F401
from megatron_md.checkpoint.hf import write_hf
from megatron_md.checkpoint.reader import open_model

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = kib("VmRSS:")
reader = open_model({load!r})
state = dict(reader.items()) if {mode!r} == "whole" else reader
write_hf(state, reader.topology, {out!r})
print(json.dumps({{"base": base, "peak": kib("VmHWM:")}}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1024x8", help="HIDDENxLAYERS (ffn = 4 × hidden, SwiGLU)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--out", default=str(REPO / "docs" / "convert_memory.md"), help="markdown file ('-': stdout only)")
    a = p.parse_args(argv)
    hidden, layers = (int(x) for x in a.size.lower().split("x"))
    t0 = time.time()
    work = tempfile.mkdtemp(prefix="convert_memory_")
    try:
        ckpt = os.path.join(work, "ckpt")
        flags = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(4 * hidden),
                 "--num-attention-heads", "8", "--num-query-groups", "4", "--seq-length", "16",
                 "--max-position-embeddings", "16", "--micro-batch-size", "1", "--vocab-size", str(a.vocab),
                 "--lr", "0.001", "--mock-data", "--eval-iters", "0", "--log-interval", "1", "--normalization",
                 "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
                 "--untie-embeddings-and-output-weights", "--optimizer", "adam", "--train-iters", "1",
                 "--save", ckpt, "--save-interval", "1", "--ckpt-format", "torch_dist"]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, str(REPO / "examples" / "pretrain_gpt.py"), *flags], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        sys.path.insert(0, str(REPO))
        from megatron_md.checkpoint.reader import open_model
        reader = open_model(ckpt)
        sizes = {n: reader.dtype(n).itemsize * int(__import__("math").prod(reader.shape(n))) for n in reader}
        model_bytes, largest = sum(sizes.values()), max(sizes.values())
        largest_name = max(sizes, key=sizes.get)
        ckpt_bytes = dir_bytes(os.path.join(ckpt, "iter_0000001"))
        res = {}
        for mode in ("stream", "whole"):
            out = os.path.join(work, f"hf_{mode}")
            code = CHILD.format(repo=str(REPO), load=ckpt, mode=mode, out=out)
            r = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
            res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 2 ** 20
    rows = [f"| {mode} | {v['base'] / mib:.0f} | {v['peak'] / mib:.0f} | {(v['peak'] - v['base']) / mib:.0f} | "
            f"{(v['peak'] - v['base']) / largest:.1f} | {(v['peak'] - v['base']) / model_bytes:.2f} |"
            for mode, v in res.items()]
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/convert_memory.py " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:])
    text = "\n".join(header("to-hf peak memory on a torch_dist checkpoint: streaming vs whole model", cmd, REPO,
                            f"Wall time {time.time() - t0:.0f} s.") + [
        f"Model: hidden {hidden}, {layers} layers, SwiGLU ffn {4 * hidden}, GQA 8 heads / 4 groups, vocab "
        f"{a.vocab}, untied head, fp32 — {model_bytes / mib:.0f} MiB of weights; the checkpoint (AdamW after one "
        f"iteration: weights and both moments, every rank file) is {ckpt_bytes / mib:.0f} MiB, "
        f"**{ckpt_bytes / largest:.0f}× the largest tensor** ({largest_name}, {largest / mib:.0f} MiB), "
        f"{ckpt_bytes / model_bytes:.1f}× the weights.", "",
        "Each conversion runs in a fresh process; *held* = peak resident set (VmHWM) minus the resident set after "
        "importing torch, torch.distributed.checkpoint, safetensors and megatron_md (VmRSS), i.e. what the "
        "conversion itself held.", "",
        "| reader | RSS after imports (MiB) | peak RSS (MiB) | held (MiB) | held / largest tensor | held / weights |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        "`stream` is `tools/convert_checkpoint.py to-hf`: the torch_dist reader (`megatron_md/checkpoint/reader.py`) "
        "reads one layer's slice of one key per access, and the safetensors writer writes each file's header from "
        "the shapes first and then each tensor as it comes, so what it holds is about one Megatron tensor and its "
        "Hugging Face pieces. `whole` reads every tensor first, as a merge of per-rank files does."])
    emit(text, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
