"""GPU checks: Transformer-Engine layers, FP8, NCCL, bf16 Newton–Schulz on CUDA.

Every test skips without the hardware or optional package it needs, saying which. Run them
all with ``tests/gpu/run_all.sh`` on a GPU machine (it also runs the NCCL multi-rank check
under torchrun when two or more GPUs are present).
"""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs transformer-engine (the `te` extra; GPU clusters only)")
needs_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for NCCL")


@needs_cuda
def test_bf16_newton_schulz_on_cuda_matches_fp32():
    from megatron_md.ops import newton_schulz, resolve_coefficients

    x = torch.randn(1024, 4096, device="cuda")
    c = resolve_coefficients("jordan")
    a = newton_schulz(x, c, dtype=torch.bfloat16)
    b = newton_schulz(x, c, dtype=torch.float32)
    assert a.dtype == torch.float32 and a.is_cuda
    assert (a - b).norm() / b.norm() < 5e-2


@needs_cuda
def test_optimizers_on_cuda_equal_cpu_reference():
    from megatron_md import optim
    from megatron_md.optim import reference as ref

    torch.manual_seed(0)
    w0 = torch.randn(96, 64) * 0.1
    for name in ("Muon", "NorMuon", "RMNP", "AdamH", "MuonMD", "SFNorMuon"):
        p = torch.nn.Parameter(w0.clone().cuda())
        kw = dict(ns_dtype=torch.float32) if name in ("Muon", "NorMuon", "MuonMD", "SFNorMuon") else {}
        opt = getattr(optim, name)([p], **kw)
        oracle = getattr(ref, name)([w0.clone()])
        for t in range(5):
            g = torch.randn(96, 64)
            p.grad = g.cuda()
            opt.step()
            oracle.step([g])
        torch.testing.assert_close(p.detach().cpu(), oracle.params[0], rtol=1e-4, atol=1e-5)


def _one_gpu_parallel() -> None:
    """A one-rank NCCL process group and megatron's parallel state (TP = PP = 1), once per process."""
    from megatron.core import parallel_state as ps
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)


def _tiny_te_gpt(fp8: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    _one_gpu_parallel()
    model_parallel_cuda_manual_seed(1)
    cfg = TransformerConfig(num_layers=2, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                            num_query_groups=4, bf16=True, params_dtype=torch.bfloat16,
                            fp8="hybrid" if fp8 else None, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, get_gpt_layer_with_transformer_engine_spec(), vocab_size=1024,
                     max_sequence_length=128).cuda()
    return cfg, model


def _train_te(fp8: bool, optimizer="muon-md", steps=20):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig

    cfg, gpt = _tiny_te_gpt(fp8)
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.01, bf16=True, clip_grad=1.0,
                                                 params_dtype=torch.bfloat16), [model], MDConfig(optimizer=optimizer))
    return _train_cuda(model, opt, steps)


def _train_cuda(model, opt, steps: int) -> list[float]:
    """``steps`` Megatron iterations of ``model`` on one fixed batch of 8 × 128 random tokens (vocab 1024)."""
    from megatron.core.distributed import finalize_model_grads

    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 1024, (8, 129), generator=g).cuda()
    pos = torch.arange(128, device="cuda").unsqueeze(0).expand(8, -1)
    losses = []
    for _ in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        loss = model(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean()
        loss.backward()
        finalize_model_grads([model])
        ok, _, _ = opt.step()
        assert ok
        losses.append(loss.item())
    return losses


@needs_cuda
@needs_te
def test_transformer_engine_layers_train_with_muon_md():
    losses = _train_te(fp8=False)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


@needs_cuda
@needs_te
def test_fp8_training_with_muon_md():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada/Hopper)")
    losses = _train_te(fp8=True)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


@needs_two_gpus
def test_nccl_two_ranks_sharded_equals_reference():
    """The distributed exactness checks of tests/distributed, on NCCL (torchrun, 2 GPUs)."""
    torchrun = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    script = os.path.join(os.path.dirname(__file__), "nccl_check.py")
    out = subprocess.run(f"{torchrun} --nproc-per-node 2 {script}", shell=True, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "NCCL CHECKS PASSED" in out.stdout


def _fsdp2_vs_ddp(optimizer: str, steps: int = 5, kind: str = "fsdp2"):
    """megatron-core's torch FSDP2 wrapper (megatron_md.megatron.fsdp) — or, ``kind="megatron"``, its
    Megatron-FSDP adapter as the driver wraps it (NCCL: pre-multiplied-sum gradient reduce, its CUDA
    device, streams and buffers) — and plain DDP on one GPU (world 1: meshes on CUDA, DTensor parameters
    and proxies on the device): the same losses."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig
    from megatron_md.megatron.fsdp import fsdp2_class

    _one_gpu_parallel()
    out = {}
    for fsdp in (False, True):
        model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        cfg = TransformerConfig(num_layers=2, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
                                num_query_groups=4, gated_linear_unit=True, add_bias_linear=False,
                                hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
                                use_cpu_initialization=True)
        gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=1024, max_sequence_length=128,
                       share_embeddings_and_output_weights=False).cuda()
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=not fsdp)
        if fsdp and kind == "megatron":
            from megatron_md.training.model import _megatron_fsdp
            model = _megatron_fsdp(cfg, gpt)
        else:
            model = fsdp2_class()(cfg, ddp_cfg, gpt) if fsdp else DistributedDataParallel(cfg, ddp_cfg, gpt)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=0.01, weight_decay=0.0, clip_grad=1.0),
                                     [model], MDConfig(optimizer=optimizer))
        out[fsdp] = _train_cuda(model, opt, steps)
    return out


@needs_cuda
@pytest.mark.parametrize("kind", ["fsdp2", "megatron"])
def test_fsdp2_on_cuda_equals_ddp(kind):
    if kind == "megatron":
        pytest.importorskip("einops", reason="megatron-core's Megatron-FSDP adapter needs einops")
    for name in ("muon-md", "rmnp"):
        got = _fsdp2_vs_ddp(name, kind=kind)
        assert all(math.isfinite(x) for x in got[True]), got
        for a, b in zip(got[True], got[False]):
            assert abs(a - b) <= 1e-4 * abs(b), (name, got)
