"""What one optimizer step does, read off the product's own optimizer classes.

The cost model (:mod:`megatron_md.planning.cost`) must not re-derive what each method's step
communicates: :func:`trace_method` builds the real optimizer class (``MATRIX_OPTIMIZERS``, with
the constructor keywords of a default :class:`~megatron_md.megatron.config.MDConfig`) over two
small matrices in one process — a plain one and a fused QKV (:func:`~megatron_md.shard.fused_qkv`
blocks, as the builder makes them) — whose shards record every reduction the step asks for,
and takes its second step (construction and first-step work excluded). It returns:

* the **reduction program**: for each bucketed flush (one collective per process group in a
  sharded run, :class:`~megatron_md.shard.Reductions`), the reductions of each matrix — kind
  ``row`` / ``col`` / ``total`` and the number of values of a ``total``;
* the Newton–Schulz steps per matrix (from the instance's resolved coefficients);
* the **state** per weight: bytes of parameter-shaped state per element, and the row / column
  vector state per row / column (measured on the instance's ``state``);
* **elementwise passes**: the number of tensors of the matrix's size that the step's aten ops
  write (a measure of elementwise FLOPs and memory traffic per element).

Not traced: anything whose cost depends on the layout (that is the shard's business, computed by
the cost model from the layout), and work outside the matrix optimizer (the Adam partner).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import resolve_coefficients
from ..shard import Whole, fused_qkv
from ..shard.layouts import Plan

#: the plain matrix and the fused QKV of the trace (sizes chosen so that no two of matrix
#: numel, rows and columns coincide)
_PLAIN = (24, 40)
_QKV = dict(num_query_groups=2, heads_per_group=2, head_dim=6, d_in=40)


@dataclass(frozen=True)
class Reduction:
    """One reduction of one matrix: ``kind`` in row/col/total, ``values`` for a total."""

    matrix: str   # "plain" or "qkv<b>" (block b of a fused QKV)
    kind: str
    values: int = 1


@dataclass(frozen=True)
class MethodTrace:
    """See module docstring."""

    name: str
    flushes: tuple[tuple[Reduction, ...], ...]
    ns_steps: int           # 0: no Newton–Schulz
    state_bytes_per_element: float
    state_per_row: float    # vector state elements per row (fp32)
    state_per_col: float
    elementwise_passes: int

    def program(self, matrix: str) -> list[list[Reduction]]:
        """The reductions of one matrix kind per flush (``plain``, or ``qkv`` for the blocks of a
        fused QKV: block index kept in ``Reduction.matrix``)."""
        return [[r for r in f if r.matrix == matrix or (matrix == "qkv" and r.matrix.startswith("qkv"))]
                for f in self.flushes]


class _Recorder(Whole):
    """A Whole shard whose reductions are logged (kind, values) and whose finishing marks the
    flush they were completed in."""

    def __init__(self, shape, label, log):
        super().__init__(shape)
        self.label, self.log = label, log

    def _wrap(self, plan: Plan, kind: str, values: int = 1) -> Plan:
        log, label = self.log, self.label
        if not log["on"]:
            return plan
        entry = Reduction(label, kind, values)

        def finish(v, fin=plan.finish):
            log["events"].append(("done", entry))
            return v if fin is None else fin(v)
        log["events"].append(("add", entry))
        return Plan(plan.partial, plan.groups, finish)

    def row_plan(self, x, square=False):
        return self._wrap(super().row_plan(x, square), "row")

    def col_plan(self, x, square=False):
        return self._wrap(super().col_plan(x, square), "col")

    def total_plan(self, xs, square=False):
        return self._wrap(super().total_plan(xs, square), "total", len(xs))


class _Passes(TorchDispatchMode):
    """Counts tensors of ``numel`` elements written by aten ops (matmuls excluded)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if "mm" not in name:
            # in-place ops (foreach ones return nothing) write their first argument
            written = args[0] if name.endswith("_") and args else out
            for t in (written if isinstance(written, (list, tuple)) else [written]):
                if isinstance(t, torch.Tensor) and t.numel() == self.numel:
                    self.count += 1
        return out


def _flushes(events) -> tuple:
    """Group the finished reductions into flushes: a flush is a run of consecutive 'done' events."""
    out, cur, last = [], [], None
    for what, entry in events:
        if what == "done":
            if last != "done" and cur:
                out.append(tuple(cur))
                cur = []
            cur.append(entry)
        last = what
    if cur:
        out.append(tuple(cur))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def trace_method(name: str, *, sphere: str = "frobenius") -> MethodTrace:
    """Trace the matrix method ``name`` (an ``--optimizer`` value with a matrix method); see the
    module docstring. ``sphere="rows"``: AdamMD as MD's output-head optimizer."""
    from ..megatron.config import MDConfig
    from ..optim.builder import MATRIX_OPTIMIZERS

    cls = MATRIX_OPTIMIZERS[name]
    kwargs = MDConfig(optimizer=name).matrix_kwargs()
    if name in ("adam-md", "muon-md"):
        kwargs["init"] = "project"
    if sphere != "frobenius":
        kwargs["sphere"] = sphere
    if kwargs.get("ns_dtype", 0) is None:
        kwargs["ns_dtype"] = torch.float32
    log = {"on": False, "events": []}
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Parameter(torch.randn(*_PLAIN, generator=gen))
    blocks = fused_qkv(**_QKV)
    for b, v in enumerate(blocks.views):
        v.shard = _Recorder(v.shard.shape, f"qkv{b}", log)
    qkv = torch.nn.Parameter(torch.randn(*blocks.local_shape, generator=gen))
    shards = {plain: _Recorder(_PLAIN, "plain", log), qkv: blocks}
    opt = cls([plain, qkv], shards=shards, **kwargs)
    opt.check_finite = False
    for p in (plain, qkv):
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    log["on"] = True
    passes = _Passes(plain.numel())
    with passes:
        opt.step()
    log["on"] = False
    g = opt.param_groups[0]
    steps = len(resolve_coefficients(g["ns_coefficients"], g["ns_steps"])) if getattr(opt, "uses_ns", False) else 0
    per_el = rows = cols = 0.0
    for key, t in opt.state[plain].items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.numel() == plain.numel():
            per_el += t.element_size()
        elif t.numel() == _PLAIN[0]:
            rows += 1
        elif t.numel() == _PLAIN[1]:
            cols += 1
    return MethodTrace(name if sphere == "frobenius" else f"{name}[{sphere}]", _flushes(log["events"]), steps,
                       per_el, rows, cols, passes.count)
