"""Megatron-LM integration: our flags in its parser, our optimizer in its training loop.

A launcher around Megatron-LM's own, unmodified ``pretrain_gpt.py`` (the whole of
``examples/megatron_lm/pretrain_gpt_md.py``)::

    import runpy, sys
    from megatron_md import megatron_lm

    megatron_lm.install()          # before pretrain_gpt.py runs: parser, validation, optimizer
    sys.argv[0] = "pretrain_gpt.py"
    runpy.run_path("<Megatron-LM>/pretrain_gpt.py", run_name="__main__")
    megatron_lm.shutdown()         # the process groups, before the interpreter exits

or, in your own ``pretrain()`` script, ``megatron_lm.install()`` before calling ``pretrain(...,
extra_args_provider=megatron_lm.extra_args_provider)`` (optional once installed; it is
idempotent). Run with e.g. ``--optimizer muon-md --lr 0.01 --weight-decay 0``. Everything else
(``--lr``, ``--min-lr``, ``--clip-grad``, ``--bf16``, ``--use-distributed-optimizer``,
``--adam-beta1/2``, ``--adam-eps``, the LR schedule) stays Megatron-LM's own flag.

What :func:`install` changes in ``megatron.training`` (each a wrapper that hands every other
``--optimizer`` to Megatron-LM's original; :func:`uninstall` restores them), and why:

* ``arguments.add_megatron_arguments``: also adds our flags. ``pretrain()`` parses the command
  line with Megatron-LM's parser *before* it calls ``extra_args_provider`` (in
  ``ft_integration.setup()``, and in ``inprocess_restart.maybe_wrap_for_inprocess_restart``
  in the stock ``pretrain_gpt.py``): without this, ``--optimizer muon-md`` is "invalid choice".
* ``arguments.validate_args`` (also the copy ``initialize`` imported): for our names,
  Megatron-LM's validation runs as for ``adam`` — its ``'muon' in args.optimizer`` checks are
  about its own Muon (which refuses the distributed optimizer) — and then
  :func:`megatron_md.megatron.config.validate` rejects bad combinations before training.
* ``training.get_megatron_optimizer_config``: our names get the Adam config Megatron-LM builds
  for ``adam`` (lr, betas, eps, clip, bf16, distributed optimizer), carrying our name;
  without this every name but ``muon``/``adam`` is "Invalid optimizer type!".
* ``training.get_megatron_optimizer`` and ``training.get_megatron_muon_optimizer``:
  ``setup_model_and_optimizer`` sends every name containing "muon" (``muon-md``, ``normuon``,
  ``muonh``, ``sf-normuon``) to the latter; both build megatron_md's optimizer for our names.
* ``training.evaluate``, ``training.save_checkpoint``, ``training.load_checkpoint``, for the
  schedule-free methods only (Megatron-LM never calls ``optimizer.eval()/train()``):
  evaluation and saved ``--ckpt-format torch`` checkpoints see the averaged iterate x (parameters
  are swapped to x around the call and back to y after, bit-exactly); after loading such a
  checkpoint the parameters are turned back into y before training continues. ``torch_dist``
  checkpoints hold y and the whole optimizer state (our wrappers' ``sharded_state_dict``), as the
  driver's do.
* ``training.save_checkpoint`` and ``training.load_checkpoint``, for every run (any
  ``--optimizer``): the checkpoint's integrity, as the driver's
  (:mod:`megatron_md.checkpoint.megatron_lm_loop`). After Megatron-LM's save of ``iter_N``, a
  manifest (sha256 + size of every file); before its load, every file checked against it, so a
  damaged or incomplete checkpoint stops the run with one ``error:`` line naming the file (one
  without a manifest loads as before, with a note). A save that fails for lack of storage (a full
  disk, a quota) stops with one line naming ``--save``, the cause and the checkpoint kept, after the
  partial ``iter_N`` is removed and the tracker put back. Not with ``--async-save`` or for
  non-persistent checkpoints (no manifest; said once).

Megatron-LM behaviour to know about:

* ``adam`` and ``muon`` exist in both: they stay Megatron-LM's own unless
  ``install(builtin="md")``. Megatron-LM also owns ``--muon-momentum``/``--muon-nesterov``, so our
  Muon's flags are spelled ``--md-muon-*`` there (see :func:`megatron_md.megatron.config.add_md_args`).
* Megatron-LM ≥ 0.17's validation turns ``--use-distributed-optimizer`` into
  ``use_layer_wise_distributed_optimizer`` for optimizers other than adam/sgd; with
  ``--dp-mode auto`` the installed builder follows that (``--dp-mode layer-wise``).
* Its ``--weight-decay`` defaults to 0.01 and ``--lr-decay-style`` to linear:
  MD/hyperball methods need ``--weight-decay 0``, schedule-free ones ``--lr-decay-style constant``
  (:func:`megatron_md.megatron.config.validate` says so before training).
* Megatron-LM's own CUDA-only start-up (``initialize_megatron`` asserts CUDA, skips the
  model-parallel groups without a GPU, builds fused kernels with ``nvcc``) is untouched: on a GPU
  machine nothing else is needed. The CPU runs in ``tests/megatron_lm`` add test-only shims for
  it (``tests/megatron_lm/cpu_megatron_lm.py``).

:func:`register_emerging_optimizers` is the lighter alternative on megatron-core ≥ 0.18: our
classes as entries of megatron-core's own emerging-optimizer registry (see its docstring for
what that path does not do).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import logging
import weakref
from typing import Any, Callable, Literal, Optional

from .megatron.config import (MD_METHODS, METHOD_CONFIGS, NO_WEIGHT_DECAY, OPTIMIZER_CHOICES, SCHEDULE_FREE,
                              MDConfig, add_md_args, md_config_from_args, validate)
from .megatron.model_recipe import (add_recipe_args, apply_recipe_preset, recipe_from_args, recipe_gpt_model,
                                    unscaled_output_init)

logger = logging.getLogger(__name__)

__all__ = ["extra_args_provider", "install", "uninstall", "installed", "routes_to_md", "md_config_for_megatron_lm",
           "register_emerging_optimizers", "MEGATRON_NATIVE", "REGISTRY_METHODS"]

#: ``--optimizer`` names that Megatron-LM implements itself as well.
MEGATRON_NATIVE: tuple[str, ...] = ("adam", "muon")
#: Methods :func:`register_emerging_optimizers` registers (schedule-free ones are left out: the
#: registry path has no hook around evaluation and checkpoints, so they would see the gradient
#: point y instead of the average x).
REGISTRY_METHODS: tuple[str, ...] = ("muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md")
_ORIGINAL = "__megatron_md_original__"
_GROUP_TITLE = "megatron_md"


def extra_args_provider(parser):
    """Megatron-LM ``extra_args_provider``: adds the megatron_md flags and extends ``--optimizer``'s
    choices (once: a parser that has them already is returned as is). Chain with your own as
    ``lambda p: mine(extra_args_provider(p))``."""
    _State.parser = parser  # --model-recipe's preset needs to know which flags the command line gives
    if any(getattr(g, "title", None) == _GROUP_TITLE for g in getattr(parser, "_action_groups", ())):
        return parser
    add_recipe_args(parser)
    parser = add_md_args(parser)
    parser.add_argument("--load-hf", default=None, metavar="DIR",
                        help="megatron_md: start from a Hugging Face Llama/Mixtral/Qwen3 folder (save_pretrained's "
                        "safetensors) instead of a random init; the model flags must be those its config.json implies "
                        "(tools/convert_checkpoint.py from-hf --load-hf DIR --print-flags --megatron-lm). Not with --load")
    return parser


def routes_to_md(name: Optional[str], builtin: Literal["megatron", "md"] = "megatron") -> bool:
    """Whether ``--optimizer name`` is built by megatron_md (see :data:`MEGATRON_NATIVE`)."""
    return name in OPTIMIZER_CHOICES and (builtin == "md" or name not in MEGATRON_NATIVE)


def md_config_for_megatron_lm(args: Any) -> MDConfig:
    """:func:`md_config_from_args`, with ``--dp-mode auto`` following Megatron-LM's
    ``use_layer_wise_distributed_optimizer`` (set by its validation, see the module docstring)."""
    md = md_config_from_args(args)
    if md.dp_mode == "auto" and getattr(args, "use_layer_wise_distributed_optimizer", False):
        md = dataclasses.replace(md, dp_mode="layer-wise")
    return md


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"megatron_md.megatron_lm.install() hooks into Megatron-LM's training loop, but {name} is not "
            f"importable ({e}). It ships with Megatron-LM (a clone of github.com/NVIDIA/Megatron-LM on PYTHONPATH), "
            f"not with the megatron-core wheel. With megatron-core alone, call "
            f"megatron_md.megatron.builder.get_megatron_optimizer(config, model_chunks, md=MDConfig(...)) directly."
        ) from e


def _megatron_args():
    return importlib.import_module("megatron.training.global_vars").get_args()


class _State:
    """What the hooks share: the routing choice and the last optimizer megatron_md built."""

    builtin: str = "megatron"
    optimizer: Optional[Callable[[], Any]] = None  # weakref to the Megatron optimizer
    parser: Any = None  # the last parser our flags were added to (Megatron-LM drops it after parsing)


def _is_md(name: Optional[str]) -> bool:
    return routes_to_md(name, _State.builtin)


@contextlib.contextmanager
def _optimizer_seen_as(args, name: str):
    """Megatron-LM's own code sees ``args.optimizer == name`` inside the block."""
    saved = args.optimizer
    args.optimizer = name
    try:
        yield
    finally:
        args.optimizer = saved


