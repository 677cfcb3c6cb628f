"""Which parameters get the matrix optimizer and which its Adam-family partner.

Declarative, ordered rules; the first match wins. ``ndim == 2`` alone never decides what an
embedding or output head is: an ``nn.Embedding`` weight is 2-D and must not be
orthogonalized, nor may a tied or named output head.

Roles: ``matrix`` (hidden 2-D weights of attention/MLP → matrix optimizer), ``embedding``,
``output`` (output head), ``vector`` (norms, biases, other 1-D) and ``other`` (anything no
rule recognizes, e.g. a raw 3-D ``nn.Parameter``: routed to the partner, never guessed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

#: leaf module names that denote an output head in common GPT code bases
OUTPUT_HEAD_NAMES = ("lm_head", "output_layer", "output", "head", "classifier", "embed_out")

Matcher = Callable[[str, nn.Parameter, nn.Module], bool]


@dataclass(frozen=True)
class Rule:
    """``match(param_name, param, owning_module) -> bool``; first matching rule gives the role."""

    description: str
    role: str
    match: Matcher


def _leaf(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else ""


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("weight of an nn.Embedding", "embedding", lambda n, p, m: isinstance(m, nn.Embedding)),
    Rule("Megatron embedding/output attribute", "output",
         lambda n, p, m: bool(getattr(p, "is_embedding_or_output_parameter", False))),
    Rule("output head by module name", "output", lambda n, p, m: _leaf(n) in OUTPUT_HEAD_NAMES),
    Rule("1-D or 0-D (norm, bias, gain)", "vector", lambda n, p, m: p.ndim < 2),
    Rule("weight of an nn.Linear", "matrix", lambda n, p, m: isinstance(m, nn.Linear) and n.endswith("weight")),
    Rule("anything else", "other", lambda n, p, m: True),
)

ROLES = ("matrix", "embedding", "output", "vector", "other")


def classify(model: nn.Module, rules: Sequence[Rule] = DEFAULT_RULES) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Map each role to its ``(name, param)`` list. Tied parameters appear once, under the
    first module that owns them (so a head tied to the embedding is an embedding)."""
    out: dict[str, list] = {r: [] for r in ROLES}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{pname}" if mod_name else pname
            role = next(r.role for r in rules if r.match(full, p, mod))
            if role not in out:
                raise ValueError(f"routing rule gave unknown role {role!r} for {full}")
            out[role].append((full, p))
    return out
