"""Optimizer telemetry in the driver: ``--log-optimizer-stats-interval K`` and ``--log-jsonl``.

Every ``K`` iterations (off by default) :class:`OptimizerTelemetry` records, for every hidden
matrix of the model (Q, K and V separately, each expert separately), the effective learning
rate ``η_eff = ‖ŵ_{t+1} − ŵ_t‖_F``, ``‖w‖_F``, ``‖u‖_F`` (the applied update) and ``cos(u, w)``
(:mod:`megatron_md.telemetry`), plus the MD gain statistics (AdamMD/MuonMD), the RMNP
row-vs-Newton–Schulz distance and ``V Vᵀ`` diagonal dominance on the first
``--log-optimizer-stats-samples`` matrices of each rank's optimizer, and, for ``--optimizer
adam`` with weight decay, AdamW's equilibrium predictions. Values are exact under TP, EP,
ZeRO-1, layer-wise DP and PP: the step statistics are computed on the *model* parameters
(whole TP shards after Megatron's copy/all-gather of the updated weights) with their TP
layouts, the gain and RMNP statistics on the optimizer's own shards; rank 0 collects them
(one ``gather_object``) and prints one console line with the means per layer type, writes a
``{"event": "optimizer_stats"}`` JSONL record with every matrix, and TensorBoard scalars.

Cost: on a telemetry iteration one copy of the model's hidden matrices (the weights before
the step), a few reductions per matrix, and for RMNP one gathered Newton–Schulz per sampled
matrix; other iterations do nothing (``benchmarks/telemetry_cost.py``). Reading never changes
the training trajectory (tested bit for bit). With ``--overlap-param-gather`` the step leaves
only this rank's shard of each weight updated until the next forward pass, so a telemetry step
all-gathers the weights right after the step (:func:`~megatron_md.training.model.sync_params`;
the next forward then has nothing left to gather).

:class:`JsonlLog` is the run's machine-readable log: ``train``, ``valid``,
``optimizer_stats`` and ``summary`` events, one JSON object per line (``tools/plot_run.py``,
``tools/sweep.py`` read it).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from .. import telemetry as tm

__all__ = ["OptimizerTelemetry", "JsonlLog", "layer_type", "STATS_EVENT"]

STATS_EVENT = "optimizer_stats"


# ----------------------------------------------------------------------------- names
def layer_type(name: str) -> str:
    """Aggregation key of a matrix record name (``decoder.layers.3.self_attention.linear_qkv.weight/q``)."""
    block = name.rsplit("/", 1)[1] if "/" in name else ""
    if "linear_qkv" in name:
        return f"attn_{block}" if block in ("q", "k", "v") else "attn_qkv"
    if "linear_proj" in name:
        return "attn_proj"
    if "router" in name:
        return "router"
    expert = "experts" in name
    if re.search(r"linear_fc1|weight1\b", name):
        return "expert_fc1" if expert else "mlp_fc1"
    if re.search(r"linear_fc2|weight2\b", name):
        return "expert_fc2" if expert else "mlp_fc2"
    return "other"


def _global_names(model_chunks) -> dict[int, str]:
    """Global name of every decoder-layer parameter, ``id(param) → name``: layer numbers are
    global under pipeline parallelism (``layer.layer_number``) and expert indices global under
    expert parallelism (local index + EP rank × local experts)."""
    from .model import unwrap
    out = {}
    off = _expert_offset(model_chunks)
    for chunk in model_chunks:
        for layer in unwrap(chunk).decoder.layers:
            prefix = f"decoder.layers.{layer.layer_number - 1}."
            for n, p in layer.named_parameters():
                n = re.sub(r"experts\.local_experts\.(\d+)\.", lambda m: f"experts.{int(m.group(1)) + off}.", n)
                n = re.sub(r"(experts\.linear_fc[12]\.weight)(\d+)$", lambda m: f"{m.group(1)}{int(m.group(2)) + off}", n)
                out[id(p)] = prefix + n
    return out


def _block_labels(name: str, layout, expert_offset: int) -> list[Optional[str]]:
    views = getattr(layout, "views", None)
    if views is None:
        return [None]
    if name.endswith("linear_qkv.weight") and len(views) == 3:
        return ["q", "k", "v"]
    if name.endswith("linear_fc1.weight") and len(views) == 2:
        return ["gate", "up"]
    return [f"expert{expert_offset + e}" for e in range(len(views))]


def _expert_offset(model_chunks) -> int:
    from megatron.core import parallel_state as ps

    from .model import unwrap
    n_exp = getattr(unwrap(model_chunks[0]).config, "num_moe_experts", None) or 0
    if not n_exp:
        return 0
    return ps.get_expert_model_parallel_rank() * (n_exp // ps.get_expert_model_parallel_world_size())


def _local_matrix(p, layout, model_chunks):
    """``(tensor, layout)`` this rank reads a matrix's step from: the model parameter and its TP
    layout, or under FSDP2 its local rows (flattened, on the parameter's storage) as the row-aligned
    flat range the optimizer binds (:func:`megatron_md.megatron.builder.fsdp_layout`)."""
    from ..megatron import fsdp
    if not fsdp.is_dtensor(p):
        return p, layout
    from ..megatron.builder import fsdp_layout
    from ..megatron.routing import is_expert
    group = fsdp.dp_group_of(model_chunks, expert=is_expert(p))
    return p._local_tensor.detach().view(-1), fsdp_layout(layout, fsdp.row_range(p, group), group)


def _views(layout):
    return [(v.shard, v.get) for v in layout.views] if hasattr(layout, "views") else [(layout, lambda t: t)]


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- telemetry
class OptimizerTelemetry:
    """Per-matrix step statistics every ``interval`` iterations (see module docstring).

    Use: ``due(it)`` before the step of iteration ``it``; if due, ``before_step()``, then the
    step, then ``after_step(it)`` on every rank (collectives) — it returns the record on rank 0
    (None elsewhere, and None when the step was skipped: pass ``ok``)."""

    def __init__(self, args, model_chunks, optimizer):
        from ..megatron.builder import hybrid_optimizers, model_matrices
        from ..megatron.routing import named_params
        self.model_chunks = model_chunks
        self.interval = int(args.log_optimizer_stats_interval)
        self.samples = int(args.log_optimizer_stats_samples)
        self.optimizer = optimizer
        self.hybrids = hybrid_optimizers(optimizer)
        gnames = _global_names(model_chunks)
        self._offset = _expert_offset(model_chunks)
        self._gname = {n: gnames.get(id(p), n) for n, p in named_params(model_chunks)}
        self.matrices = [(self._gname[n], *_local_matrix(p, lay, model_chunks)) for n, p, lay in
                         model_matrices(model_chunks, router_on_matrix=args.md.router_on_matrix)]
        self._adamw = (args.optimizer == "adam" and args.weight_decay > 0, args.weight_decay, args.adam_beta1)
        self._prev: Optional[list] = None

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    @torch.no_grad()
    def before_step(self) -> None:
        self._prev = [p.detach().clone() for _, p, _ in self.matrices]

    @torch.no_grad()
    def after_step(self, iteration: int, ok: bool, lr: float) -> Optional[dict]:
        from .model import sync_params
        prev, self._prev = self._prev, None
        if prev is None or not ok:
            return None
        sync_params(self.model_chunks)  # overlapped param gather: the updated weights of every shard
        local: dict[str, dict] = {}
        for (name, p, lay), before in zip(self.matrices, prev):
            labels = _block_labels(name, lay, self._offset)
            for label, (shard, get) in zip(labels, _views(lay)):
                rec = tm.matrix_step_stats(shard, get(before), get(p.detach()))
                rec["numel"] = shard.d_out * shard.d_in
                local[name + (f"/{label}" if label else "")] = rec
        del prev
        self._method_stats(local)
        return self._collect(iteration, lr, local)

    def _method_stats(self, local: dict) -> None:
        from ..optim import RMNP
        from ..optim.md import _MD
        for h in self.hybrids:
            mo = h.matrix_optimizer
            if mo is None or not isinstance(mo, (_MD, RMNP)):
                continue
            sampled = 0
            for g in mo.param_groups:
                for p in g["params"]:
                    name = self._gname.get(h.matrix_names.get(p), h.matrix_names.get(p, "?"))
                    labels = _block_labels(name, mo.layout(p), self._offset)
                    for label, m in zip(labels, mo.mats_of(p, g)):
                        key = name + (f"/{label}" if label else "")
                        if isinstance(mo, _MD):
                            extra = tm.gain_stats(m.shard, m.vec["g_r"], m.vec["g_c"])
                        elif sampled < self.samples:
                            sampled += 1
                            extra = tm.rmnp_diagnostics(m.shard, m.get(m.state["momentum_buffer"]), eps=g["eps"])
                        else:
                            continue
                        # split-QKV keys differ from an unsplit optimizer layout: keep both readable
                        local.setdefault(key, {}).update(extra)

    def _collect(self, iteration: int, lr: float, local: dict) -> Optional[dict]:
        if dist.is_initialized() and dist.get_world_size() > 1:
            got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(local, got, dst=0)
            if dist.get_rank() != 0:
                return None
        else:
            got = [local]
        merged: dict[str, dict] = {}
        for part in got:
            for k, v in part.items():
                merged.setdefault(k, {}).update({kk: vv for kk, vv in v.items() if kk not in merged.get(k, {})})
        mats = dict(sorted(merged.items()))
        on, wd, beta1 = self._adamw
        pred = None
        if on:
            pred = tm.adamw_equilibrium(lr, wd, beta1, 1)
            for r in mats.values():
                if "numel" in r:
                    r["pred_w_norm"] = tm.adamw_equilibrium(lr, wd, beta1, r["numel"])["w_norm"]
        by_type: dict[str, dict] = defaultdict(lambda: defaultdict(list))
        for k, r in mats.items():
            for kk, vv in r.items():
                if kk != "numel":
                    by_type[layer_type(k)][kk].append(vv)
        types = {t: {kk: _mean(vs) for kk, vs in d.items()} for t, d in sorted(by_type.items())}
        keys = {kk for r in mats.values() for kk in r if kk not in ("numel",)}
        overall = {kk: _mean([r.get(kk) for r in mats.values()]) for kk in sorted(keys)}
        rec = {"event": STATS_EVENT, "iteration": iteration, "lr": lr, "overall": overall, "by_type": types,
               "matrices": mats}
        if pred is not None:
            rec["adamw_equilibrium"] = {"eta_eff": pred["eta_eff"], "transient_steps": pred["transient_steps"],
                                        "w_norm_over_pred": _mean([r["w_norm"] / r["pred_w_norm"] for r in mats.values()
                                                                   if "pred_w_norm" in r])}
        return rec

    # -------------------------------------------------------------------------- output
    @staticmethod
    def format_line(rec: dict) -> str:
        o, t = rec["overall"], rec["by_type"]
        parts = [f" optimizer stats {rec['iteration']:>7} | eta_eff {o['eta_eff']:.3e} ("
                 + ", ".join(f"{k} {v['eta_eff']:.2e}" for k, v in t.items() if "eta_eff" in v) + ")",
                 f"|w| {o['w_norm']:.3f}", f"|u| {o['u_norm']:.3e}", f"cos(u,w) {o['cos_uw']:+.3f}"]
        if "gain_row_mean" in o:
            parts.append(f"gains row {o['gain_row_mean']:.3f}±{o['gain_row_std']:.3f} "
                         f"col {o['gain_col_mean']:.3f}±{o['gain_col_std']:.3f}")
        if "row_vs_ns" in o:
            parts.append(f"rmnp |U_NS-U_row|/|U_NS| {o['row_vs_ns']:.3f} (matched {o['row_vs_ns_matched']:.3f}) dd avg {o['dd_avg']:.2f} "
                         f"min {o['dd_min']:.2f} max {o['dd_max']:.2f}")
        if "adamw_equilibrium" in rec:
            e = rec["adamw_equilibrium"]
            parts.append(f"AdamW equilibrium: eta_eff {e['eta_eff']:.3e}, |w|/|w_inf| {e['w_norm_over_pred']:.3f}, "
                         f"transient {e['transient_steps']:.0f} steps")
        return " | ".join(parts)

    @staticmethod
    def write_tensorboard(writer, rec: dict) -> None:
        it = rec["iteration"]
        for k, v in rec["overall"].items():
            writer.add_scalar(f"optimizer-stats/{k}", v, it)
        for t, d in rec["by_type"].items():
            for k, v in d.items():
                writer.add_scalar(f"optimizer-stats/{k}/{t}", v, it)
        if "adamw_equilibrium" in rec:
            writer.add_scalar("optimizer-stats/eta_eff/adamw_prediction", rec["adamw_equilibrium"]["eta_eff"], it)


class JsonlLog:
    """Append-only JSON-lines log written by rank 0 (no-op elsewhere or without a path)."""

    def __init__(self, path: Optional[str]):
        self._fh = None
        if path and (not dist.is_initialized() or dist.get_rank() == 0):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, obj: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(obj, allow_nan=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
