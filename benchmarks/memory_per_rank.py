#!/usr/bin/env python
"""Memory per rank of weights, gradients and optimizer state under plain DP, ZeRO-1, torch FSDP2 and
Megatron-FSDP.

Two gloo ranks (DP=2) build the same GPTModel (local spec, GQA, SwiGLU, untied head) in megatron-core's
DDP (plain, or with the distributed optimizer: ZeRO-1) or in its torch FSDP2 wrapper, build megatron_md's
optimizer, run one step and count, on rank 0, the bytes of every distinct storage that holds

* **weights**: the model's parameters (DDP's contiguous param buffer; FSDP2's local row shards),
* **grads**: the gradients after backward (DDP's grad buffer; FSDP2's reduce-scattered local rows),
* **optimizer**: every optimizer state tensor (moments, momenta, schedule-free ``z``, MD gains, row
  moments) and, in bf16, the fp32 main copies of the weights,

each storage counted once (a ZeRO-1 fp32 shard is a view of the param buffer: counted as a weight).
Counts, not timings. Writes the table between the ``memory_per_rank`` markers of docs/memory.md.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/memory_per_rank.py [--hidden 256] [--bf16]``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import header  # noqa: E402

OPTIMIZERS = ["adam", "muon", "normuon", "rmnp", "muon-md", "sf-normuon"]
MODES = ["dp", "zero1", "fsdp2", "mfsdp"]
LABELS = {"dp": "plain DP", "zero1": "ZeRO-1", "fsdp2": "FSDP2", "mfsdp": "Megatron-FSDP"}
BEGIN, END = "<!-- BEGIN memory_per_rank -->", "<!-- END memory_per_rank -->"


def _storages(tensors) -> dict:
    out = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        if hasattr(t, "_local_tensor"):
            t = t._local_tensor
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def _state_tensors(x):
    import torch
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _state_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _state_tensors(v)


def _measure(ctx, hidden: int, layers: int, bf16: bool):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_md.megatron.builder import get_megatron_optimizer, hybrid_optimizers
    from megatron_md.megatron.config import MDConfig
    from megatron_md.megatron.fsdp import fsdp2_class

    ctx.init_model_parallel(tp=1)
    rows = {}
    vocab, seq = 1024, 32
    for name in OPTIMIZERS:
        for mode in MODES:
            with ctx.check(f"{name}/{mode}"):
                cfg = TransformerConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
                                        num_attention_heads=8, num_query_groups=4, use_cpu_initialization=True,
                                        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
                                        gated_linear_unit=True, transformer_impl="local", bf16=bf16,
                                        params_dtype=torch.bfloat16 if bf16 else torch.float32)
                torch.manual_seed(1)
                gpt = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=vocab, max_sequence_length=seq,
                               share_embeddings_and_output_weights=False)
                if bf16:
                    from megatron.core.transformer.module import Float16Module
                    gpt = Float16Module(cfg, gpt)
                zero = mode == "zero1"
                if mode == "fsdp2":
                    model = fsdp2_class()(cfg, DistributedDataParallelConfig(), gpt)
                elif mode == "mfsdp":
                    from megatron_md.training.model import _megatron_fsdp
                    model = _megatron_fsdp(cfg, gpt)
                else:
                    model = DistributedDataParallel(config=cfg, ddp_config=DistributedDataParallelConfig(
                        grad_reduce_in_fp32=not bf16, use_distributed_optimizer=zero), module=gpt)
                opt = get_megatron_optimizer(
                    OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, use_distributed_optimizer=zero,
                                    bf16=bf16, params_dtype=cfg.params_dtype),
                    [model], MDConfig(optimizer=name))
                tok = torch.randint(0, vocab, (2, seq + 1), generator=torch.Generator().manual_seed(ctx.rank))
                pos = torch.arange(seq).unsqueeze(0).expand(2, -1)
                model.zero_grad_buffer()
                model(tok[:, :-1], pos, None, labels=tok[:, 1:]).float().mean().backward()
                finalize_model_grads([model])
                if mode == "mfsdp":  # its sharded buffers: model weights (gathered per unit), fp32 main weights, grads
                    groups = model.param_and_grad_buffer.parameter_groups
                    weights = _storages(getattr(b, "data", None) for g in groups
                                        for b in (g.model_weight_buffer, g.main_weight_buffer) if b is not None)
                    grads = _storages(g.main_grad_buffer.data for g in groups if g.main_grad_buffer is not None)
                else:
                    weights = _storages(p for p in model.module.parameters())
                if mode == "fsdp2":
                    grads = _storages(p.grad for p in model.module.parameters())
                elif mode == "mfsdp":
                    pass
                else:
                    grads = _storages(b.grad_data for b in model.buffers)
                opt.step()
                state = []
                for inner in hybrid_optimizers(opt):
                    state += list(_state_tensors(dict(inner.state)))
                    for sub in (inner.matrix_optimizer, inner.head_optimizer):
                        if sub is not None:
                            state += list(_state_tensors(dict(sub.state)))
                for w in getattr(opt, "chained_optimizers", [opt]):
                    for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
                        for g in getattr(w, attr, []) or []:
                            state += list(g)
                st = {k: v for k, v in _storages(state).items() if k not in weights and k not in grads}
                rows[(name, mode)] = (sum(weights.values()), sum(grads.values()), sum(st.values()))
    ctx.record("rows", rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main copies in the optimizer)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory.md"),
                    help="the file whose memory_per_rank section is replaced ('-': print only)")
    a = ap.parse_args(argv)
    from megatron_md.testing.spawn import run_group
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), str(ROOT), os.environ.get("PYTHONPATH")])),
           "MEGATRON_MD_NS_DTYPE": "fp32"}
    res = run_group(2, f"{Path(__file__).stem}:_measure", a.hidden, a.layers, a.bf16, megatron=True, timeout=1200,
                    env=env)
    res.raise_for_failures()
    # the mean of the two ranks (Megatron-FSDP cuts its buckets at whole rows: its ranks hold unequal parts)
    rows = {k: tuple((a + b) / 2 for a, b in zip(v, res.values[1]["rows"][k])) for k, v in res.values[0]["rows"].items()}
    spread = {k: abs(sum(v) - sum(res.values[1]["rows"][k])) / max(sum(v) + sum(res.values[1]["rows"][k]), 1) * 2
              for k, v in res.values[0]["rows"].items()}
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    dtype = "bf16 weights, fp32 main copies" if a.bf16 else "fp32"
    body = [f"Per rank (the mean of the DP=2 ranks), GPTModel hidden {a.hidden}, {a.layers} layers, GQA 8/4 heads, "
            f"SwiGLU ffn {4 * a.hidden}, vocab 1024, untied head; {dtype}; MiB. *ratio*: the rank's total against "
            "plain DP's with the same optimizer; *ranks differ*: |rank 0 − rank 1| / mean of the totals.", "",
            "| optimizer | mode | weights | grads | optimizer state | total | ratio | ranks differ |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in OPTIMIZERS:
        base = sum(rows[(name, "dp")])
        for mode in MODES:
            w, g, s = rows[(name, mode)]
            body.append(f"| {name} | {LABELS[mode]} | {mb(w)} | {mb(g)} | {mb(s)} | {mb(w + g + s)} | "
                        f"{(w + g + s) / base:.3f} | {spread[(name, mode)]:.2f} |")
    body += ["", "FSDP2 divides weights, gradients and optimizer state by the data-parallel size (0.50 at DP=2); "
             "ZeRO-1 divides the optimizer state only (megatron-core's distributed optimizer keeps the whole "
             "gradient buffer and the whole weights on every rank). What FSDP2 adds above 0.500 is the per-matrix "
             "vectors (MD's gains, NorMuon's row moments) of the rows a rank holds. Megatron-FSDP's weights are "
             "its sharded model-weight and main-weight buffers — two sharded copies, in fp32 too (megatron-core "
             "0.16.1's adapter as the driver builds it), hence its 0.63–0.66 — and its gradients its sharded "
             "main-gradient buffer; the unit-at-a-time gathered buckets of forward and backward are transient and "
             "not counted. Its buckets are cut at whole rows of each weight but hold equal numbers of elements, "
             "so its ranks' totals agree (*ranks differ*)."]
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/memory_per_rank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([BEGIN, "## Memory per rank: plain DP, ZeRO-1, FSDP2, Megatron-FSDP", ""]
                     + header("", cmd, ROOT, "Counts, not timings.")[2:] + body + [END])
    print(text)
    if a.out != "-":
        p = Path(a.out)
        doc = p.read_text() if p.exists() else ""
        if BEGIN in doc and END in doc:
            doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, doc, flags=re.S)
        else:
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        p.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
