"""Command line of the Megatron-Core training driver: Megatron-LM-style flags plus megatron_md's.

:func:`parse_args` parses and :func:`validate_args` checks everything that can be checked
without building a model (parallel sizes against the world size, batch arithmetic, precision,
Transformer Engine / FP8 availability, the optimizer combination via
:func:`megatron_md.megatron.config.validate`). Every error is an :class:`ArgumentError`
(a ``ValueError``) whose message names the flags; the command-line entry point turns it into a
usage error (exit code 2) before any model, dataset or process group is created.

Flag names and meanings follow Megatron-LM; defaults that differ are noted in the help
(dropout 0, ``--transformer-impl`` auto-selected, ``--weight-decay`` and ``--lr-decay-style``
defaulting per optimizer).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

from ..checkpoint.md import check_resume
from ..megatron.config import MD_METHODS, NO_WEIGHT_DECAY, SCHEDULE_FREE, add_md_args, md_config_from_args, validate
from ..megatron.model_recipe import add_recipe_args, apply_recipe_preset, recipe_from_args

__all__ = ["ArgumentError", "build_parser", "parse_args", "parse_with_recipe", "validate_args", "te_available",
           "optimizer_config", "md_config", "world_size_from_env"]


class ArgumentError(ValueError):
    """Invalid command line (the message names the flags)."""


class _Parser(argparse.ArgumentParser):
    """Raises :class:`ArgumentError` instead of exiting, so callers (and tests) decide."""

    def error(self, message):  # noqa: D401 - argparse API
        raise ArgumentError(message)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer >= 1")
    return v


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer >= 0")
    return v


def build_parser(defaults: Optional[dict] = None, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The full parser; ``defaults`` overrides defaults (e.g. the MoE entry point's)."""
    p = _Parser(prog=prog, description="Megatron-Core GPT pretraining with megatron_md optimizers",
                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=_positive_int, default=None, help="transformer layers (required)")
    g.add_argument("--hidden-size", type=_positive_int, default=None, help="model width (required)")
    g.add_argument("--num-attention-heads", type=_positive_int, default=None, help="(required)")
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM "
                   "compatibility; --num-query-groups alone enables GQA")
    g.add_argument("--num-query-groups", type=_positive_int, default=None, help="KV groups (default: heads)")
    g.add_argument("--ffn-hidden-size", type=_positive_int, default=None, help="default 4*hidden")
    g.add_argument("--kv-channels", type=_positive_int, default=None, help="default hidden/heads")
    g.add_argument("--seq-length", type=_positive_int, default=None, help="(required)")
    g.add_argument("--max-position-embeddings", type=_positive_int, default=None,
                   help="default --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rope-type", choices=["rope", "yarn"], default="rope",
                   help="yarn: YaRN context extension of RoPE (arXiv:2309.00071; megatron-core's YarnRotaryEmbedding, "
                   "for multi-head/GQA and for --multi-latent-attention): frequencies interpolated by "
                   "--rotary-scaling-factor between --beta-fast and --beta-slow rotations over "
                   "--original-max-position-embeddings, attention temperature from --mscale/--mscale-all-dim. "
                   "Needs --position-embedding-type rope")
    g.add_argument("--rotary-scaling-factor", type=float, default=None,
                   help="YaRN's context extension factor s >= 1 (with --rope-type yarn; default 1)")
    g.add_argument("--original-max-position-embeddings", type=_positive_int, default=None,
                   help="the context length before YaRN's extension (required with --rope-type yarn)")
    g.add_argument("--beta-fast", type=float, default=None, help="YaRN's beta_fast (default 32)")
    g.add_argument("--beta-slow", type=float, default=None, help="YaRN's beta_slow (default 1)")
    g.add_argument("--mscale", type=float, default=None, help="YaRN's mscale (default 1)")
    g.add_argument("--mscale-all-dim", type=float, default=None, help="YaRN's mscale_all_dim (default 0)")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of every LayerNorm/RMSNorm")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated, SiLU)")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in linear layers")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="(Megatron-LM default: 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="(Megatron-LM default: 0.1)")
    g.add_argument("--make-vocab-size-divisible-by", type=_positive_int, default=128,
                   help="pad the vocabulary to a multiple of this times the TP size")

    g = p.add_argument_group("multi-latent attention", "DeepSeek-V2/V3 attention (megatron-core's MLASelfAttention; "
                             "megatron_md.megatron.mla): low-rank query and key/value latents, a decoupled RoPE part "
                             "per head; needs --position-embedding-type rope")
    g.add_argument("--multi-latent-attention", action="store_true",
                   help="MLA instead of multi-head/grouped-query attention (every layer)")
    g.add_argument("--q-lora-rank", type=_positive_int, default=None,
                   help="rank of the query latent (linear_q_down_proj, q_layernorm, linear_q_up_proj); default none: "
                   "the query is one projection of the hidden state (linear_q_proj)")
    g.add_argument("--kv-lora-rank", type=_positive_int, default=None,
                   help="rank of the key/value latent (default 32, as Megatron-LM)")
    g.add_argument("--qk-head-dim", type=_positive_int, default=None,
                   help="per-head query/key dims without RoPE (default 128, as Megatron-LM)")
    g.add_argument("--qk-pos-emb-head-dim", type=_positive_int, default=None,
                   help="per-head query/key dims with RoPE; the key's are shared by all heads (default 64, as "
                   "Megatron-LM; even)")
    g.add_argument("--v-head-dim", type=_positive_int, default=None, help="per-head value dims (default 128, "
                   "as Megatron-LM)")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=_positive_int, default=None, help="experts per MoE layer (off: dense)")
    g.add_argument("--moe-router-topk", type=_positive_int, default=2)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="load-balancing aux loss weight")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"],
                   default="aux_loss")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall", "flex"], default="allgather")
    g.add_argument("--moe-ffn-hidden-size", type=_positive_int, default=None, help="default --ffn-hidden-size")
    g.add_argument("--moe-router-pre-softmax", action="store_true", help="softmax before top-k (needed for top-1)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=_positive_int, default=None,
                   help="a shared expert (DeepSeek-style: one MLP every token passes, beside the routed ones) of this "
                   "hidden size (e.g. the routed --moe-ffn-hidden-size times the number of shared experts)")
    g.add_argument("--moe-grouped-gemm", action="store_true")
    g.add_argument("--expert-tensor-parallel-size", type=_positive_int, default=None,
                   help="TP size of the experts (default: --tensor-model-parallel-size)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1,
                   help="pipeline stages (megatron-core's 1F1B schedule; --num-layers divisible by it)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int, default=None,
                   help="layers per virtual stage: the interleaved 1F1B schedule (needs --pipeline-model-parallel-size > 1)")
    g.add_argument("--expert-model-parallel-size", type=_positive_int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="needs --tensor-model-parallel-size > 1")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO-1 over data parallel")
    g.add_argument("--use-torch-fsdp2", action="store_true",
                   help="torch FSDP2 over data parallel (megatron-core's TorchFullyShardedDataParallel): parameters, "
                   "gradients and optimizer state sharded by rows; every optimizer's update stays the exact one. "
                   "Not with --pipeline-model-parallel-size > 1, --expert-model-parallel-size > 1, "
                   "--use-distributed-optimizer, --overlap-grad-reduce/--overlap-param-gather or --dp-mode layer-wise")
    g.add_argument("--use-megatron-fsdp", action="store_true",
                   help="Megatron-FSDP over data parallel (megatron-core's FullyShardedDataParallel, ZeRO-3 "
                   "optim_grads_params: parameters, gradients and optimizer state in flat buckets cut at whole "
                   "rows); every optimizer's update stays the exact one; torch_dist checkpoints that reshard. Same "
                   "restrictions as --use-torch-fsdp2, and no --load-hf")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap DDP's gradient all-reduce (reduce-scatter with --use-distributed-optimizer) with "
                   "the backward pass: each bucket's collective starts as soon as its gradients are ready")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's all-gather of the updated parameters with the next "
                   "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=_positive_int, default=None,
                   help="elements per gradient bucket (needs --overlap-grad-reduce; default max(40M, 1M x data-parallel "
                   "size), as Megatron-LM); without overlap all gradients form one bucket")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, else gloo")
    g.add_argument("--distributed-timeout-minutes", type=_positive_int, default=10)

    g = p.add_argument_group("precision and kernels")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="only with --optimizer adam")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale (fp16)")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when it is importable with CUDA, else local")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 training (needs --transformer-impl transformer_engine, CUDA, --bf16)")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed")
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=_positive_int, default=1)
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent")

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None, help="(required) peak LR of the matrix optimizer "
                   "(of AdamW for --optimizer adam); the partner uses --partner-lr or this")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default=None,
                   help="default: constant for schedule-free optimizers, else linear")
    g.add_argument("--lr-decay-iters", type=_positive_int, default=None, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=_nonneg_int, default=0)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="default: 0 for adamh/muonh/adam-md/muon-md (they take none), else 0.01")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip (0: off)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=_positive_int, default=None, help="(required)")
    g.add_argument("--global-batch-size", type=_positive_int, default=None,
                   help="default micro-batch-size * data-parallel size")
    g.add_argument("--train-iters", type=_nonneg_int, default=None,
                   help="(required) 0: train nothing: write what --load or --load-hf gave to --save (a conversion)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=_positive_int, default=1000)
    g.add_argument("--eval-iters", type=_nonneg_int, default=100,
                   help="validation batches (the same fixed batches at every evaluation)")
    g.add_argument("--log-interval", type=_positive_int, default=100)
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard scalars (needs tensorboard)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="stop the run (before saving) when the loss is NaN/Inf; non-finite gradients or grad "
                   "norms skip the step either way")
    g.add_argument("--loss-spike-factor", type=float, default=10.0,
                   help="stop the run (before saving) when an iteration's loss exceeds this multiple of the mean "
                   "of the previous --loss-spike-window iterations (0: off)")
    g.add_argument("--loss-spike-window", type=_positive_int, default=20,
                   help="iterations in the recent mean of --loss-spike-factor (checked once that many are known)")
    g.add_argument("--exit-interval", type=_positive_int, default=None,
                   help="stop after this iteration (the LR schedule still follows --train-iters)")
    g.add_argument("--log-jsonl", default=None, help="append train/valid/optimizer-stats/summary events to this "
                   "JSON-lines file (rank 0; read by tools/plot_run.py and tools/sweep.py)")

    g = p.add_argument_group("optimizer telemetry")
    g.add_argument("--log-optimizer-stats-interval", type=_nonneg_int, default=0,
                   help="every K iterations log per-matrix effective LR ||w_hat' - w_hat||, ||w||, ||u||, cos(u,w), "
                   "MD gain statistics and RMNP diagnostics (0: off)")
    g.add_argument("--log-optimizer-stats-samples", type=_nonneg_int, default=2,
                   help="RMNP: matrices per rank on which the Newton-Schulz comparison and V V^T diagonal "
                   "dominance are computed (each costs one Newton-Schulz)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=_positive_int, default=None,
                   help="iterations between checkpoints (a final one is always written with --save)")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    g.add_argument("--ckpt-step", type=_nonneg_int, default=None, help="load this iteration instead of the latest")
    g.add_argument("--no-load-optim", action="store_true", help="load only the model weights")
    g.add_argument("--export-sf-x", action="store_true",
                   help="with --load of a schedule-free checkpoint and nothing left to train (--train-iters = its "
                   "iteration): --save writes the averaged weights x, weights only (what tools/convert_checkpoint.py "
                   "sf-to-x runs for torch_dist)")
    g.add_argument("--load-hf", default=None, metavar="DIR",
                   help="start from a Hugging Face Llama/Mixtral/Qwen3 folder (save_pretrained's safetensors) instead "
                   "of a random init: the model flags must be those its config.json implies (tools/"
                   "convert_checkpoint.py from-hf prints them); MD optimizers need --md-init factor "
                   "--no-md-embedding-unit-norm (the weights are kept). Not with --load")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch_dist",
                   help="torch_dist: Megatron distributed checkpoints (megatron.core.dist_checkpointing), model "
                   "and every optimizer state in the unsharded model's coordinates: --load at any TP/PP/EP/DP "
                   "layout and DP mode; torch: per-rank files (resume with the same layout). Both carry a sha256 "
                   "manifest; --load reads either")
    g.add_argument("--async-save", action="store_true",
                   help="Megatron-LM's asynchronous save: refused (saves are synchronous and atomic)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None,
                   help="prefix written by tools/preprocess_data.py (<prefix>_train/_valid, <prefix>.json)")
    g.add_argument("--mock-data", action="store_true", help="megatron-core's synthetic GPT data")
    g.add_argument("--vocab-size", type=_positive_int, default=None,
                   help="tokenizer vocabulary (default: from <data-path>.json; 4096 with --mock-data)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on predicting EOD")
    g.add_argument("--dataloader-cache", default=None, help="GPTDataset index cache dir "
                   "(default <data dir>/cache)")

    add_recipe_args(p)
    add_md_args(p)
    if defaults:
        p.set_defaults(**defaults)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None,
               world_size: Optional[int] = None) -> argparse.Namespace:
    """Parse and validate; raises :class:`ArgumentError` (naming the flags) on any problem."""
    return validate_args(parse_with_recipe(build_parser(defaults), argv), world_size=world_size)


