"""``--ckpt-format torch_dist``: Megatron distributed checkpoints of the model and of every
optimizer's whole state, loadable at any TP/PP/EP/DP layout and DP mode.

Layout (Megatron-LM's names; the directory is what ``megatron.core.dist_checkpointing.save``
writes, plus our integrity manifest, :mod:`.integrity`)::

    <save>/iter_0000100/{__0_0.distcp, ..., .metadata, common.pt, metadata.json}
    <save>/iter_0000100/manifest.json        # sha256 + size of every file, the run's layout
    <save>/latest_checkpointed_iteration.txt # written last

The sharded state dict holds each model chunk's own ``sharded_state_dict()`` (global layer and
expert numbers), every optimizer value as the Megatron layer's seam names it
(:mod:`megatron_md.megatron.sharded_state`: in the unsharded model's coordinates, so that
``dist_checkpointing`` reshards it on load), and every rank's RNG states (a ShardedObject,
restored only at the same layout). ``common.pt`` (rank 0) holds the iteration, the LR scheduler,
the loss history and the optimizers' merged common state.

Loading checks first — the tracker, the manifest, every file's size and sha256 (hashed in
parallel over the ranks), the model shape and optimizer setup recorded in the manifest, and that
the checkpoint holds every key this run asks for with the same global shape — the ranks agree,
and only then is anything loaded.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..megatron.sharded_state import (Entry, apply_wrapper_common, built_tensors, commons_for, merge_commons, optimizer_wrappers,
                                      sharded_types, template_map, wrapper_common, wrapper_entries)
from ..errors import CheckpointError
from .integrity import FORMAT, agree, checkpoint_dir, hash_tree, new_staging, publish, save_step, verify_file
from .rng import rng_state, set_rng_state
from .topology import DIST_OPTIM_FLAGS, LAYOUT_FLAGS, MODEL_FLAGS, run_topology, topology_diffs

__all__ = ["CKPT_FORMAT", "save_dist_checkpoint", "load_dist_checkpoint", "save_dist", "load_dist", "check_keys",
           "sharded_tensors"]

CKPT_FORMAT = "torch_dist"


def _dc():
    from megatron.core import dist_checkpointing
    return dist_checkpointing


def _unwrapped(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_templates(model_chunks) -> list[dict]:
    """Each chunk's ``sharded_state_dict()`` (what Megatron saves for the model)."""
    from ..megatron import fsdp
    return [fsdp.megatron_fsdp_sharded_state_dict(c, _unwrapped(c)) if fsdp.is_megatron_fsdp(c) else
            fsdp.sharded_state_dict(_unwrapped(c)) if fsdp.is_fsdp2([c]) else _unwrapped(c).sharded_state_dict()
            for c in model_chunks]


def _collect(optimizer, model_chunks, templates, args, *, loading: bool) -> tuple[list[Entry], list[dict]]:
    """Every optimizer value of this rank as sharded entries (``loading``: empty buffers whose
    ``restore`` writes the loaded value into the optimizer), and the per-wrapper common state."""
    tmap = template_map(templates)
    mixed = bool(args.bf16 or args.fp16)
    entries: list[Entry] = []
    commons = []
    for w in optimizer_wrappers(optimizer):
        entries.extend(wrapper_entries(w, tmap, mixed, loading=loading))
        commons.append(wrapper_common(w))
    return entries, commons


def _apply_commons(optimizer, commons: list) -> None:
    wrappers = optimizer_wrappers(optimizer)
    for w, c in zip(wrappers, commons_for(len(wrappers), commons)):
        apply_wrapper_common(w, c)


