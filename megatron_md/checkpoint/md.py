"""A plain (AdamW-, Muon-, ...) trained checkpoint → one that MD (adam-md / muon-md) resumes unchanged.

MD sees every hidden matrix as ``W = diag(s_r) · D · diag(s_c)`` with D on a sphere. Its paper
recipe projects W onto the sphere at the start (gains 1), which changes a trained model. With
``--md-init factor`` the optimizer instead keeps W and factors the gains from it (row norms;
:class:`megatron_md.optim.md._MD`): the fused weights, hence the model's outputs, are unchanged,
and so are they when the weights are loaded after the optimizer is built (the driver's order).
The untied output head (``--md-head-gains``, one unit sphere per row) is factored the same way.

MD's embedding rule (``--md-embedding-unit-norm``: every vocabulary row back to norm 1 after each
step) cannot keep a trained embedding: its rows are not unit-norm and nothing downstream absorbs
a per-token scale. A converted checkpoint is therefore resumed with
``--no-md-embedding-unit-norm`` (the embedding, and a tied head, train on the Adam partner).

:func:`to_md` writes a checkpoint of the same layout with the same weights (bit for bit) and no
optimizer state (a torch_dist checkpoint: the same files, hard-linked or copied, whose optimizer
state the required ``--no-load-optim`` leaves unread), and records the conversion in its manifest;
:func:`check_resume` (called by the driver's and Megatron-LM's argument checks) makes a run that
loads it without
``--no-load-optim --md-init factor --no-md-embedding-unit-norm`` fail before training, naming the
missing flags. Every rank file is verified against the source manifest first (``load_verified``).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

from ..errors import CheckpointError
from ..megatron.config import MD_METHODS, SCHEDULE_FREE
from .integrity import MANIFEST, checkpoint_dir, read_latest, read_manifest
from .merge import latest_iteration, relink_checkpoint, rewrite_checkpoint

__all__ = ["to_md", "resume_error", "check_resume", "RESUME_FLAGS", "TO_MD_KEY"]

#: the manifest topology key that marks a to-md checkpoint
TO_MD_KEY = "to_md"
#: the flags that resume a to-md checkpoint with an MD optimizer
RESUME_FLAGS = ("--no-load-optim", "--md-init", "factor", "--no-md-embedding-unit-norm")


def to_md(root: str, out: str, iteration: Optional[int] = None) -> dict:
    """Write the MD-ready copy of checkpoint ``root`` (latest or ``iteration``) to ``out``.

    Returns ``{"iteration", "from", "layout", "resume_flags"}``. Refuses (:class:`CheckpointError`)
    a missing or damaged checkpoint, one already trained with MD or converted, a schedule-free one
    (``sf-to-x`` first: its weights ``y`` are not the model) and an ``out`` that holds a checkpoint.
    """
    iteration = latest_iteration(root, iteration)
    man = read_manifest(root, iteration)
    dist_format = man.get("ckpt_format") == "torch_dist"
    topo = man["topology"]
    opt = topo["optim"]["optimizer"]
    where = f"--load {root} (iteration {iteration})"
    if topo.get(TO_MD_KEY):
        rec = topo[TO_MD_KEY]
        raise CheckpointError(f"{where} is already MD-ready (converted by {rec.get('by', 'to-md')} from "
                              + (f"--optimizer {rec['from']}" if rec.get("by", "to-md") == "to-md" else rec["from"])
                              + f"); resume it with {' '.join(RESUME_FLAGS)}")
    if opt in MD_METHODS:
        raise CheckpointError(f"{where} was trained with --optimizer {opt}: already MD (its gains are in its "
                              f"optimizer state); resume it with --load and --optimizer {opt}")
    if opt in SCHEDULE_FREE:
        raise CheckpointError(f"{where} was trained with the schedule-free --optimizer {opt}: its weights are the "
                              "training iterate y, not the model; convert it with sf-to-x first, then to-md")
    new = copy.deepcopy(topo)
    new["optim"] = {k: None for k in topo["optim"]}
    new["optim"]["optimizer"] = f"none (to-md of {opt}; resume with {' '.join(RESUME_FLAGS)})"
    new[TO_MD_KEY] = {"from": opt, "init": "factor", "embedding_unit_norm": False,
                      "resume_flags": list(RESUME_FLAGS)}

    def edit(state, path):
        state.update(optimizer=None, scheduler=None, model_x=None, extra={"converted": f"to-md of {path}"})

    if dist_format:   # the same files (weights bit for bit); the optimizer state in them goes unread
        relink_checkpoint(root, iteration, man, out, new)
    else:
        rewrite_checkpoint(root, iteration, man, out, new, edit)
    return {"iteration": iteration, "from": opt, "layout": topo["layout"], "resume_flags": list(RESUME_FLAGS)}


def _to_md_record(load: str, ckpt_step: Optional[int]) -> Optional[dict]:
    """The to-md record of the checkpoint ``--load`` would read (None: none, or not ours to judge:
    no checkpoint, a Megatron-LM directory, an unreadable manifest — the loader reports those)."""
    try:
        it = ckpt_step if ckpt_step is not None else read_latest(load)
        if it is None:
            return None
        with open(os.path.join(checkpoint_dir(load, it), MANIFEST)) as fh:
            rec = json.load(fh).get("topology", {}).get(TO_MD_KEY)
    except (OSError, ValueError, CheckpointError, AttributeError):
        return None
    return rec if isinstance(rec, dict) else None


def resume_error(load: str, ckpt_step: Optional[int], md, *, no_load_optim: bool) -> Optional[str]:
    """Why a run with ``--load load`` (``--ckpt-step ckpt_step``) and MD config ``md`` must not
    start from a to-md checkpoint (None: fine, or not a to-md checkpoint)."""
    rec = _to_md_record(load, ckpt_step)
    if rec is None:
        return None
    by = rec.get("by", "to-md")
    where = (f"--load {load} was converted by tools/convert_checkpoint.py {by} (from "
             + (f"--optimizer {rec.get('from')})" if by == "to-md" else f"{rec.get('source')})"))
    missing, reasons = [], []
    if not no_load_optim:
        missing.append("--no-load-optim")
        reasons.append("it holds weights only")
    if md.optimizer in MD_METHODS:
        if md.md_init != "factor":
            missing.append("--md-init factor")
        if md.md_embedding_unit_norm:
            missing.append("--no-md-embedding-unit-norm")
        if len(missing) > len(reasons):
            reasons.append(f"--optimizer {md.optimizer} keeps the trained model only with --md-init factor "
                           "--no-md-embedding-unit-norm; otherwise it projects the matrices onto their spheres and "
                           "rescales the embedding rows")
    if not missing:
        return None
    return f"{where}: pass {' '.join(missing)} ({'; '.join(reasons)})"


def check_resume(md, args) -> None:
    """Raise ``ValueError`` naming the missing flags when ``args.load`` (``args.ckpt_step``) is a
    to-md checkpoint that a run with MD config ``md`` would not resume as converted; anything else
    (no ``--load``, not a to-md checkpoint, not ours) passes, for the loader to judge."""
    load = getattr(args, "load", None)
    if load:
        why = resume_error(load, getattr(args, "ckpt_step", None), md,
                           no_load_optim=bool(getattr(args, "no_load_optim", False)))
        if why:
            raise ValueError(why)