# ------------------------------------------------------------------------------ the hooks
def _hook_add_megatron_arguments(original: Callable) -> Callable:
    @functools.wraps(original)
    def add_megatron_arguments(parser, *a, **k):
        return extra_args_provider(original(parser, *a, **k))
    return add_megatron_arguments


def _hook_validate_args(original: Callable) -> Callable:
    @functools.wraps(original)
    def validate_args(args, *a, **k):
        _apply_model_recipe(args)
        name = getattr(args, "optimizer", None)
        if not _is_md(name):
            result = original(args, *a, **k)
            with _refusals():
                _validate_load_hf(args, md=None)
            return result
        with _refusals():
            _refuse_fsdp(args, name)
        arguments = importlib.import_module("megatron.training.arguments")
        print_args = getattr(arguments, "_print_args", None)

        def _print_args(title, printed, *pa, **pk):  # its argument table shows the real name
            printed.optimizer = name
            return print_args(title, printed, *pa, **pk)

        with contextlib.ExitStack() as stack:
            stack.enter_context(_optimizer_seen_as(args, "adam"))
            if print_args is not None:
                arguments._print_args = _print_args
                stack.callback(setattr, arguments, "_print_args", print_args)
            result = original(args, *a, **k)
        with _refusals():
            _validate_md(args, name)
            _validate_load_hf(args, md=dataclasses.replace(md_config_for_megatron_lm(args), optimizer=name))
        return result
    return validate_args