# ----------------------------------------------------------------------------- the sharded dict
def _rng_object(args, state=None):
    _, _, ShardedObject = sharded_types()
    return ShardedObject("rng_state", state if state is not None else rng_state(), (dist.get_world_size(),),
                         (dist.get_rank(),), replica_id=0)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def build_sharded(model_chunks, optimizer, args, *, loading: bool, with_optim: bool, with_rng: bool):
    """(sharded state dict, optimizer entries, per-wrapper commons) of this rank."""
    templates = model_templates(model_chunks)
    sd: dict[str, Any] = {_model_key(i, len(templates)): t for i, t in enumerate(templates)}
    entries, commons = [], []
    if with_optim and optimizer is not None:
        entries, commons = _collect(optimizer, model_chunks, templates, args, loading=loading)
        sd["optimizer"] = {f"e{i}": e.sharded for i, e in enumerate(entries)}
    if with_rng:
        sd["rng_state"] = _rng_object(args)
    return sd, entries, commons


def save_dist(staging: str, model_chunks, optimizer, args, common: dict) -> None:
    """Write this rank's part of a torch_dist checkpoint into ``staging`` (collective)."""
    sd, _, commons = build_sharded(model_chunks, optimizer, args, loading=False, with_optim=optimizer is not None,
                                   with_rng=True)
    sd["common"] = dict(common, optimizer_common=merge_commons(commons) if optimizer is not None else None)
    _dc().save(sd, staging)


def sharded_tensors(sd) -> list:
    """Every ``ShardedTensor`` of a sharded state dict, factories built (a SwiGLU fc1 shard is two
    tensors, views of the parameter)."""
    return [t for t, _ in sharded_tensors_with_lead(sd)]


def sharded_tensors_with_lead(sd) -> list:
    """``(ShardedTensor, number of leading layer/expert axes)`` of every tensor of :func:`sharded_tensors`:
    its ``prepend_axis_num``, or for an FSDP2 row box (:func:`megatron_md.megatron.fsdp.row_factory`, whose
    prepended axes are leading axes of size 1) the prepended axes' count."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    ShardedTensor, Factory, _ = sharded_types()
    out = []
    for t in nested_values(sd):
        if isinstance(t, Factory):
            geo = getattr(t, "md_fsdp", None)
            out.extend((x, len(geo["prepend"][0]) if geo is not None else x.prepend_axis_num) for x in built_tensors(t))
        elif isinstance(t, ShardedTensor):
            out.append((t, t.prepend_axis_num))
    return out


def check_keys(directory: str, sd) -> Optional[str]:
    """Why the checkpoint in ``directory`` cannot give this rank's ``sd`` (a key it lacks, or
    another global shape); None if it can."""
    meta = _dc().load_tensors_metadata(directory)
    for t in sharded_tensors(sd):
        have = meta.get(t.key)
        if have is None:
            what = ("optimizer state" if t.key.startswith("optimizer.") else "model weights")
            return f"{directory} has no {what} {t.key!r}"
        if tuple(have.global_shape) != tuple(t.global_shape):
            return (f"{directory}: {t.key} has global shape {tuple(have.global_shape)}, this run "
                    f"{tuple(t.global_shape)}")
    return None


def _load_model(module, state: dict) -> None:
    """``module.load_state_dict(state, strict=True)``; an FSDP2 module's DTensors take the loaded
    local rows into their local pieces (what the torch_dist load read for this rank)."""
    from ..megatron.fsdp import is_dtensor
    own = module.state_dict(keep_vars=True)
    if not any(is_dtensor(v) for v in own.values()):
        module.load_state_dict(state, strict=True)
        return
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("._extra_state"))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"model state: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            if not torch.is_tensor(v) or k not in state:
                continue
            target = v._local_tensor if is_dtensor(v) else v
            got = state[k]
            if got is not target:
                target.copy_(got.view_as(target))


def load_dist(directory: str, model_chunks, optimizer, args, *, load_optim: bool, load_rng: bool,
              check: Callable[[Optional[str]], None]) -> dict:
    """Load a torch_dist checkpoint into the model (and optimizer): returns its common state.
    ``check(error)`` is the ranks' agreement (raises everywhere if any rank has an error)."""
    sd, entries, _ = build_sharded(model_chunks, optimizer, args, loading=True,
                                   with_optim=load_optim and optimizer is not None, with_rng=load_rng)
    error = None
    try:
        error = check_keys(directory, sd)
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is a bad checkpoint
        error = f"{directory}: its metadata cannot be read ({type(exc).__name__}: {exc})"
    check(error)
    sd["common"] = None
    got = _dc().load(sd, directory)
    for i, c in enumerate(model_chunks):
        _load_model(_unwrapped(c), got[_model_key(i, len(model_chunks))])
    common = got["common"]
    if entries:
        with torch.no_grad():
            loaded = got["optimizer"]
            for i, e in enumerate(entries):
                e.restore(loaded[f"e{i}"])
        _apply_commons(optimizer, common["optimizer_common"])
        for w in optimizer_wrappers(optimizer):
            inner = w.optimizer
            if hasattr(inner, "_share_state"):
                inner._share_state()
    from ..megatron.fsdp import install_weights
    # Megatron-FSDP: its main weights (the loaded model weights, then — bf16 — the exact fp32 main copies
    # of the optimizer state, on the same storage) into the weights it gathers
    install_weights(model_chunks)
    if load_rng:
        set_rng_state(got["rng_state"])
    return common


