"""The driver's checkpoints: :func:`save_checkpoint` and :func:`load_checkpoint`, both formats.

``--ckpt-format torch_dist`` (default; :mod:`.dist`) or ``torch`` (per-rank files;
:mod:`.per_rank`); ``--load`` reads either, from the manifest. Both are published and verified the
same way (:mod:`.integrity`), and both refuse another model, layout or optimizer setup, as
:mod:`.topology` defines, before anything is loaded.
"""
from __future__ import annotations

from typing import Optional

from ..errors import CheckpointError
from .dist import CKPT_FORMAT, load_dist_checkpoint, save_dist_checkpoint
from .integrity import agree, read_latest, read_manifest
from .per_rank import check_per_rank, restore_per_rank, save_per_rank

__all__ = ["save_checkpoint", "load_checkpoint"]


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, args,
                    extra: Optional[dict] = None, topology_extra: Optional[dict] = None) -> str:
    """Save iteration ``iteration`` under ``root`` in ``args.ckpt_format`` (collective); returns
    the published directory. The previous checkpoint stays the latest until this one is complete.
    ``topology_extra``: more manifest topology records (e.g. from-hf's weights-only record)."""
    if getattr(args, "ckpt_format", "torch") == CKPT_FORMAT:
        return save_dist_checkpoint(root, iteration, model_chunks, optimizer, scheduler, args, extra, topology_extra)
    return save_per_rank(root, iteration, model_chunks, optimizer, scheduler, args, extra, topology_extra)


def load_checkpoint(root: str, model_chunks, optimizer, scheduler, args, iteration: Optional[int] = None,
                    load_optim: bool = True, load_rng: bool = True) -> Optional[dict]:
    """Restore from ``root`` (the latest, or ``iteration``); returns ``{"iteration", "extra",
    "checkpoint_iteration"}``, or None if ``root`` holds no checkpoint and no specific iteration was
    asked for.

    Raises :class:`CheckpointError` (on every rank, before changing anything) if the checkpoint
    is incomplete, corrupted or of another layout/model/optimizer."""
    state, error, latest, man = None, None, None, None
    try:
        latest = read_latest(root) if iteration is None else iteration
        if latest is not None:
            man = read_manifest(root, latest)
            if man.get("ckpt_format") != CKPT_FORMAT:
                state, error = check_per_rank(root, latest, man, model_chunks, optimizer, args, load_optim)
    except CheckpointError as exc:
        error = str(exc)
    agree(error)
    if latest is None:
        return None
    if man.get("ckpt_format") == CKPT_FORMAT:
        return load_dist_checkpoint(root, latest, man, model_chunks, optimizer, scheduler, args, load_optim, load_rng)
    return restore_per_rank(state, model_chunks, optimizer, scheduler, load_optim=load_optim, load_rng=load_rng)
