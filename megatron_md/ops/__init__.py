"""Pure tensor math (no torch.distributed, no Megatron)."""
from .newton_schulz import NS_COEFFICIENTS, newton_schulz, ns_flops, resolve_coefficients
from .norms import UNIT_GAIN, col_norm, fro_norm, inv_softplus, row_norm, softplus, sphere_retract
from .scaling import SCALE_NAMES, check_scale, scale_factor

__all__ = [
    "NS_COEFFICIENTS", "newton_schulz", "ns_flops", "resolve_coefficients",
    "UNIT_GAIN", "col_norm", "fro_norm", "inv_softplus", "row_norm", "softplus", "sphere_retract",
    "SCALE_NAMES", "check_scale", "scale_factor",
]
