"""Checkpoints with an integrity manifest, written atomically; ``--load`` resumes bit-exactly.

Two formats (``--ckpt-format``; ``--load`` reads either, from the manifest):

* ``torch_dist`` (default): Megatron distributed checkpoints, model and every optimizer state
  in the unsharded model's coordinates, loadable at any layout — :mod:`megatron_md.training.dist_ckpt`
  writes and reads the state; this module stages, hashes, publishes and verifies the directory
  exactly as for the per-rank format below (every file in the manifest, hashed and verified in
  parallel over the ranks).
* ``torch``: per-rank files, described next.

Layout (Megatron-LM's names)::

    <save>/iter_0000100/rank_00000.pt ... rank_<world-1>.pt
    <save>/iter_0000100/manifest.json               # sha256 + size of every rank file, the run's layout
    <save>/latest_checkpointed_iteration.txt          # "100", written last

Each rank ``torch.save``s its model state dict, its optimizer state, the LR scheduler, the
iteration, the loss history and all RNG states (python, numpy, torch, CUDA, megatron's TP/EP
tracker) into a staging directory ``iter_0000100.tmp<pid>``, ``fsync``s it and hashes what is on
disk. Rank 0 gathers the hashes, writes ``manifest.json``, renames the staging directory to
``iter_0000100`` and only then writes the tracker file (each step atomic, directories fsynced).
A crash at any point leaves the previous checkpoint as the ``latest`` one; the ``*.tmp<pid>``
leftovers of an interrupted save are removed at the start of the next save.

Loading first *checks* on every rank — the tracker, the manifest (layout and model shape of the
run that wrote it against this run: flags named in the error), its own rank file (present,
size and sha256 as recorded), that it unpickles, and that every model and optimizer tensor has
this run's keys and shapes — then the ranks agree (any rank's problem stops all of them with the
same :class:`~megatron_md.training.errors.CheckpointError`, naming the file), and only then is
anything restored: nothing is ever partially loaded. A weights-only load (``load_optim=False``) of
the same model written at another TP/PP/EP/DP layout is resharded: every rank merges the verified
rank files (``convert.megatron_ckpt.load_full_model``) and takes its own cut.

Optimizer state is saved *below* Megatron's wrappers, per rank: for every wrapper (dense and
expert ones of a ``ChainedOptimizer``) the inner ``HybridOptimizer``'s torch state dict, the
matrix optimizer's own state dict (its param groups carry e.g. the schedule-free counters),
the wrapper's main parameters (fp32 copies or ZeRO-1 shards), its grad-scaler state and its
skipped-step count. Loading restores all of it *in place* (the optimizer objects keep their
param-group dicts, which other objects reference). This is exact for an identical layout and
model; another layout (unless weights only), optimizer or model shape is refused before loading.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..megatron.model_recipe import recipe_from_args
from .errors import CheckpointError

__all__ = ["save_checkpoint", "load_checkpoint", "read_latest", "checkpoint_dir", "complete_iterations",
           "verify_file", "load_verified", "TRACKER", "MANIFEST", "CheckpointError"]

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FORMAT = 2
_TMP = re.compile(r"\.tmp\d+$")
_ITER = re.compile(r"^iter_(\d{7})$")

#: layout/optimizer keys of the manifest and the flag each comes from
_LAYOUT_FLAGS = {
    "world_size": "the number of ranks", "tp": "--tensor-model-parallel-size",
    "pp": "--pipeline-model-parallel-size", "vpp": "--num-layers-per-virtual-pipeline-stage (virtual stages)",
    "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size", "dp": "the data-parallel size",
}
_OPTIM_FLAGS = {
    "optimizer": "--optimizer", "use_distributed_optimizer": "--use-distributed-optimizer",
    "dp_mode": "--dp-mode", "split_qkv": "--split-qkv/--no-split-qkv", "split_fc1": "--split-fc1/--no-split-fc1",
    "precision": "--bf16/--fp16",
    "zero_buckets": "--overlap-grad-reduce/--ddp-bucket-size (ZeRO-1 shards follow the gradient buckets)",
}
#: optimizer-setup keys compared only when the checkpoint records them (older checkpoints do not)
_OPTIONAL_OPTIM_KEYS = ("zero_buckets", "split_fc1")
_MODEL_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups", "ffn_hidden_size": "--ffn-hidden-size", "kv_channels": "--kv-channels",
    "swiglu": "--swiglu", "normalization": "--normalization", "position_embedding_type": "--position-embedding-type",
    "max_position_embeddings": "--max-position-embeddings", "untie": "--untie-embeddings-and-output-weights",
    "bias_linear": "--disable-bias-linear", "padded_vocab_size": "--vocab-size (padded)",
    "num_experts": "--num-experts", "moe_ffn_hidden_size": "--moe-ffn-hidden-size", "rotary_base": "--rotary-base",
    "moe_router_topk": "--moe-router-topk", "moe_router_pre_softmax": "--moe-router-pre-softmax",
    # the model recipe (megatron_md.megatron.model_recipe): absent in older checkpoints = the defaults
    "qk_layernorm": "--qk-layernorm", "embedding_multiplier": "--embedding-multiplier",
    "post_norm": "--post-norm", "post_norm_gain": "--post-norm-gain/--no-post-norm-gain",
    "fixed_layer_scale": "--fixed-layer-scale",
}
#: model keys that older checkpoints lack, with the value they stand for
_MODEL_KEY_DEFAULTS = {"qk_layernorm": False, "embedding_multiplier": None, "post_norm": False,
                       "post_norm_gain": True, "fixed_layer_scale": None}


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _rank_file(root: str, iteration: int, rank: int) -> str:
    return os.path.join(checkpoint_dir(root, iteration), _rank_name(rank))


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


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_latest(root: str) -> Optional[int]:
    """Iteration named by ``<root>/latest_checkpointed_iteration.txt`` (None if absent)."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def complete_iterations(root: str) -> list[int]:
    """Iterations under ``root`` whose directory has a manifest (their save completed)."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and os.path.exists(os.path.join(root, name, MANIFEST)):
            out.append(int(m.group(1)))
    return sorted(out)


def _clean_stale(root: str) -> list[str]:
    """Remove ``*.tmp<pid>`` files and staging directories an interrupted save left behind."""
    removed = []
    for d in [root] + [os.path.join(root, n) for n in os.listdir(root) if _ITER.match(n)]:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if _TMP.search(name):
                p = os.path.join(d, name)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ the run's identity
def _topology(args) -> dict:
    """What must be equal between the run that saved and the run that loads (per group)."""
    prec = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    md = getattr(args, "md", None)
    return {
        "layout": {"world_size": dist.get_world_size(), "tp": args.tensor_model_parallel_size,
                   "pp": args.pipeline_model_parallel_size,
                   "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None),
                   "ep": args.expert_model_parallel_size, "etp": args.expert_tensor_parallel_size,
                   "dp": args.data_parallel_size},
        "optim": {"optimizer": args.optimizer, "use_distributed_optimizer": args.use_distributed_optimizer,
                  "dp_mode": getattr(md, "dp_mode", None), "split_qkv": getattr(md, "split_qkv", None),
                  "split_fc1": getattr(md, "split_fc1", None),
                  "precision": prec,
                  # ZeRO-1 flat ranges are cut per gradient bucket: another bucket layout, other shards
                  "zero_buckets": ([bool(getattr(args, "overlap_grad_reduce", False)),
                                    getattr(args, "ddp_bucket_size", None)]
                                   if args.use_distributed_optimizer else None)},
        "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                  "num_attention_heads": args.num_attention_heads,
                  "num_query_groups": args.num_query_groups or args.num_attention_heads,
                  "ffn_hidden_size": args.ffn_hidden_size, "kv_channels": args.kv_channels,
                  "swiglu": args.swiglu, "normalization": args.normalization,
                  "position_embedding_type": args.position_embedding_type,
                  "max_position_embeddings": args.max_position_embeddings,
                  "untie": args.untie_embeddings_and_output_weights, "bias_linear": not args.disable_bias_linear,
                  "padded_vocab_size": args.padded_vocab_size, "num_experts": args.num_experts,
                  "moe_ffn_hidden_size": args.moe_ffn_hidden_size if args.num_experts else None,
                  "rotary_base": args.rotary_base if args.position_embedding_type == "rope" else None,
                  "moe_router_topk": args.moe_router_topk if args.num_experts else None,
                  "moe_router_pre_softmax": args.moe_router_pre_softmax if args.num_experts else None,
                  **_recipe_keys(args)},
        # not compared on load; read by tools/convert_checkpoint.py
        "info": {"vocab_size": args.vocab_size, "seq_length": args.seq_length, "layernorm_epsilon": 1e-5,
                 "transformer_impl": args.transformer_impl, "moe_grouped_gemm": bool(args.moe_grouped_gemm)},
    }


def _recipe_keys(args) -> dict:
    """The model recipe's manifest keys (the function of the model; not the init-only options)."""
    r = recipe_from_args(args)
    return {"qk_layernorm": r.qk_layernorm, "embedding_multiplier": r.embedding_multiplier, "post_norm": r.post_norm,
            "post_norm_gain": r.post_norm_gain if r.post_norm else True, "fixed_layer_scale": r.fixed_layer_scale}