def _hf_model_settings(args, vocab_size: int) -> dict:
    """Megatron-LM's validated ``args`` as :func:`megatron_md.checkpoint.hf_import.expected_model`
    states a model (the vocabulary is the tokenizer's, checked when the weights are copied)."""
    moe = bool(getattr(args, "num_experts", None))
    return {
        "num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": args.num_attention_heads,
        "num_query_groups": args.num_query_groups if args.group_query_attention else args.num_attention_heads,
        "kv_channels": args.kv_channels or args.hidden_size // args.num_attention_heads,
        "ffn_hidden_size": args.ffn_hidden_size, "max_position_embeddings": args.max_position_embeddings,
        "vocab_size": vocab_size, "norm_epsilon": getattr(args, "layernorm_epsilon", getattr(args, "norm_epsilon", 1e-5)), "rotary_base": args.rotary_base,
        "normalization": args.normalization, "swiglu": args.swiglu,
        "position_embedding_type": args.position_embedding_type, "disable_bias_linear": not args.add_bias_linear,
        "untie_embeddings_and_output_weights": args.untie_embeddings_and_output_weights,
        "qk_layernorm": bool(args.qk_layernorm), "num_experts": args.num_experts or None,
        "moe_router_topk": args.moe_router_topk if moe else None,
        "moe_ffn_hidden_size": args.moe_ffn_hidden_size if moe else None,
        "moe_router_pre_softmax": args.moe_router_pre_softmax if moe else None,
        "moe_shared_expert_intermediate_size": args.moe_shared_expert_intermediate_size if moe else None,
    }


def _validate_load_hf(args, md) -> None:
    """``--load-hf``: the folder's model is the one Megatron-LM's flags build; a ``ValueError`` (one
    ``error:`` line) naming what differs."""
    hf_dir = getattr(args, "load_hf", None)
    if not hf_dir:
        return
    from .checkpoint.hf_import import check_model, read_config
    from .errors import CheckpointError
    if getattr(args, "load", None) or getattr(args, "pretrained_checkpoint", None):
        raise ValueError("--load-hf and --load/--pretrained-checkpoint are mutually exclusive (--load-hf starts "
                         "from a Hugging Face model)")
    try:
        cfg = read_config(hf_dir)
        diffs = check_model(cfg, _hf_model_settings(args, int(cfg.get("vocab_size", 0))))
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    extra = [flag for flag, on in (("--rotary-percent", getattr(args, "rotary_percent", 1.0) != 1.0),
                                   ("--use-rope-scaling", getattr(args, "use_rope_scaling", False)),
                                   ("--apply-layernorm-1p", getattr(args, "apply_layernorm_1p", False)),
                                   ("--moe-grouped-gemm", getattr(args, "moe_grouped_gemm", False))) if on]
    if diffs or extra:
        raise ValueError(f"--load-hf {hf_dir}: its config.json is another model; "
                         + (f"pass {diffs}" if diffs else "")
                         + (f"{'; ' if diffs else ''}drop {', '.join(extra)}" if extra else "")
                         + " (tools/convert_checkpoint.py from-hf --print-flags --megatron-lm lists the flags)")
    if md is not None and md.optimizer in MD_METHODS and (md.md_init != "factor" or md.md_embedding_unit_norm):
        raise ValueError(f"--load-hf with --optimizer {md.optimizer}: pass --md-init factor "
                         "--no-md-embedding-unit-norm (MD then keeps the imported weights and factors its gains "
                         "from them; otherwise it projects every matrix onto its sphere)")


