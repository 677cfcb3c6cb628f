"""``tools/convert_checkpoint.py reshard``: a checkpoint at another TP/PP/EP/DP layout (or format),
optimizer state included — a thin front end to the driver.

The driver's ``--load`` of a ``torch_dist`` checkpoint already reshards the model and every
optimizer state (:mod:`megatron_md.checkpoint.dist`); a run with nothing left to train
(``--train-iters`` = the checkpoint's iteration) writes the loaded state at its own layout and
``--ckpt-format`` and stops. This module builds that run's command line from the checkpoint's
manifest (model shape, optimizer, QKV split, precision) plus the target layout, and runs it
with ``torchrun``. A ``torch`` (per-rank) source is resharded for its weights only (the driver's
weights-only load at another layout); its optimizer state needs the same layout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence

from ..errors import CheckpointError
from .integrity import read_latest, read_manifest
from .merge import latest_iteration

__all__ = ["driver_flags", "reshard", "run_driver", "driver_command", "DRIVER"]

#: the driver a conversion runs (the dense entry point builds MoE models too, from --num-experts)
DRIVER = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "pretrain_gpt.py"))


def driver_flags(topology: dict, tp: int) -> list[str]:
    """The model and optimizer flags of the run that wrote ``topology`` (a manifest's), for a
    run at tensor-parallel size ``tp`` that must build the same model."""
    m, info, opt = topology["model"], topology.get("info", {}), topology["optim"]
    if not info:
        raise CheckpointError("the checkpoint was written before conversion support (no model info); re-save it")
    padded = m["padded_vocab_size"]
    if padded % tp:
        raise CheckpointError(f"--tensor-model-parallel-size {tp}: the padded vocabulary of {padded} rows does not "
                              "split evenly")
    f = ["--num-layers", m["num_layers"], "--hidden-size", m["hidden_size"],
         "--num-attention-heads", m["num_attention_heads"], "--num-query-groups", m["num_query_groups"],
         "--ffn-hidden-size", m["ffn_hidden_size"], "--normalization", m["normalization"],
         "--position-embedding-type", m["position_embedding_type"],
         "--max-position-embeddings", m["max_position_embeddings"], "--seq-length", info["seq_length"],
         # the same padded vocabulary at any TP: pad to a multiple of exactly `padded`
         "--vocab-size", info["vocab_size"], "--make-vocab-size-divisible-by", padded // tp,
         "--transformer-impl", info.get("transformer_impl") or "local", "--optimizer", opt["optimizer"]]
    if m.get("kv_channels"):
        f += ["--kv-channels", m["kv_channels"]]
    f += ["--swiglu"] if m["swiglu"] else []
    f += ["--untie-embeddings-and-output-weights"] if m["untie"] else []
    f += [] if m["bias_linear"] else ["--disable-bias-linear"]
    if m.get("norm_epsilon", 1e-5) != 1e-5:
        f += ["--norm-epsilon", repr(m["norm_epsilon"])]
    if m.get("rotary_base"):
        f += ["--rotary-base", m["rotary_base"]]
    if m.get("num_experts"):
        f += ["--num-experts", m["num_experts"], "--moe-ffn-hidden-size", m["moe_ffn_hidden_size"],
              "--moe-router-topk", m["moe_router_topk"]]
        f += ["--moe-router-pre-softmax"] if m.get("moe_router_pre_softmax") else []
        if m.get("moe_shared_expert_intermediate_size"):
            f += ["--moe-shared-expert-intermediate-size", m["moe_shared_expert_intermediate_size"]]
    if m.get("multi_latent_attention"):
        f += ["--multi-latent-attention"]
        for key in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if m.get(key) is not None:  # no --q-lora-rank: the query is one projection
                f += ["--" + key.replace("_", "-"), m[key]]
    f += ["--qk-layernorm"] if m.get("qk_layernorm") else []
    f += ["--embedding-multiplier", repr(m["embedding_multiplier"])] if m.get("embedding_multiplier") else []
    f += ["--post-norm"] + ([] if m.get("post_norm_gain", True) else ["--no-post-norm-gain"]) if m.get("post_norm") else []
    f += ["--fixed-layer-scale", repr(m["fixed_layer_scale"])] if m.get("fixed_layer_scale") else []
    if opt.get("split_qkv") is False:
        f += ["--no-split-qkv"]
    f += ["--split-fc1"] if opt.get("split_fc1") else []
    f += {"bf16": ["--bf16"], "fp16": ["--fp16"]}.get(opt.get("precision"), [])
    return [str(x) for x in f]


def reshard(load: str, save: str, *, nproc: int, layout: Sequence[str] = (), ckpt_format: str = "torch_dist",
            iteration: Optional[int] = None, extra: Sequence[str] = (), dry_run: bool = False) -> list[str]:
    """Run the driver on ``nproc`` ranks with ``layout`` (e.g. ``["--tensor-model-parallel-size", "2"]``)
    to write checkpoint ``iteration`` of ``load`` into ``save``; returns the command."""
    it = latest_iteration(load, iteration)
    man = read_manifest(load, it)
    if os.path.abspath(save) == os.path.abspath(load) or read_latest(save) is not None:
        raise CheckpointError(f"--save {save}: already a checkpoint directory; choose a new one (nothing is overwritten)")
    tp = 1
    lay = list(layout)
    if "--tensor-model-parallel-size" in lay:
        tp = int(lay[lay.index("--tensor-model-parallel-size") + 1])
    weights_only = man.get("ckpt_format") != "torch_dist"
    cmd = driver_command(
        nproc, *driver_flags(man["topology"], tp), *lay,
        # the LR schedule and every optimizer hyperparameter come from the checkpoint
        "--lr", "1e-3", "--micro-batch-size", "1", "--mock-data", "--eval-iters", "0", "--log-interval", "1",
        "--load", load, "--ckpt-step", str(it), "--train-iters", str(it), "--save", save,
        "--ckpt-format", ckpt_format, *(["--no-load-optim"] if weights_only else []), *extra)
    if dry_run:
        return cmd
    run_driver(cmd, "resharding", save, it)
    return cmd


def driver_command(nproc: int, *flags: str) -> list[str]:
    """The command line of a conversion's driver run: ``torchrun --standalone`` on ``nproc`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), DRIVER,
            *flags]


def run_driver(cmd: Sequence[str], what: str, save: str, iteration: int) -> None:
    """Run a conversion's driver command in a fresh torchrun world (not the caller's, if it runs
    inside one); a :class:`CheckpointError` with the driver's own error lines if it fails or writes
    no checkpoint of ``iteration`` into ``save``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "ROLE_RANK") and not k.startswith("TORCHELASTIC_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        said = [ln for ln in lines if "error:" in ln and "ChildFailedError" not in ln]
        tail = "\n".join(dict.fromkeys(said)) or "\n".join(lines[-12:])
        raise CheckpointError(f"the {what} run failed (exit {proc.returncode}):\n{tail}")
    if read_latest(save) != iteration:
        raise CheckpointError(f"the {what} run wrote no checkpoint of iteration {iteration} into {save}")
