"""Integrity of the checkpoints Megatron-LM's own loop saves through our plugin, tried as a user
would: bytes overwritten in the middle of a ``.distcp`` file, a save onto a full filesystem.

Each format runs one sequence of torchrun launches (this file's ``__main__``, inside a private mount
namespace whose checkpoint directory is a 24 MiB tmpfs when ``unshare -rm`` works; without it the
full-disk step is left out): save at iteration 3 (its manifest lists every file with its size and
sha256); fill the filesystem and resume towards 6 (the save at 6 fails: one ``error:`` line naming
--save and the cause, nothing of iteration 6 left, the tracker still 3); free it; torch_dist only:
overwrite 16 bytes in the middle of a ``.distcp`` of iteration 3 and resume (refused before loading,
one line naming the file), then undo it; resume (iterations 4–6 train, and the save at 6 has its
manifest). 4 launches for torch_dist, 3 for torch. Needs ``MEGATRON_LM_PATH`` like
test_pretrain_gpt.py, whose launcher and tiny GPT it reuses; skipped without it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import util
from pathlib import Path

import pytest

from megatron_md.testing.full_disk import fill, in_private_tmpfs, private_tmpfs_works

_spec = util.spec_from_file_location("_mlm_pretrain", Path(__file__).with_name("test_pretrain_gpt.py"))
_mlm = util.module_from_spec(_spec)
_spec.loader.exec_module(_mlm)
pytestmark = _mlm.pytestmark

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = ["--optimizer", "muon-md", "--tensor-model-parallel-size", "2"]


def _launch(fmt: str, *flags: str) -> dict:
    rc, out, iters, _ = _mlm._run(*COMMON, "--ckpt-format", fmt, *flags)
    ranks = out.split("failed (exitcode")[0]   # what the ranks printed, before torchrun's own report
    return {"rc": rc, "errors": [ln for ln in out.splitlines() if "error:" in ln],
            "notes": [ln for ln in out.splitlines() if "megatron_md: note:" in ln],
            "traceback": "Traceback" in ranks, "iterations": sorted(iters),
            "loaded": "successfully loaded checkpoint" in out, "tail": out[-2500:]}


def _listing(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in ds + fs)


def _sequence(mnt: str, fmt: str, full_disk: bool) -> dict:
    """The sequence of the module docstring for ``fmt`` under ``mnt``; what each step saw."""
    ckpt = os.path.join(mnt, fmt)
    it3 = os.path.join(ckpt, "iter_0000003")
    out: dict = {"ckpt": ckpt}
    out["save"] = _launch(fmt, "--save", ckpt, "--save-interval", "3", "--exit-interval", "3")
    out["manifest"] = json.load(open(os.path.join(it3, "manifest.json")))
    out["files"] = {os.path.relpath(os.path.join(d, f), it3): {"bytes": os.path.getsize(os.path.join(d, f)),
                                                             "sha256": hashlib.sha256(open(os.path.join(d, f), "rb")
                                                                                      .read()).hexdigest()}
                    for d, _, fs in os.walk(it3) for f in fs if f != "manifest.json"}
    resume = ["--load", ckpt, "--save", ckpt, "--save-interval", "3"]
    if full_disk:
        filler = os.path.join(mnt, "filler")
        fill(filler)
        out["full"] = _launch(fmt, *resume)
        out["full"]["left"] = _listing(ckpt)
        out["full"]["tracker"] = open(os.path.join(ckpt, TRACKER)).read().strip()
        os.remove(filler)
    if fmt == "torch_dist":   # 16 bytes overwritten in the middle of the largest .distcp
        victim = max((os.path.join(it3, f) for f in os.listdir(it3) if f.endswith(".distcp")), key=os.path.getsize)
        saved = os.path.join(mnt, "saved")
        shutil.copyfile(victim, saved)
        with open(victim, "r+b") as fh:
            mid = os.path.getsize(victim) // 2
            fh.seek(mid)
            chunk = fh.read(16)
            fh.seek(mid)
            fh.write(bytes(b ^ 0xFF for b in chunk))
        out["victim"] = victim
        out["damaged"] = _launch(fmt, *resume)
        shutil.copyfile(saved, victim)
    out["resumed"] = _launch(fmt, *resume)
    it6 = os.path.join(ckpt, "iter_0000006", "manifest.json")
    out["resumed"]["manifest6"] = sorted(json.load(open(it6))["files"]) if os.path.exists(it6) else None
    return out


@pytest.fixture(scope="module")
def tmpfs() -> bool:
    return private_tmpfs_works()


def _run_sequence(tmp_path: Path, fmt: str, full_disk: bool) -> dict:
    mnt, result = tmp_path / "mnt", tmp_path / "result.json"
    mnt.mkdir()
    me = [sys.executable, str(Path(__file__).resolve()), str(mnt), fmt, str(result), str(int(full_disk))]
    cmd = in_private_tmpfs(mnt, me) if full_disk else me
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=_mlm.ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return json.loads(result.read_text())


def _one_line(step: dict, *needles: str) -> str:
    assert step["rc"] != 0 and len(step["errors"]) == 1, step
    line = step["errors"][0]
    assert line.startswith("megatron_md: error: ") and all(n in line for n in needles), (needles, line)
    assert not step["traceback"], step["tail"]
    return line


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_checkpoint_integrity_in_megatron_lms_loop(tmp_path, tmpfs, fmt):
    got = _run_sequence(tmp_path, fmt, tmpfs)
    ckpt = got["ckpt"]
    assert got["save"]["rc"] == 0 and got["save"]["iterations"] == [1, 2, 3], got["save"]
    man = got["manifest"]
    assert man["writer"] == "megatron-lm" and man["iteration"] == 3 and man["ckpt_format"] == fmt, man
    assert man["files"] == got["files"], (man["files"], got["files"])  # every file, its size and sha256
    if fmt == "torch_dist":
        assert {"common.pt", ".metadata", "metadata.json"} <= set(man["files"]), man["files"]
        assert sum(n.endswith(".distcp") for n in man["files"]) >= 2, man["files"]
    else:
        assert sorted(man["files"]) == ["mp_rank_00/model_optim_rng.pt", "mp_rank_01/model_optim_rng.pt"]

    if tmpfs:
        full = got["full"]
        # torch: Python's write says ENOSPC; torch_dist: megatron-core's torch.save of common.pt reports
        # a C++ stream error, so the free space is what names the cause
        line = _one_line(full, f"--save {ckpt}", "iteration 6 could not be written",
                         "the latest checkpoint is still iteration 3")
        assert "No space left on device" in line or "bytes free on its filesystem" in line, line
        assert full["iterations"] == [4, 5, 6] and full["loaded"], full
        assert full["tracker"] == "3" and not [f for f in full["left"] if "0000006" in f or ".tmp" in f], full
    else:
        print("full-disk step left out: unshare -rm (user namespaces) is not available for a private tmpfs")

    if fmt == "torch_dist":   # (the per-rank format's files are verified by the same code: tests/distributed)
        damaged = got["damaged"]
        _one_line(damaged, got["victim"], "is corrupted", "sha256", "manifest")
        assert damaged["iterations"] == [] and not damaged["loaded"], damaged

    resumed = got["resumed"]
    assert resumed["rc"] == 0 and resumed["loaded"] and resumed["iterations"] == [4, 5, 6], resumed["tail"]
    assert not resumed["errors"], resumed["errors"]
    assert resumed["manifest6"] == sorted(man["files"]), resumed["manifest6"]


if __name__ == "__main__":   # python this_file.py <dir> <format> <result.json> <full disk 0/1>
    _mnt, _fmt, _result, _full = sys.argv[1:5]
    with open(_result, "w") as _fh:
        json.dump(_sequence(_mnt, _fmt, _full == "1"), _fh)
