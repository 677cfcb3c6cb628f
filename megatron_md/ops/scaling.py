"""Update scale factors, defined once (names clash across libraries).

``shape_scaling = max(1, sqrt(d_out/d_in))`` (Keller Jordan, NorMuon, RMNP);
``unit_rms = sqrt(d_out/d_in)``; ``shape_up = sqrt(max(d_out/d_in, d_in/d_out))`` (MD
authors' MuonMD default); ``rms_match = 0.2·sqrt(max(d_out, d_in))`` (Moonlight: update
RMS ≈ AdamW's); ``none = 1``. Always evaluated on the logical (unsharded) shape.
"""
from __future__ import annotations

import math
from typing import Literal

ScaleName = Literal["shape_scaling", "unit_rms", "shape_up", "rms_match", "none"]
SCALE_NAMES: tuple[str, ...] = ("shape_scaling", "unit_rms", "shape_up", "rms_match", "none")


def check_scale(name: str) -> str:
    if name not in SCALE_NAMES:
        raise ValueError(f"scale={name!r}: unknown scale factor; expected one of {SCALE_NAMES}")
    return name


def scale_factor(name: str, d_out: int, d_in: int) -> float:
    """The scalar multiplying an orthogonalized/normalized update of a d_out×d_in matrix."""
    check_scale(name)
    if name == "shape_scaling":
        return max(1.0, math.sqrt(d_out / d_in))
    if name == "unit_rms":
        return math.sqrt(d_out / d_in)
    if name == "shape_up":
        return math.sqrt(max(d_out / d_in, d_in / d_out))
    if name == "rms_match":
        return 0.2 * math.sqrt(max(d_out, d_in))
    return 1.0
