"""Schedule-free checkpoint → plain model checkpoint at the averaged iterate ``x``.

Schedule-free optimizers train the model at ``y`` and evaluate at ``x`` (the average their
theory is about; arXiv:2405.15682). The driver saves, for schedule-free runs, the model state
at ``x`` next to the training state (``model_x``, computed by the optimizer's own ``eval()``
swap). :func:`sf_to_x` writes a new checkpoint directory of the same layout whose model is
``x`` and which holds no optimizer state: the driver loads it with ``--no-load-optim`` (any
optimizer), and ``to-hf`` / ``to-md`` convert it further.
"""
from __future__ import annotations

import copy
from typing import Optional

from ..errors import CheckpointError
from ..megatron.config import SCHEDULE_FREE
from .integrity import read_manifest
from .merge import latest_iteration, require_per_rank, rewrite_checkpoint

__all__ = ["sf_to_x"]


def sf_to_x(root: str, out: str, iteration: Optional[int] = None) -> int:
    """Write the ``x`` weights of checkpoint ``root`` (latest or ``iteration``) to ``out``; returns
    the iteration. ``out`` must not already hold a checkpoint (nothing is overwritten)."""
    iteration = latest_iteration(root, iteration)
    man = read_manifest(root, iteration)
    require_per_rank(root, man)
    opt = man["topology"]["optim"]["optimizer"]
    if opt not in SCHEDULE_FREE:
        raise CheckpointError(f"--load {root}: trained with --optimizer {opt}, not a schedule-free optimizer "
                              f"({', '.join(SCHEDULE_FREE)}); its weights already are the model")
    topo = copy.deepcopy(man["topology"])
    topo["optim"] = {k: None for k in topo["optim"]}
    topo["optim"]["optimizer"] = f"none (sf-to-x of {opt})"

    def edit(state, path):
        if state.get("model_x") is None:
            raise CheckpointError(f"{path}: no averaged weights (model_x) in this file; it was saved by an older driver")
        state.update(model=state["model_x"], model_x=None, optimizer=None, scheduler=None,
                     extra={"converted": f"sf-to-x of {path}"})

    rewrite_checkpoint(root, iteration, man, out, topo, edit)
    return iteration
