"""``--ckpt-format torch``: one file per rank, resumed at the same layout.

Each rank ``torch.save``s (``<save>/iter_N/rank_<r>.pt``) its model state dicts, its optimizer
state, the LR scheduler, the iteration, the loss history and all RNG states into the staging
directory; the manifest and publishing are :mod:`.integrity`'s.

Loading first *checks* on every rank — the manifest's layout and model shape against this run
(flags named in the error), its own rank file (present, size and sha256 as recorded), that it
unpickles, and that every model and optimizer tensor has this run's keys and shapes — then the
ranks agree, and only then is anything restored: nothing is ever partially loaded. A weights-only
load (``load_optim=False``) of the same model written at another TP/PP/EP/DP layout is resharded:
every rank merges the verified rank files (:func:`.merge.load_full_model`) and takes its own cut.

Optimizer state is saved *below* Megatron's wrappers, per rank: for every wrapper (dense and
expert ones of a ``ChainedOptimizer``) the inner ``HybridOptimizer``'s torch state dict, the
matrix optimizer's own state dict (its param groups carry e.g. the schedule-free counters),
the wrapper's main parameters (fp32 copies or ZeRO-1 shards), its grad-scaler state and its
skipped-step count. Loading restores all of it *in place* (the optimizer objects keep their
param-group dicts, which other objects reference). This is exact for an identical layout and
model; another layout (unless weights only), optimizer or model shape is refused before loading.
Schedule-free runs also save the model at the averaged iterate ``x`` (``model_x``, for ``sf-to-x``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..megatron.builder import swap_to_eval, swap_to_train
from ..megatron.config import SCHEDULE_FREE
from ..megatron.sharded_state import optimizer_wrappers
from .integrity import (FORMAT, MANIFEST, atomic_torch_save, checkpoint_dir, new_staging, publish, rank_file,
                        rank_name, save_step, sha256, verify_file)
from .merge import load_full_model, local_model_state
from .rng import rng_state, set_rng_state
from .topology import rank_coords, reshards_weights, run_topology, topology_error

__all__ = ["save_per_rank", "check_per_rank", "restore_per_rank"]


# ------------------------------------------------------------------------------ optimizer state
def _opt_state(optimizer) -> list:
    out = []
    for w in optimizer_wrappers(optimizer):
        inner = w.optimizer
        matrix = getattr(inner, "matrix_optimizer", None)
        scaler = getattr(w, "grad_scaler", None)
        out.append({
            "inner": inner.state_dict(),
            "matrix": matrix.state_dict() if matrix is not None else None,
            "mains": [p.detach().clone() for g in inner.param_groups for p in g["params"]],
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "md_skipped_steps": getattr(w, "md_skipped_steps", 0),
        })
    return out


def _to_param(key, value, p):
    """Like torch's load_state_dict: floating state follows the param's dtype/device; ``step`` stays."""
    if torch.is_tensor(value):
        if key == "step":
            return value.clone()
        if value.is_floating_point():
            return value.to(dtype=p.dtype, device=p.device).clone()
        return value.to(device=p.device).clone()
    if isinstance(value, dict):
        return {k: _to_param(k, v, p) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_param(None, v, p) for v in value)
    return value


def _groups_mismatch(opt: torch.optim.Optimizer, sd: dict) -> Optional[str]:
    groups, saved = opt.param_groups, sd.get("param_groups", [])
    if len(groups) != len(saved):
        return f"{len(saved)} parameter groups, this run has {len(groups)}"
    for i, (g, s) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(s["params"]):
            return f"parameter group {i} has {len(s['params'])} parameters, this run has {len(g['params'])}"
    return None


def _restore_inplace(opt: torch.optim.Optimizer, sd: dict) -> None:
    """``load_state_dict`` that keeps the optimizer's param-group dict objects (checked before)."""
    by_index = {}
    for g, s in zip(opt.param_groups, sd["param_groups"]):
        for k, v in s.items():
            if k != "params":
                g[k] = v
        by_index.update(zip(s["params"], g["params"]))
    opt.state.clear()
    for idx, st in sd["state"].items():
        p = by_index[idx]
        opt.state[p] = {k: _to_param(k, v, p) for k, v in st.items()}