def _coords() -> dict:
    """This rank's place in every parallel group (which shard of what the conversion tools merge)."""
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
            "etp": ps.get_expert_tensor_parallel_rank(), "edp": ps.get_expert_data_parallel_rank()}


def _diffs(have: dict, want: dict, group: str, flags: dict) -> list:
    a, b = have.get(group, {}), want[group]
    if group == "model":
        a = {**_MODEL_KEY_DEFAULTS, **a}
    return [f"{flags[k]}: checkpoint {a.get(k)!r}, this run {b[k]!r}" for k in flags
            if a.get(k) != b[k] and not (k in _OPTIONAL_OPTIM_KEYS and k not in a)]


def _reshards(have: dict, want: dict, load_optim: bool) -> bool:
    """A weights-only load (``--no-load-optim``) of the same model at another parallel layout:
    the weights are merged from every rank file and cut for this run's layout."""
    return (not load_optim and not _diffs(have, want, "model", _MODEL_FLAGS)
            and bool(_diffs(have, want, "layout", _LAYOUT_FLAGS)) and "info" in have)


def _resharded_model(root: str, iteration: int, model_chunks, args) -> list:
    """This rank's model state dicts from a checkpoint of another layout (all rank files verified)."""
    from megatron.core import parallel_state as ps

    from ..convert.megatron_ckpt import load_full_model, local_model_state
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


