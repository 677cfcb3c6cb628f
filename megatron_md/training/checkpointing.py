"""Per-rank checkpoints, written atomically; ``--load`` resumes bit-exactly (same topology).

Layout (Megatron-LM's names)::

    <save>/iter_0000100/rank_00000.pt ... rank_<world-1>.pt
    <save>/latest_checkpointed_iteration.txt          # "100", written last

Each rank ``torch.save``s its model state dict, its optimizer state, the LR scheduler, the
iteration, the loss history and all RNG states (python, numpy, torch, CUDA, megatron's TP/EP
tracker) to a temporary file in the target directory, ``fsync``s it and ``os.replace``s it into
place. After a barrier (every rank's file is complete), rank 0 writes the pointer file the same
way and fsyncs the directory: a crash at any point leaves the previous checkpoint as the
``latest`` one, never a half-written one.

Optimizer state is saved *below* Megatron's wrappers, per rank: for every wrapper (dense and
expert ones of a ``ChainedOptimizer``) the inner ``HybridOptimizer``'s torch state dict, the
matrix optimizer's own state dict (its param groups carry e.g. the schedule-free counters),
the wrapper's main parameters (fp32 copies or ZeRO-1 shards), its grad-scaler state and its
skipped-step count. Loading restores all of it *in place* (the optimizer objects keep their
param-group dicts, which other objects reference). This is exact for an identical topology
and model; a different TP/DP/EP layout is rejected with a clear error.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "read_latest", "checkpoint_dir", "TRACKER"]

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT = 1


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_file(root: str, iteration: int, rank: int) -> str:
    return os.path.join(checkpoint_dir(root, iteration), f"rank_{rank:05d}.pt")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def read_latest(root: str) -> Optional[int]:
    """Iteration named by ``<root>/latest_checkpointed_iteration.txt`` (None if absent)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise RuntimeError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


# ------------------------------------------------------------------------------------ topology
def _topology(args) -> dict:
    return {"world_size": dist.get_world_size(), "tp": args.tensor_model_parallel_size,
            "pp": args.pipeline_model_parallel_size, "ep": args.expert_model_parallel_size,
            "etp": args.expert_tensor_parallel_size, "dp": args.data_parallel_size,
            "optimizer": args.optimizer, "use_distributed_optimizer": args.use_distributed_optimizer,
            "num_layers": args.num_layers, "hidden_size": args.hidden_size,
            "num_experts": args.num_experts, "padded_vocab_size": args.padded_vocab_size}


# ------------------------------------------------------------------------------------ RNG
def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
    get_cuda_rng_tracker().set_states(st["tracker"])


# ------------------------------------------------------------------------------------ optimizer
def _wrappers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _opt_state(optimizer) -> list:
    out = []
    for w in _wrappers(optimizer):
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


def _restore_inplace(opt: torch.optim.Optimizer, sd: dict, what: str) -> None:
    """``load_state_dict`` that keeps the optimizer's param-group dict objects."""
    groups, saved = opt.param_groups, sd["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise RuntimeError(f"{what}: the checkpoint's parameter groups do not match this model/optimizer")
    by_index = {}
    for g, s in zip(groups, saved):
        for k, v in s.items():
            if k != "params":
                g[k] = v
        by_index.update(zip(s["params"], g["params"]))
    opt.state.clear()
    for idx, st in sd["state"].items():
        p = by_index[idx]
        opt.state[p] = {k: _to_param(k, v, p) for k, v in st.items()}


def _load_opt_state(optimizer, saved: list) -> None:
    wrappers = _wrappers(optimizer)
    if len(wrappers) != len(saved):
        raise RuntimeError(f"checkpoint has {len(saved)} optimizer(s), this run builds {len(wrappers)}")
    for w, s in zip(wrappers, saved):
        inner = w.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if len(params) != len(s["mains"]) or any(p.shape != q.shape for p, q in zip(params, s["mains"])):
            raise RuntimeError("checkpoint main parameters do not match this optimizer (different topology?)")
        with torch.no_grad():
            for p, q in zip(params, s["mains"]):
                p.copy_(q)
        _restore_inplace(inner, s["inner"], "optimizer")
        matrix = getattr(inner, "matrix_optimizer", None)
        if (matrix is None) != (s["matrix"] is None):
            raise RuntimeError("checkpoint and run disagree on the matrix optimizer")
        if matrix is not None:
            _restore_inplace(matrix, s["matrix"], "matrix optimizer")
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


# ------------------------------------------------------------------------------------ API
def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, args,
                    extra: Optional[dict] = None) -> str:
    """Write this rank's file, then (rank 0, after a barrier) the ``latest`` pointer."""
    rank = dist.get_rank()
    d = checkpoint_dir(root, iteration)
    if rank == 0:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    state = {
        "format": FORMAT, "iteration": iteration, "topology": _topology(args),
        "model": [c.state_dict() for c in model_chunks],
        "optimizer": _opt_state(optimizer) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(), "extra": extra or {},
    }
    _atomic_torch_save(state, _rank_file(root, iteration, rank))
    dist.barrier()
    if rank == 0:
        _atomic_write_text(os.path.join(root, TRACKER), f"{iteration}\n")
    dist.barrier()
    return d


def load_checkpoint(root: str, model_chunks, optimizer, scheduler, args, iteration: Optional[int] = None,
                    load_optim: bool = True, load_rng: bool = True) -> Optional[dict]:
    """Restore from ``root`` (the latest, or ``iteration``); returns ``{"iteration", "extra"}``,
    or None if ``root`` holds no checkpoint and no specific iteration was asked for."""
    if iteration is None:
        iteration = read_latest(root)
        if iteration is None:
            return None
    path = _rank_file(root, iteration, dist.get_rank())
    if not os.path.exists(path):
        raise FileNotFoundError(f"--load {root}: {path} does not exist (saved with a different world size?)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise RuntimeError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    want, have = _topology(args), state["topology"]
    if not load_optim:  # model weights only: another optimizer may continue from them
        for k in ("optimizer", "use_distributed_optimizer"):
            want.pop(k)
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise RuntimeError("--load: the checkpoint was written with a different configuration "
                           "(checkpoint value, this run): " + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items()))
    for c, sd in zip(model_chunks, state["model"]):
        c.load_state_dict(sd, strict=True)
    if load_optim and optimizer is not None and state["optimizer"] is not None:
        _load_opt_state(optimizer, state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
    if load_rng:
        _set_rng_state(state["rng"])
    dist.barrier()
    return {"iteration": state["iteration"] if load_optim else 0, "extra": state["extra"]}