def _hook_setup_model_and_optimizer(original: Callable) -> Callable:
    @functools.wraps(original)
    def setup_model_and_optimizer(*a, **k):
        result = original(*a, **k)
        args = _megatron_args()
        if getattr(args, "load_hf", None):
            import os
            import time

            from .checkpoint.hf_import import load_into
            from .errors import CheckpointError
            model, optimizer = result[0], result[1]
            t0 = time.perf_counter()
            try:
                n = load_into(model if isinstance(model, (list, tuple)) else [model], args.load_hf,
                              args.padded_vocab_size)
            except CheckpointError as exc:
                _stop(str(exc), 1, says=int(os.environ.get("RANK", "0")) == 0)
            if optimizer is not None:
                optimizer.reload_model_params()   # fp32 main weights (and MD's factored gains) from the import
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"megatron_md: initialized from the Hugging Face model {args.load_hf} ({n:,} elements on "
                      f"rank 0, {time.perf_counter() - t0:.1f}s)", flush=True)
        return result
    return setup_model_and_optimizer


def _apply_model_recipe(args) -> None:
    """``--model-recipe``'s preset for every flag the command line does not give (Megatron-LM's own —
    ``--qk-layernorm``, ``--init-method-std``, ``--normalization``, … — and ours), before Megatron-LM
    validates them; a bad recipe value is one ``error:`` line, as every refusal."""
    import sys
    parser = _State.parser
    if parser is None or getattr(args, "model_recipe", None) is None:
        return
    with _refusals():
        apply_recipe_preset(parser, args, sys.argv[1:])


def _hook_gpt_model(original: type) -> type:
    """``gpt_builders.GPTModel`` (what Megatron-LM's ``gpt_builder`` constructs): a subclass that
    puts the model recipe (post-norm, branch scale: layer-spec subclasses; the embedding multiplier:
    a hook) into every model it builds, and builds multi-latent attention on the local spec with our core
    attention (:func:`megatron_md.megatron.mla.mla_gpt_model`); with neither it is the plain model."""
    from .megatron.mla import mla_gpt_model
    return recipe_gpt_model(mla_gpt_model(original), lambda: recipe_from_args(_megatron_args()))


def _hook_transformer_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def core_transformer_config_from_args(args, *a, **k):
        return unscaled_output_init(original(args, *a, **k), args)  # --no-scaled-output-init
    return core_transformer_config_from_args


@contextlib.contextmanager
def _refusals():
    """A ``ValueError`` of our validation or builder (a flag combination we refuse, naming the flags)
    becomes one ``error:`` line from rank 0 and exit code 2 on every rank, as in our driver — not a
    traceback per rank. Every rank refuses alike (the same flags, the same checks)."""
    import os
    try:
        yield
    except ValueError as exc:
        _stop(str(exc), 2, says=int(os.environ.get("RANK", "0")) == 0)


def _stop(message: str, code: int, *, says: bool):
    """End this rank with exit ``code``; the rank that ``says`` prints ``megatron_md: error: message``
    (one line on stderr). Under torchrun the others first wait :data:`_REFUSAL_GRACE_S`: torchrun
    stops every rank when the first one exits, and that must be the one with the line."""
    import os
    import sys
    import time
    if says:
        print(f"megatron_md: error: {message}", file=sys.stderr, flush=True)
    elif os.environ.get("TORCHELASTIC_RUN_ID"):
        time.sleep(_REFUSAL_GRACE_S)
    raise SystemExit(code) from None


#: under torchrun, how long ranks other than 0 wait after a refusal (rank 0's exit ends them sooner)
_REFUSAL_GRACE_S = 30.0