def parse_with_recipe(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then ``--model-recipe``'s preset for every flag ``argv`` does not give."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        apply_recipe_preset(parser, args, argv)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None
    return args


def world_size_from_env() -> int:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def te_available() -> tuple[bool, str]:
    """(True, "") if Transformer Engine and CUDA are usable, else (False, why)."""
    import torch
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
        return False, (f"Transformer Engine is not importable ({type(exc).__name__}: {exc}); "
                       "install the extra: pip install 'megatron_md[te]'")
    if not torch.cuda.is_available():
        return False, "Transformer Engine needs CUDA, which is not available"
    return True, ""


def _need(args, *names):
    missing = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is None]
    if missing:
        raise ArgumentError(f"missing required argument(s): {' '.join(missing)}")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check the flags and fill derived defaults (in place; returns ``args``)."""
    _need(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
          "train_iters", "lr")
    # ---------------------------------------------------------------- schedule / optimizer
    name = args.optimizer
    if args.lr_decay_style is None:
        args.lr_decay_style = "constant" if name in SCHEDULE_FREE else "linear"
    if args.weight_decay is None:
        args.weight_decay = 0.0 if name in NO_WEIGHT_DECAY else 0.01
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ArgumentError(f"--lr {args.lr}: must be a finite number > 0")
    if not 0 <= args.min_lr <= args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr}: must be in [0, --lr {args.lr}]")
    if args.weight_decay < 0 or args.clip_grad < 0:
        raise ArgumentError("--weight-decay and --clip-grad must be >= 0")
    args.lr_decay_iters = args.lr_decay_iters or max(1, args.train_iters)
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be < --lr-decay-iters "
                            f"{args.lr_decay_iters} (default --train-iters)")
    try:
        args.md = validate(md_config_from_args(args), args)
        check_resume(args.md, args)  # a to-md checkpoint names the flags it must be resumed with
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None
    if args.md.split_fc1 and not args.swiglu:
        raise ArgumentError("--split-fc1 splits a SwiGLU linear_fc1 into its gate and up halves; it needs --swiglu")

    _validate_overlap(args)
    _validate_fsdp2(args)
    _validate_yarn(args)

    ws = world_size if world_size is not None else world_size_from_env()
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = None
    lpv = args.num_layers_per_virtual_pipeline_stage
    if lpv is not None:
        if pp == 1:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if (args.num_layers // pp) % lpv:
            raise ArgumentError(f"--num-layers-per-virtual-pipeline-stage {lpv} does not divide the "
                                f"{args.num_layers // pp} layers per pipeline stage (--num-layers {args.num_layers} / "
                                f"--pipeline-model-parallel-size {pp})")
        args.virtual_pipeline_model_parallel_size = args.num_layers // pp // lpv
        if args.virtual_pipeline_model_parallel_size == 1:
            args.virtual_pipeline_model_parallel_size = None  # one chunk per stage: plain 1F1B
    if ws % (tp * pp):
        raise ArgumentError(f"world size {ws} is not divisible by --tensor-model-parallel-size {tp} x "
                            f"--pipeline-model-parallel-size {pp}")
    args.world_size = ws
    args.data_parallel_size = dp = ws // (tp * pp)
    h, heads = args.hidden_size, args.num_attention_heads
    if args.kv_channels is None and h % heads and not args.multi_latent_attention:
        raise ArgumentError(f"--hidden-size {h} is not divisible by --num-attention-heads {heads} "
                            "(or pass --kv-channels)")
    if heads % tp:
        raise ArgumentError(f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}")
    groups = args.num_query_groups or heads
    if heads % groups:
        raise ArgumentError(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    if groups % tp:
        raise ArgumentError(f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}")
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * h
    if args.swiglu and args.ffn_hidden_size % tp:
        raise ArgumentError(f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{args.max_position_embeddings}")
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgumentError(f"--sequence-parallel: --seq-length {args.seq_length} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgumentError(f"--{name.replace('_', '-')} must be in [0, 1)")

    # ---------------------------------------------------------------- MoE
    etp = args.expert_tensor_parallel_size or tp
    args.expert_tensor_parallel_size = etp
    if args.num_experts is None:
        if ep > 1:
            raise ArgumentError(f"--expert-model-parallel-size {ep} needs --num-experts")
        if args.moe_shared_expert_intermediate_size:
            raise ArgumentError("--moe-shared-expert-intermediate-size needs --num-experts (a shared expert sits "
                                "beside routed ones)")
    else:
        ne = args.num_experts
        if tp > 1 and not args.sequence_parallel:
            # megatron-core's MoELayer.forward raises this in training (Megatron-LM's validate_args too)
            raise ArgumentError(f"--num-experts with --tensor-model-parallel-size {tp} needs --sequence-parallel")
        if ne % ep:
            raise ArgumentError(f"--num-experts {ne} is not divisible by --expert-model-parallel-size {ep}")
        if args.moe_router_topk > ne:
            raise ArgumentError(f"--moe-router-topk {args.moe_router_topk} exceeds --num-experts {ne}")
        if args.moe_router_topk == 1 and not args.moe_router_pre_softmax:
            raise ArgumentError("--moe-router-topk 1 needs --moe-router-pre-softmax (megatron-core's top-1 router)")
        if (ws // pp) % (ep * etp):
            raise ArgumentError(f"world size {ws} / --pipeline-model-parallel-size {pp} is not divisible by "
                                f"--expert-model-parallel-size {ep} x expert tensor parallel size {etp}")
        if args.moe_token_dispatcher_type == "flex":
            raise ArgumentError("--moe-token-dispatcher-type flex needs DeepEP/HybridEP, which this driver does "
                                "not set up; use alltoall or allgather")
        if args.moe_aux_loss_coeff < 0:
            raise ArgumentError("--moe-aux-loss-coeff must be >= 0")
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
        if args.moe_grouped_gemm and not args.bf16:
            raise ArgumentError("--moe-grouped-gemm needs --bf16")

    # ---------------------------------------------------------------- batches
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size {dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.virtual_pipeline_model_parallel_size and args.num_microbatches % pp:
        raise ArgumentError(f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the number of "
                            f"micro-batches ({args.num_microbatches} = --global-batch-size / (--micro-batch-size x "
                            f"data-parallel size)) to be a multiple of --pipeline-model-parallel-size {pp}")

    # ---------------------------------------------------------------- precision / TE / FP8
    import torch
    if args.fp16 and args.bf16:
        raise ArgumentError("--fp16 and --bf16 are mutually exclusive")
    if args.fp16 and args.loss_scale is None:
        raise ArgumentError("--fp16 needs a static --loss-scale in this driver (no dynamic loss scaling)")
    if args.transformer_impl is None:
        ok, _ = te_available()
        args.transformer_impl = "transformer_engine" if ok else "local"
    elif args.transformer_impl == "transformer_engine":
        ok, why = te_available()
        if not ok:
            raise ArgumentError(f"--transformer-impl transformer_engine: {why}. Use --transformer-impl local")
    if args.fp8_format is not None:
        if args.transformer_impl != "transformer_engine":
            raise ArgumentError(f"--fp8-format {args.fp8_format} needs --transformer-impl transformer_engine "
                                f"(got {args.transformer_impl}); FP8 GEMMs exist only in Transformer Engine")
        if not torch.cuda.is_available():
            raise ArgumentError(f"--fp8-format {args.fp8_format} needs CUDA (an FP8-capable GPU)")
        if not args.bf16:
            raise ArgumentError(f"--fp8-format {args.fp8_format} needs --bf16")
    _validate_mla(args)
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if torch.cuda.is_available() else "gloo"
    elif args.distributed_backend == "nccl" and not torch.cuda.is_available():
        raise ArgumentError("--distributed-backend nccl needs CUDA; use gloo on CPU")

    # ---------------------------------------------------------------- data / checkpoints
    if args.data_path is None and not args.mock_data:
        raise ArgumentError("--data-path is required (run tools/preprocess_data.py), or pass --mock-data")
    if args.data_path is not None and args.mock_data:
        raise ArgumentError("--data-path and --mock-data are mutually exclusive")
    if args.data_path is not None:
        import json
        meta = f"{args.data_path}.json"
        if not os.path.exists(meta):
            raise ArgumentError(f"--data-path {args.data_path}: {meta} not found; create it with "
                                f"tools/preprocess_data.py --output-prefix {args.data_path}")
        with open(meta) as fh:
            args.data_meta = json.load(fh)
        for split in ("train", "valid"):
            for ext in ("bin", "idx"):
                f = f"{args.data_path}_{split}.{ext}"
                if not os.path.exists(f):
                    raise ArgumentError(f"--data-path {args.data_path}: {f} not found")
        args.vocab_size = args.vocab_size or args.data_meta["vocab_size"]
        args.eod_id = args.data_meta["eod_id"]
    else:
        args.data_meta = None
        args.vocab_size = args.vocab_size or 4096
        args.eod_id = 0
    mult = args.make_vocab_size_divisible_by * tp
    args.padded_vocab_size = int(math.ceil(args.vocab_size / mult) * mult)
    if args.loss_spike_factor < 0 or (args.loss_spike_factor and args.loss_spike_factor <= 1):
        raise ArgumentError(f"--loss-spike-factor {args.loss_spike_factor}: must be > 1 (or 0: off)")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save")
    if args.ckpt_step is not None and args.load is None:
        raise ArgumentError("--ckpt-step needs --load")
    if args.train_iters == 0 and not (args.load or args.load_hf):
        raise ArgumentError("--train-iters 0 trains nothing: it writes what --load or --load-hf gave to --save; "
                            "pass one of them (or --train-iters > 0)")
    if args.load_hf is not None:
        _validate_load_hf(args)
    if args.export_sf_x and (args.optimizer not in SCHEDULE_FREE or not args.load or not args.save
                             or args.no_load_optim):
        raise ArgumentError(f"--export-sf-x needs a schedule-free --optimizer ({', '.join(SCHEDULE_FREE)}; this run: "
                            f"{args.optimizer}), --load with its optimizer state (no --no-load-optim) and --save")
    if args.async_save:
        raise ArgumentError("--async-save: not supported by this driver (Megatron's asynchronous writer needs a "
                            "CUDA worker process per rank); drop --async-save (saves are synchronous and atomic)")
    return args


#: the MLA flags' values when --multi-latent-attention leaves them out (Megatron-LM's defaults)
MLA_DEFAULTS = {"kv_lora_rank": 32, "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128}
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def _validate_mla(args: argparse.Namespace) -> None:
    """``--multi-latent-attention`` and its dimensions (after ``--transformer-impl`` is resolved):
    the MLA flags need it, it needs RoPE and one key/value head per query head, and the local
    spec's column-parallel down projections need latent ranks divisible by the TP size."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if not args.multi_latent_attention:
        given = [flag(n) for n in MLA_FIELDS if getattr(args, n) is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} need --multi-latent-attention")
        return
    for name, value in MLA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.position_embedding_type != "rope":
        raise ArgumentError(f"--multi-latent-attention needs --position-embedding-type rope (got "
                            f"{args.position_embedding_type}): MLA rotates its --qk-pos-emb-head-dim dims itself, and "
                            "learned absolute positions would add a second position signal")
    heads = args.num_attention_heads
    if args.group_query_attention or (args.num_query_groups or heads) != heads:
        raise ArgumentError("--multi-latent-attention and --group-query-attention/--num-query-groups are mutually "
                            "exclusive (MLA's keys and values come per head from the shared latent)")
    if args.kv_channels is not None:
        raise ArgumentError("--kv-channels has no effect with --multi-latent-attention; set --qk-head-dim, "
                            "--qk-pos-emb-head-dim and --v-head-dim")
    if args.qk_pos_emb_head_dim % 2:
        raise ArgumentError(f"--qk-pos-emb-head-dim {args.qk_pos_emb_head_dim} must be even (RoPE rotates pairs)")
    recipe = recipe_from_args(args)
    extra = [f for on, f in ((recipe.post_norm, "--post-norm"), (recipe.fixed_layer_scale, "--fixed-layer-scale"))
             if on]
    if extra:
        raise ArgumentError(f"{', '.join(extra)} with --multi-latent-attention: not supported (the model recipe "
                            "post-processes megatron-core's SelfAttention, not MLASelfAttention)")
    tp = args.tensor_model_parallel_size
    if args.transformer_impl == "transformer_engine" and tp > 1 and not args.sequence_parallel:
        raise ArgumentError(f"--multi-latent-attention with --transformer-impl transformer_engine at "
                            f"--tensor-model-parallel-size {tp} needs --sequence-parallel: without it megatron-core "
                            "0.16 leaves the gradient of MLA's shared rotary key unreduced over TP (Megatron-LM issue "
                            "#1699; the local spec corrects it, megatron_md.megatron.mla)")
    if args.transformer_impl == "local" and tp > 1:
        # the local spec's down projections are ColumnParallelLinear: their output rows split over TP
        for what, rows in (("--q-lora-rank", args.q_lora_rank),
                           ("--kv-lora-rank + --qk-pos-emb-head-dim", args.kv_lora_rank + args.qk_pos_emb_head_dim)):
            if rows is not None and rows % tp:
                raise ArgumentError(f"--multi-latent-attention with --transformer-impl local: {what} ({rows}) is not "
                                    f"divisible by --tensor-model-parallel-size {tp} (the local spec splits the down "
                                    "projections' outputs over TP)")


