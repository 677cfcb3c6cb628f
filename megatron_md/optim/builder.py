"""Build a matrix optimizer + its Adam-family partner for a plain PyTorch model.

``build_optimizer(model, "muon-md", lr=0.01, adam_lr=3e-3)`` routes parameters with
:func:`megatron_md.optim.routing.classify` and returns an :class:`OptimizerSet` that steps
both (skipping the whole step, in both, when any gradient is non-finite). The Megatron
builder lives in ``megatron_md.megatron``.
"""
from __future__ import annotations

from typing import Any

import torch

from .hyperball import AdamH, MuonH
from .md import AdamMD, MuonMD
from .muon import Muon, NorMuon
from .rmnp import RMNP
from .schedule_free import SFAdamW, SFNorMuon
from .base import nonfinite_flag
from .routing import DEFAULT_RULES, classify

MATRIX_OPTIMIZERS = {
    "muon": Muon, "normuon": NorMuon, "rmnp": RMNP, "adamh": AdamH, "muonh": MuonH,
    "adam-md": AdamMD, "muon-md": MuonMD, "sf-normuon": SFNorMuon,
}
ELEMENTWISE = ("adam", "adamw", "sf-adamw")
OPTIMIZER_NAMES = tuple(ELEMENTWISE) + tuple(MATRIX_OPTIMIZERS)


class OptimizerSet:
    """Several optimizers stepped as one; the step is all-or-nothing on non-finite grads."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.skipped_steps = 0
        for opt in optimizers.values():
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        if nonfinite_flag(self.param_groups).item() > 0:
            self.skipped_steps += 1
            return
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def set_lr_factor(self, factor: float) -> None:
        """Every group's lr ← base_lr × factor (MD gains follow: they keep their ratio to lr)."""
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * factor

    def train(self) -> None:
        for o in self.optimizers.values():
            if hasattr(o, "train"):
                o.train()

    def eval(self) -> None:
        for o in self.optimizers.values():
            if hasattr(o, "eval"):
                o.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, **{k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        for k, o in self.optimizers.items():
            o.load_state_dict(sd[k])


def fused_adamw_kwargs() -> dict:
    """``torch.optim.AdamW`` keywords of the Adam partner: the fused kernel where this torch has
    it for CPU and CUDA (torch >= 2.4: about 5× the foreach path on CPU, the same update), else
    the foreach path (torch's CPU default is the per-tensor loop)."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}
    return {"fused": True}


def build_optimizer(model: torch.nn.Module, name: str, *, lr: float, adam_lr: float | None = None,
                    weight_decay: float = 0.0, adam_weight_decay: float | None = None,
                    adam_betas=(0.9, 0.95), adam_eps: float = 1e-8, rules=DEFAULT_RULES,
                    **matrix_kwargs) -> OptimizerSet:
    """Route ``model``'s parameters and build ``name`` (see ``OPTIMIZER_NAMES``).

    * ``adam``/``adamw``: torch AdamW on everything (``weight_decay`` on ≥2-D params, 0 on vectors).
    * ``sf-adamw``: SF-AdamW on everything.
    * matrix methods: the method on ``matrix`` params (``lr``, ``weight_decay`` where it has
      one, ``matrix_kwargs``); AdamW (SF-AdamW for ``sf-normuon``) on embeddings, output head,
      vectors and unrecognized params at ``adam_lr`` (default ``lr``), with
      ``adam_weight_decay`` (default ``weight_decay``) on 2-D ones and 0 on vectors. MD's
      gains run at ``adam_lr`` unless ``gains_lr`` is given.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"optimizer={name!r}: expected one of {OPTIMIZER_NAMES}")
    roles = classify(model, rules)
    adam_lr = lr if adam_lr is None else adam_lr
    adam_wd = weight_decay if adam_weight_decay is None else adam_weight_decay

    def partner_groups(names, lr_, wd):
        params = [p for r in names for _, p in roles[r]]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return [g for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
                if g["params"]]

    if name in ("adam", "adamw"):
        groups = partner_groups(ROLES_ALL, lr, weight_decay)
        return OptimizerSet({"adamw": torch.optim.AdamW(groups, lr=lr, betas=adam_betas, eps=adam_eps, **fused_adamw_kwargs())})
    if name == "sf-adamw":
        groups = partner_groups(ROLES_ALL, lr, weight_decay)
        return OptimizerSet({"sf-adamw": SFAdamW(groups, lr=lr, **matrix_kwargs)})

    cls = MATRIX_OPTIMIZERS[name]
    matrix = [p for _, p in roles["matrix"]]
    if not matrix:
        raise ValueError(f"optimizer={name!r}: the model has no hidden 2-D matrices (nn.Linear weights) to route to it")
    kw = dict(matrix_kwargs)
    if cls in (AdamMD, MuonMD) and kw.get("gains_lr") is None:
        kw["gains_lr"] = adam_lr  # MD's gains at the partner (base) LR, as the MD paper
    if weight_decay and cls not in (AdamH, MuonH, AdamMD, MuonMD):
        kw["weight_decay"] = weight_decay
    opts = {name: cls(matrix, lr=lr, **kw)}
    rest = partner_groups(("embedding", "output", "vector", "other"), adam_lr, adam_wd)
    if rest:
        if name == "sf-normuon":
            opts["sf-adamw"] = SFAdamW(rest, lr=adam_lr)
        else:
            opts["adamw"] = torch.optim.AdamW(rest, lr=adam_lr, betas=adam_betas, eps=adam_eps, **fused_adamw_kwargs())
    return OptimizerSet(opts)


ROLES_ALL = ("matrix", "embedding", "output", "vector", "other")
