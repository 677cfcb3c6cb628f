"""Newton–Schulz orthogonalization: ``NS(X) ≈ polar(X) = U Vᵀ`` for ``X = U Σ Vᵀ``.

Pure tensor math (no torch.distributed). Batched over any leading dimensions.

Update rule, per coefficient triple ``(a, b, c)`` after ``X ← X / (‖X‖_F + eps)`` and a
transpose to the short side (rows ≤ cols)::

    A = X Xᵀ;  B = b A + c A A;  X = a X + B X

Coefficient sets: ``"jordan"`` (Keller Jordan's fixed quintic, 3.4445, −4.7750, 2.0315) and
``"quintic"`` (a 5-step schedule). See docs/optimizer_spec.md.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Triple = tuple[float, float, float]
CoefficientSpec = Union[str, Sequence[Sequence[float]]]

NS_COEFFICIENTS: dict[str, tuple[Triple, ...]] = {
    "jordan": ((3.4445, -4.7750, 2.0315),),
    "quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
}


def resolve_coefficients(spec: CoefficientSpec, steps: int | None = None) -> tuple[Triple, ...]:
    """Turn a coefficient spec into the exact list of triples to run.

    ``"jordan"``: the fixed triple repeated ``steps`` (default 5) times. ``"quintic"``: the
    first ``steps`` triples of the schedule; beyond 5 the last triple repeats. An explicit
    sequence of triples is used as given (``steps`` must be ``None`` or its length).
    """
    if isinstance(spec, str):
        if spec not in NS_COEFFICIENTS:
            raise ValueError(
                f"ns_coefficients={spec!r}: unknown coefficient set; expected one of "
                f"{sorted(NS_COEFFICIENTS)} or a list of (a, b, c) triples"
            )
        steps = 5 if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"ns_steps={steps!r}: must be an integer >= 1")
        table = NS_COEFFICIENTS[spec]
        return tuple(table[min(i, len(table) - 1)] for i in range(steps))
    try:
        triples = tuple(tuple(float(v) for v in t) for t in spec)
    except TypeError as e:
        raise ValueError(f"ns_coefficients={spec!r}: expected a name or a list of triples") from e
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"ns_coefficients={spec!r}: every entry must be an (a, b, c) triple")
    if steps is not None and steps != len(triples):
        raise ValueError(
            f"ns_steps={steps!r}: must be None or equal to the number of explicit triples "
            f"({len(triples)})"
        )
    return triples  # type: ignore[return-value]


def newton_schulz(
    x: torch.Tensor,
    coefficients: Sequence[Triple],
    *,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Approximate the polar factor of each trailing 2-D matrix of ``x``.

    Runs in ``dtype`` (fp32 or bf16) and returns a tensor of ``x.dtype``. Leading dims are a
    batch; each matrix is normalized by its own Frobenius norm.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {tuple(x.shape)}")
    out_dtype, shape = x.dtype, x.shape
    X = x.to(dtype)
    if X.ndim > 3:
        X = X.reshape(-1, *shape[-2:])
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    # in place when X is already our own copy (the dtype cast made one); never on the caller's x
    X = X.div_(norm + eps) if X.data_ptr() != x.data_ptr() else X / (norm + eps)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = ns_iterations(X, coefficients)
    if transposed:
        X = X.mT
    return X.reshape(shape).to(out_dtype)


def ns_iterations(X: torch.Tensor, coefficients: Sequence[Triple], gram=None) -> torch.Tensor:
    """The Newton–Schulz iterations on a normalized, wide (rows ≤ cols) ``X`` (2-D, or 3-D a batch):
    ``A = X Xᵀ; B = b A + c A A; X ← a X + B X`` per triple. ``gram``: applied to each ``A`` before use
    (the split NS sums it over the members holding column blocks of X, :mod:`.split_ns`)."""
    # addmm/baddbmm fuse the scaled sums (the same op sequence as torch.optim.Muon)
    mm = torch.addmm if X.ndim == 2 else torch.baddbmm
    for a, b, c in coefficients:
        A = X @ X.mT
        if gram is not None:
            A = gram(A)
        B = mm(A, A, A, beta=b, alpha=c)
        X = mm(X, B, X, beta=a)
    return X


def ns_flops(d_out: int, d_in: int, steps: int) -> int:
    """Multiply-add FLOPs of one NS run on a d_out×d_in matrix (used to balance owners)."""
    m, n = min(d_out, d_in), max(d_out, d_in)
    # A = X Xᵀ: 2 m² n; A A: 2 m³; B X: 2 m² n.
    return steps * (4 * m * m * n + 2 * m * m * m)
