"""The integrity functions our plugin puts around Megatron-LM's ``save_checkpoint`` /
``load_checkpoint`` (:mod:`megatron_md.checkpoint.megatron_lm_loop`), on 2 gloo ranks, without
Megatron-LM: an ``iter_N`` directory laid out as Megatron-LM writes it (``*.distcp``, ``.metadata``,
``common.pt``, ``metadata.json``, a per-rank ``mp_rank_01/model_optim_rng.pt``) stands in for its
save. What Megatron-LM's real loop does with them (a damaged ``.distcp``, a full filesystem) is
tests/megatron_lm/test_checkpoint_integrity_megatron_lm.py.

* the manifest after a save lists every file with its size and sha256, and a load verifies it:
  16 bytes overwritten mid-file, a truncated file, a missing file, an unreadable manifest each stop
  both ranks with the same :class:`CheckpointError` naming the file; no manifest is a note;
* before a save, a leftover ``iter_N`` that the tracker does not name is removed (its files would
  otherwise be listed in the new manifest), the one it names is kept;
* a failed save (an ``OSError`` ENOSPC raised on the ranks after a partial write): one message naming
  --save, the cause and the checkpoint kept, said by rank 0 only; the partial directory is gone and
  the tracker is put back; when a rank never comes (blocked in one of Megatron-LM's collectives), the
  failing rank waits ``wait_s`` and says it itself; a failure that is not a storage one is re-raised.
"""
from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest

from megatron_md.testing.spawn import group_fixture

pytestmark = pytest.mark.distributed

FILES = {"__0_0.distcp": 4096, "__1_0.distcp": 4096, ".metadata": 300, "common.pt": 700, "metadata.json": 40,
         "mp_rank_01/model_optim_rng.pt": 2048}


def _write_checkpoint(directory: str, seed: int) -> None:
    for name, size in FILES.items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(bytes((seed + i * 7) % 251 for i in range(size)))