def _model_settings(args: argparse.Namespace) -> dict:
    """This run's model as :func:`megatron_md.checkpoint.hf_import.expected_model` states one."""
    recipe = recipe_from_args(args)
    moe = bool(args.num_experts)
    return {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": args.num_attention_heads,
        "num_query_groups": args.num_query_groups or args.num_attention_heads,
        "kv_channels": args.kv_channels or args.hidden_size // args.num_attention_heads,
        "ffn_hidden_size": args.ffn_hidden_size, "max_position_embeddings": args.max_position_embeddings,
        "vocab_size": args.vocab_size, "norm_epsilon": args.norm_epsilon, "rotary_base": args.rotary_base,
        "normalization": args.normalization, "swiglu": args.swiglu,
        "position_embedding_type": args.position_embedding_type, "disable_bias_linear": args.disable_bias_linear,
        "untie_embeddings_and_output_weights": args.untie_embeddings_and_output_weights,
        "qk_layernorm": recipe.qk_layernorm, "num_experts": args.num_experts or None,
        "moe_router_topk": args.moe_router_topk if moe else None,
        "moe_ffn_hidden_size": (args.moe_ffn_hidden_size or args.ffn_hidden_size) if moe else None,
        "moe_router_pre_softmax": args.moe_router_pre_softmax if moe else None,
        "moe_shared_expert_intermediate_size": args.moe_shared_expert_intermediate_size if moe else None,
    }


