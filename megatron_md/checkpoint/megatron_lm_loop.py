"""Integrity for the checkpoints Megatron-LM's own training loop saves and loads (the plugin's
half of :mod:`.integrity`; :mod:`megatron_md.megatron_lm` wraps Megatron-LM's ``save_checkpoint``
and ``load_checkpoint`` with these functions).

Megatron-LM writes ``<save>/iter_0000004/`` in place (``*.distcp``, ``.metadata``, ``common.pt``,
``metadata.json`` for torch_dist; ``mp_rank_XX/model_optim_rng.pt`` for torch), then rank 0 writes
``<save>/latest_checkpointed_iteration.txt``. Around that:

* :func:`prepare_save` (every rank, before Megatron-LM's save): rank 0 removes an ``iter_N`` that the
  tracker does not name — what a failed or killed save of that iteration left, about to be
  overwritten — so that the manifest lists exactly what this save writes; every rank remembers the
  tracker as it was.
* :func:`finish_save` (after Megatron-LM's save returned on every rank): every file of ``iter_N``
  hashed in parallel over the ranks (:func:`.integrity.hash_tree`), and rank 0 writes
  ``iter_N/manifest.json`` atomically: the driver's schema (sha256 + size per file) with
  ``"writer": "megatron-lm"`` and no run topology.
* :func:`failed_save` (Megatron-LM's save, or the manifest, raised on this rank): the failing ranks
  agree on a private gloo group — ranks blocked in a collective of Megatron-LM's save by a failed
  peer (megatron-core writes ``common.pt`` on rank 0 alone, before the collective part) never come,
  so it waits at most ``wait_s`` — then rank 0 removes the partial ``iter_N`` and puts the tracker
  back; a storage failure (an ``OSError`` behind it, or a full filesystem) becomes one message
  naming ``--save``, the cause and the checkpoint that stays the latest
  (:func:`.integrity.describe_save_failure`, the driver's wording).
* :func:`verify_load` (every rank, before Megatron-LM's load reads anything): the directory it will
  read — ``--load``'s tracker or ``--ckpt-step``; ``--pretrained-checkpoint`` when ``--load`` has no
  tracker (:func:`checkpoint_to_load`) — checked file by file against its manifest (present, size,
  sha256; hashed in parallel), the ranks agree: a :class:`~megatron_md.errors.CheckpointError` naming the file. A
  checkpoint without a manifest (saved without the plugin) loads as before, with a note.

Not covered (each said once as a note): ``--async-save`` (Megatron-LM finishes the checkpoint in the
background after the save returns: no manifest is written; the partial directory of a failed save
is still removed), non-persistent checkpoints (``--non-persistent-save-interval``: neither written
with a manifest nor verified). The manifest is written after Megatron-LM's tracker: a crash between
the two leaves a checkpoint that loads unverified, with the note. All ranks must see one filesystem
(as Megatron-LM's torch_dist format needs anyway).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch.distributed as dist

from .integrity import (FORMAT, MANIFEST, MEGATRON_LM_WRITER, TRACKER, agree, atomic_write_text,
                        describe_save_failure, hash_tree, verify_files)

__all__ = ["SavePlan", "iteration_dir", "prepare_save", "finish_save", "failed_save", "discard",
           "checkpoint_to_load", "verify_load", "SAVE_FAILURE_WAIT_S"]

#: how long the ranks whose save failed wait for the others to report theirs (a rank blocked in
#: one of Megatron-LM's collectives by a failed peer never does)
SAVE_FAILURE_WAIT_S = 10.0


def iteration_dir(root: str, iteration: int, release: bool = False) -> str:
    """Megatron-LM's directory of ``iteration`` under ``root`` (``release`` for a release checkpoint)."""
    return os.path.join(root, "release" if release else f"iter_{iteration:07d}")


def _read_tracker(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, TRACKER)) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _tracker_checkpoint(text: Optional[str]) -> Union[int, str, None]:
    """What a tracker's text names: an iteration, ``"release"``, or None (no tracker, or unreadable)."""
    t = (text or "").strip()
    return int(t) if t.isdigit() else ("release" if t == "release" else None)