def _topology_error(where: str, have: dict, want: dict, load_optim: bool) -> Optional[str]:
    def diffs(group, flags):
        return _diffs(have, want, group, flags)

    model = diffs("model", _MODEL_FLAGS)
    if model:
        return (f"{where} holds another model shape ({'; '.join(model)}); pass the model flags it was "
                "trained with, or another --load directory")
    layout = diffs("layout", _LAYOUT_FLAGS)
    if layout:
        return (f"{where} was written with another parallel layout ({'; '.join(layout)}); its optimizer state "
                "is per-rank, so resume with the same layout, or pass --no-load-optim to load the weights at "
                "this layout (resharded) with a fresh optimizer")
    optim = diffs("optim", _OPTIM_FLAGS) if load_optim else []
    if optim:
        return (f"{where} holds the state of another optimizer setup ({'; '.join(optim)}); to continue from its "
                "weights with this optimizer pass --no-load-optim (fresh optimizer state, iteration 0)")
    return None


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
    wrappers = _wrappers(optimizer)
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
    for w, s in zip(_wrappers(optimizer), saved):
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
    from ..megatron.config import SCHEDULE_FREE
    if optimizer is None or args.optimizer not in SCHEDULE_FREE:
        return None
    from ..megatron.builder import swap_to_eval, swap_to_train
    swap_to_eval(optimizer, model_chunks)
    try:
        return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in c.state_dict().items()}
                for c in model_chunks]
    finally:
        swap_to_train(optimizer, model_chunks)


