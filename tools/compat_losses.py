"""Regenerate the loss table of docs/compatibility.md from Megatron-LM's own log.

Runs Megatron-LM's unmodified ``pretrain_gpt.py`` through our launcher
(``examples/megatron_lm/pretrain_gpt_md.py``; on a CPU machine through the test-only start-up
shims ``tests/megatron_lm/cpu_megatron_lm.py``) with the documented command, once per row of
:data:`ROWS`, reads Megatron-LM's log lines (``iteration N/ M | ... lm loss: ...``, ``validation
loss at iteration N``) and rewrites the rows of this megatron-core version between the markers
``<!-- compat-losses:begin -->`` / ``<!-- compat-losses:end -->`` (rows of other versions are kept),
and the command block between ``<!-- compat-command:begin/end -->``: the table always shows what the
printed command prints, it cannot drift.

    MEGATRON_LM_PATH=/path/to/Megatron-LM python tools/compat_losses.py            # rewrite the doc
    MEGATRON_LM_PATH=/path/to/Megatron-LM python tools/compat_losses.py --check    # exit 1 if it differs

Needs Megatron-LM's import dependencies beside megatron-core (docs/compatibility.md).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compatibility.md"
LAUNCHER = "examples/megatron_lm/pretrain_gpt_md.py"
SHIMS = "tests/megatron_lm/cpu_megatron_lm.py"
PY311 = ROOT / "tests" / "megatron_lm" / "py311"   # typing.override for Python 3.11 (CPU runs)

#: Newton-Schulz dtype of the documented runs, pinned: the automatic choice times bf16 against fp32
#: on this CPU, and on a loaded machine that probe can flip between runs (the last digit moved)
NS_DTYPE = "fp32"
#: the documented command's flags (a tiny GPT on Megatron's mock data, 6 iterations, 2 ranks)
FLAGS = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 6 --eval-interval 3 "
    "--eval-iters 2 --log-interval 1 --lr 0.01 --lr-decay-style constant --weight-decay 0 --clip-grad 1.0 "
    "--seed 1234 --mock-data --tokenizer-type NullTokenizer --vocab-size 128 --distributed-backend gloo "
    "--transformer-impl local --use-cpu-initialization --no-gradient-accumulation-fusion "
    "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm "
    "--no-rope-fusion --position-embedding-type learned_absolute --attention-dropout 0 --hidden-dropout 0").split()
#: (row label, the flags after FLAGS); the first row's flags end the documented command
ROWS = (
    ("`--optimizer muon-md`, TP=2", "--tensor-model-parallel-size 2 --optimizer muon-md"),
    ("`--optimizer sf-normuon`, TP=2", "--tensor-model-parallel-size 2 --optimizer sf-normuon"),
    ("`--optimizer rmnp --use-distributed-optimizer`, TP=2",
     "--tensor-model-parallel-size 2 --optimizer rmnp --use-distributed-optimizer"),
    ("`--optimizer muon-md --use-distributed-optimizer`, TP=1 × DP=2 (split QKV)",
     "--tensor-model-parallel-size 1 --optimizer muon-md --use-distributed-optimizer"),
)
ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|")
VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: (\S+) \|")
BEGIN, END = "<!-- compat-losses:begin -->", "<!-- compat-losses:end -->"
CMD_BEGIN, CMD_END = "<!-- compat-command:begin -->", "<!-- compat-command:end -->"
HEADER = ("| run | it 1 | it 2 | it 3 | it 4 | it 5 | it 6 | val @3 | val @6 |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def command_text() -> str:
    """The documented command (the first row), wrapped like a shell command."""
    words = ["python -m torch.distributed.run --nproc-per-node 2", SHIMS, LAUNCHER]
    for w in FLAGS + ROWS[0][1].split():  # a flag and its value stay on one line
        if w.startswith("--") or not words[-1].startswith("--"):
            words.append(w)
        else:
            words[-1] += " " + w
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > 100:
            lines.append(cur + " \\")
            cur = "  " + w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return ("```\nexport MEGATRON_LM_PATH=<Megatron-LM checkout> CUDA_DEVICE_MAX_CONNECTIONS=1 "
            f"MEGATRON_MD_NS_DTYPE={NS_DTYPE}\n" + "\n".join(lines) + "\n```")


def version_tag() -> str:
    """``core_vX`` script / wheel of this environment, for the rows' labels."""
    from importlib.metadata import version
    return f"megatron-core {version('megatron-core')}"


def run_row(flags: str, timeout: int = 600) -> list[str]:
    """Megatron-LM's losses of one run: iterations 1..6 and the validation losses at 3 and 6 (3 decimals)."""
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1", MEGATRON_MD_NS_DTYPE=NS_DTYPE,
               PYTHONPATH=os.pathsep.join(filter(None, [str(PY311), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SHIMS, LAUNCHER,
           *FLAGS, *flags.split()]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    iters = {int(m[1]): float(m[2]) for m in ITER.finditer(out)}
    valid = {int(m[1]): float(m[2]) for m in VALID.finditer(out)}
    if proc.returncode != 0 or sorted(iters) != list(range(1, 7)) or sorted(valid) != [3, 6]:
        raise RuntimeError(f"{flags}: exit code {proc.returncode}, iterations {sorted(iters)}, validations "
                           f"{sorted(valid)}\n{out[-3000:]}")
    return [f"{iters[i]:.3f}" for i in range(1, 7)] + [f"{valid[i]:.3f}" for i in (3, 6)]


def _between(text: str, begin: str, end: str) -> tuple[int, int]:
    a, b = text.index(begin) + len(begin), text.index(end)
    return a, b


def render(doc: str, rows: dict[str, list[str]], tag: str) -> str:
    """``doc`` with this version's rows replaced (others kept, in order) and the command block."""
    a, b = _between(doc, BEGIN, END)
    old = [ln for ln in doc[a:b].strip().splitlines()[2:] if ln.startswith("|")]
    ours = [f"| {label}, {tag} | " + " | ".join(rows[label]) + " |" for label, _ in ROWS]
    kept = [ln for ln in old if not ln.endswith(" |") or f", {tag} |" not in ln]
    doc = doc[:a] + "\n" + HEADER + "\n" + "\n".join(ours + kept) + "\n" + doc[b:]
    a, b = _between(doc, CMD_BEGIN, CMD_END)
    return doc[:a] + "\n" + command_text() + "\n" + doc[b:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the doc instead of rewriting it (exit 1)")
    a = ap.parse_args(argv)
    if not os.environ.get("MEGATRON_LM_PATH"):
        print("compat_losses: error: set MEGATRON_LM_PATH to a Megatron-LM checkout", file=sys.stderr)
        return 2
    tag = version_tag()
    rows = {label: run_row(flags) for label, flags in ROWS}
    doc = DOC.read_text()
    new = render(doc, rows, tag)
    if a.check:
        if new != doc:
            changed = sorted(set(new.splitlines()) ^ set(doc.splitlines()))
            print(f"compat_losses: docs/compatibility.md differs from what the command prints ({tag}); "
                  f"run tools/compat_losses.py. Lines:\n" + "\n".join(changed), file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