def _named_dir(root: str, named: Union[int, str, None]) -> Optional[str]:
    if named is None:
        return None
    return iteration_dir(root, 0, release=True) if named == "release" else iteration_dir(root, named)


@dataclass
class SavePlan:
    """One save of Megatron-LM's loop, as :func:`prepare_save` found it."""

    root: str                 #: --save
    iteration: int
    directory: str            #: the iteration's directory Megatron-LM writes
    tracker: Optional[str]    #: the tracker's text before the save (None: there was none)
    names_directory: bool     #: the tracker named ``directory`` before the save (never removed then)

    @property
    def latest(self) -> Union[int, str, None]:
        return _tracker_checkpoint(self.tracker)


_GROUP: dict = {}


def _failure_group(wait_s: float):
    """A gloo group over all ranks whose collectives time out after ``wait_s`` (collective to
    create: made in :func:`prepare_save`, where every rank is; one per world)."""
    key = (id(dist.group.WORLD), wait_s)
    if key not in _GROUP:
        _GROUP.clear()
        _GROUP[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    return _GROUP[key]


def prepare_save(root: str, iteration: int, *, release: bool = False,
                 wait_s: float = SAVE_FAILURE_WAIT_S) -> tuple[SavePlan, Optional[str]]:
    """Before Megatron-LM saves ``iteration`` under ``root`` (collective): rank 0 removes a leftover
    directory of that iteration that the tracker does not name. Returns the plan and, on rank 0
    when something was removed, a note saying what."""
    directory = iteration_dir(root, iteration, release)
    tracker = _read_tracker(root)
    named = _tracker_checkpoint(tracker)
    plan = SavePlan(root, iteration, directory, tracker, _named_dir(root, named) == directory)
    _failure_group(wait_s)
    note = None
    if dist.get_rank() == 0 and os.path.isdir(directory) and not plan.names_directory:
        shutil.rmtree(directory, ignore_errors=True)
        note = (f"removed {directory} before saving iteration {iteration} into it ({TRACKER} names "
                f"{'iteration ' + str(named) if isinstance(named, int) else named or 'no checkpoint'}: what "
                f"an earlier save left there)")
    dist.barrier()   # nobody writes into the directory before it is gone
    return plan, note


def finish_save(plan: SavePlan, ckpt_format: str) -> str:
    """After Megatron-LM's save of ``plan`` returned on every rank (collective): hash every file of
    the directory in parallel, rank 0 writes its manifest atomically. Returns the manifest's path."""
    files = hash_tree(plan.directory)
    path = os.path.join(plan.directory, MANIFEST)
    if dist.get_rank() == 0:
        atomic_write_text(path, json.dumps({
            "format": FORMAT, "writer": MEGATRON_LM_WRITER, "ckpt_format": ckpt_format,
            "iteration": plan.iteration, "release": os.path.basename(plan.directory) == "release",
            "files": files}, indent=1) + "\n")
    return path


def discard(plan: SavePlan) -> Optional[str]:
    """Remove what a failed save of ``plan`` left — its directory, unless the tracker named it
    before — and put the tracker back as it was. Returns why the tracker could not be put back
    (None when it could, or had not changed)."""
    if not plan.names_directory:
        shutil.rmtree(plan.directory, ignore_errors=True)
    path = os.path.join(plan.root, TRACKER)
    if _read_tracker(plan.root) == plan.tracker:
        return None
    try:
        if plan.tracker is None:
            os.remove(path)
        else:
            atomic_write_text(path, plan.tracker)
    except OSError as exc:
        return f"{path} could not be put back to {plan.tracker!r} ({exc.strerror or exc})"
    return None


def failed_save(plan: SavePlan, exc: BaseException, *, wait_s: float = SAVE_FAILURE_WAIT_S,
                grace_s: float = 30.0) -> tuple[Optional[str], bool]:
    """This rank's Megatron-LM save (or its manifest) of ``plan`` raised ``exc``.

    The ranks agree (at most ``wait_s``) and what the save left is removed (:func:`discard`) once
    they have all stopped writing: by rank 0 when every rank came (each failed), else — some rank is
    blocked in one of Megatron-LM's collectives by a failed peer — by rank 0 at once, by any other
    rank after ``grace_s`` (time for a failed rank 0 to end the run first, as torchrun ends every rank
    when one exits). Returns (the message to stop with, whether this rank says it); the message is
    None when this rank's failure is not a storage failure (the caller re-raises ``exc``: a traceback
    is the useful report of a bug)."""
    message, storage = describe_save_failure(plan.root, plan.iteration, exc, plan.latest)
    mine = message if storage else None
    rank = dist.get_rank()
    group = _failure_group(wait_s)
    got: Optional[list] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(got, mine, group=group)
    except Exception:  # noqa: BLE001 - a timeout: some rank is blocked in Megatron-LM's collectives
        got = None
    if got is not None:   # every rank failed: they have all stopped writing
        if rank == 0:
            problem = discard(plan)
            first = next((m for m in got if m is not None), None)
            got[0] = first if problem is None or first is None else f"{first}; {problem}"
        dist.broadcast_object_list(got, src=0, group=group)
        return (got[0] if mine is not None else None), rank == 0
    # the run ends with the first rank that exits (torchrun stops the others): let that be a rank 0
    # with a storage failure, which says it at once; any other rank, and a failure that is not a
    # storage one (on a rank whose peer died: "Connection closed by peer"), waits ``grace_s`` first
    if rank != 0 or mine is None:
        time.sleep(grace_s)
    problem = discard(plan)
    if mine is not None and problem is not None:
        mine = f"{mine}; {problem}"
    return mine, True


def checkpoint_to_load(args: Any, load_arg: str = "load") -> Optional[str]:
    """The directory Megatron-LM's ``load_checkpoint(..., load_arg=load_arg)`` will read, by its rules:
    ``args.<load_arg>``, or ``--pretrained-checkpoint`` when that has no tracker; the tracker's
    iteration (``release``: the ``release`` directory), ``--ckpt-step`` in its place. None when it
    will load nothing (no tracker and no ``--ckpt-step``)."""
    root = getattr(args, load_arg, None)
    pretrained = getattr(args, "pretrained_checkpoint", None)
    if pretrained is not None and (root is None or not os.path.isfile(os.path.join(root, TRACKER))):
        root = pretrained
    if root is None:
        return None
    named = _tracker_checkpoint(_read_tracker(root))
    step = getattr(args, "ckpt_step", None)
    if step and named != "release":   # a release tracker names its directory whatever the step
        return iteration_dir(root, int(step))
    return _named_dir(root, named)


def verify_load(directory: Optional[str]) -> Optional[str]:
    """Before Megatron-LM loads ``directory`` (collective): every file its manifest lists checked
    (present, size, sha256), each rank its share; if any does not match, every rank raises the
    same :class:`~megatron_md.errors.CheckpointError` naming the file (and so does a manifest that cannot be read).
    Returns a note when there is no manifest to check against (a checkpoint saved without the
    plugin: it loads as before), None otherwise. A directory that does not exist is Megatron-LM's
    to report."""
    error, note = None, None
    path = os.path.join(directory, MANIFEST) if directory is not None else None
    if path is not None and os.path.isdir(directory):
        if not os.path.exists(path):
            note = (f"{directory} has no integrity manifest ({MANIFEST}: saved without megatron_md's plugin, with "
                    f"--async-save, or its save stopped before the manifest); loading it unverified")
        else:
            try:
                with open(path) as fh:
                    files = json.load(fh)["files"]
                if not isinstance(files, dict) or not all(isinstance(e, dict) and {"bytes", "sha256"} <= set(e)
                                                         for e in files.values()):
                    raise ValueError("its 'files' are not {name: {bytes, sha256}}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                error = f"{path} is not a valid manifest ({type(exc).__name__}: {exc})"
            else:
                error = verify_files(directory, files)
    agree(error)
    return note