# ------------------------------------------------------------------------------------ agreement
def _agree(error: Optional[str]) -> None:
    """Every rank raises the same CheckpointError if any rank has one (lowest rank's message)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        others = sum(1 for _, e in bad[1:] if e != bad[0][1])  # the same message everywhere: said once
        raise CheckpointError(bad[0][1] + (f" (and {others} other rank(s) with other problems)" if others else ""))


def load_verified(path: str, entry: dict) -> dict:
    """``torch.load`` of a rank file after checking it against its manifest ``entry``; a
    :class:`CheckpointError` naming the file when it does not match (offline tools' reader)."""
    why = verify_file(path, entry)
    if why:
        raise CheckpointError(why)
    return torch.load(path, map_location="cpu", weights_only=False)


def verify_file(path: str, entry: dict) -> Optional[str]:
    """Why ``path`` does not match its manifest ``entry`` ({"bytes", "sha256"}); None if it does."""
    if not os.path.exists(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        return (f"{path} is truncated or was rewritten: {size} bytes, the manifest records {entry['bytes']}")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        return (f"{path} is corrupted: its sha256 is {digest[:16]}…, the manifest records "
                f"{entry['sha256'][:16]}… (same size; bytes were overwritten)")
    return None


def _read_manifest(root: str, iteration: int) -> dict:
    d = checkpoint_dir(root, iteration)
    path = os.path.join(d, MANIFEST)
    others = [i for i in complete_iterations(root) if i != iteration]
    hint = f"; complete checkpoints there: iterations {others} (--ckpt-step N)" if others else ""
    if not os.path.isdir(d):
        raise CheckpointError(f"--load {root}: {d} does not exist{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"--load {root}: {path} is missing — the save of iteration {iteration} did not "
                              f"complete, or it was written by a megatron_md without integrity manifests{hint}")
    try:
        with open(path) as fh:
            man = json.load(fh)
        if man.get("format") != FORMAT or man.get("iteration") != iteration:
            raise ValueError(f"format {man.get('format')!r} / iteration {man.get('iteration')!r}, "
                             f"expected {FORMAT} / {iteration}")
        man["files"], man["topology"]  # noqa: B018 - required keys
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from None
    return man


# ------------------------------------------------------------------------------------ API
def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, args,
                    extra: Optional[dict] = None) -> str:
    """Write this rank's file into a staging directory; rank 0 then writes the manifest,
    publishes the directory and, last, the ``latest`` pointer. Returns the directory."""
    rank = dist.get_rank()
    if getattr(args, "ckpt_format", "torch") == "torch_dist":
        return _save_dist_checkpoint(root, iteration, model_chunks, optimizer, scheduler, args, extra)
    final = checkpoint_dir(root, iteration)
    name = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        _clean_stale(root)
        name[0] = f"{final}.tmp{os.getpid()}"
        os.makedirs(name[0])
    dist.broadcast_object_list(name, src=0)
    staging = name[0]
    state = {
        "format": FORMAT, "iteration": iteration, "topology": _topology(args), "coords": _coords(),
        "model": [c.state_dict() for c in model_chunks],
        "optimizer": _opt_state(optimizer) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(), "extra": extra or {},
        "model_x": _averaged_weights(model_chunks, optimizer, args),
    }
    path = os.path.join(staging, _rank_name(rank))
    _atomic_torch_save(state, path)
    entry = (_rank_name(rank), {"bytes": os.path.getsize(path), "sha256": _sha256(path)})
    entries = [None] * dist.get_world_size()
    dist.all_gather_object(entries, entry)
    if rank == 0:
        _publish(root, iteration, staging, final, {
            "format": FORMAT, "iteration": iteration, "topology": state["topology"],
            "files": dict(sorted(entries))})
    dist.barrier()
    return final


def _staging(root: str, iteration: int) -> str:
    """Rank 0 removes an interrupted save's leftovers and creates ``iter_N.tmp<pid>``; every rank gets its name."""
    name = [None]
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        _clean_stale(root)
        name[0] = f"{checkpoint_dir(root, iteration)}.tmp{os.getpid()}"
        os.makedirs(name[0])
    dist.broadcast_object_list(name, src=0)
    return name[0]


def _hash_tree(directory: str, names: Optional[list] = None) -> dict:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``directory`` (or of ``names``),
    each rank hashing its share (files i ≡ rank mod world), gathered on every rank."""
    if names is None:
        lst = [None]
        if dist.get_rank() == 0:
            lst[0] = sorted(os.path.relpath(os.path.join(d, f), directory)
                            for d, _, fs in os.walk(directory) for f in fs if f != MANIFEST)
        dist.broadcast_object_list(lst, src=0)
        names = lst[0]
    w, r = dist.get_world_size(), dist.get_rank()
    mine = {}
    for i, n in enumerate(names):
        if i % w == r:
            path = os.path.join(directory, n)
            mine[n] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    parts = [None] * w
    dist.all_gather_object(parts, mine)
    return dict(sorted((k, v) for part in parts for k, v in part.items()))


def _save_dist_checkpoint(root, iteration, model_chunks, optimizer, scheduler, args, extra) -> str:
    """``--ckpt-format torch_dist``: megatron.core.dist_checkpointing into the staging directory
    (:mod:`megatron_md.training.dist_ckpt`), then the same manifest/publish/tracker sequence."""
    from .dist_ckpt import CKPT_FORMAT, save_dist
    staging = _staging(root, iteration)
    topo = _topology(args)
    common = {"iteration": iteration, "topology": topo, "extra": extra or {},
              "scheduler": scheduler.state_dict() if scheduler is not None else None}
    save_dist(staging, model_chunks, optimizer, args, common)
    dist.barrier()
    files = _hash_tree(staging)
    if dist.get_rank() == 0:
        _publish(root, iteration, staging, checkpoint_dir(root, iteration), {
            "format": FORMAT, "ckpt_format": CKPT_FORMAT, "iteration": iteration, "topology": topo,
            "files": files})
    dist.barrier()
    return checkpoint_dir(root, iteration)


#: optimizer-setup keys a torch_dist checkpoint must share with the run that loads its optimizer
#: state (its state is in the unsharded model's coordinates: the DP mode and ZeRO buckets may change)
_DIST_OPTIM_FLAGS = {k: v for k, v in _OPTIM_FLAGS.items() if k in ("optimizer", "split_qkv", "split_fc1",
                                                                      "precision")}


def _load_dist_checkpoint(root, latest, man, model_chunks, optimizer, scheduler, args, load_optim, load_rng):
    from .dist_ckpt import load_dist
    d = checkpoint_dir(root, latest)
    where = f"--load {root} (iteration {latest})"
    have, want = man["topology"], _topology(args)
    error = None
    model = _diffs(have, want, "model", _MODEL_FLAGS)
    if model:
        error = (f"{where} holds another model shape ({'; '.join(model)}); pass the model flags it was "
                 "trained with, or another --load directory")
    elif load_optim and optimizer is not None and _diffs(have, want, "optim", _DIST_OPTIM_FLAGS):
        error = (f"{where} holds the state of another optimizer setup "
                 f"({'; '.join(_diffs(have, want, 'optim', _DIST_OPTIM_FLAGS))}); to continue from its weights "
                 "with this optimizer pass --no-load-optim (fresh optimizer state, iteration 0)")
    if error is None:
        w, r = dist.get_world_size(), dist.get_rank()
        for i, (n, entry) in enumerate(sorted(man["files"].items())):
            if i % w == r:
                error = verify_file(os.path.join(d, n), entry)
                if error is not None:
                    break
    _agree(error)
    same_layout = not _diffs(have, want, "layout", _LAYOUT_FLAGS)
    common = load_dist(d, model_chunks, optimizer, args, load_optim=load_optim, load_rng=load_rng and same_layout,
                       check=_agree)
    if not load_optim and optimizer is not None:
        optimizer.reload_model_params()
    if load_optim and scheduler is not None and common.get("scheduler") is not None:
        scheduler.load_state_dict(common["scheduler"])
    dist.barrier()
    it = common["iteration"]
    return {"iteration": it if load_optim else 0, "extra": common["extra"] if load_optim else {},
            "checkpoint_iteration": it}


def _publish(root: str, iteration: int, staging: str, final: str, manifest: dict) -> None:
    """Manifest into the staging directory, staging → ``iter_N`` (replacing an older save of the
    same iteration), then the tracker: a crash before the tracker keeps the previous latest."""
    _atomic_write_text(os.path.join(staging, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    replaced = None
    if os.path.exists(final):
        replaced = f"{final}.replaced.tmp{os.getpid()}"
        os.replace(final, replaced)
    os.replace(staging, final)
    _fsync_dir(root)
    _atomic_write_text(os.path.join(root, TRACKER), f"{iteration}\n")
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def load_checkpoint(root: str, model_chunks, optimizer, scheduler, args, iteration: Optional[int] = None,
                    load_optim: bool = True, load_rng: bool = True) -> Optional[dict]:
    """Restore from ``root`` (the latest, or ``iteration``); returns ``{"iteration", "extra"}``,
    or None if ``root`` holds no checkpoint and no specific iteration was asked for.

    Raises :class:`CheckpointError` (on every rank, before changing anything) if the checkpoint
    is incomplete, corrupted or of another layout/model/optimizer."""
    rank = dist.get_rank()
    state, error, latest, reshard, dist_format = None, None, None, False, False
    try:
        latest = read_latest(root) if iteration is None else iteration
        if latest is not None:
            man = _read_manifest(root, latest)
            dist_format = man.get("ckpt_format") == "torch_dist"
            reshard = _reshards(man["topology"], _topology(args), load_optim)
            error = None if (reshard or dist_format) else _topology_error(f"--load {root} (iteration {latest})", man["topology"],
                                                         _topology(args), load_optim)
            if error is None and dist_format:
                pass
            elif error is None and reshard:
                state = {"model": _resharded_model(root, latest, model_chunks, args), "iteration": 0,
                         "extra": {}, "rng": None}
            elif error is None:
                path = _rank_file(root, latest, rank)
                entry = man["files"].get(_rank_name(rank))
                if entry is None:
                    error = f"{path}: not listed in {os.path.join(checkpoint_dir(root, latest), MANIFEST)}"
                else:
                    error = verify_file(path, entry)
                    if error is not None and not os.path.exists(path):
                        error += (f" (the manifest lists {len(man['files'])} rank files; the checkpoint directory "
                                  "is incomplete — was a file deleted or not copied?)")
            if error is None and not reshard and not dist_format:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=False)
                except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
                    error = f"{path} cannot be read ({type(exc).__name__}: {exc})"
            if error is None and not reshard and not dist_format:
                why = _model_mismatch(model_chunks, state["model"])
                if why is None and load_optim and optimizer is not None:
                    why = _opt_mismatch(optimizer, state["optimizer"])
                if why is not None:
                    error = f"{path} does not fit this run: {why}"
    except CheckpointError as exc:
        error = str(exc)
    _agree(error)
    if latest is None:
        return None
    if dist_format:
        return _load_dist_checkpoint(root, latest, man, model_chunks, optimizer, scheduler, args, load_optim, load_rng)

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
        _set_rng_state(state["rng"])
    dist.barrier()
    return {"iteration": state["iteration"] if load_optim else 0, "extra": state["extra"] if load_optim else {},
            "checkpoint_iteration": state["iteration"]}
