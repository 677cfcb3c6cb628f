"""Row/column/Frobenius norms, sphere retraction and softplus gains on local tensors.

Rows are output neurons (norm over d_in, ``dim=-1``), columns input features (norm over
d_out, ``dim=-2``). Sharded versions of these reductions live in ``megatron_md.shard``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: softplus⁻¹(1) = log(e − 1): the gain parameter whose softplus is exactly 1.
UNIT_GAIN = math.log(math.e - 1.0)


def row_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def col_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-2)


def fro_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


def sphere_retract(x: torch.Tensor, radius: float | torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``x ← radius · x / norm`` in place (``norm`` = ‖x‖_F, computed by the caller so a
    sharded caller can pass the all-reduced value)."""
    return x.mul_(radius / norm)


def softplus(g: torch.Tensor) -> torch.Tensor:
    return F.softplus(g)


def inv_softplus(s: torch.Tensor | float) -> torch.Tensor:
    """``softplus⁻¹(s) = log(exp(s) − 1)``, computed stably (``s + log(−expm1(−s))``)."""
    s = torch.as_tensor(s, dtype=torch.float32) if not torch.is_tensor(s) else s
    return s + torch.log(-torch.expm1(-s))