def _validate_load_hf(args: argparse.Namespace) -> None:
    """``--load-hf``: the folder's model is the one these flags build, nothing else computes more."""
    from ..checkpoint.hf_import import check_model, read_config
    from ..errors import CheckpointError
    if args.multi_latent_attention:
        raise ArgumentError("--load-hf with --multi-latent-attention: the importer reads Llama/Mixtral/Qwen3 folders, "
                            "which have no multi-latent attention")
    if args.load is not None:
        raise ArgumentError("--load-hf and --load are mutually exclusive (--load-hf starts from a Hugging Face "
                            "model; --load resumes a checkpoint)")
    try:
        diffs = check_model(read_config(args.load_hf), _model_settings(args))
    except (ValueError, CheckpointError) as exc:
        raise ArgumentError(str(exc)) from None
    if diffs:
        raise ArgumentError(f"--load-hf {args.load_hf}: its config.json is another model; pass {diffs} "
                            "(tools/convert_checkpoint.py from-hf --print-flags lists them all)")
    recipe = recipe_from_args(args)
    extra = [flag for on, flag in ((recipe.embedding_multiplier, "--embedding-multiplier"),
                                   (recipe.post_norm, "--post-norm"),
                                   (recipe.fixed_layer_scale, "--fixed-layer-scale")) if on]
    if extra:
        raise ArgumentError(f"--load-hf {args.load_hf}: {', '.join(extra)} change the model's function; a Hugging "
                            "Face Llama/Mixtral/Qwen3 computes without them")
    if args.moe_grouped_gemm:
        raise ArgumentError("--load-hf with --moe-grouped-gemm: not supported (SequentialMLP experts only)")
    if args.md.optimizer in MD_METHODS and (args.md.md_init != "factor" or args.md.md_embedding_unit_norm):
        raise ArgumentError(f"--load-hf with --optimizer {args.md.optimizer}: pass --md-init factor "
                            "--no-md-embedding-unit-norm (MD then keeps the imported weights and factors its gains "
                            "from them; otherwise it projects every matrix onto its sphere)")


