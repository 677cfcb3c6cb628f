"""The default Newton–Schulz dtype, chosen from the machine rather than assumed.

CPUs differ: without native bf16 a bf16 matmul is tens to hundreds of times slower than fp32;
with ``avx512_bf16``/``amx_bf16`` (and a oneDNN build that uses them) it can be several times
faster. A flag alone is not proof — on some CPUs that report ``avx512_bf16`` torch's bf16 GEMM
is still slower than fp32 — so the rule is:

* CUDA: bf16 (tensor cores).
* CPU without a native-bf16 flag in ``/proc/cpuinfo``: fp32, no probe.
* CPU with one (or flags unknown): a one-off timing probe (one NS iteration in both dtypes,
  interleaved, minimum of each); bf16 only if it is at least :data:`BF16_MIN_SPEEDUP`
  times faster.
* any other device: fp32.

The decision is cached per device type for the process and logged once (logger
``megatron_md.ns_dtype``, INFO) with its reason. An explicit ``ns_dtype`` always wins; the
environment variable ``MEGATRON_MD_NS_DTYPE`` (``fp32``/``bf16``/``auto``) overrides the
automatic choice for a whole run (e.g. to pin tests or benchmarks across machines).

:func:`choose_ns_dtype` is the pure decision (flags and probe result injected) and is what the
tests exercise; :func:`default_ns_dtype` wires it to the real machine.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import torch

log = logging.getLogger("megatron_md.ns_dtype")

#: CPU flags that mean the ISA has native bf16 dot products (x86; ``bf16`` is ARMv8.6's).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
#: bf16 must beat fp32 by this factor in the probe to be chosen (margin against probe noise).
BF16_MIN_SPEEDUP = 1.5
ENV_VAR = "MEGATRON_MD_NS_DTYPE"
_ENV_VALUES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16}

_CACHE: dict[str, tuple[torch.dtype, str]] = {}


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> Optional[set[str]]:
    """The CPU feature flags (x86 ``flags`` / ARM ``Features`` lines), or None if unreadable."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(val.split())
    except OSError:
        return None
    return None


def _ns_iteration(x: torch.Tensor) -> torch.Tensor:
    a = x @ x.mT
    b = torch.addmm(a, a, a, beta=-4.7750, alpha=2.0315)
    return torch.addmm(x, b, x, beta=3.4445)


def probe_bf16_speedup(n: int = 256, k: int = 1024, repeats: int = 5) -> tuple[float, float, float]:
    """``(fp32 seconds, bf16 seconds, fp32/bf16)`` for one Newton–Schulz iteration (the same
    ``addmm`` chain) on an ``n × k`` matrix: minimum of ``repeats``, the dtypes interleaved so a
    burst of load on a shared machine hits both. Returns after the warm-up when bf16 is already
    more than 10× slower (a CPU without a bf16 GEMM path: no need to wait for more)."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(n, k, generator=gen)
    xs = {torch.float32: x32, torch.bfloat16: x32.to(torch.bfloat16)}
    best = {dt: float("inf") for dt in xs}

    def timed(dt):
        t0 = time.perf_counter()
        _ns_iteration(xs[dt])
        best[dt] = min(best[dt], time.perf_counter() - t0)

    for dt in xs:  # warm-up (first-call dispatch, oneDNN kernel selection)
        timed(dt)
    if best[torch.bfloat16] <= 10 * best[torch.float32]:
        for _ in range(repeats):
            for dt in xs:
                timed(dt)
    f32, b16 = best[torch.float32], best[torch.bfloat16]
    return f32, b16, f32 / max(b16, 1e-12)


def choose_ns_dtype(device_type: str, *, flags: Optional[set[str]] = None,
                    probe: Optional[Callable[[], tuple[float, float, float]]] = None,
                    env: Optional[str] = None) -> tuple[torch.dtype, str]:
    """The automatic NS dtype for ``device_type`` and the reason (see module docstring).

    ``flags``: the CPU flags (None = unknown); ``probe``: returns ``(fp32 s, bf16 s, speedup)``
    and is called only when the flags allow bf16; ``env``: the value of ``MEGATRON_MD_NS_DTYPE``.
    """
    if env is not None and env.strip().lower() not in ("", "auto"):
        key = env.strip().lower()
        if key not in _ENV_VALUES:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of fp32, bf16, auto")
        return _ENV_VALUES[key], f"{ENV_VAR}={env}"
    if device_type == "cuda":
        return torch.bfloat16, "CUDA: bf16 tensor-core matmuls"
    if device_type != "cpu":
        return torch.float32, f"{device_type}: fp32 (no measured bf16 path)"
    if flags is not None:
        native = sorted(set(BF16_FLAGS) & flags)
        if not native:
            return torch.float32, "CPU without native bf16 (no avx512_bf16/amx_bf16/bf16 in /proc/cpuinfo): fp32"
        what = f"CPU flags {'/'.join(native)}"
    else:
        what = "CPU flags unknown"
    if probe is None:
        return torch.float32, f"{what}, no probe run: fp32"
    f32, b16, speedup = probe()
    detail = f"probe (one NS iteration, 256×1024): fp32 {1e3 * f32:.2f} ms, bf16 {1e3 * b16:.2f} ms ({speedup:.2f}× for bf16)"
    if speedup >= BF16_MIN_SPEEDUP:
        return torch.bfloat16, f"{what}; {detail}: bf16"
    return torch.float32, f"{what}; {detail} < {BF16_MIN_SPEEDUP}×: fp32"


def ns_dtype_decision(device: torch.device | str) -> tuple[torch.dtype, str]:
    """:func:`choose_ns_dtype` on this machine, cached per device type and logged once."""
    dev_type = torch.device(device).type
    if dev_type not in _CACHE:
        flags = cpu_flags() if dev_type == "cpu" else None
        dtype, reason = choose_ns_dtype(dev_type, flags=flags, probe=probe_bf16_speedup,
                                        env=os.environ.get(ENV_VAR))
        _CACHE[dev_type] = (dtype, reason)
        log.info("Newton–Schulz dtype on %s: %s (%s); pass ns_dtype / --<method>-ns-dtype to override",
                 dev_type, str(dtype).replace("torch.", ""), reason)
    return _CACHE[dev_type]


def default_ns_dtype(t: torch.Tensor) -> torch.dtype:
    """The automatic NS dtype for tensors on ``t``'s device (see :func:`ns_dtype_decision`)."""
    return ns_dtype_decision(t.device)[0]
