"""Merge the per-rank model shards of a driver checkpoint into one unsharded state dict.

Every rank file records its coordinates (TP, PP, EP, expert-TP, DP ranks). The merged dict uses
the names of an unpipelined ``GPTModel`` (``decoder.layers.<global layer>...``, experts
``mlp.experts.local_experts.<global expert>...``); tensor-parallel shards are joined the way
megatron-core splits them:

* column-parallel ``linear_qkv`` (whole query groups per rank), ``word_embeddings`` and
  ``output_layer`` (vocabulary rows): concatenated along dim 0;
* ``linear_fc1`` of a gated MLP holds ``[gate; up]`` per rank: the gates and the ups are
  concatenated separately (dim 0), then stacked ``[gate; up]``;
* row-parallel ``linear_proj`` / ``linear_fc2``: concatenated along dim 1;
* everything else (norms, row-parallel biases, the router) is replicated: rank 0's copy.

Layers of pipeline stage ``p``, virtual stage ``v`` (``V`` per rank, ``P`` stages, ``Lc`` layers
per chunk) are global layers ``(v * P + p) * Lc + i`` (megatron-core's even split).

:func:`rewrite_checkpoint` is the writer of the converters that keep the layout (``sf-to-x``,
``to-md``): every rank file verified, edited and written into a new checkpoint directory with
its own manifest, published like the driver's saves (staging directory, then the tracker).
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

import torch

from ..errors import CheckpointError
from .integrity import (FORMAT, TRACKER, atomic_torch_save, checkpoint_dir, clean_stale, load_verified,
                        publish, read_latest, read_manifest, sha256,
                        verify_file)

__all__ = ["load_full_model", "merge_shards", "split_shard", "local_model_state", "latest_iteration",
           "rewrite_checkpoint", "relink_checkpoint"]

_COL = re.compile(r"(linear_qkv\.(weight|bias)|word_embeddings\.weight|output_layer\.weight)$")
_FC1 = re.compile(r"linear_fc1\.(weight|bias)$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)\.(.*)$")


def _strip(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _global_name(key: str, v: int, pp: int, pp_rank: int, per_chunk: int, ep_rank: int, local_experts: int,
                 where: str) -> tuple[str, bool]:
    """``(name in the unpipelined model, is an expert param)`` of a chunk-``v`` key on a rank at
    pipeline stage ``pp_rank`` and expert rank ``ep_rank`` (layers and experts by global index)."""
    m = _LAYER.match(key)
    if not m:
        return key, False
    layer, rest = int(m.group(1)), m.group(2)
    e = _EXPERT.match(rest)
    if e:
        rest = f"{e.group(1)}{ep_rank * local_experts + int(e.group(2))}.{e.group(3)}"
    elif ".experts." in rest:
        raise CheckpointError(f"{where}: {key}: only SequentialMLP experts (local_experts.<i>) "
                              "are supported by the converter")
    return f"decoder.layers.{(v * pp + pp_rank) * per_chunk + layer}.{rest}", bool(e)


def merge_shards(name: str, shards: list, gated: bool) -> torch.Tensor:
    """One tensor from its tensor-parallel shards (in TP-rank order); see the module docstring."""
    if len(shards) == 1:
        return shards[0]
    if _FC1.search(name) and gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    if _COL.search(name) or _FC1.search(name):
        return torch.cat(shards, dim=0)
    if _ROW.search(name):
        return torch.cat(shards, dim=1)
    return shards[0]


def latest_iteration(root: str, iteration: Optional[int] = None, flag: str = "--load") -> int:
    """``iteration``, or the latest one of ``root``; a :class:`CheckpointError` if there is none."""
    if iteration is not None:
        return iteration
    found = read_latest(root)
    if found is None:
        what = "does not exist" if not os.path.exists(root) else f"has no {TRACKER}"
        raise CheckpointError(f"{flag} {root}: {what} (not a checkpoint directory written by the driver)")
    return found


def require_per_rank(root: str, manifest: dict) -> None:
    """The offline converters read per-rank (``--ckpt-format torch``) files: a clear error for a
    torch_dist checkpoint, with the command that converts it."""
    if manifest.get("ckpt_format") == "torch_dist":
        raise CheckpointError(
            f"{root} is a torch_dist checkpoint; write it as per-rank files first (any layout): "
            f"python tools/convert_checkpoint.py reshard --load {root} --save <new dir> --ckpt-format torch")


def _new_output(root: str, out: str, iteration: int) -> tuple[str, str]:
    """``(final, staging)`` directories of a converter's output checkpoint ``out``, which must not
    hold a checkpoint yet (nothing is overwritten)."""
    if os.path.abspath(out) == os.path.abspath(root) or read_latest(out) is not None:
        raise CheckpointError(f"--save {out}: already a checkpoint directory; choose a new one (nothing is overwritten)")
    os.makedirs(out, exist_ok=True)
    clean_stale(out)
    final = checkpoint_dir(out, iteration)
    staging = f"{final}.tmp{os.getpid()}"
    os.makedirs(staging)
    return final, staging


def relink_checkpoint(root: str, iteration: int, manifest: dict, out: str, topology: dict) -> None:
    """Write checkpoint ``out`` with the files of ``root``'s iteration ``iteration`` unchanged (each
    verified against ``manifest``, then hard-linked, or copied across filesystems) and ``topology``
    in its manifest: a torch_dist checkpoint whose weights a converter keeps bit for bit."""
    final, staging = _new_output(root, out, iteration)
    src = checkpoint_dir(root, iteration)
    for name, entry in sorted(manifest["files"].items()):
        path, dst = os.path.join(src, name), os.path.join(staging, name)
        why = verify_file(path, entry)
        if why:
            raise CheckpointError(why)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.link(path, dst)
        except OSError:
            shutil.copyfile(path, dst)
    publish(out, iteration, staging, final, {**manifest, "topology": topology})


def rewrite_checkpoint(root: str, iteration: int, manifest: dict, out: str, topology: dict, edit) -> None:
    """Write checkpoint ``out`` (iteration ``iteration``, same rank files and layout as ``root``):
    each rank file of ``root``, verified against ``manifest``, passed through ``edit(state, path)``
    (in place) and saved with ``topology``. ``out`` must not hold a checkpoint yet."""
    final, staging = _new_output(root, out, iteration)
    files = {}
    src = checkpoint_dir(root, iteration)
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(src, name)
        state = load_verified(path, entry)
        edit(state, path)
        state["topology"] = topology
        dst = os.path.join(staging, name)
        atomic_torch_save(state, dst)
        files[name] = {"bytes": os.path.getsize(dst), "sha256": sha256(dst)}
    publish(out, iteration, staging, final,
                {"format": FORMAT, "iteration": iteration, "topology": topology, "files": files})


def load_full_model(root: str, iteration: Optional[int] = None) -> tuple[dict, dict, int]:
    """``(state, topology, iteration)``: the unsharded model weights of the checkpoint in ``root``
    (the latest one, or ``iteration``), after verifying every rank file against the manifest."""
    iteration = latest_iteration(root, iteration)
    man = read_manifest(root, iteration)
    require_per_rank(root, man)
    topo = man["topology"]
    if "info" not in topo:
        raise CheckpointError(f"{root} (iteration {iteration}): written before conversion support; re-save it")
    model, layout = topo["model"], topo["layout"]
    pp, vpp = layout["pp"], layout["vpp"] or 1
    per_chunk = model["num_layers"] // (pp * vpp)
    num_experts = model["num_experts"] or 0
    local_experts = num_experts // layout["ep"] if num_experts else 0
    if topo["info"].get("moe_grouped_gemm"):
        raise CheckpointError(f"{root}: grouped-GEMM experts (--moe-grouped-gemm) in per-rank files (--ckpt-format "
                              "torch) are not supported by the converter; save with --ckpt-format torch_dist")
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    d = checkpoint_dir(root, iteration)
    for name, entry in sorted(man["files"].items()):
        path = os.path.join(d, name)
        state = load_verified(path, entry)
        c = state["coords"]
        for v, sd in enumerate(state["model"]):
            for key, t in sd.items():
                key = _strip(key)
                if not torch.is_tensor(t) or "_extra_state" in key:
                    continue
                key, expert = _global_name(key, v, pp, c["pp"], per_chunk, c["ep"], local_experts, where=path)
                shard = c["etp"] if expert else c["tp"]
                pieces.setdefault(key, {}).setdefault(shard, t)
    gated = bool(model["swiglu"])
    full = {k: merge_shards(k, [s[i] for i in sorted(s)], gated) for k, s in pieces.items()}
    if not model["untie"]:  # the last stage's copy of a tied embedding (PP > 1) is the embedding
        full.pop("output_layer.weight", None)
    return full, topo, iteration


def split_shard(name: str, full: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    """This TP rank's shard of the unsharded ``full`` (the inverse of :func:`merge_shards`)."""
    if tp == 1:
        return full
    if _FC1.search(name) and gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
    if _COL.search(name) or _FC1.search(name):
        return full.chunk(tp, dim=0)[rank]
    if _ROW.search(name):
        return full.chunk(tp, dim=1)[rank]
    return full