def _validate_overlap(args: argparse.Namespace) -> None:
    """``--overlap-grad-reduce`` / ``--overlap-param-gather`` / ``--ddp-bucket-size``, as Megatron-LM
    allows them. Overlapped parameter gathering exists only where the optimizer step leaves each
    rank with its own shard of the updated weights, i.e. the distributed optimizer; plain DDP and
    ``--dp-mode layer-wise`` (which broadcasts whole matrices inside the step) have no all-gather
    to overlap."""
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        layer_wise = " (--dp-mode layer-wise broadcasts inside the optimizer step and is plain DDP)" \
            if args.md.dp_mode == "layer-wise" else ""
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer: it overlaps the distributed "
                            "optimizer's all-gather of updated parameters with the next forward pass, and plain DDP "
                            f"has no such all-gather{layer_wise}; use --overlap-grad-reduce alone")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ArgumentError("--overlap-param-gather needs --overlap-grad-reduce (as Megatron-LM requires: without it "
                            "all parameters form one bucket, whose all-gather the first layer's forward waits for)")
    if args.ddp_bucket_size is not None and not args.overlap_grad_reduce:
        raise ArgumentError(f"--ddp-bucket-size {args.ddp_bucket_size} has no effect without --overlap-grad-reduce "
                            "(megatron-core then puts all gradients in one bucket)")


