"""Schedule-free checkpoint → plain model checkpoint at the averaged iterate ``x``.

Schedule-free optimizers train the model at ``y`` and evaluate at ``x`` (the average their
theory is about; arXiv:2405.15682). The driver saves, for schedule-free runs, the model state
at ``x`` next to the training state (``model_x``, computed by the optimizer's own ``eval()``
swap). :func:`sf_to_x` writes a new checkpoint directory of the same layout whose model is
``x`` and which holds no optimizer state: the driver loads it with ``--no-load-optim`` (any
optimizer), and ``to-hf`` / ``to-md`` convert it further.

A ``torch_dist`` checkpoint holds ``y`` and the optimizer state (``z`` and the averaging weights),
sharded like the model: :func:`sf_to_x` runs the driver at the checkpoint's own layout (its world
size, TP, PP, EP) with ``--load`` and nothing left to train plus ``--export-sf-x``, which saves the
model after the optimizer's own swap to ``x``, without the optimizer state — every rank computes its
shard of ``x``, no process holds the model.
"""
from __future__ import annotations

import copy
import os
from typing import Optional

from ..errors import CheckpointError
from ..megatron.config import SCHEDULE_FREE
from .integrity import read_latest, read_manifest
from .merge import latest_iteration, require_per_rank, rewrite_checkpoint

__all__ = ["sf_to_x", "sf_x_optim"]


def sf_x_optim(optimizer: str) -> dict:
    """The manifest's ``optim`` record of an sf-to-x output: no optimizer state."""
    from .topology import OPTIM_FLAGS
    out = {k: None for k in OPTIM_FLAGS}
    out["optimizer"] = f"none (sf-to-x of {optimizer})"
    return out


def _layout_flags(layout: dict, num_layers: int) -> list[str]:
    """The driver flags of a manifest's ``layout`` (its world size comes from torchrun)."""
    f = ["--tensor-model-parallel-size", layout["tp"], "--pipeline-model-parallel-size", layout["pp"],
         "--expert-model-parallel-size", layout["ep"]]
    if layout.get("etp"):
        f += ["--expert-tensor-parallel-size", layout["etp"]]
    if layout.get("vpp"):
        f += ["--num-layers-per-virtual-pipeline-stage", num_layers // layout["pp"] // layout["vpp"]]
    return [str(x) for x in f]


def _sf_to_x_dist(root: str, out: str, iteration: int, man: dict) -> int:
    from .reshard import driver_command, driver_flags, run_driver
    topo = man["topology"]
    lay = topo["layout"]
    cmd = driver_command(
        lay["world_size"], *driver_flags(topo, lay["tp"]), *_layout_flags(lay, topo["model"]["num_layers"]),
        "--lr", "1e-3", "--micro-batch-size", "1", "--mock-data", "--eval-iters", "0", "--log-interval", "1",
        "--load", root, "--ckpt-step", str(iteration), "--train-iters", str(iteration), "--save", out,
        "--ckpt-format", "torch_dist", "--export-sf-x")
    run_driver(cmd, "sf-to-x", out, iteration)
    return iteration


def sf_to_x(root: str, out: str, iteration: Optional[int] = None) -> int:
    """Write the ``x`` weights of checkpoint ``root`` (latest or ``iteration``) to ``out``; returns
    the iteration. ``out`` must not already hold a checkpoint (nothing is overwritten)."""
    iteration = latest_iteration(root, iteration)
    man = read_manifest(root, iteration)
    opt = man["topology"]["optim"]["optimizer"]
    if opt not in SCHEDULE_FREE:
        raise CheckpointError(f"--load {root}: trained with --optimizer {opt}, not a schedule-free optimizer "
                              f"({', '.join(SCHEDULE_FREE)}); its weights already are the model")
    if os.path.abspath(out) == os.path.abspath(root) or read_latest(out) is not None:
        raise CheckpointError(f"--save {out}: already a checkpoint directory; choose a new one (nothing is overwritten)")
    if man.get("ckpt_format") == "torch_dist":
        return _sf_to_x_dist(root, out, iteration, man)
    require_per_rank(root, man)
    topo = copy.deepcopy(man["topology"])
    topo["optim"] = sf_x_optim(opt)

    def edit(state, path):
        if state.get("model_x") is None:
            raise CheckpointError(f"{path}: no averaged weights (model_x) in this file; it was saved by an older driver")
        state.update(model=state["model_x"], model_x=None, optimizer=None, scheduler=None,
                     extra={"converted": f"sf-to-x of {path}"})

    rewrite_checkpoint(root, iteration, man, out, topo, edit)
    return iteration
