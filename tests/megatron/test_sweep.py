"""tools/sweep.py's runner on the real driver (in-process, megatron-core on CPU, mock data):
results are tabulated, finished runs are never rerun, failed runs are recorded with their
error, interrupted runs are rerun, and a grid extended later reuses what exists."""
from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_md.experiments.sweep import SweepConfig, run_sweep  # noqa: E402

pytestmark = [pytest.mark.megatron]

REPO = Path(__file__).resolve().parents[2]
BASE = ["--num-layers", "1", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
        "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "2", "--vocab-size", "256",
        "--make-vocab-size-divisible-by", "64"]


def _cfg(**kw):
    base = dict(optimizers=["adam", "adamh"], lrs={"adam": [1e-3, 3e-3], "adamh": [1e-2]}, train_iters=[4],
                hidden_sizes=[32], base_args=BASE, data="mock", in_process=True,
                # AdamH takes no weight decay: the driver rejects this run before training
                optimizer_args={"adamh": ["--weight-decay", "0.1"]})
    base.update(kw)
    return SweepConfig(**base)


def test_sweep_runs_records_and_resumes(tmp_path):
    root = tmp_path / "sw"
    counts = run_sweep(_cfg(), str(root), progress=False)
    assert counts == {"ok": 2, "failed": 1, "skipped": 0}
    rows = {r["run_id"]: r for r in csv.DictReader(open(root / "results.csv"))}
    assert set(rows) == {"adam-N32-D4-lr0.001-s1", "adam-N32-D4-lr0.003-s1", "adamh-N32-D4-lr0.01-s1"}
    ok = rows["adam-N32-D4-lr0.003-s1"]
    assert ok["status"] == "ok" and float(ok["final_val_loss"]) > 0 and float(ok["eta_eff_last10"]) > 0
    assert int(ok["tokens"]) == 4 * 2 * 16
    assert "examples/pretrain_gpt.py" in ok["command"] and "--lr 0.003" in ok["command"]
    bad = json.loads((root / "runs" / "adamh-N32-D4-lr0.01-s1" / "result.json").read_text())
    assert bad["status"] == "failed" and bad["returncode"] == 2 and "--weight-decay" in bad["error"]
    # a finished run keeps its log compressed (the driver's exact lines), nothing else beside it
    run = root / "runs" / "adam-N32-D4-lr0.003-s1"
    assert sorted(p.name for p in run.iterdir()) == ["command.json", "log.jsonl.gz", "result.json", "stdout.txt"]
    log = [json.loads(x) for x in gzip.decompress((run / "log.jsonl.gz").read_bytes()).decode().splitlines()]
    assert [e["event"] for e in log].count("optimizer_stats") == 4 and log[-1]["event"] == "summary"

    # resume: nothing finished is rerun (failed runs stay recorded unless retried)
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/result.json")}
    meta = (root / "sweep.json").read_bytes()
    (root / "sweep.json").write_bytes(meta.replace(b'"commit": ', b'"commit": "x", "was": '))
    assert run_sweep(_cfg(), str(root), progress=False) == {"ok": 0, "failed": 0, "skipped": 3}
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("runs/*/result.json")}
    # ... and sweep.json (the config and commit of the invocation that ran) is left as it was
    assert b'"was": ' in (root / "sweep.json").read_bytes()

    # an interrupted run (no result.json) is rerun; an extended grid adds only its new point;
    # the failed run is retried on request, here with the flag fixed
    (root / "runs" / "adam-N32-D4-lr0.001-s1" / "result.json").unlink()
    cfg = _cfg(lrs={"adam": [1e-3, 3e-3, 1e-2], "adamh": [1e-2]}, optimizer_args={})
    assert run_sweep(cfg, str(root), progress=False, retry_failed=True) == {"ok": 3, "failed": 0, "skipped": 1}
    rows = list(csv.DictReader(open(root / "results.csv")))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert stamps[root / "runs" / "adam-N32-D4-lr0.003-s1" / "result.json"] == \
        (root / "runs" / "adam-N32-D4-lr0.003-s1" / "result.json").stat().st_mtime_ns


def test_sweep_cli_validates_and_lists(tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "sweep.py")]
    r = subprocess.run(tool + ["--out", str(tmp_path / "x"), "--optimizers", "adam", "--train-iters", "4",
                               "--hidden-sizes", "32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--lrs" in r.stderr
    r = subprocess.run(tool + ["--out", str(tmp_path / "x"), "--optimizers", "adam", "--lrs", "1e-3",
                               "--train-iters", "4", "--hidden-sizes", "32", "--", "--lr", "0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--lr is set per run" in r.stderr
    r = subprocess.run(tool + ["--out", str(tmp_path / "x"), "--optimizers", "adam,adamh", "--lrs", "1e-3,2e-3",
                               "--train-iters", "4,8", "--hidden-sizes", "32", "--data", "mock", "--dry-run", "--",
                               *BASE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("8 grid points: 0 finished, 8 pending")
    assert "adamh-N32-D8-lr0.002-s1: " in r.stdout and "--mock-data" in r.stdout