def _opt_mismatch(optimizer, saved: Optional[list]) -> Optional[str]:
    """Why ``saved`` cannot be restored into ``optimizer`` (None: it can)."""
    if saved is None:
        return "it holds no optimizer state"
    wrappers = optimizer_wrappers(optimizer)
    if len(wrappers) != len(saved):
        return f"it has {len(saved)} optimizer(s) (dense/expert), this run builds {len(wrappers)}"
    for i, (w, s) in enumerate(zip(wrappers, saved)):
        inner = w.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(s["mains"]):
            return f"optimizer {i} has {len(s['mains'])} main parameters, this run has {len(params)}"
        for j, (p, q) in enumerate(zip(params, s["mains"])):
            if p.shape != q.shape:
                return f"optimizer {i} main parameter {j} has shape {tuple(q.shape)}, this run {tuple(p.shape)}"
        why = _groups_mismatch(inner, s["inner"])
        if why:
            return f"optimizer {i}: {why}"
        matrix = getattr(inner, "matrix_optimizer", None)
        if (matrix is None) != (s["matrix"] is None):
            return f"optimizer {i}: the checkpoint {'has no' if s['matrix'] is None else 'has a'} matrix optimizer"
        if matrix is not None:
            why = _groups_mismatch(matrix, s["matrix"])
            if why:
                return f"matrix optimizer {i}: {why}"
    return None


def _load_opt_state(optimizer, saved: list) -> None:
    for w, s in zip(optimizer_wrappers(optimizer), saved):
        inner = w.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        with torch.no_grad():
            for p, q in zip(params, s["mains"]):
                p.copy_(q)
        _restore_inplace(inner, s["inner"])
        matrix = getattr(inner, "matrix_optimizer", None)
        if matrix is not None:
            _restore_inplace(matrix, s["matrix"])
            if hasattr(inner, "_share_state"):
                inner._share_state()  # local mains: one state object for both
        if s["grad_scaler"] is not None and getattr(w, "grad_scaler", None) is not None:
            w.grad_scaler.load_state_dict(s["grad_scaler"])
        if hasattr(w, "md_skipped_steps"):
            w.md_skipped_steps = s["md_skipped_steps"]
        if hasattr(w, "_copy_main_params_to_model_params") and not _is_fp32_optimizer(w):
            w._copy_main_params_to_model_params()


def _is_fp32_optimizer(w) -> bool:
    from megatron.core.optimizer.optimizer import FP32Optimizer
    return isinstance(w, FP32Optimizer)


# ---------------------------------------------------------------------------------------- model
def _model_mismatch(model_chunks, saved: list) -> Optional[str]:
    if len(saved) != len(model_chunks):
        return f"it has {len(saved)} model chunk(s), this run {len(model_chunks)}"
    for i, (c, sd) in enumerate(zip(model_chunks, saved)):
        mine = c.state_dict()
        missing = [k for k in mine if k not in sd]
        extra = [k for k in sd if k not in mine]
        if missing or extra:
            return (f"model chunk {i}: " + (f"missing {missing[:3]}" if missing else "")
                    + (" " if missing and extra else "") + (f"unexpected {extra[:3]}" if extra else ""))
        for k, v in mine.items():
            if torch.is_tensor(v) and torch.is_tensor(sd[k]) and v.shape != sd[k].shape:
                return f"model chunk {i}: {k} has shape {tuple(sd[k].shape)}, this run {tuple(v.shape)}"
    return None


def _averaged_weights(model_chunks, optimizer, args) -> Optional[list]:
    """Schedule-free runs: the model state dicts at the averaged iterate ``x`` (the weights that
    evaluation uses; ``tools/convert_checkpoint.py sf-to-x`` exports them). The optimizer's own
    swap computes them; swapping back restores ``y`` exactly."""
    if optimizer is None or args.optimizer not in SCHEDULE_FREE:
        return None
    swap_to_eval(optimizer, model_chunks)
    try:
        return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in c.state_dict().items()}
                for c in model_chunks]
    finally:
        swap_to_train(optimizer, model_chunks)


def _resharded_model(root: str, iteration: int, model_chunks, args) -> list:
    """This rank's model state dicts from a checkpoint of another layout (all rank files verified)."""
    from megatron.core import parallel_state as ps

    full, topo, _ = load_full_model(root, iteration)
    ne = args.num_experts or 0
    ep = args.expert_model_parallel_size
    current = [c.state_dict() for c in model_chunks]
    out = local_model_state(
        full, [list(sd) for sd in current], pp=args.pipeline_model_parallel_size,
        pp_rank=ps.get_pipeline_model_parallel_rank(), vpp=args.virtual_pipeline_model_parallel_size or 1,
        num_layers=args.num_layers, ep_rank=ps.get_expert_model_parallel_rank() if ne else 0,
        local_experts=ne // ep if ne else 0, tp=args.tensor_model_parallel_size,
        tp_rank=ps.get_tensor_model_parallel_rank(), etp=args.expert_tensor_parallel_size if ne else 1,
        etp_rank=ps.get_expert_tensor_parallel_rank() if ne else 0, gated=bool(args.swiglu),
        tied=not args.untie_embeddings_and_output_weights)
    for sd, cur in zip(out, current):
        for k, v in cur.items():
            if k not in sd:  # extra state (TE), kept as built
                sd[k] = v
            elif torch.is_tensor(v) and tuple(v.shape) != tuple(sd[k].shape):
                raise CheckpointError(f"{k}: the checkpoint's weights cut for this layout have shape "
                                      f"{tuple(sd[k].shape)}, this run's {tuple(v.shape)}")
    return out


