"""What a new user runs into with checkpoints and diverging runs, each refused with a clear error.

One spawned group of 2 gloo ranks runs the real driver (``pretrain`` in-process, DP=2, AdamW) on
the synthetic indexed dataset of test_driver: a 4-iteration run saves at 2 and 4, then every
scenario damages a copy of the checkpoint the way it happens in practice (bytes overwritten in
the middle of rank 1's ``exp_avg`` tensor, a truncated rank file, a deleted rank file, a missing
manifest) or loads it with another optimizer / model shape / layout, and asserts that

* both ranks raise the same :class:`CheckpointError` before anything is restored, naming the
  file (or the flag) and the mismatch; ``main()`` prints it as one line from rank 0, exit 1;
* the checkpoint directory is byte-for-byte unchanged (nothing overwritten), and the
  undamaged checkpoint still resumes exactly.

An interrupted save (both ranks stopped while writing iteration 4: partial ``*.tmp<pid>``
files, no manifest) leaves iteration 2 as the latest; resuming from it reproduces the
uninterrupted run and its first save removes the leftovers. A save onto a full filesystem (a small
tmpfs in a private mount namespace, both formats) stops the run with one error line naming --save
and the cause, leaves no staging files, and the previous checkpoint resumes. A diverging run (AdamW at LR 100)
stops with the spike message before the checkpoint of that iteration. A global grad norm that
overflows while every gradient is finite skips the step in each Megatron wrapper (FP32, bf16,
ZeRO-1, the chained dense+expert optimizer of a MoE model), changing nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from collections import deque
from importlib import util
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")

from megatron_md.testing.full_disk import in_private_tmpfs, private_tmpfs_works  # noqa: E402
from megatron_md.testing.spawn import group_fixture  # noqa: E402

pytestmark = [pytest.mark.megatron]


def _sibling(name: str):
    spec = util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tree_digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _overwrite_exp_avg(path: str) -> None:
    """Overwrite 64 bytes in the middle of the largest ``exp_avg`` tensor's bytes in ``path``
    with large finite floats (the size stays the same)."""
    import torch
    state = torch.load(path, map_location="cpu", weights_only=False)
    tensors = [st["exp_avg"] for w in state["optimizer"] for st in w["inner"]["state"].values() if "exp_avg" in st]
    t = max(tensors, key=lambda x: x.numel())
    raw = t.contiguous().numpy().tobytes()
    data = bytearray(open(path, "rb").read())
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0, "exp_avg bytes not found exactly once"
    mid = at + len(raw) // 2
    data[mid:mid + 64] = torch.full((16,), 3e37).numpy().tobytes()
    open(path, "wb").write(bytes(data))


# ============================================================================ the spawned group
def _failure_checks(ctx):
    import torch
    import torch.distributed as dist

    from megatron_md.checkpoint import integrity as ck
    from megatron_md.training.arguments import parse_args
    from megatron_md.errors import CheckpointError, DivergenceError
    from megatron_md.training.pretrain import main, pretrain

    drv = _sibling("test_driver")
    base = drv.synthetic_base(ctx, "--ckpt-format", "torch", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
                              "--train-iters", "4", "--optimizer", "adam", "--global-batch-size", "4")
    good = os.path.join(ctx.tmpdir, "good")
    it4 = ck.checkpoint_dir(good, 4)
    pristine = os.path.join(ctx.tmpdir, "pristine")

    with ctx.check("setup_run_saves_manifests"):
        full = pretrain(parse_args(base + ["--save", good, "--save-interval", "2"]))
        ctx.record("full", full)
        if ctx.rank == 0:
            for it in (2, 4):
                man = json.load(open(os.path.join(ck.checkpoint_dir(good, it), ck.MANIFEST)))
                assert sorted(man["files"]) == ["rank_00000.pt", "rank_00001.pt"], man["files"]
                for name, entry in man["files"].items():
                    p = os.path.join(ck.checkpoint_dir(good, it), name)
                    assert entry == {"bytes": os.path.getsize(p),
                                     "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest()}, (name, entry)
                assert man["topology"]["optim"]["optimizer"] == "adam", man["topology"]
            shutil.copytree(it4, pristine)
        dist.barrier()

    def refused(name, extra, needles, damage=None, load=good):
        """Damage (rank 0), load on both ranks: the same CheckpointError naming ``needles``;
        the checkpoint directory is unchanged by the attempt; then undo the damage."""
        with ctx.check(name):
            try:
                if ctx.rank == 0 and damage is not None:
                    damage()
                dist.barrier()
                before = _tree_digest(load) if ctx.rank == 0 else None
                try:
                    pretrain(parse_args(base + ["--load", load] + extra))
                except CheckpointError as exc:
                    msg = str(exc)
                else:
                    raise AssertionError("the load was not refused")
                msgs = [None, None]
                dist.all_gather_object(msgs, msg)
                assert msgs[0] == msgs[1], msgs
                for needle in needles:
                    assert needle in msg, (needle, msg)
                ctx.record(name, msg)
                if ctx.rank == 0:
                    assert _tree_digest(load) == before, "the failed load modified the checkpoint directory"
            finally:
                dist.barrier()
                if ctx.rank == 0 and damage is not None:
                    shutil.rmtree(it4)
                    shutil.copytree(pristine, it4)
                dist.barrier()

    r0, r1 = os.path.join(it4, "rank_00000.pt"), os.path.join(it4, "rank_00001.pt")
    refused("corrupted_bytes_refused", [], [r1, "corrupted", "sha256", "manifest"],
            damage=lambda: _overwrite_exp_avg(r1))
    refused("truncated_file_refused", [], [r0, "truncated", "bytes"],
            damage=lambda: open(r0, "r+b").truncate(os.path.getsize(r0) // 2))
    refused("missing_rank_file_refused", [], [r1, "is missing", "incomplete"], damage=lambda: os.remove(r1))
    refused("missing_manifest_refused", [], [os.path.join(it4, ck.MANIFEST), "did not complete", "[2]",
                                            "--ckpt-step"],
            damage=lambda: os.remove(os.path.join(it4, ck.MANIFEST)))
    refused("other_optimizer_refused", ["--optimizer", "muon"],
            ["--optimizer: checkpoint 'adam', this run 'muon'", "--no-load-optim"])
    refused("other_model_shape_refused", ["--hidden-size", "64"], ["--hidden-size: checkpoint 32, this run 64"])
    refused("other_ffn_size_refused", ["--ffn-hidden-size", "64"], ["--ffn-hidden-size: checkpoint 128, this run 64"])
    refused("other_layout_refused", ["--tensor-model-parallel-size", "2"],
            ["--tensor-model-parallel-size: checkpoint 1, this run 2", "same layout"])
    refused("other_zero1_setting_refused", ["--use-distributed-optimizer"],
            ["--use-distributed-optimizer: checkpoint False, this run True"])
    refused("missing_step_refused", ["--ckpt-step", "3"], [ck.checkpoint_dir(good, 3), "does not exist", "[2, 4]"])

    with ctx.check("other_zero1_bucket_layout_refused"):
        # ZeRO-1 shards follow the gradient buckets: another bucket layout is refused, flags named
        zdir = os.path.join(ctx.tmpdir, "zero1")
        zero = base + ["--use-distributed-optimizer"]
        pretrain(parse_args(zero + ["--train-iters", "2", "--save", zdir, "--save-interval", "2"]))
        try:
            pretrain(parse_args(zero + ["--overlap-grad-reduce", "--ddp-bucket-size", "1000", "--load", zdir]))
        except CheckpointError as exc:
            assert "--overlap-grad-reduce/--ddp-bucket-size" in str(exc) and "--no-load-optim" in str(exc), str(exc)
        else:
            raise AssertionError("a ZeRO-1 checkpoint loaded with another bucket layout")
        res = pretrain(parse_args(zero + ["--load", zdir]))   # the same layout resumes
        assert res["iterations"] == 4, res

    with ctx.check("main_prints_one_line_and_exits_1"):
        try:
            if ctx.rank == 0:
                _overwrite_exp_avg(r1)
            dist.barrier()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(base + ["--load", good], prog="pretrain_gpt.py")
            text = err.getvalue()
            assert code == 1, code
            lines = [ln for ln in text.splitlines() if "error:" in ln]
            assert "Traceback" not in text, text
            if ctx.rank == 0:
                assert len(lines) == 1 and lines[0].startswith("pretrain_gpt.py: error: ") and r1 in lines[0], text
            else:
                assert not lines, text
        finally:
            dist.barrier()
            if ctx.rank == 0:
                shutil.rmtree(it4)
                shutil.copytree(pristine, it4)
            dist.barrier()

    with ctx.check("undamaged_checkpoint_resumes_exactly"):
        res = pretrain(parse_args(base + ["--load", good, "--ckpt-step", "2"]))
        for it in ("3", "4"):
            assert res["train_loss_history"][it] == full["train_loss_history"][it], (it, res, full)

    with ctx.check("other_optimizer_with_no_load_optim_continues_from_weights"):
        res = pretrain(parse_args(base + ["--load", good, "--optimizer", "muon", "--no-load-optim",
                                          "--weight-decay", "0"]))
        hist = res["train_loss_history"]
        assert res["iterations"] == 4 and all(math.isfinite(v) for v in hist.values()), res
        # it starts from the trained weights: below the fresh model's first loss
        assert hist["1"] < full["train_loss_history"]["1"] - 0.05, (hist, full["train_loss_history"])

    # weights-only loads at another layout: merged from every rank file and cut for this layout;
    # an LR of ~0 keeps them, so the first evaluation is the saved model's (fixed batches)
    keep = ["--no-load-optim", "--lr", "1e-12", "--min-lr", "0", "--train-iters", "1", "--eval-interval", "1"]

    def same_val(a, b):
        va, vb = list(a["val_loss_history"].values())[-1], list(b["val_loss_history"].values())[-1]
        assert abs(va - vb) <= 1e-5 * abs(vb), (va, vb)

    for name, layout in (("tp2", ["--tensor-model-parallel-size", "2"]),
                         ("pp2", ["--pipeline-model-parallel-size", "2"])):
        with ctx.check(f"reshard_weights_dp2_to_{name}"):
            res = pretrain(parse_args(base + ["--load", good] + layout + keep))
            assert res["tp"] * res["pp"] == 2 and res["dp"] == 1, res
            same_val(res, full)
    with ctx.check("reshard_weights_tp2_to_dp2"):
        tp2 = os.path.join(ctx.tmpdir, "tp2")
        saved = pretrain(parse_args(base + ["--tensor-model-parallel-size", "2", "--train-iters", "2",
                                            "--eval-interval", "2", "--save", tp2]))
        same_val(pretrain(parse_args(base + ["--load", tp2] + keep)), saved)

    with ctx.check("bf16_weights_only_load_keeps_the_loaded_weights"):
        # the bf16 wrapper's fp32 main params must be refreshed from the loaded weights; an LR of
        # ~0 leaves them unchanged, so every loss stays at the trained model's level
        res = pretrain(parse_args(base + ["--load", good, "--no-load-optim", "--bf16", "--lr", "1e-12",
                                          "--min-lr", "0", "--train-iters", "3"]))
        hist, fresh = res["train_loss_history"], full["train_loss_history"]["1"]
        assert all(hist[k] < fresh - 0.05 for k in ("1", "2", "3")), (hist, fresh)

    # ----------------------------------------------------------------- interrupted save
    inter = os.path.join(ctx.tmpdir, "interrupted")
    with ctx.check("interrupted_save_keeps_previous_latest"):
        from megatron_md.checkpoint import per_rank  # the per-rank format's writer calls it
        real = per_rank.atomic_torch_save

        def dying_save(obj, path):  # a kill while iteration 4's rank files are being written
            if obj.get("iteration") == 4:
                with open(f"{path}.tmp{os.getpid()}", "wb") as fh:
                    fh.write(b"PK\x03\x04 partial")
                raise KeyboardInterrupt("simulated kill during the save of iteration 4")
            return real(obj, path)

        per_rank.atomic_torch_save = dying_save
        try:
            pretrain(parse_args(base + ["--save", inter, "--save-interval", "2"]))
            raise AssertionError("the simulated kill did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            per_rank.atomic_torch_save = real
        dist.barrier()
        if ctx.rank == 0:
            assert ck.read_latest(inter) == 2
            leftovers = [os.path.join(d, f) for d, ds, fs in os.walk(inter) for f in fs + ds if ".tmp" in f]
            assert leftovers, "the simulated kill left no partial files"
            ctx.record("leftovers", [os.path.relpath(p, inter) for p in leftovers])
        dist.barrier()

    with ctx.check("resume_after_interrupted_save_is_exact_and_cleans_leftovers"):
        res = pretrain(parse_args(base + ["--load", inter, "--save", inter, "--save-interval", "2"]))
        for it in ("3", "4"):
            assert res["train_loss_history"][it] == full["train_loss_history"][it], (it, res, full)
        if ctx.rank == 0:
            names = sorted(os.listdir(inter))
            assert names == ["iter_0000002", "iter_0000004", ck.TRACKER], names
            assert not [f for d, ds, fs in os.walk(inter) for f in fs + ds if ".tmp" in f]
            assert ck.read_latest(inter) == 4

    # ----------------------------------------------------------------- divergence
    with ctx.check("loss_spike_stops_before_saving"):
        div = os.path.join(ctx.tmpdir, "diverged")
        try:
            pretrain(parse_args(base + ["--lr", "100", "--clip-grad", "0", "--save", div, "--save-interval", "1",
                                        "--loss-spike-window", "1", "--loss-spike-factor", "2"]))
        except DivergenceError as exc:
            msg = str(exc)
        else:
            raise AssertionError("the diverging run was not stopped")
        ctx.record("divergence", msg)
        assert "iteration 2:" in msg and "stopping before saving" in msg and "iteration 1 in" in msg, msg
        assert "--loss-spike-factor" in msg or "is nan" in msg or "is inf" in msg, msg
        if ctx.rank == 0:
            assert ck.read_latest(div) == 1 and ck.complete_iterations(div) == [1], os.listdir(div)

    # ----------------------------------------------------------------- grad-norm overflow
    from megatron.core import parallel_state as ps

    from megatron_md.megatron.builder import get_megatron_optimizer, skipped_steps
    from megatron_md.training.arguments import optimizer_config
    from megatron_md.training.model import build_model, initialize, transformer_config
    variants = {
        "fp32_muon": ["--optimizer", "muon"],
        "bf16_adam": ["--optimizer", "adam", "--bf16"],
        "zero1_adam": ["--optimizer", "adam", "--use-distributed-optimizer"],
        "moe_chained_muon": ["--optimizer", "muon", "--num-experts", "2", "--moe-router-topk", "2",
                             "--expert-model-parallel-size", "2"],
    }
    for name, extra in variants.items():
        with ctx.check(f"grad_norm_overflow_skips_step_{name}"):
            args = parse_args(base + extra)
            initialize(args)
            try:
                model = build_model(args, transformer_config(args))
                opt = get_megatron_optimizer(optimizer_config(args), model, args.md)
                params = [p for c in model for p in c.parameters()]
                assert len(getattr(opt, "chained_optimizers", [opt])) == (2 if "moe" in name else 1)

                def step(value):
                    for c in model:
                        c.zero_grad_buffer()
                    for p in params:
                        p.main_grad.fill_(value)
                    assert all(torch.isfinite(p.main_grad).all() for p in params), "every gradient is finite"
                    before = [p.detach().clone() for p in params]
                    ok, norm, _ = opt.step()
                    changed = any(not torch.equal(a, p) for a, p in zip(before, params))
                    return ok, norm, changed

                # 1e30 is finite in fp32 (and bf16); its square is not: the norm overflows
                ok, norm, changed = step(1e30)
                assert ok is False and not math.isfinite(norm) and not changed, (ok, norm, changed)
                assert skipped_steps(opt) == 1, skipped_steps(opt)
                ok, norm, changed = step(1e-3)
                assert ok is True and math.isfinite(norm) and changed, (ok, norm, changed)
                assert skipped_steps(opt) == 1
            finally:
                ps.destroy_model_parallel()


failure_group = group_fixture(2, _failure_checks, megatron=True, timeout=400)

CHECKS = ["setup_run_saves_manifests", "corrupted_bytes_refused", "truncated_file_refused",
          "missing_rank_file_refused", "missing_manifest_refused", "other_optimizer_refused",
          "other_model_shape_refused", "other_ffn_size_refused", "other_layout_refused",
          "other_zero1_setting_refused", "missing_step_refused", "other_zero1_bucket_layout_refused", "main_prints_one_line_and_exits_1",
          "undamaged_checkpoint_resumes_exactly", "other_optimizer_with_no_load_optim_continues_from_weights",
          "bf16_weights_only_load_keeps_the_loaded_weights", "reshard_weights_dp2_to_tp2",
          "reshard_weights_dp2_to_pp2", "reshard_weights_tp2_to_dp2",
          "interrupted_save_keeps_previous_latest", "resume_after_interrupted_save_is_exact_and_cleans_leftovers",
          "loss_spike_stops_before_saving"] + [
          f"grad_norm_overflow_skips_step_{v}" for v in ("fp32_muon", "bf16_adam", "zero1_adam", "moe_chained_muon")]


@pytest.mark.distributed
@pytest.mark.parametrize("name", CHECKS)
def test_checkpoint_failure(failure_group, name):
    failure_group.assert_ok(name)


# ============================================================================ in-process
def _args(**kw):
    base = dict(check_for_nan_in_loss_and_grad=True, loss_spike_factor=10.0, save="/ckpt")
    base.update(kw)
    return SimpleNamespace(**base)


def test_loss_check_rules():
    from megatron_md.errors import DivergenceError
    from megatron_md.training.pretrain import _check_loss
    full = deque([5.0, 5.2, 4.8], maxlen=3)
    _check_loss(_args(), 4, 49.0, full, 2)                        # 9.8x the mean: allowed
    with pytest.raises(DivergenceError, match=r"iteration 4: the loss 51 is 10\.2x the mean 5 .*iteration 2 in /ckpt"):
        _check_loss(_args(), 4, 51.0, full, 2)
    _check_loss(_args(), 2, 1e9, deque([5.0], maxlen=3), None)     # window not full yet: no spike check
    _check_loss(_args(loss_spike_factor=0.0), 4, 1e9, full, 2)     # spike check off
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DivergenceError, match="no checkpoint was written by this run"):
            _check_loss(_args(), 1, bad, deque(maxlen=3), None)
    _check_loss(_args(check_for_nan_in_loss_and_grad=False), 1, float("nan"), deque(maxlen=3), None)


def test_loss_check_flags_validate():
    from megatron_md.training.arguments import ArgumentError, parse_args
    drv = _sibling("test_driver")
    a = parse_args(drv.TINY, world_size=1)
    assert a.check_for_nan_in_loss_and_grad and a.loss_spike_factor == 10.0 and a.loss_spike_window == 20
    assert not parse_args(drv.TINY + ["--no-check-for-nan-in-loss-and-grad"], world_size=1).check_for_nan_in_loss_and_grad
    with pytest.raises(ArgumentError, match="--loss-spike-factor 0.5"):
        parse_args(drv.TINY + ["--loss-spike-factor", "0.5"], world_size=1)


def test_stale_tmp_cleanup_and_tracker(tmp_path):
    from megatron_md.checkpoint import integrity as ck
    from megatron_md.errors import CheckpointError
    (tmp_path / ck.TRACKER).write_text("x\n")
    with pytest.raises(CheckpointError, match=ck.TRACKER):
        ck.read_latest(str(tmp_path))
    os.makedirs(tmp_path / "iter_0000002")
    (tmp_path / "iter_0000002" / "rank_00000.pt").write_bytes(b"keep")
    (tmp_path / "iter_0000002" / "rank_00000.pt.tmp123").write_bytes(b"stale")
    os.makedirs(tmp_path / "iter_0000004.tmp77")
    (tmp_path / "iter_0000004.tmp77" / "rank_00000.pt").write_bytes(b"stale")
    (tmp_path / f"{ck.TRACKER}.tmp5").write_text("4")
    removed = ck.clean_stale(str(tmp_path))
    assert len(removed) == 3, removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", ck.TRACKER]
    assert os.listdir(tmp_path / "iter_0000002") == ["rank_00000.pt"]
    entry = {"bytes": 4, "sha256": hashlib.sha256(b"keep").hexdigest()}
    assert ck.verify_file(str(tmp_path / "iter_0000002" / "rank_00000.pt"), entry) is None
    (tmp_path / "iter_0000002" / "rank_00000.pt").write_bytes(b"kept")
    assert "corrupted" in ck.verify_file(str(tmp_path / "iter_0000002" / "rank_00000.pt"), entry)


#: run inside a private mount namespace whose --save filesystem is a small tmpfs: for each format,
#: save at iteration 2, fill the filesystem, resume to 4 (its save runs out of space), free it and
#: resume again; prints one JSON line of what happened
_FULL_DISK = r"""
import contextlib, io, json, os, sys
sys.path.insert(0, {repo!r})
tiny = {tiny!r}
from megatron_md.testing.full_disk import fill


