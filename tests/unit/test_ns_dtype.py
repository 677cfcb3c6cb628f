"""The automatic Newton–Schulz dtype: the decision rule, with the machine facts injected."""
import logging

import pytest
import torch

from megatron_md.ops import ns_dtype as nd
from megatron_md.optim import Muon


def _probe(f32_ms, b16_ms):
    calls = []

    def probe():
        calls.append(1)
        return f32_ms / 1e3, b16_ms / 1e3, f32_ms / b16_ms

    return probe, calls


def test_cuda_is_bf16_without_probe():
    probe, calls = _probe(1.0, 10.0)
    dtype, reason = nd.choose_ns_dtype("cuda", flags=None, probe=probe)
    assert dtype is torch.bfloat16 and "CUDA" in reason and not calls


def test_cpu_without_bf16_flags_is_fp32_without_probe():
    probe, calls = _probe(10.0, 1.0)  # even a (bogus) fast bf16 probe is not consulted
    dtype, reason = nd.choose_ns_dtype("cpu", flags={"avx2", "avx512f", "fma"}, probe=probe)
    assert dtype is torch.float32 and "without native bf16" in reason and not calls


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])
def test_cpu_with_flag_follows_the_probe(flag):
    fast, calls = _probe(78.0, 19.0)   # the avx512_bf16 machine: bf16 4× faster
    dtype, reason = nd.choose_ns_dtype("cpu", flags={"avx2", flag}, probe=fast)
    assert dtype is torch.bfloat16 and flag in reason and "4.11×" in reason and calls == [1]
    slow, _ = _probe(6.5, 16.8)        # flag present, bf16 GEMM still slower than fp32
    dtype, reason = nd.choose_ns_dtype("cpu", flags={flag}, probe=slow)
    assert dtype is torch.float32 and "0.39×" in reason


def test_margin_and_unknown_flags():
    just_below, _ = _probe(1.4, 1.0)   # 1.4× < BF16_MIN_SPEEDUP
    assert nd.choose_ns_dtype("cpu", flags=None, probe=just_below)[0] is torch.float32
    above, _ = _probe(1.6, 1.0)
    dtype, reason = nd.choose_ns_dtype("cpu", flags=None, probe=above)
    assert dtype is torch.bfloat16 and "unknown" in reason
    assert nd.choose_ns_dtype("cpu", flags=None, probe=None)[0] is torch.float32
    assert nd.choose_ns_dtype("mps", flags=None, probe=above)[0] is torch.float32


def test_environment_override():
    probe, calls = _probe(10.0, 1.0)
    assert nd.choose_ns_dtype("cpu", flags={"avx512_bf16"}, probe=probe, env="fp32")[0] is torch.float32
    assert nd.choose_ns_dtype("cuda", env="fp32")[0] is torch.float32
    assert nd.choose_ns_dtype("cpu", flags=set(), env="bf16")[0] is torch.bfloat16
    assert nd.choose_ns_dtype("cpu", flags=set(), env="auto")[0] is torch.float32
    assert not calls
    with pytest.raises(ValueError, match="MEGATRON_MD_NS_DTYPE"):
        nd.choose_ns_dtype("cpu", env="fp16")


def test_cpu_flags_parsing(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert nd.cpu_flags(str(f)) == {"fpu", "avx2", "avx512_bf16"}
    f.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "bf16" in nd.cpu_flags(str(f))
    assert nd.cpu_flags(str(tmp_path / "missing")) is None


def test_decision_is_cached_logged_once_and_explicit_dtype_wins(monkeypatch, caplog):
    monkeypatch.setattr(nd, "_CACHE", {})
    calls = []
    monkeypatch.setattr(nd, "probe_bf16_speedup", lambda: (calls.append(1), (0.002, 0.001, 2.0))[1])
    monkeypatch.setattr(nd, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.delenv(nd.ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger="megatron_md.ns_dtype"):
        assert nd.default_ns_dtype(torch.zeros(1)) is torch.bfloat16
        assert nd.default_ns_dtype(torch.zeros(2)) is torch.bfloat16
    assert calls == [1]
    msgs = [r.getMessage() for r in caplog.records if r.name == "megatron_md.ns_dtype"]
    assert len(msgs) == 1 and "bfloat16" in msgs[0] and "avx512_bf16" in msgs[0]
    # ns_dtype=None steps exactly like an explicit bf16; an explicit fp32 wins over the decision
    init, grad = torch.randn(16, 8), torch.randn(16, 8)
    after = {}
    for ns_dtype in (None, torch.bfloat16, torch.float32):
        p = torch.nn.Parameter(init.clone())
        opt = Muon([p], ns_dtype=ns_dtype)
        p.grad = grad.clone()
        opt.step()
        after[ns_dtype] = p.detach()
    assert torch.equal(after[None], after[torch.bfloat16])
    assert not torch.equal(after[torch.float32], after[torch.bfloat16])
    assert after[None].dtype is torch.float32
