"""megatron-core >= 0.18's emerging-optimizer registry with megatron_md's entries, for real.

``register_emerging_optimizers()`` puts our classes in megatron-core's ``_EMERGING_OPTIMIZERS``;
megatron-core's own ``_create_emerging_optimizer`` then builds them from an ``OptimizerConfig``
(through our ``config_to_kwargs``). The optimizer it builds must take the same steps on the
hidden matrices as megatron_md's builder does on the same GPT (TP=1, fp32): the registry copy of
each matrix gets exactly the gradient our builder's step used, so after N steps both hold the
same matrices (to fp32 rounding) only if the two constructions are the same update rule.

Skipped on megatron-core without the registry (0.16/0.17); ``make test-latest`` runs it. Note:
megatron-core's full ``get_megatron_optimizer(OptimizerConfig(optimizer=<registry name>))`` also
requires the ``emerging-optimizers`` package, which is not installable from PyPI (a 999.9.9
placeholder there); see docs/compatibility.md.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_md.testing.spawn import group_fixture

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None, reason="megatron-core is not installed"),
]

VOCAB, SEQ, HIDDEN, HEADS, LAYERS, BATCH, STEPS = 96, 16, 32, 4, 2, 4, 4
METHODS = {"rmnp": 3e-3, "normuon": 0.02, "muon-md": 0.01, "adamh": 0.01}


def _has_registry() -> bool:
    try:
        return importlib.util.find_spec("megatron.core.optimizer.emerging_optimizers") is not None
    except ModuleNotFoundError:
        return False


def _checks(ctx):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import emerging_optimizers as eo
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_md import megatron_lm
    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig
    from megatron_md.megatron.routing import named_params, role_of

    ctx.init_model_parallel(tp=1)
    with ctx.check("registers"):
        assert megatron_lm.register_emerging_optimizers(MDConfig(split_qkv=False)) is True
        for name in megatron_lm.REGISTRY_METHODS:
            assert name in eo._EMERGING_OPTIMIZERS, name
        ours = {n for n in megatron_lm.REGISTRY_METHODS
                if eo._EMERGING_OPTIMIZERS[n].optimizer_cls.__module__.startswith("megatron_md.")}
        assert set(METHODS) <= ours, ours
        ctx.record("megatron_own_kept", sorted(set(megatron_lm.REGISTRY_METHODS) - ours))

    for name, lr in METHODS.items():
        with ctx.check(f"{name}/registry-equals-builder"):
            cfg = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN,
                                    num_attention_heads=HEADS, use_cpu_initialization=True, hidden_dropout=0.0,
                                    attention_dropout=0.0, add_bias_linear=False)
            torch.manual_seed(1234)
            gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                           share_embeddings_and_output_weights=False)
            model = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True), module=gpt)
            matrices = [(n, p) for n, p in named_params([model]) if role_of(n, p) == "matrix"]
            copies = [torch.nn.Parameter(p.detach().clone()) for _, p in matrices]  # before MD's projection
            ocfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=0.0, weight_decay=0.0, clip_grad=0.0)
            ours = get_megatron_optimizer(ocfg, [model], MDConfig(optimizer=name, split_qkv=False))
            theirs, _ = eo._create_emerging_optimizer(ocfg, [{"params": copies}], name, [model],
                                                      ProcessGroupCollection.use_mpu_process_groups())
            assert type(theirs).__module__.startswith("megatron_md."), type(theirs)
            start = [p.detach().clone() for _, p in matrices]
            for step in range(STEPS):
                g = torch.Generator().manual_seed(100 + step)
                tok = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
                model.zero_grad_buffer()
                ours.zero_grad()
                pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
                model(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean().backward()
                for (_, p), c in zip(matrices, copies):
                    c.grad = p.main_grad.detach().clone()
                ok, _, _ = ours.step()
                assert ok
                theirs.step()
            worst = max(((p.detach() - c.detach()).norm() / p.detach().norm()).item()
                        for (_, p), c in zip(matrices, copies))
            moved = min(((p.detach() - s).norm() / s.norm()).item() for (_, p), s in zip(matrices, start))
            ctx.record(f"{name}/worst_rel_diff", worst)
            assert moved > 1e-4, moved  # every matrix was updated
            assert worst < 1e-5, worst


registry_group = group_fixture(1, _checks, megatron=True, timeout=300)


@pytest.mark.skipif(not _has_registry(), reason="megatron-core < 0.18 has no emerging-optimizer registry")
@pytest.mark.parametrize("check", ["registers", *(f"{n}/registry-equals-builder" for n in METHODS)])
def test_registry(registry_group, check):
    registry_group.assert_ok(check)