#: YaRN's flags and their values when --rope-type yarn leaves them out (megatron-core's YaRN defaults)
YARN_DEFAULTS = {"rotary_scaling_factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                 "mscale_all_dim": 0.0}
YARN_FIELDS = ("rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
               "mscale_all_dim")


def _validate_yarn(args: argparse.Namespace) -> None:
    """``--rope-type yarn`` and its parameters: RoPE only; the YaRN flags need it; the original context
    length is given and the factor is at least 1."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.rope_type != "yarn":
        given = [flag(n) for n in YARN_FIELDS if getattr(args, n) is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} need --rope-type yarn")
        return
    if args.position_embedding_type != "rope":
        raise ArgumentError(f"--rope-type yarn needs --position-embedding-type rope (got {args.position_embedding_type})")
    if args.original_max_position_embeddings is None:
        raise ArgumentError("--rope-type yarn needs --original-max-position-embeddings (the context length the "
                            "rotary frequencies were trained at, before the extension)")
    for name, value in YARN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not (math.isfinite(args.rotary_scaling_factor) and args.rotary_scaling_factor >= 1):
        raise ArgumentError(f"--rotary-scaling-factor {args.rotary_scaling_factor}: must be >= 1 (YaRN extends)")
    if not args.beta_fast > args.beta_slow > 0:
        raise ArgumentError(f"--beta-fast {args.beta_fast} and --beta-slow {args.beta_slow}: need beta_fast > "
                            "beta_slow > 0 (rotations over the original context)")


def _validate_fsdp2(args: argparse.Namespace) -> None:
    """``--use-torch-fsdp2`` / ``--use-megatron-fsdp`` where megatron-core's wrappers and megatron_md
    support them (the first three as Megatron-LM's own checks for FSDP2)."""
    flag = "--use-megatron-fsdp" if args.use_megatron_fsdp else "--use-torch-fsdp2"
    if args.use_megatron_fsdp and args.use_torch_fsdp2:
        raise ArgumentError("--use-torch-fsdp2 and --use-megatron-fsdp: pick one")
    if not (args.use_torch_fsdp2 or args.use_megatron_fsdp):
        return
    bad = [f for on, f in ((args.pipeline_model_parallel_size > 1, "--pipeline-model-parallel-size > 1"),
                           (args.expert_model_parallel_size > 1, "--expert-model-parallel-size > 1"),
                           (args.use_distributed_optimizer, "--use-distributed-optimizer"),
                           (args.overlap_grad_reduce, "--overlap-grad-reduce"),
                           (args.overlap_param_gather, "--overlap-param-gather"),
                           (args.md.dp_mode == "layer-wise", "--dp-mode layer-wise"),
                           (args.fp16, "--fp16"),
                           (not args.untie_embeddings_and_output_weights,
                            "a tied output layer (pass --untie-embeddings-and-output-weights: megatron-core's wrapper "
                            "shards the word embedding as its own unit, so the tied head would read a sharded weight)"),
                           (args.ckpt_format != "torch_dist", f"--ckpt-format {args.ckpt_format}"),
                           (args.use_megatron_fsdp and bool(args.load_hf), "--load-hf")) if on]
    if bad:
        raise ArgumentError(f"{flag} with {', '.join(bad)}: not supported (FSDP shards parameters, "
                            "gradients and optimizer state itself and overlaps its own all-gathers; megatron-core's "
                            "FSDP2 wrapper has no pipeline or expert parallelism; its checkpoints are torch_dist)")
    from ..megatron.fsdp import available
    ok, why = available(megatron=args.use_megatron_fsdp)
    if not ok:
        raise ArgumentError(f"{flag}: {why}")


def optimizer_config(args):
    """megatron-core ``OptimizerConfig`` from the parsed flags."""
    import torch
    from megatron.core.optimizer import OptimizerConfig
    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, loss_scale=args.loss_scale,
        params_dtype=torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32),
        use_distributed_optimizer=args.use_distributed_optimizer, overlap_param_gather=args.overlap_param_gather)


def md_config(args):
    """The validated :class:`~megatron_md.megatron.config.MDConfig` (built by :func:`validate_args`)."""
    return args.md
