"""Probe megatron-core's FSDP paths on CPU/gloo, step by step: torch FSDP2 (``TorchFullyShardedDataParallel``)
and Megatron-FSDP (``--use-megatron-fsdp``).

    python benchmarks/probe_fsdp2.py            # 2 gloo ranks; prints each step's outcome

Not a test (tests/megatron/test_fsdp2.py is): it records what runs and where it stops
(docs/compatibility.md, "FSDP"). Each step runs on every rank; a failing step is reported with its
exception and innermost frames, and the following steps still run where they can. ``--no-shims``
leaves out the two CPU shims below to show the failures they get past:

* :mod:`megatron_md.megatron.cpu_compat`'s ``fsdp2_cpu_mesh``: ``DeviceMesh.from_group(group, "cuda")``
  (hard-coded in megatron-core 0.16.1) builds a CPU mesh when there is no GPU;
* ``transformer_impl="local"``: with TransformerConfig's default ("transformer_engine") the wrapper
  also ``fully_shard``s every ColumnParallelLinear inside an already wrapped TransformerLayer.

It also shows megatron-core 0.16.1's own ``finalize_model_grads`` failing on its FSDP2 wrapper and
passing on megatron_md's (:func:`megatron_md.megatron.fsdp.fsdp2_class`).
"""
from __future__ import annotations

import argparse
import os
import traceback
from pathlib import Path

from megatron_md.testing.spawn import run_group

VOCAB, SEQ, HIDDEN = 96, 16, 32


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames))


def _probe(ctx, shims: bool):
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.distributed import torch_fully_sharded_data_parallel as tfsdp
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer as mcore_optimizer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig

    from megatron_md.megatron.fsdp import fsdp2_class

    ctx.init_model_parallel(tp=1)
    out, state = {}, {}

    def step(name, fn):
        try:
            r = fn()
            out[name] = "ok" + (f": {r}" if r is not None else "")
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            out[name] = f"FAIL {type(exc).__name__}: {str(exc)[:300]} [{_where(exc)}]"

    cfg = TransformerConfig(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN, num_attention_heads=4,
                            num_query_groups=2, use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0, add_bias_linear=False,
                            **({"transformer_impl": "local"} if shims else {}))
    torch.manual_seed(1)
    gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    step("wrap", lambda: state.setdefault("model", tfsdp.TorchFullyShardedDataParallel(
        cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), gpt)) and None)
    model = state.get("model")
    if model is None:
        ctx.record("steps", out)
        return

    def placements():
        p = dict(model.module.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"]
        return f"linear_qkv.weight {type(p).__name__} {tuple(p.shape)} {p.placements} local {tuple(p.to_local().shape)}"
    step("params are DTensors", placements)

    def forward_backward():
        tok = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
        loss = model(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean()
        loss.backward()
        g = next(iter(model.module.parameters())).grad
        return f"loss {loss.item():.4f}, grad {type(g).__name__} {g.placements}"
    step("forward + backward (reduce-scatter on gloo)", forward_backward)
    step("finalize_model_grads (megatron-core's wrapper)", lambda: finalize_model_grads([model]))

    def ours():
        torch.manual_seed(1)
        m = fsdp2_class()(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                          GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ))
        tok = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
        pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
        m(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean().backward()
        finalize_model_grads([m])
    step("finalize_model_grads (megatron_md's wrapper, megatron_md.megatron.fsdp)", ours)
    step("megatron-core Adam optimizer", lambda: type(mcore_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3), [model])).__name__)
    step("megatron_md muon-md optimizer", lambda: type(get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0), [model], MDConfig(optimizer="muon-md"))).__name__)
    step("megatron_md rmnp optimizer", lambda: type(get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0), [model], MDConfig(optimizer="rmnp"))).__name__)
    ctx.record("steps", out)
    _probe_megatron_fsdp(ctx, step, out)


def _probe_megatron_fsdp(ctx, step, out) -> None:
    """Megatron-FSDP (``--use-megatron-fsdp``: megatron-core's ``distributed.fsdp.mcore_fsdp_adapter.
    FullyShardedDataParallel``, ZeRO-3 ``optim_grads_params``) on the same model, on the CPU device."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    state = {}

    def wrap():
        from megatron.core.distributed.fsdp.mcore_fsdp_adapter import FullyShardedDataParallel
        cfg = TransformerConfig(num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN, num_attention_heads=4,
                                num_query_groups=2, use_cpu_initialization=True, hidden_dropout=0.0,
                                attention_dropout=0.0, add_bias_linear=False, transformer_impl="local")
        torch.manual_seed(1)
        gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
        ddp = DistributedDataParallelConfig(use_megatron_fsdp=True, data_parallel_sharding_strategy="optim_grads_params",
                                            use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                            gradient_reduce_div_fusion=False)  # NCCL's PREMUL_SUM: not on gloo
        state["model"] = FullyShardedDataParallel(cfg, ddp, gpt, device=torch.device("cpu"))

    step("Megatron-FSDP wrap (device=cpu)", wrap)
    model = state.get("model")
    if model is not None:
        def forward_backward():
            tok = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
            pos = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
            loss = model(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean()
            loss.backward()
            model.finish_grad_sync()
            return f"loss {loss.item():.4f}"
        step("Megatron-FSDP forward + backward + grad sync", forward_backward)
    ctx.record("steps", out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-shims", action="store_true", help="without the two CPU shims (see the module docstring)")
    a = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    res = run_group(2, f"{Path(__file__).stem}:_probe", not a.no_shims, megatron=True, timeout=300,
                    cpu_compat=None if not a.no_shims else {"skip": ["fsdp2_cpu_mesh"]},
                    env={"PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))})
    for name, what in res.values[0].get("steps", {}).items():
        print(f"{name}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