def _refuse_fsdp(args, name: str) -> None:
    """``--use-torch-fsdp2`` / ``--use-megatron-fsdp`` with our optimizers in Megatron-LM's loop: refused
    (checked before Megatron-LM's own validation, whose FSDP asserts would otherwise come first as a traceback)."""
    fsdp = [f for f, on in (("--use-torch-fsdp2", getattr(args, "use_torch_fsdp2", False)),
                            ("--use-megatron-fsdp", getattr(args, "use_megatron_fsdp", False))) if on]
    if fsdp:
        raise ValueError(
            f"--optimizer {name} with {fsdp[0]} in Megatron-LM's loop: not supported (megatron-core 0.16's "
            f"FSDP2 wrapper fails in finalize_model_grads, and its checkpoints cut FSDP2's rows its own way); "
            f"use megatron_md's driver (examples/pretrain_gpt.py --use-torch-fsdp2 or --use-megatron-fsdp: every "
            f"optimizer, exact) or --use-distributed-optimizer here")


def _validate_md(args, name: str) -> None:
    md = dataclasses.replace(md_config_for_megatron_lm(args), optimizer=name)
    validate(md, args)
    from .checkpoint.md import check_resume  # a to-md checkpoint names its flags
    check_resume(md, args)
    _refuse_fsdp(args, name)
    fmt = getattr(args, "ckpt_format", "torch")
    saves = bool(getattr(args, "save", None) or getattr(args, "load", None))
    if saves and fmt not in ("torch", "torch_dist"):
        raise ValueError(
            f"--optimizer {name} with --ckpt-format {fmt}: megatron_md's optimizer state is written in the "
            f"torch_dist format (every state in the unsharded model's coordinates, any layout on load) or "
            f"per rank (torch); pass --ckpt-format torch_dist")
    if saves and fmt == "torch" and (getattr(args, "use_distributed_optimizer", False) or md.dp_mode == "layer-wise"):
        raise ValueError(
            f"--optimizer {name} with --ckpt-format torch and --use-distributed-optimizer or --dp-mode "
            f"layer-wise: Megatron-LM saves the distributed optimizer's shards as Adam state (exp_avg, "
            f"exp_avg_sq) and the replicated optimizer from data-parallel rank 0 only; pass --ckpt-format "
            f"torch_dist (megatron_md's sharded optimizer state, any layout on load)")


def _hook_get_optimizer_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_megatron_optimizer_config(args, *a, **k):
        name = getattr(args, "optimizer", None)
        if not _is_md(name):
            return original(args, *a, **k)
        with _optimizer_seen_as(args, "adam"):
            result = original(args, *a, **k)
        config = result[0] if isinstance(result, tuple) else result
        config.optimizer = name  # read back by our builder hook; not a Megatron optimizer name
        return result
    return get_megatron_optimizer_config


def _hook_get_optimizer(original: Callable) -> Callable:
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        name = getattr(config, "optimizer", None)
        if not _is_md(name):
            return original(config, model_chunks, *args, **kwargs)
        megatron_args = _megatron_args()
        md = dataclasses.replace(md_config_for_megatron_lm(megatron_args), optimizer=name)
        with _refusals():
            validate(md, megatron_args)
        extra = dict(kwargs)
        if args:
            if signature is None:
                raise TypeError(f"get_megatron_optimizer: cannot name positional arguments {args!r}")
            bound = signature.bind(config, model_chunks, *args, **kwargs).arguments
            extra = {k: v for k, v in list(bound.items())[2:]}
        from .megatron.builder import get_megatron_optimizer as build  # lazy: heavy, and optional

        params = inspect.signature(build).parameters
        passed = {k: v for k, v in extra.items() if k in params and k not in ("config", "md")}
        dropped = sorted(k for k in extra if k not in passed and extra[k] not in (None, False))
        if dropped:
            logger.info("megatron_md: %s not used by megatron_md's builder (it does its own param groups and "
                        "process groups)", ", ".join(dropped))
        with _refusals():
            optimizer = build(config, model_chunks, md=md, **passed)
        try:
            _State.optimizer = weakref.ref(optimizer)
        except TypeError:  # not weak-referenceable
            _State.optimizer = lambda: optimizer
        logger.info("megatron_md: built --optimizer %s (dp_mode=%s, distributed optimizer=%s) for Megatron-LM",
                    name, md.dp_mode, bool(getattr(config, "use_distributed_optimizer", False)))
        return optimizer
    return get_megatron_optimizer


def _schedule_free(optimizer) -> bool:
    from .megatron.builder import hybrid_optimizers
    return optimizer is not None and any(h._sf_parts() for h in hybrid_optimizers(optimizer))


def _current_optimizer():
    return _State.optimizer() if _State.optimizer is not None else None