# ---------------------------------------------------------------------------------- save / load
def save_dist_checkpoint(root, iteration, model_chunks, optimizer, scheduler, args, extra,
                         topology_extra: Optional[dict] = None) -> str:
    """``--ckpt-format torch_dist``: megatron.core.dist_checkpointing into the staging directory
    (:func:`save_dist`), then the same manifest/publish/tracker sequence."""
    staging = new_staging(root, iteration)
    topo = {**run_topology(args), **(topology_extra or {})}
    common = {"iteration": iteration, "topology": topo, "extra": extra or {},
              "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_step(root, iteration, staging, lambda: save_dist(staging, model_chunks, optimizer, args, common))
    dist.barrier()
    files = hash_tree(staging)
    save_step(root, iteration, staging, lambda: dist.get_rank() == 0 and publish(
        root, iteration, staging, checkpoint_dir(root, iteration), {
            "format": FORMAT, "ckpt_format": CKPT_FORMAT, "iteration": iteration, "topology": topo,
            "files": files}))
    dist.barrier()
    return checkpoint_dir(root, iteration)


def load_dist_checkpoint(root, latest, man, model_chunks, optimizer, scheduler, args, load_optim, load_rng):
    d = checkpoint_dir(root, latest)
    where = f"--load {root} (iteration {latest})"
    have, want = man["topology"], run_topology(args)
    error = None
    model = topology_diffs(have, want, "model", MODEL_FLAGS)
    if model:
        error = (f"{where} holds another model shape ({'; '.join(model)}); pass the model flags it was "
                 "trained with, or another --load directory")
    elif load_optim and optimizer is not None and topology_diffs(have, want, "optim", DIST_OPTIM_FLAGS):
        error = (f"{where} holds the state of another optimizer setup "
                 f"({'; '.join(topology_diffs(have, want, 'optim', DIST_OPTIM_FLAGS))}); to continue from its weights "
                 "with this optimizer pass --no-load-optim (fresh optimizer state, iteration 0)")
    if error is None:
        w, r = dist.get_world_size(), dist.get_rank()
        for i, (n, entry) in enumerate(sorted(man["files"].items())):
            if i % w == r:
                error = verify_file(os.path.join(d, n), entry)
                if error is not None:
                    break
    agree(error)
    same_layout = not topology_diffs(have, want, "layout", LAYOUT_FLAGS)
    common = load_dist(d, model_chunks, optimizer, args, load_optim=load_optim, load_rng=load_rng and same_layout,
                       check=agree)
    if not load_optim and optimizer is not None:
        optimizer.reload_model_params()
    if load_optim and scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    dist.barrier()
    it = common["iteration"]
    return {"iteration": it if load_optim else 0, "extra": common["extra"] if load_optim else {},
            "checkpoint_iteration": it}
