"""Run logs of a sweep stored compressed (megatron_md.experiments.sweep): the writer keeps the
exact bytes, deterministically and atomically; the readers take plain and ``.gz`` logs alike."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_md.experiments.sweep import LOG, LOG_GZ, compress_log, compress_logs, log_path, read_log

REPO = Path(__file__).resolve().parents[2]
EVENTS = [{"event": "train", "iteration": i, "loss": 6.0 - i / 7, "lr": 1e-3, "grad_norm": 0.5 + i}
          for i in range(1, 6)] + [{"event": "summary", "final_val_loss": 5.25, "note": "η ✓"}]


def _plain(d: Path, torn: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in EVENTS)
    (d / LOG).write_text(text + ('{"event": "tra' if torn else ""), encoding="utf-8")
    return d / LOG


def test_compress_log_keeps_the_bytes_and_is_deterministic(tmp_path):
    plain = _plain(tmp_path / "a")
    raw = plain.read_bytes()
    gz = compress_log(plain)
    assert gz == tmp_path / "a" / LOG_GZ and not plain.exists()
    assert gzip.decompress(gz.read_bytes()) == raw
    assert len(gz.read_bytes()) < len(raw)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [LOG_GZ]   # no temporary file left
    # same log, another folder and time: the same compressed bytes
    other = compress_log(_plain(tmp_path / "b"))
    assert other.read_bytes() == gz.read_bytes()


def test_read_log_takes_plain_and_compressed(tmp_path):
    plain = _plain(tmp_path / "run", torn=True)
    assert read_log(plain) == EVENTS                     # a torn last line is left out
    assert log_path(tmp_path / "run") == plain
    compress_log(plain)
    assert log_path(tmp_path / "run") == tmp_path / "run" / LOG_GZ
    assert read_log(tmp_path / "run" / LOG_GZ) == EVENTS
    assert read_log(plain) == EVENTS                     # the plain name finds the .gz beside it
    assert read_log(tmp_path / "nothing.jsonl") == []


def test_read_log_names_a_damaged_gz(tmp_path):
    gz = compress_log(_plain(tmp_path / "run"))
    gz.write_bytes(gz.read_bytes()[:-12])                # truncated: no gzip trailer
    with pytest.raises(ValueError, match=rf"{LOG_GZ}: not a complete gzip-compressed log"):
        read_log(gz)


def test_compress_logs_only_touches_finished_runs(tmp_path):
    done, running = tmp_path / "runs" / "done", tmp_path / "runs" / "running"
    _plain(done)
    (done / "result.json").write_text("{}")
    _plain(running)
    assert compress_logs(tmp_path) == [done / LOG_GZ]
    assert (running / LOG).exists() and not (running / LOG_GZ).exists()
    assert compress_logs(tmp_path) == []                 # nothing left to do


def test_sweep_tool_compresses_and_plot_tool_reads(tmp_path):
    d = tmp_path / "sw" / "runs" / "adam-N64-D5-lr0.001-s1"
    _plain(d)
    (d / "result.json").write_text("{}")
    tool = [sys.executable, str(REPO / "tools" / "sweep.py")]
    r = subprocess.run(tool + ["--out", str(tmp_path / "sw"), "--compress-logs"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "1 logs compressed" in r.stdout, r.stderr
    assert not (d / LOG).exists() and read_log(d / LOG_GZ) == EVENTS
    r = subprocess.run(tool + ["--out", str(tmp_path / "none"), "--compress-logs"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not a sweep directory" in r.stderr
    out = tmp_path / "c.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "plot_run.py"), str(d), str(d / LOG_GZ), "--out",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10_000