def run(flags):
    from megatron_md.training.pretrain import main
    err, log = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(log):
        rc = main(tiny + flags)
    return rc, [ln for ln in err.getvalue().splitlines() if "error:" in ln], log.getvalue()


if __name__ == "__main__":   # megatron-core's checkpoint writer spawns helpers that import this file
    mnt, out = sys.argv[1], {{}}
    for fmt in ("torch", "torch_dist"):
        d, filler = os.path.join(mnt, fmt), os.path.join(mnt, "filler")
        rc0, _, _ = run(["--train-iters", "2", "--save", d, "--ckpt-format", fmt])
        fill(filler)
        rc1, errors, _ = run(["--train-iters", "4", "--load", d, "--save", d, "--save-interval", "2",
                              "--ckpt-format", fmt])
        left = sorted(os.path.relpath(os.path.join(r, f), d) for r, ds, fs in os.walk(d) for f in ds + fs)
        os.remove(filler)
        rc2, _, log = run(["--train-iters", "3", "--load", d, "--ckpt-format", fmt])
        out[fmt] = dict(rc=[rc0, rc1, rc2], errors=errors, left=left,
                        resumed=[ln for ln in log.splitlines() if "loaded checkpoint" in ln])
    print(json.dumps(out))
"""


@pytest.mark.skipif(not private_tmpfs_works(), reason="needs unshare -rm and mount (user namespaces) for a small "
                    "private tmpfs, the full filesystem of this test")
def test_a_save_onto_a_full_filesystem_is_one_error_and_the_previous_checkpoint_resumes(tmp_path):
    """A real full filesystem (a 24 MiB tmpfs in a private mount namespace, filled up after the first
    save): the second save stops the run with one ``error:`` line naming --save and ``No space left
    on device``, exit 1, no staging files left; the first checkpoint then resumes — both formats."""
    import subprocess
    import sys
    drv = _sibling("test_driver")
    at = drv.TINY.index("--train-iters")
    tiny = drv.TINY[:at] + drv.TINY[at + 2:]   # each run sets its own
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK.format(repo=str(Path(__file__).resolve().parents[2]), tiny=tiny))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(in_private_tmpfs(mnt, [sys.executable, script, mnt]), capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for fmt, res in got.items():
        assert res["rc"] == [0, 1, 0], (fmt, res)
        assert len(res["errors"]) == 1, (fmt, res["errors"])
        line = res["errors"][0]
        # per rank: Python's own write says ENOSPC; torch_dist: megatron-core's torch.save of common.pt
        # reports a C++ stream error, so the free space is what names the cause
        assert f"--save {mnt / fmt}" in line and "the latest checkpoint is still iteration 2" in line, line
        assert ("No space left on device" in line) if fmt == "torch" else ("bytes free on its filesystem" in line), line
        assert not [f for f in res["left"] if ".tmp" in f], (fmt, res["left"])
        assert any("iteration 2" in ln for ln in res["resumed"]), (fmt, res["resumed"])
