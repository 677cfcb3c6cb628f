"""Every optimizer under megatron-core's torch FSDP2 (``TorchFullyShardedDataParallel``, DTensor
``Shard(0)`` parameters), CPU/gloo, fp32: the exact update of plain data parallelism.

One spawned group of 2 ranks runs the tiny GQA SwiGLU GPT of test_megatron_optimizers (per-block
Q/K/V and, with ``split_fc1``, gate/up) for 5 steps, each rank half the batch, under
  * plain DP=2 (megatron-core's DDP, replicated weights): the reference,
  * FSDP2 DP=2 (each rank a row block of every weight, Megatron's FP32Optimizer over proxies),
  * Megatron-FSDP DP=2 (``--use-megatron-fsdp``: megatron-core's adapter, ZeRO-3; each rank whole
    rows of every weight, cut unevenly where its flat buckets split),
and checks the losses (≤1e-5 relative) and the final gathered parameters; then MD's recipe
(unit-norm embedding rows, the row-sphere head), a non-finite gradient on one rank (skipped on
every rank, nothing changed), the collective count per step independent of the matrix count,
megatron-core's refusal combinations, bf16 (both FSDPs), and the driver with ``--use-megatron-fsdp``
against plain DP. A group of 4 ranks does the same at TP=2 × FSDP2 DP=2 and TP=2 × Megatron-FSDP DP=2
against TP=2 × plain DP=2 (and FSDP2 with sequence parallelism).
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from pathlib import Path

from megatron_md.testing.spawn import group_fixture
from megatron_md.testing.tools import load_module

pytestmark = [pytest.mark.megatron, pytest.mark.skipif(importlib.util.find_spec("megatron.core") is None,
                                                       reason="megatron-core is not installed")]

#: the optimizers, LRs, batches, tolerances and comparison of test_megatron_optimizers (the same model sizes)
_MO = load_module(Path(__file__).with_name("test_megatron_optimizers.py"))
LRS, OPTIMIZERS, RTOL_PARAM, RTOL_PARAM_BY = _MO.LRS, _MO.OPTIMIZERS, _MO.RTOL_PARAM, _MO.RTOL_PARAM_BY
_batch, _compare = _MO._batch, _MO._compare
VOCAB, SEQ, HIDDEN, HEADS, GROUPS, LAYERS, BATCH, STEPS = 96, 16, 32, 4, 2, 2, 4, 5
assert (VOCAB, SEQ, BATCH, STEPS) == (_MO.VOCAB, _MO.SEQ, _MO.BATCH, _MO.STEPS), "the shared batches' sizes"


def _config(bf16=False, tp=1, sp=False):
    from megatron.core.transformer.transformer_config import TransformerConfig
    return TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=2 * HIDDEN,
                             num_attention_heads=HEADS, num_query_groups=GROUPS, use_cpu_initialization=True,
                             hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
                             gated_linear_unit=True, bf16=bf16, tensor_model_parallel_size=tp, sequence_parallel=sp,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32, transformer_impl="local")


def _gpt(cfg, tied=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    torch.manual_seed(1234)
    gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                   share_embeddings_and_output_weights=tied)
    with torch.no_grad():  # weights keyed by name (independent of the RNG's history; TP ranks draw their own)
        import zlib
        from megatron.core import parallel_state as ps
        tp_rank = ps.get_tensor_model_parallel_rank()
        for name, p in gpt.named_parameters():
            if p.ndim >= 2:
                g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{tp_rank}".encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return gpt


def _build(name, fsdp, md_kw=None, bf16=False, tied=False, tp=1, sp=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.megatron.config import MDConfig
    from megatron_md.megatron.fsdp import fsdp2_class

    cfg = _config(bf16, tp, sp)
    gpt = _gpt(cfg, tied)
    if bf16:
        from megatron.core.transformer.module import Float16Module
        gpt = Float16Module(cfg, gpt)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=not fsdp)
    if fsdp == "megatron":
        from megatron_md.training.model import _megatron_fsdp
        model = _megatron_fsdp(cfg, gpt)
    elif fsdp:
        model = fsdp2_class()(cfg, ddp_cfg, gpt)
    else:
        model = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=gpt)
    ocfg = OptimizerConfig(optimizer="adam", lr=LRS[name], min_lr=0.0, weight_decay=0.0, clip_grad=1.0,
                           bf16=bf16, params_dtype=cfg.params_dtype)
    md = MDConfig(optimizer=name, **dict(dict(split_fc1=True), **(md_kw or {})))
    return model, get_megatron_optimizer(ocfg, [model], md)


def _train(model, opt, steps=STEPS, poison_rank=None):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    losses, oks = [], []
    for s in range(steps):
        tokens, labels = _batch(s, r, dp)
        model.zero_grad_buffer()
        opt.zero_grad()
        pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1)
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        if poison_rank is not None and r == poison_rank:
            p = next(p for n, p in model.module.named_parameters() if "linear_fc1" in n)
            g = p.grad._local_tensor if hasattr(p.grad, "_local_tensor") else p.main_grad
            g.view(-1)[0] = float("nan")
        finalize_model_grads([model])
        ok, _, _ = opt.step()
        oks.append(ok)
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=ps.get_data_parallel_group())
        losses.append(mean.item() / dp)
    return (losses, oks) if poison_rank is not None else losses


def _full_params(model):
    """name -> this TP rank's fp32 parameter (FSDP2 DTensors gathered over DP; DDP's as they are)."""
    from megatron_md.megatron.fsdp import is_dtensor
    out = {}
    from megatron_md.megatron.fsdp import is_megatron_fsdp
    if is_megatron_fsdp(model):
        from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import gather_uneven_dtensor_to_full_tensor
    for name, p in model.module.named_parameters():
        if is_dtensor(p) and is_megatron_fsdp(model):  # uneven row pieces, the mesh DP × TP: this TP rank's part
            t = gather_uneven_dtensor_to_full_tensor(p)
            t = t.full_tensor() if is_dtensor(t) else t
            names = p.device_mesh.mesh_dim_names or ()
            for i, pl in enumerate(p.placements):
                if names[i] == "tp" and pl.is_shard():
                    from megatron.core import parallel_state as ps
                    t = t.chunk(p.device_mesh.size(i), dim=pl.dim)[ps.get_tensor_model_parallel_rank()]
        else:
            t = p.full_tensor() if is_dtensor(p) else p
        out[name.replace("module.", "")] = t.detach().float().clone()
    return out


def _checks(ctx):
    from megatron_md.megatron.fsdp import is_dtensor
    from megatron_md.shard import comm

    ctx.init_model_parallel(tp=1)
    refs = {}
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/ddp"):
            model, opt = _build(name, fsdp=False)
            losses = _train(model, opt)
            assert losses[-1] < losses[0], losses
            refs[name] = (losses, _full_params(model))
        with ctx.check(f"{name}/fsdp2"):
            assert name in refs, "reference failed"
            model, opt = _build(name, fsdp=True)
            qkv = dict(model.module.named_parameters())["decoder.layers.0.self_attention.linear_qkv.weight"]
            assert is_dtensor(qkv) and qkv._local_tensor.shape[0] == qkv.shape[0] // 2, qkv.shape
            ctx.record(f"{name}/fsdp2", _compare(refs[name], (_train(model, opt), _full_params(model)),
                                                 RTOL_PARAM_BY.get(name, RTOL_PARAM)))

    for name in OPTIMIZERS:
        with ctx.check(f"{name}/megatron-fsdp"):
            # Megatron-FSDP (ZeRO-3 optim_grads_params): each rank whole rows of every weight, cut where
            # its flat buckets split (uneven)
            assert name in refs, "reference failed"
            model, opt = _build(name, fsdp="megatron")
            ctx.record(f"{name}/megatron-fsdp", _compare(refs[name], (_train(model, opt), _full_params(model)),
                                                         RTOL_PARAM_BY.get(name, RTOL_PARAM)))

    for name in ("adam-md", "muon-md"):
        with ctx.check(f"{name}/fsdp2-recipe"):
            # MD's recipe under FSDP2: unit-norm embedding rows and the row-sphere head, each rank
            # projecting its own rows
            model, opt = _build(name, fsdp=True)
            _train(model, opt, steps=2)
            full = _full_params(model)
            emb = full["embedding.word_embeddings.weight"]
            torch.testing.assert_close(emb.norm(dim=1), torch.ones(emb.shape[0]), rtol=1e-5, atol=1e-5)

    with ctx.check("nonfinite-skips-on-every-rank"):
        model, opt = _build("muon-md", fsdp=True)
        _train(model, opt, steps=1)
        before = _full_params(model)
        (_, oks) = _train(model, opt, steps=1, poison_rank=1)
        from megatron_md.megatron.builder import skipped_steps
        assert oks == [False] and skipped_steps(opt) == 1, oks
        after = _full_params(model)
        assert all(torch.equal(before[k], after[k]) for k in before)

    with ctx.check("collectives-independent-of-matrix-count"):
        # the optimizer step's all-reduces (row/column statistics, norms: metered) do not grow with
        # the number of layers; Newton–Schulz pieces travel point-to-point, per matrix
        # (FSDP2 and Megatron-FSDP)
        global LAYERS
        counts = {}
        for fsdp in (True, "megatron"):
            for name in ("rmnp", "normuon", "muon-md"):
                for layers in (2, 4):
                    saved, LAYERS = LAYERS, layers
                    try:
                        model, opt = _build(name, fsdp=fsdp)
                    finally:
                        LAYERS = saved
                    _train(model, opt, steps=1)
                    comm.METER.reset()
                    _train(model, opt, steps=1)
                    counts[(fsdp, name, layers)] = sum(v for (_, kind), v in comm.METER.calls.items()
                                                       if kind == "all_reduce")
                assert counts[(fsdp, name, 2)] == counts[(fsdp, name, 4)] > 0, counts
        ctx.record("all-reduce-counts", {f"{'megatron-fsdp' if k[0] == 'megatron' else 'fsdp2'}/{k[1]}/L{k[2]}": v
                                         for k, v in counts.items()})

    with ctx.check("refusals"):
        from megatron.core.optimizer import OptimizerConfig

        from megatron_md.megatron.builder import get_megatron_optimizer
        from megatron_md.megatron.config import MDConfig
        from megatron_md.megatron.fsdp import fsdp2_class
        from megatron.core.distributed import DistributedDataParallelConfig
        cfg = _config()
        model = fsdp2_class()(cfg, DistributedDataParallelConfig(), _gpt(cfg))
        for kw, flag in ((dict(use_distributed_optimizer=True), "--use-distributed-optimizer"),):
            try:
                get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, **kw), [model],
                                       MDConfig(optimizer="muon"))
            except ValueError as exc:
                assert flag in str(exc) and "--use-torch-fsdp2" in str(exc), exc
            else:
                raise AssertionError(f"{flag} with FSDP2 was accepted")
        try:
            get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0), [model],
                                   MDConfig(optimizer="muon", dp_mode="layer-wise"))
        except ValueError as exc:
            assert "--dp-mode layer-wise" in str(exc), exc
        else:
            raise AssertionError("--dp-mode layer-wise with FSDP2 was accepted")

    for name in ("muon-md", "rmnp"):
        for kind, fsdp in (("bf16", True), ("megatron-fsdp-bf16", "megatron")):
            with ctx.check(f"{name}/{kind}"):
                model, opt = _build(name, fsdp=fsdp, bf16=True)
                losses = _train(model, opt, steps=8)
                assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.05, losses


    with ctx.check("driver-megatron-fsdp"):
        # the training driver with --use-megatron-fsdp (last: the driver sets up its own parallel state):
        # iteration for iteration the losses of plain DP=2, for a per-block method with MD's recipe,
        # dense and MoE (EP=1)
        from megatron_md.training.arguments import parse_args
        from megatron_md.training.pretrain import pretrain
        td = load_module(Path(__file__).with_name("test_driver.py"))
        base = td.synthetic_base(ctx, "--log-interval", "1", "--global-batch-size", "4", "--train-iters", "4",
                                 "--untie-embeddings-and-output-weights", "--optimizer", "muon-md")
        # dense, and a MoE (its experts marked as experts on Megatron-FSDP's DTensors: fsdp.mark_experts)
        moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
               "--disable-bias-linear"]
        for model in ([], moe):
            ref = pretrain(parse_args(base + model))["train_loss_history"]
            got = pretrain(parse_args(base + model + ["--use-megatron-fsdp"]))["train_loss_history"]
            assert ref.keys() == got.keys() and len(ref) == 4, (ref, got)
            for it, x in ref.items():
                assert math.isfinite(x) and abs(got[it] - x) <= 1e-5 * abs(x), (model, it, x, got[it])


group = group_fixture(2, _checks, megatron=True, timeout=1200)


def _checks_tp2(ctx):
    """4 ranks: TP=2 × FSDP2 over DP=2 against TP=2 × plain DP=2, every optimizer (the TP-local
    rows of each weight cut again over DP: flat ranges inside tensor-parallel layouts); and with
    sequence parallelism (megatron-core all-reduces the norms' gradients over TP between FSDP2's
    DTensors)."""
    ctx.init_model_parallel(tp=2)
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/tp2-fsdp2"):
            model, opt = _build(name, fsdp=False, tp=2)
            ref = (_train(model, opt), _full_params(model))
            model, opt = _build(name, fsdp=True, tp=2)
            ctx.record(f"{name}/tp2-fsdp2", _compare(ref, (_train(model, opt), _full_params(model)),
                                                     RTOL_PARAM_BY.get(name, RTOL_PARAM)))
    with ctx.check("ns-split-reaches-the-optimizer"):
        # --ns-split (MDConfig.ns_split) is what the matrix optimizer's orthogonalize gets; off: the environment
        from megatron_md.megatron.builder import hybrid_optimizers
        for flag, want in ((True, True), (False, None)):
            _, opt = _build("muon", fsdp=True, tp=2, md_kw=dict(ns_split=flag))
            got = hybrid_optimizers(opt)[0].matrix_optimizer.ns_split
            assert got is want, (flag, got)
    with ctx.check("muon-md/tp2-sp-fsdp2"):
        model, opt = _build("muon-md", fsdp=False, tp=2, sp=True)
        ref = (_train(model, opt), _full_params(model))
        model, opt = _build("muon-md", fsdp=True, tp=2, sp=True)
        ctx.record("muon-md/tp2-sp-fsdp2", _compare(ref, (_train(model, opt), _full_params(model))))


group4 = group_fixture(4, _checks_tp2, megatron=True, timeout=1200)


def _checks_tp2_megatron_fsdp(ctx):
    """4 ranks: TP=2 × Megatron-FSDP DP=2 against TP=2 × plain DP=2, every optimizer (its DTensors span
    DP × TP: each rank's rows of its TP-local part). In the slow tier: a rank of this group segfaulted
    (exit -11) inside Megatron-FSDP's forward once in a clean-clone CI run, after passing in every earlier
    run; not yet traced (the closing note of stop 19)."""
    ctx.init_model_parallel(tp=2)
    for name in OPTIMIZERS:
        with ctx.check(f"{name}/tp2-megatron-fsdp"):
            model, opt = _build(name, fsdp=False, tp=2)
            ref = (_train(model, opt), _full_params(model))
            model, opt = _build(name, fsdp="megatron", tp=2)
            ctx.record(f"{name}/tp2-megatron-fsdp", _compare(ref, (_train(model, opt), _full_params(model)),
                                                             RTOL_PARAM_BY.get(name, RTOL_PARAM)))


group4m = group_fixture(4, _checks_tp2_megatron_fsdp, megatron=True, timeout=1200)

CHECKS = [f"{n}/{s}" for n in OPTIMIZERS for s in ("ddp", "fsdp2", "megatron-fsdp")] + \
    ["adam-md/fsdp2-recipe", "muon-md/fsdp2-recipe", "nonfinite-skips-on-every-rank",
     "collectives-independent-of-matrix-count", "refusals", "muon-md/bf16", "rmnp/bf16",
     "muon-md/megatron-fsdp-bf16", "rmnp/megatron-fsdp-bf16", "driver-megatron-fsdp"]


@pytest.mark.parametrize("check", CHECKS)
def test_fsdp2(group, check):
    group.assert_ok(check)


@pytest.mark.parametrize("check", [f"{n}/tp2-fsdp2" for n in OPTIMIZERS]
                         + ["muon-md/tp2-sp-fsdp2",
                                                                           "ns-split-reaches-the-optimizer"])
def test_tp2_fsdp2(group4, check):
    group4.assert_ok(check)


@pytest.mark.slow
@pytest.mark.parametrize("check", [f"{n}/tp2-megatron-fsdp" for n in OPTIMIZERS])
def test_tp2_megatron_fsdp(group4m, check):
    group4m.assert_ok(check)