def local_model_state(full: dict, chunk_keys: list, *, pp: int, pp_rank: int, vpp: int, num_layers: int,
                      ep_rank: int, local_experts: int, tp: int, tp_rank: int, etp: int, etp_rank: int,
                      gated: bool, tied: bool) -> list:
    """Per model chunk (virtual stage ``v``): ``{key: tensor}`` for the keys of that chunk's state
    dict, cut from the unsharded ``full`` (see :func:`load_full_model`) for this rank's place in the
    layout — the weights of a checkpoint written at any TP/PP/EP, for a run at another one."""
    per_chunk = num_layers // (pp * vpp)
    out = []
    for v, keys in enumerate(chunk_keys):
        sd = {}
        for key in keys:
            name = _strip(key)
            if "_extra_state" in name:
                continue
            name, expert = _global_name(name, v, pp, pp_rank, per_chunk, ep_rank, local_experts, where="this run")
            t_tp, t_rank = (etp, etp_rank) if expert else (tp, tp_rank)
            src = "embedding.word_embeddings.weight" if tied and name == "output_layer.weight" else name
            if src not in full:
                raise CheckpointError(f"{key}: not in the checkpoint's model (it has {len(full)} tensors)")
            sd[key] = split_shard(src, full[src], t_tp, t_rank, gated).clone()
        out.append(sd)
    return out
