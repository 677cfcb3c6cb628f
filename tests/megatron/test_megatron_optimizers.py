"""Our optimizers inside megatron-core's optimizer stack, on real GPTModel / MoE models (CPU, gloo).

One spawned group of 2 ranks runs, for every optimizer, a tiny GQA SwiGLU GPT for 5 steps, the
per-block methods seeing Q, K, V of the fused QKV and (``split_fc1``) the gate and up halves of
``linear_fc1`` as separate matrices, at
  * reference: TP=1 with the full batch on both DP ranks (the DP mean of identical gradients is
    that gradient: exactly the single-process trajectory),
  * TP=2 (fused QKV split per query group across TP, fc1 per half),
  * DP=2 + Megatron's DistributedOptimizer (ZeRO-1 flat shards cut per block; each rank half the batch),
  * DP=2 + layer-wise distribution (each rank half the batch),
and a tiny MoE GPT (4 experts, top-2, alltoall) at EP=2 against EP=1; then the bf16 path.
Each sharded run must give the reference's losses and final (gathered) parameters.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from megatron_md.testing.spawn import group_fixture

pytestmark = [pytest.mark.megatron, pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                                       reason="megatron-core is not installed")]

VOCAB, SEQ, HIDDEN, HEADS, GROUPS, LAYERS, BATCH, STEPS = 96, 16, 32, 4, 2, 2, 4, 5
LRS = {"adam": 3e-3, "muon": 0.02, "normuon": 0.02, "rmnp": 3e-3, "adamh": 0.01, "muonh": 0.01,
       "adam-md": 3e-3, "muon-md": 0.01, "sf-adamw": 3e-3, "sf-normuon": 0.01}
OPTIMIZERS = list(LRS)
MODES = ["tp2", "zero1", "layerwise"]
RTOL_LOSS, RTOL_PARAM = 1e-5, 1e-4
#: AdamH with the fc1 split, DP=2 (ZeRO-1 and layer-wise alike, half the batch per rank): one element of
#: the word embedding (on the Adam partner; [12, 20]) has a near-zero gradient, and Adam's m/√v turns the
#: DP mean's 1e-7 rounding into a 2e-4 (ZeRO-1; layer-wise 1.2e-4) relative difference of that weight
#: after 5 steps — the same element is the worst without the split (2e-6); every matrix agrees to 1e-6
RTOL_PARAM_BY = {"adamh": 5e-4}


# ----------------------------------------------------------------------------- rank side
def _config(tp=1, ep=1, moe=False, bf16=False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                 expert_model_parallel_size=ep, moe_aux_loss_coeff=0.0) if moe else {}
    return TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN,
                             num_attention_heads=HEADS, num_query_groups=GROUPS, use_cpu_initialization=True,
                             hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
                             tensor_model_parallel_size=tp, bf16=bf16, gated_linear_unit=not moe,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32, **extra)


def _build(name, tp=1, ep=1, moe=False, dist_opt=False, md_kw=None, bf16=False, tied=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig

    cfg = _config(tp, ep, moe, bf16)
    torch.manual_seed(1234)  # CPU init draws the full weights: identical at any TP/EP
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None)
    gpt = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, share_embeddings_and_output_weights=tied)
    _reinit_by_global_name(gpt, ep)
    if bf16:
        gpt = gpt.bfloat16()
    model = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=dist_opt), module=gpt)
    ocfg = OptimizerConfig(optimizer="adam", lr=LRS[name], min_lr=0.0, weight_decay=0.0, clip_grad=1.0,
                           use_distributed_optimizer=dist_opt, bf16=bf16, params_dtype=cfg.params_dtype)
    md = MDConfig(optimizer=name, **dict(dict(split_fc1=not moe), **(md_kw or {})))
    return model, get_megatron_optimizer(ocfg, [model], md)


def _reinit_by_global_name(gpt, ep):
    """Every ≥2-D weight drawn from a generator keyed by its *global* name (expert index
    included), so EP=1 and EP=2 (whose RNG streams differ) start from the same model."""
    import re
    import zlib

    from megatron.core import parallel_state as ps

    rank = ps.get_expert_model_parallel_rank() if ep > 1 else 0
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if p.ndim < 2:
                continue
            m = re.search(r"local_experts\.(\d+)\.", name)
            if m:
                glob = rank * (4 // ep) + int(m.group(1))
                name = name.replace(f"local_experts.{m.group(1)}.", f"local_experts.{glob}.")
            full = list(p.shape)
            dim = p.partition_dim if tp > 1 and getattr(p, "tensor_model_parallel", False) else None
            if dim is not None:
                full[dim] *= tp
            w = torch.randn(full, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.05
            if dim is not None:
                w = torch.cat([h.chunk(tp, dim=dim)[tp_rank] for h in _halves(name, w)])
            p.copy_(w)


def _halves(name, w):
    """A gated MLP's linear_fc1 ``[gate; up]`` as its two halves (TP splits each; every rank holds
    ``[gate_r; up_r]``); any other weight as itself."""
    return w.chunk(2) if name.endswith("mlp.linear_fc1.weight") else [w]


def _batch(step, dp_rank=0, dp_size=1):
    """This DP rank's slice of global batch ``step``; two batches alternate, so that 5 steps
    of a tiny model visibly lower the loss (random tokens have nothing else to learn)."""
    g = torch.Generator().manual_seed(1000 + step % 2)
    tok = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    n = BATCH // dp_size
    tok = tok[dp_rank * n:(dp_rank + 1) * n]
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def _train(model, opt, split_data: bool, steps=STEPS):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses = []
    for s in range(steps):
        tokens, labels = _batch(s, r, dp) if split_data else _batch(s)
        model.zero_grad_buffer()
        opt.zero_grad()
        pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([model])
        ok, _, _ = opt.step()
        assert ok
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        losses.append(mean.item() / dp)
    return losses


def _full_params(model, num_experts=0):
    """name -> full fp32 parameter: TP shards gathered; experts renamed by global index."""
    import re

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size() if num_experts else 1
    out = {}
    for name, p in model.module.named_parameters():
        t = p.detach().float()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            halves = list(zip(*[_halves(name, x) for x in parts]))
            t = torch.cat([torch.cat(h, dim=p.partition_dim) for h in halves])
        m = re.search(r"local_experts\.(\d+)\.", name)
        if m and ep > 1:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t.contiguous(), group=ps.get_expert_model_parallel_group())
            loc = num_experts // ep
            for r, part in enumerate(parts):
                out[name.replace(f"local_experts.{m.group(1)}.", f"local_experts.{r * loc + int(m.group(1))}.")] = part
            continue
        out[name] = t.clone()
    return out


def _compare(ref, got, rtol_param=RTOL_PARAM):
    (l0, p0), (l1, p1) = ref, got
    for a, b in zip(l1, l0):
        assert abs(a - b) <= RTOL_LOSS * abs(b) + 1e-6, f"losses {l1} vs reference {l0}"
    assert p0.keys() == p1.keys(), sorted(set(p0) ^ set(p1))
    worst = max(((p1[k] - p0[k]).norm() / p0[k].norm()).item() for k in p0)
    assert worst <= rtol_param, f"max relative parameter difference {worst:.2e}"
    return worst


#: MD recipe variants checked at TP=2 (and ZeRO-1) against their TP=1 reference: residual-output
#: scaling α = sqrt(1/(2L)); a head tied to the embedding (it follows the unit-norm rows)
RECIPE_VARIANTS = {"adam-md-alpha": dict(md_residual_scaling=True), "adam-md-tied": dict()}


def _check_recipe(model, opt, trained=True):
    from megatron_md.megatron.builder import hybrid_optimizers

    params = dict(model.module.named_parameters())
    emb = params["embedding.word_embeddings.weight"].detach()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(emb.shape[0]), rtol=1e-5, atol=1e-5)
    head_opt = hybrid_optimizers(opt)[0].head_optimizer
    assert head_opt is not None and head_opt.defaults["sphere"] == "rows"
    (p,) = [q for g in head_opt.param_groups for q in g["params"]]
    torch.testing.assert_close(head_opt.direction(p).norm(dim=1), torch.ones(p.shape[0]), rtol=1e-5, atol=1e-5)
    s_r, s_c = head_opt.gains(p)
    if trained:
        assert (s_r - 1).abs().max() > 1e-4 and (s_c - 1).abs().max() > 1e-4, "head gains did not move"
    torch.testing.assert_close(p, params["output_layer.weight"].detach())  # the model sees W = s_r D s_c


def _checks(ctx):
    """Runs grouped by parallel layout: every (re)initialisation of megatron's parallel state
    creates gloo groups (and their threads) that are never freed, so there are three of them."""
    refs, moe_refs = {}, {}

    def reference(name, split=True):
        return refs.get((name, split))

    ctx.init_model_parallel(tp=1, ep=1)
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/reference"):
            model, opt = _build(name)
            losses = _train(model, opt, split_data=False)
            assert losses[-1] < losses[0], losses
            refs[(name, True)] = (losses, _full_params(model))
        with ctx.check(f"{name}/zero1"):
            ref = reference(name)
            assert ref is not None, "reference failed"
            model, opt = _build(name, dist_opt=True)
            ctx.record(f"{name}/zero1", _compare(ref, (_train(model, opt, split_data=True), _full_params(model)),
                                                 RTOL_PARAM_BY.get(name, RTOL_PARAM)))
        with ctx.check(f"{name}/layerwise"):
            ref = reference(name, True)
            assert ref is not None, "reference failed"
            model, opt = _build(name, md_kw=dict(dp_mode="layer-wise"))
            ctx.record(f"{name}/layerwise", _compare(ref, (_train(model, opt, split_data=True), _full_params(model)),
                                                 RTOL_PARAM_BY.get(name, RTOL_PARAM)))
        with ctx.check(f"{name}/moe-ep1"):
            model, opt = _build(name, moe=True)
            moe_refs[name] = (_train(model, opt, split_data=False), _full_params(model, 4))

    for name in ("adam-md", "muon-md"):
        with ctx.check(f"{name}/recipe-rows"):
            # MD's recipe (the defaults): unit-norm embedding rows after every step, the head on
            # one unit sphere per row with row and column gains that moved away from 1
            model, opt = _build(name)
            _check_recipe(model, opt, trained=False)   # rows projected at construction
            for _ in range(3):                          # and after every step
                _train(model, opt, split_data=False, steps=1)
                _check_recipe(model, opt)
    for key, kw in RECIPE_VARIANTS.items():
        with ctx.check(f"{key}/reference"):
            model, opt = _build("adam-md", md_kw=kw, tied=key.endswith("tied"))
            losses = _train(model, opt, split_data=False)
            refs[(key, True)] = (losses, _full_params(model))
        if key.endswith("alpha"):
            with ctx.check(f"{key}/zero1"):
                model, opt = _build("adam-md", dist_opt=True, md_kw=kw)
                ctx.record(f"{key}/zero1", _compare(refs[(key, True)], (_train(model, opt, split_data=True),
                                                                            _full_params(model))))

    ctx.init_model_parallel(tp=2)
    for key, kw in RECIPE_VARIANTS.items():
        with ctx.check(f"{key}/tp2"):
            assert (key, True) in refs, "reference failed"
            model, opt = _build("adam-md", tp=2, md_kw=kw, tied=key.endswith("tied"))
            ctx.record(f"{key}/tp2", _compare(refs[(key, True)], (_train(model, opt, split_data=False),
                                                                 _full_params(model))))
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/tp2"):
            ref = reference(name, True)
            assert ref is not None, "reference failed"
            model, opt = _build(name, tp=2)
            ctx.record(f"{name}/tp2", _compare(ref, (_train(model, opt, split_data=False), _full_params(model))))
    for name in ("muon-md", "rmnp"):
        with ctx.check(f"{name}/bf16"):
            model, opt = _build(name, tp=2, bf16=True)
            losses = _train(model, opt, split_data=False, steps=8)
            assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses
    with ctx.check("nonfinite-skips-on-every-rank"):
        from megatron.core.distributed import finalize_model_grads

        from megatron_md.megatron.builder import skipped_steps
        model, opt = _build("muon-md", tp=2)
        _train(model, opt, split_data=False, steps=1)
        before = {k: v.clone() for k, v in _full_params(model).items()}
        tokens, labels = _batch(0)
        model.zero_grad_buffer()
        opt.zero_grad()
        pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
        model(tokens, pos, None, labels=labels).float().mean().backward()
        if ctx.rank == 1:  # poison one gradient element on one rank only
            p = next(p for n, p in model.module.named_parameters() if "linear_fc1" in n)
            p.main_grad.view(-1)[0] = float("nan")
        finalize_model_grads([model])
        ok, _, _ = opt.step()
        assert ok is False and skipped_steps(opt) == 1
        after = _full_params(model)
        assert all(torch.equal(before[k], after[k]) for k in before)

    for name in ("sf-normuon", "muon-md"):
        with ctx.check(f"{name}/state-dict-resume"):
            # Megatron's optimizer.state_dict() carries everything (incl. the matrix optimizer's
            # groups: schedule-free counters): a fresh optimizer resumes bit-exactly
            import copy
            model, opt = _build(name, tp=2)
            _train(model, opt, split_data=False, steps=2)
            model_sd, opt_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            cont = _train(model, opt, split_data=False, steps=3)
            model2, opt2 = _build(name, tp=2)
            model2.load_state_dict(model_sd)
            opt2.load_state_dict(opt_sd)
            resumed = _train(model2, opt2, split_data=False, steps=3)
            assert resumed == cont, (resumed, cont)

    ctx.init_model_parallel(tp=1, ep=2)
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/moe-ep2"):
            assert name in moe_refs, "EP=1 reference failed"
            model, opt = _build(name, ep=2, moe=True)
            got = (_train(model, opt, split_data=True), _full_params(model, 4))
            ctx.record(f"{name}/moe-ep2", _compare(moe_refs[name], got))


group = group_fixture(2, _checks, megatron=True, timeout=1800)

CHECKS = [f"{n}/{s}" for n in OPTIMIZERS
          for s in ["reference", *MODES, "moe-ep1", "moe-ep2"]] + \
    ["muon-md/bf16", "rmnp/bf16", "nonfinite-skips-on-every-rank", "sf-normuon/state-dict-resume",
     "muon-md/state-dict-resume", "adam-md/recipe-rows", "muon-md/recipe-rows"] + \
    [f"{k}/{s}" for k in RECIPE_VARIANTS for s in ("reference", "tp2", *(["zero1"] if k.endswith("alpha") else []))]


@pytest.mark.parametrize("check", CHECKS)
def test_megatron(group, check):
    group.assert_ok(check)