def _checks(ctx):
    import torch.distributed as dist

    from megatron_md.checkpoint import megatron_lm_loop as loop
    from megatron_md.errors import CheckpointError

    root = os.path.join(ctx.tmpdir, "ckpt")
    tracker = os.path.join(root, "latest_checkpointed_iteration.txt")

    def megatron_save(plan):   # what Megatron-LM's save writes: the files (rank 0), then the tracker
        if ctx.rank == 0:
            _write_checkpoint(plan.directory, plan.iteration)
        dist.barrier()
        if ctx.rank == 0:
            with open(tracker, "w") as fh:
                fh.write(str(plan.iteration))
        dist.barrier()

    def load_error(directory):
        try:
            note = loop.verify_load(directory)
        except CheckpointError as exc:
            msgs = [None, None]
            dist.all_gather_object(msgs, str(exc))
            assert msgs[0] == msgs[1], msgs
            return msgs[0]
        assert note is None, note
        return None

    it4 = os.path.join(root, "iter_0000004")
    with ctx.check("manifest_lists_every_file_and_verifies"):
        for it in (2, 4):
            plan, note = loop.prepare_save(root, it)
            assert note is None and plan.directory == os.path.join(root, f"iter_{it:07d}"), (plan, note)
            megatron_save(plan)
            path = loop.finish_save(plan, "torch_dist")
        dist.barrier()   # rank 0 wrote it
        man = json.load(open(path))
        assert man["writer"] == "megatron-lm" and man["iteration"] == 4 and man["ckpt_format"] == "torch_dist", man
        assert {n: e["bytes"] for n, e in man["files"].items()} == FILES, man["files"]
        args = SimpleNamespace(load=root, ckpt_step=None, pretrained_checkpoint=None)
        assert loop.checkpoint_to_load(args) == it4
        assert load_error(it4) is None
        dist.barrier()

    def damaged(name, damage, needles):
        with ctx.check(name):
            victim = os.path.join(it4, "__1_0.distcp")
            pristine = open(victim, "rb").read() if ctx.rank == 0 else None
            try:
                if ctx.rank == 0:
                    damage(victim)
                dist.barrier()
                msg = load_error(it4)
                assert msg is not None and all(n in msg for n in needles), (needles, msg)
            finally:
                dist.barrier()
                if ctx.rank == 0:
                    os.makedirs(it4, exist_ok=True)
                    open(victim, "wb").write(pristine)
                dist.barrier()

    def overwrite_16(path):
        data = bytearray(open(path, "rb").read())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        open(path, "wb").write(bytes(data))

    victim = os.path.join(it4, "__1_0.distcp")
    damaged("sixteen_bytes_overwritten_refused", overwrite_16, [victim, "is corrupted", "sha256", "manifest"])
    damaged("truncated_file_refused", lambda p: open(p, "r+b").truncate(100), [victim, "is truncated", "100 bytes"])
    damaged("missing_file_refused", os.remove, [victim, "is missing"])
    manifest = os.path.join(it4, "manifest.json")

    with ctx.check("unreadable_manifest_refused"):
        text = open(manifest).read() if ctx.rank == 0 else None
        try:
            if ctx.rank == 0:
                open(manifest, "w").write(text[: len(text) // 2])
            dist.barrier()
            msg = load_error(it4)
            assert msg is not None and manifest in msg and "not a valid manifest" in msg, msg
        finally:
            dist.barrier()
            if ctx.rank == 0:
                open(manifest, "w").write(text)
            dist.barrier()

    with ctx.check("no_manifest_loads_with_a_note"):
        other = os.path.join(ctx.tmpdir, "plain", "iter_0000001")
        if ctx.rank == 0:
            _write_checkpoint(other, 1)
        dist.barrier()
        note = loop.verify_load(other)
        assert note is not None and other in note and "unverified" in note, note
        assert loop.verify_load(os.path.join(ctx.tmpdir, "nowhere")) is None   # Megatron-LM's to report
        dist.barrier()

    with ctx.check("leftover_removed_before_a_save_named_one_kept"):
        it6 = os.path.join(root, "iter_0000006")
        if ctx.rank == 0:
            _write_checkpoint(it6, 6)   # a save of 6 that stopped half-way: the tracker still says 4
            open(os.path.join(it6, "stale.distcp"), "wb").write(b"stale")
        dist.barrier()
        plan, note = loop.prepare_save(root, 6)
        assert not os.path.exists(it6), os.listdir(it6)
        if ctx.rank == 0:
            assert note is not None and it6 in note and "names iteration 4" in note, note
        plan, note = loop.prepare_save(root, 4)   # the tracker's own: Megatron-LM overwrites it in place
        assert note is None and plan.names_directory and os.path.exists(manifest), (plan, note)

    def failed(plan, exc, wait_s):
        message, says = loop.failed_save(plan, exc, wait_s=wait_s, grace_s=0.0)
        return message, says

    with ctx.check("full_disk_on_every_rank_is_one_message_from_rank_0"):
        plan, _ = loop.prepare_save(root, 8, wait_s=5.0)
        try:   # the disk fills half-way through the save, after Megatron-LM rewrote the tracker
            if ctx.rank == 0:
                _write_checkpoint(plan.directory, 8)
                open(tracker, "w").write("8")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(plan.directory, "__0_0.distcp"))
        except OSError as exc:
            message, says = failed(plan, exc, 5.0)
        assert says == (ctx.rank == 0), says
        assert message.startswith(f"--save {root}: the checkpoint of iteration 8 could not be written "
                                  f"(No space left on device: {plan.directory}/__0_0.distcp)"), message
        assert message.endswith("the latest checkpoint is still iteration 4"), message
        assert not os.path.exists(plan.directory) and open(tracker).read() == "4", os.listdir(root)

    with ctx.check("rank_blocked_elsewhere_the_failed_rank_says_it_after_waiting"):
        plan, _ = loop.prepare_save(root, 10, wait_s=2.0)
        if ctx.rank == 1:   # rank 0 wrote its part and waits in Megatron-LM's barrier (here: nothing)
            try:
                os.makedirs(os.path.join(plan.directory, "mp_rank_01"))
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            except OSError as exc:
                message, says = failed(plan, exc, 2.0)
            assert says and "Disk quota exceeded" in message and "iteration 10" in message, message
            assert not os.path.exists(plan.directory), os.listdir(plan.directory)

    with ctx.check("not_a_storage_failure_is_reraised"):
        plan, _ = loop.prepare_save(root, 12, wait_s=5.0)
        try:
            raise KeyError("a bug in a state dict")
        except KeyError as exc:
            message, says = failed(plan, exc, 5.0)
        assert message is None, message   # the caller re-raises: a traceback is the report of a bug
        assert not os.path.exists(plan.directory)


integrity_group = group_fixture(2, _checks, timeout=120)

CHECKS = ["manifest_lists_every_file_and_verifies", "sixteen_bytes_overwritten_refused", "truncated_file_refused",
          "missing_file_refused", "unreadable_manifest_refused", "no_manifest_loads_with_a_note",
          "leftover_removed_before_a_save_named_one_kept", "full_disk_on_every_rank_is_one_message_from_rank_0",
          "rank_blocked_elsewhere_the_failed_rank_says_it_after_waiting", "not_a_storage_failure_is_reraised"]


@pytest.mark.parametrize("name", CHECKS)
def test_megatron_lm_checkpoint_integrity(integrity_group, name):
    integrity_group.assert_ok(name)


# ============================================================================ in-process
def test_which_checkpoint_megatron_lm_loads(tmp_path):
    """Megatron-LM's rules: the tracker's iteration, ``--ckpt-step`` in its place, ``release``
    whatever the step, ``--pretrained-checkpoint`` when ``--load`` has no tracker, nothing without
    a tracker or a step."""
    from megatron_md.checkpoint.megatron_lm_loop import checkpoint_to_load

    load, pre = tmp_path / "load", tmp_path / "pre"
    load.mkdir()
    pre.mkdir()

    def args(**kw):
        return SimpleNamespace(**{"load": str(load), "ckpt_step": None, "pretrained_checkpoint": None, **kw})

    assert checkpoint_to_load(args()) is None
    assert checkpoint_to_load(args(ckpt_step=3)) == str(load / "iter_0000003")
    (load / "latest_checkpointed_iteration.txt").write_text("12\n")
    assert checkpoint_to_load(args()) == str(load / "iter_0000012")
    assert checkpoint_to_load(args(ckpt_step=3)) == str(load / "iter_0000003")
    assert checkpoint_to_load(args(pretrained_checkpoint=str(pre))) == str(load / "iter_0000012")
    (load / "latest_checkpointed_iteration.txt").write_text("release")
    assert checkpoint_to_load(args(ckpt_step=3)) == str(load / "release")
    (load / "latest_checkpointed_iteration.txt").unlink()
    (pre / "latest_checkpointed_iteration.txt").write_text("7")
    assert checkpoint_to_load(args(pretrained_checkpoint=str(pre))) == str(pre / "iter_0000007")
    assert checkpoint_to_load(args(load=None, pretrained_checkpoint=str(pre))) == str(pre / "iter_0000007")
    assert checkpoint_to_load(args(load=None)) is None
    assert checkpoint_to_load(SimpleNamespace(finetune_load=str(pre)), "finetune_load") == str(pre / "iter_0000007")


def test_drivers_tools_refuse_a_megatron_lm_checkpoint_by_name(tmp_path):
    """A manifest Megatron-LM's loop wrote (files only, no run topology) is named as such by the
    driver's reader, not taken for a broken driver checkpoint."""
    from megatron_md.checkpoint.integrity import read_manifest
    from megatron_md.errors import CheckpointError

    d = tmp_path / "iter_0000003"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": 2, "writer": "megatron-lm", "iteration": 3, "files": {}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: a checkpoint saved by Megatron-LM's own training loop"):
        read_manifest(str(tmp_path), 3)
