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


def csv_subset(parser, flag: str, value: str, allowed) -> list[str]:
    """Split a comma-separated flag value; ``parser.error`` on any name not in ``allowed``."""
    items = [v for v in value.split(",") if v]
    for v in items:
        if v not in allowed:
            parser.error(f"{flag}: unknown {v!r}; expected some of {list(allowed)}")
    return items