@contextlib.contextmanager
def _parameters_at_x(optimizer, model):
    """Schedule-free: the model's parameters are x inside the block, y (bit-exactly) after."""
    if not _schedule_free(optimizer):
        yield
        return
    from .megatron.builder import swap_to_eval, swap_to_train
    chunks = model if isinstance(model, (list, tuple)) else [model]
    swap_to_eval(optimizer, chunks)
    try:
        yield
    finally:
        swap_to_train(optimizer, chunks)


def _hook_evaluate(original: Callable) -> Callable:
    @functools.wraps(original)
    def evaluate(forward_step_func, data_iterator, model, *a, **k):
        with _parameters_at_x(_current_optimizer(), model):
            return original(forward_step_func, data_iterator, model, *a, **k)
    return evaluate


def _hook_save_checkpoint(original: Callable) -> Callable:
    bind = _binder(original)

    @functools.wraps(original)
    def save_checkpoint(iteration, model, optimizer, *a, **k):
        args = _megatron_args()
        # torch_dist: the training iterate y and the whole optimizer state, as the driver saves (x is
        # evaluated by the evaluate hook; `tools/convert_checkpoint.py` exports it). torch: the
        # checkpoint holds x and the optimizer in eval mode (y is in its state: the y stash)
        torch_dist = getattr(args, "ckpt_format", "torch") == "torch_dist"

        def save():
            with contextlib.nullcontext() if torch_dist else _parameters_at_x(optimizer, model):
                return original(iteration, model, optimizer, *a, **k)

        called = bind(iteration, model, optimizer, *a, **k)
        if called.get("non_persistent_ckpt"):
            _note_once("non-persistent", "non-persistent checkpoints are written without an integrity manifest")
            return save()
        if not getattr(args, "save", None):
            return save()
        return _save_with_manifest(args, iteration, bool(called.get("release")), save)
    return save_checkpoint


def _save_with_manifest(args, iteration: int, release: bool, save: Callable[[], Any]):
    """Megatron-LM's ``save()`` of ``iteration`` under ``--save`` with our integrity around it
    (:mod:`megatron_md.checkpoint.megatron_lm_loop`): a leftover of that iteration removed first,
    the manifest after (not with ``--async-save``), and a failed save cleaned up and stopped with
    one line."""
    from .checkpoint import megatron_lm_loop as loop

    plan, note = loop.prepare_save(args.save, iteration, release=release)
    if note:
        _note(note)
    try:
        result = save()
        if getattr(args, "async_save", False):
            _note_once("async", "--async-save: Megatron-LM finishes checkpoints in the background, so they are "
                                "written without an integrity manifest (and load unverified)")
        else:
            loop.finish_save(plan, getattr(args, "ckpt_format", "torch"))
    except Exception as exc:  # noqa: BLE001 - a storage failure becomes one line; anything else re-raises
        message, says = loop.failed_save(plan, exc, grace_s=_REFUSAL_GRACE_S)
        if message is None:
            raise
        _stop(message, 1, says=says)
    return result


def _hook_load_checkpoint(original: Callable) -> Callable:
    bind = _binder(original)

    @functools.wraps(original)
    def load_checkpoint(model, optimizer, *a, **k):
        _verify_before_load(bind(model, optimizer, *a, **k).get("load_arg", "load"))
        result = original(model, optimizer, *a, **k)
        if _schedule_free(optimizer):
            from .megatron.builder import hybrid_optimizers, swap_to_train
            if any(not g.get("train_mode", True) for h in hybrid_optimizers(optimizer)
                   for o in h._sf_parts() for g in o.param_groups):
                swap_to_train(optimizer, model if isinstance(model, (list, tuple)) else [model])
        return result
    return load_checkpoint


def _verify_before_load(load_arg: str) -> None:
    """The checkpoint Megatron-LM is about to load, checked against its manifest (every rank): a
    damaged or incomplete one stops the run with one line naming the file; one without a manifest
    loads as before, with a note."""
    from .checkpoint import megatron_lm_loop as loop
    from .errors import CheckpointError

    args = _megatron_args()
    if getattr(args, "non_persistent_ckpt_type", None):
        _note_once("non-persistent-load", "with non-persistent checkpoints, loads are not verified against "
                                          "integrity manifests")
        return
    try:
        note = loop.verify_load(loop.checkpoint_to_load(args, load_arg))
    except CheckpointError as exc:
        import torch.distributed as dist
        _stop(str(exc), 1, says=dist.get_rank() == 0)
    if note:
        _note(note)


