"""Every RNG state of a rank (python, numpy, torch, CUDA, megatron's TP/EP tracker), saved with a
checkpoint and restored only at the same layout (each rank its own)."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
          "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"])
    get_cuda_rng_tracker().set_states(st["tracker"])
