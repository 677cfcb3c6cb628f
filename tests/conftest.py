"""Test-session defaults.

The exactness tests compare sharded runs with unsharded ones at ~1e-5: Newton–Schulz must run
in fp32 there. Its automatic dtype follows the machine (bf16 on CPUs with native bf16, e.g.
avx512_bf16), so the whole session — spawned ranks and driver subprocesses inherit the
environment — pins it with ``MEGATRON_MD_NS_DTYPE=fp32`` unless the caller set it. The
automatic choice itself is tested with the variable removed (tests/unit/test_ns_dtype.py).
"""
import os

os.environ.setdefault("MEGATRON_MD_NS_DTYPE", "fp32")
