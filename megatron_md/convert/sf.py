"""Schedule-free checkpoint → plain model checkpoint at the averaged iterate ``x``.

Schedule-free optimizers train the model at ``y`` and evaluate at ``x`` (the average their
theory is about; arXiv:2405.15682). The driver saves, for schedule-free runs, the model state
at ``x`` next to the training state (``model_x``, computed by the optimizer's own ``eval()``
swap). :func:`sf_to_x` writes a new checkpoint directory of the same layout whose model is
``x`` and which holds no optimizer state: the driver loads it with ``--no-load-optim`` (any
optimizer), and ``to-hf`` exports it.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

from ..megatron.config import SCHEDULE_FREE
from ..training import checkpointing as ck
from ..training.errors import CheckpointError

__all__ = ["sf_to_x"]


def sf_to_x(root: str, out: str, iteration: Optional[int] = None) -> int:
    """Write the ``x`` weights of checkpoint ``root`` (latest or ``iteration``) to ``out``; returns
    the iteration. ``out`` must not already hold a checkpoint (nothing is overwritten)."""
    if iteration is None:
        iteration = ck.read_latest(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {ck.TRACKER} (not a checkpoint directory written by the driver)")
    if os.path.abspath(out) == os.path.abspath(root) or ck.read_latest(out) is not None:
        raise CheckpointError(f"--save {out}: already a checkpoint directory; choose a new one (nothing is overwritten)")
    man = ck._read_manifest(root, iteration)
    opt = man["topology"]["optim"]["optimizer"]
    if opt not in SCHEDULE_FREE:
        raise CheckpointError(f"--load {root}: trained with --optimizer {opt}, not a schedule-free optimizer "
                              f"({', '.join(SCHEDULE_FREE)}); its weights already are the model")
    topo = copy.deepcopy(man["topology"])
    topo["optim"] = {k: None for k in topo["optim"]}
    topo["optim"]["optimizer"] = f"none (sf-to-x of {opt})"
    os.makedirs(out, exist_ok=True)
    ck._clean_stale(out)
    final = ck.checkpoint_dir(out, iteration)
    staging = f"{final}.tmp{os.getpid()}"
    os.makedirs(staging)
    files = {}
    src = ck.checkpoint_dir(root, iteration)
    for name, entry in sorted(man["files"].items()):
        path = os.path.join(src, name)
        state = ck.load_verified(path, entry)
        if state.get("model_x") is None:
            raise CheckpointError(f"{path}: no averaged weights (model_x) in this file; it was saved by an older driver")
        state.update(model=state["model_x"], model_x=None, optimizer=None, scheduler=None, topology=topo,
                     extra={"converted": f"sf-to-x of {path}"})
        dst = os.path.join(staging, name)
        ck._atomic_torch_save(state, dst)
        files[name] = {"bytes": os.path.getsize(dst), "sha256": ck._sha256(dst)}
    ck._publish(out, iteration, staging, final,
                {"format": ck.FORMAT, "iteration": iteration, "topology": topo, "files": files})
    return iteration