def _binder(original: Callable) -> Callable[..., dict]:
    """``bind(*a, **k)``: the arguments of a call of ``original`` by name (only the keywords when its
    signature cannot be read)."""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return lambda *a, **k: dict(k)

    def bind(*a, **k) -> dict:
        try:
            return dict(signature.bind_partial(*a, **k).arguments)
        except TypeError:
            return dict(k)
    return bind


_NOTED: set = set()


def _note(text: str) -> None:
    """``megatron_md: note: text`` on rank 0's stdout."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"megatron_md: note: {text}", flush=True)


def _note_once(key: str, text: str) -> None:
    if key not in _NOTED:
        _NOTED.add(key)
        _note(text)


#: (module, attribute, hook factory, required). Optional seams that a Megatron-LM version lacks
#: are skipped; a missing required one makes install() fail with the name.
_SEAMS: tuple[tuple[str, str, Callable, bool], ...] = (
    ("megatron.training.arguments", "add_megatron_arguments", _hook_add_megatron_arguments, True),
    ("megatron.training.arguments", "validate_args", _hook_validate_args, True),
    ("megatron.training.initialize", "validate_args", _hook_validate_args, False),
    ("megatron.training.training", "get_megatron_optimizer_config", _hook_get_optimizer_config, False),
    ("megatron.training.training", "get_megatron_optimizer", _hook_get_optimizer, True),
    ("megatron.training.training", "get_megatron_muon_optimizer", _hook_get_optimizer, False),
    ("megatron.training.training", "evaluate", _hook_evaluate, True),
    ("megatron.training.training", "save_checkpoint", _hook_save_checkpoint, True),
    ("megatron.training.training", "load_checkpoint", _hook_load_checkpoint, True),
    # --load-hf: the Hugging Face weights copied into the built model, before training
    ("megatron.training.training", "setup_model_and_optimizer", _hook_setup_model_and_optimizer, False),
    # Megatron-LM's top-level model builder (pretrain_gpt.py imports it): the model recipe
    ("gpt_builders", "GPTModel", _hook_gpt_model, False),
    ("gpt_builders", "core_transformer_config_from_args", _hook_transformer_config, False),
)


def install(*, builtin: Literal["megatron", "md"] = "megatron") -> list[str]:
    """Make Megatron-LM's ``megatron.training`` parse our flags and build megatron_md optimizers.

    Wraps the names listed in the module docstring (each wrapper hands anything that is not a
    megatron_md ``--optimizer`` to the original). Idempotent; :func:`uninstall` restores.
    ``builtin``: who builds the names both implement (``adam``, ``muon``). Returns the hooked
    ``module.name`` list. Raises ``ImportError`` when Megatron-LM (``megatron.training``) is not
    importable and ``RuntimeError`` naming a required seam this Megatron-LM version lacks.
    """
    if builtin not in ("megatron", "md"):
        raise ValueError(f"builtin={builtin!r}: expected 'megatron' or 'md'")
    _State.builtin = builtin
    required_modules = {m for m, _, _, required in _SEAMS if required}
    modules = {m: (_module(m) if m in required_modules else _optional_module(m)) for m, *_ in _SEAMS}
    missing = [f"{m}.{a}" for m, a, _, required in _SEAMS if required and not hasattr(modules[m], a)]
    if missing:
        raise RuntimeError(f"this Megatron-LM version has no {', '.join(missing)}; megatron_md.megatron_lm.install() "
                           f"supports the versions in docs/compatibility.md")
    hooked = []
    for m, attr, factory, _ in _SEAMS:
        current = getattr(modules[m], attr, None) if modules[m] is not None else None
        if current is None:
            continue
        original = getattr(current, _ORIGINAL, current)
        wrapper = factory(original)
        setattr(wrapper, _ORIGINAL, original)
        setattr(modules[m], attr, wrapper)
        hooked.append(f"{m}.{attr}")
    return hooked


def shutdown() -> bool:
    """Destroy megatron-core's model-parallel groups and the default process group, if any; True
    when there was one. Megatron-LM's ``pretrain()`` returns without doing this, and a process that
    exits with a live gloo group can abort in interpreter finalization (``terminate called without
    an active exception``: gloo's worker threads still hold work whose tensors need the GIL while
    the interpreter is torn down; pytorch/pytorch#190489). Call it after a normal end of training
    (the launcher does); not after a failure, where another rank may still be inside a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    from .training.model import shutdown as destroy_groups   # our driver's own teardown

    destroy_groups(created=True)
    return True


def installed() -> list[str]:
    """The ``module.name`` seams currently hooked by :func:`install`."""
    out = []
    for m, attr, _, _ in _SEAMS:
        mod = importlib.import_module(m) if _importable(m) else None
        if mod is not None and hasattr(getattr(mod, attr, None), _ORIGINAL):
            out.append(f"{m}.{attr}")
    return out


def _optional_module(name: str):
    """The module, or None when it is not importable (a seam only some entry points have:
    ``gpt_builders`` sits at Megatron-LM's top level, on the path of its ``pretrain_gpt.py``)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def uninstall() -> bool:
    """Undo :func:`install`; False when it was not installed (or Megatron-LM is absent)."""
    undone = False
    for m, attr, _, _ in _SEAMS:
        if not _importable(m):
            continue
        mod = importlib.import_module(m)
        original = getattr(getattr(mod, attr, None), _ORIGINAL, None)
        if original is not None:
            setattr(mod, attr, original)
            undone = True
    _State.optimizer = None
    return undone


# ------------------------------------------------------------------------------ core ≥ 0.18 registry
def _md_config_or_default(name: str, md: Optional[MDConfig]) -> MDConfig:
    if md is None:
        try:
            md = md_config_from_args(_megatron_args())
        except (ImportError, AssertionError):  # no Megatron-LM, or its args are not parsed yet
            md = MDConfig()
    return dataclasses.replace(md, optimizer=name)


def _state_exists(optimizer, config=None) -> None:
    """megatron_md optimizers create all their state at construction; nothing to initialize."""


def _config_to_kwargs(name: str, md: Optional[MDConfig]) -> Callable:
    def config_to_kwargs(config, model_chunks, pg_collection) -> dict:
        if getattr(config, "fp16", False) or getattr(config, "bf16", False):
            raise ValueError(
                f"--optimizer {name} through megatron-core's emerging-optimizer registry supports fp32 parameters "
                f"only: with --bf16/--fp16 Megatron swaps the optimizer's parameters for fp32 main copies after "
                f"construction, which megatron_md's optimizers do not follow. Use megatron_md.megatron_lm.install().")
        cfg = validate(_md_config_or_default(name, md), config)
        kw = cfg.matrix_kwargs()
        if getattr(config, "lr", None) is not None:
            kw["lr"] = config.lr
        if name not in NO_WEIGHT_DECAY:
            kw["weight_decay"] = getattr(config, "weight_decay", 0.0)
        return kw

    return config_to_kwargs


def register_emerging_optimizers(md: Optional[MDConfig] = None) -> bool:
    """Register :data:`REGISTRY_METHODS` in megatron-core's emerging-optimizer registry (≥ 0.18).

    Then ``OptimizerConfig(optimizer="muon-md", ...)`` works with megatron-core's own
    ``get_megatron_optimizer`` (which routes embeddings, output head and non-2-D params to Adam).
    Hyperparameters come from ``md``, else from Megatron-LM's parsed args, else the defaults.
    Returns False, logging why, when there is no registry (megatron-core 0.16/0.17) or its API
    is not the one this code knows (:func:`megatron_md.megatron.compat.emerging_registry`).
    Names the registry already holds for another class (its own ``muon``) are left alone.

    Warning: that path runs our classes without megatron_md's sharding: each TP shard is treated
    as a whole matrix (blockwise, like ``--muon-tp-mode blockwise``; the MD sphere radius comes
    from the local shape), fused QKV is not split, fp32 params only, and megatron-core refuses
    every registry entry unless the ``emerging-optimizers`` package (≥ 0.2) is installed.
    :func:`install` has none of these limits.
    """
    from .megatron.compat import emerging_registry

    reg, why = emerging_registry()
    if reg is None:
        logger.info("megatron_md: %s; nothing registered, use megatron_md.megatron_lm.install()", why)
        return False
    registry, entry_cls, accepted = reg.entries, reg.entry_cls, reg.fields
    for name in REGISTRY_METHODS:
        cls = METHOD_CONFIGS[name].optimizer_class
        held = registry.get(name)
        if held is not None and getattr(held, "optimizer_cls", None) is not cls:
            logger.info("megatron_md: megatron-core's registry already has %r (%s); keeping it", name,
                        getattr(getattr(held, "optimizer_cls", None), "__name__", held))
            continue
        kw: dict[str, Any] = dict(optimizer_cls=cls, config_to_kwargs=_config_to_kwargs(name, md))
        if "init_state_fn" in accepted:
            kw["init_state_fn"] = _state_exists
        registry[name] = entry_cls(**kw)
    if getattr(reg.module, "HAVE_EMERGING_OPTIMIZERS", True) is False:
        logger.info("megatron_md: registered, but megatron-core refuses every registry optimizer until the "
                    "emerging-optimizers package is installed")
    return True