# ------------------------------------------------------------------------------------ save / load
def save_per_rank(root: str, iteration: int, model_chunks, optimizer, scheduler, args,
                  extra: Optional[dict] = None, topology_extra: Optional[dict] = None) -> str:
    """Write this rank's file into a staging directory; rank 0 then writes the manifest,
    publishes the directory and, last, the ``latest`` pointer. Returns the directory."""
    rank = dist.get_rank()
    staging = new_staging(root, iteration)
    state = {
        "format": FORMAT, "iteration": iteration, "topology": {**run_topology(args), **(topology_extra or {})},
        "coords": rank_coords(),
        "model": [c.state_dict() for c in model_chunks],
        "optimizer": _opt_state(optimizer) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(), "extra": extra or {},
        "model_x": _averaged_weights(model_chunks, optimizer, args),
    }
    path = os.path.join(staging, rank_name(rank))

    def write() -> tuple:
        atomic_torch_save(state, path)
        return rank_name(rank), {"bytes": os.path.getsize(path), "sha256": sha256(path)}

    entry = save_step(root, iteration, staging, write)
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, entry)
    final = checkpoint_dir(root, iteration)
    save_step(root, iteration, staging, lambda: rank == 0 and publish(root, iteration, staging, final, {
        "format": FORMAT, "iteration": iteration, "topology": state["topology"], "files": dict(sorted(entries))}))
    dist.barrier()
    return final


def check_per_rank(root: str, latest: int, man: dict, model_chunks, optimizer, args,
                   load_optim: bool) -> tuple[Optional[dict], Optional[str]]:
    """``(this rank's state, None)`` when the per-rank checkpoint ``man`` describes fits this run,
    else ``(None, why)``; changes nothing (the caller's ranks agree first). A weights-only load at
    another layout gives the weights merged from every (verified) rank file and cut for this rank."""
    want = run_topology(args)
    if reshards_weights(man["topology"], want, load_optim):
        return {"model": _resharded_model(root, latest, model_chunks, args), "iteration": 0, "extra": {},
                "rng": None}, None
    error = topology_error(f"--load {root} (iteration {latest})", man["topology"], want, load_optim)
    if error is not None:
        return None, error
    rank = dist.get_rank()
    path = rank_file(root, latest, rank)
    entry = man["files"].get(rank_name(rank))
    if entry is None:
        return None, f"{path}: not listed in {os.path.join(checkpoint_dir(root, latest), MANIFEST)}"
    error = verify_file(path, entry)
    if error is not None:
        if not os.path.exists(path):
            error += (f" (the manifest lists {len(man['files'])} rank files; the checkpoint directory "
                      "is incomplete — was a file deleted or not copied?)")
        return None, error
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        return None, f"{path} cannot be read ({type(exc).__name__}: {exc})"
    why = _model_mismatch(model_chunks, state["model"])
    if why is None and load_optim and optimizer is not None:
        why = _opt_mismatch(optimizer, state["optimizer"])
    if why is not None:
        return None, f"{path} does not fit this run: {why}"
    return state, None


def restore_per_rank(state: dict, model_chunks, optimizer, scheduler, *, load_optim: bool, load_rng: bool) -> dict:
    """Restore a state :func:`check_per_rank` accepted (on every rank); returns ``{"iteration",
    "extra", "checkpoint_iteration"}``."""
    for c, sd in zip(model_chunks, state["model"]):
        c.load_state_dict(sd, strict=True)
    if not load_optim and optimizer is not None:
        # weights only: the bf16/fp16 wrappers' fp32 main copies (and ZeRO shards) were made from
        # the freshly built model and would overwrite the loaded weights at the first step
        optimizer.reload_model_params()
    if load_optim and optimizer is not None:
        _load_opt_state(optimizer, state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    if load_rng and state["rng"] is not None:  # a resharded load has no RNG state of this rank's
        set_rng_state(state["rng"])
    dist.barrier()
    return {"iteration": state["iteration"] if load_optim else 0, "extra": state["extra"] if load_optim else {},
            "checkpoint_iteration": state["iteration"]}
