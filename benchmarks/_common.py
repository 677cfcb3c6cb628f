"""Helpers shared by the benchmark scripts (report headers)."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def git_rev(root: Path) -> str:
    """``commit <sha>``, noting uncommitted changes to the optimizer code."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "megatron_md/shard",
                                "megatron_md/optim", "megatron_md/ops"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if not rev:
            return "unknown"
        return f"commit {rev}" + (", with uncommitted changes in megatron_md/{shard,optim,ops}" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dir_bytes(path) -> int:
    """Bytes of every file under ``path``."""
    import os
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def csv_subset(parser, flag: str, value: str, allowed) -> list[str]:
    """Split a comma-separated flag value; ``parser.error`` on any name not in ``allowed``."""
    items = [v for v in value.split(",") if v]
    for v in items:
        if v not in allowed:
            parser.error(f"{flag}: unknown {v!r}; expected some of {list(allowed)}")
    return items


def interleaved(steps: dict, warmup: int, repeats: int, sync=lambda: None) -> dict:
    """Time each callable of ``steps`` (name → fn) ``repeats`` times, round-robin after ``warmup``
    untimed rounds, so that a burst of load on a shared machine hits every variant alike.
    Returns name → list of seconds."""
    import time

    for _ in range(warmup):
        for fn in steps.values():
            fn()
    out = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            sync()
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def header(title: str, cmd: str, root: Path, extra: str = "") -> list[str]:
    """The common head of a benchmark report: command, commit, date, machine, load."""
    import datetime
    import os

    import torch

    return [f"# {title}", "", f"Command: `{cmd.strip()}` (repository at {git_rev(root)})  ",
            f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}; machine: "
            f"{os.cpu_count()} vCPU {cpu_name()} "
            f"(load average {os.getloadavg()[0]:.1f} at the end); {torch.get_num_threads()} torch thread(s). {extra}", ""]


def emit(text: str, out: str) -> None:
    """Print a report and write it to ``out`` (``'-'``: stdout only)."""
    import sys
    print(text)
    if out != "-":
        Path(out).write_text(text + "\n")
        print(f"written to {out}", file=sys.stderr)
