"""Megatron-LM integration: our flags in its parser, our optimizer in its training loop.

In a ``pretrain_gpt.py``-style script::

    from megatron_md import megatron_lm

    megatron_lm.install()     # megatron.training.training now builds megatron_md optimizers
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder,
             forward_step, extra_args_provider=megatron_lm.extra_args_provider)

and run with e.g. ``--optimizer muon-md --lr 0.01 --weight-decay 0 --bf16``. Everything else
(``--lr``, ``--min-lr``, ``--clip-grad``, ``--bf16``, ``--use-distributed-optimizer``,
``--adam-beta1/2``, ``--adam-eps``, the LR schedule) stays Megatron-LM's own flag.

Megatron-LM behaviour to know about (read from its ``megatron/training`` sources):

* Its ``--optimizer`` already exists; :func:`extra_args_provider` adds our names to its choices.
  ``adam`` and ``muon`` exist in both: they stay Megatron-LM's own unless
  ``install(builtin="md")``. Megatron-LM also owns ``--muon-momentum``/``--muon-nesterov``, so our
  Muon's flags are spelled ``--md-muon-*`` there (see :func:`megatron_md.megatron.config.add_md_args`).
* Its argument validation turns ``--use-distributed-optimizer`` into
  ``use_layer_wise_distributed_optimizer`` (plain DDP) for every optimizer other than adam/sgd;
  with ``--dp-mode auto`` the installed builder follows that and distributes whole matrices
  (``--dp-mode layer-wise``).
* Its ``--weight-decay`` defaults to 0.01 and ``--lr-decay-style`` to linear:
  MD/hyperball methods need ``--weight-decay 0``, schedule-free ones ``--lr-decay-style constant``
  (:func:`megatron_md.megatron.config.validate` says so before training).

:func:`register_emerging_optimizers` is the lighter alternative on megatron-core ≥ 0.18: our
classes as entries of megatron-core's own emerging-optimizer registry (see its docstring for
what that path does not do).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
from typing import Any, Callable, Literal, Optional

from .megatron.config import (METHOD_CONFIGS, NO_WEIGHT_DECAY, OPTIMIZER_CHOICES, MDConfig, add_md_args,
                              md_config_from_args, validate)

logger = logging.getLogger(__name__)

__all__ = ["extra_args_provider", "install", "uninstall", "routes_to_md", "md_config_for_megatron_lm",
           "register_emerging_optimizers", "MEGATRON_NATIVE", "REGISTRY_METHODS"]

#: ``--optimizer`` names that Megatron-LM implements itself as well.
MEGATRON_NATIVE: tuple[str, ...] = ("adam", "muon")
#: Methods :func:`register_emerging_optimizers` registers (schedule-free ones are left out: the
#: Megatron-LM loop never calls ``optimizer.eval()/train()``, so evaluation and checkpoints
#: would see the gradient point y instead of the average x).
REGISTRY_METHODS: tuple[str, ...] = ("muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md")
_ORIGINAL = "__megatron_md_original__"


def extra_args_provider(parser):
    """Megatron-LM ``extra_args_provider``: adds the megatron_md flags and extends ``--optimizer``'s
    choices. Chain with your own as ``lambda p: mine(extra_args_provider(p))``."""
    return add_md_args(parser)


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


def _training_module():
    try:
        return importlib.import_module("megatron.training.training")
    except ImportError as e:
        raise ImportError(
            f"megatron_md.megatron_lm.install() patches Megatron-LM's training loop, but megatron.training is not "
            f"importable ({e}). It ships with Megatron-LM (a clone of github.com/NVIDIA/Megatron-LM, `pip install "
            f"-e .`), not with the megatron-core wheel. With megatron-core alone, call "
            f"megatron_md.megatron.builder.get_megatron_optimizer(config, model_chunks, md=MDConfig(...)) directly."
        ) from e


def _megatron_args():
    return importlib.import_module("megatron.training.global_vars").get_args()


def _wrap(original: Callable, builtin: str) -> Callable:
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(original)
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        name = getattr(config, "optimizer", None)
        if not routes_to_md(name, builtin):
            return original(config, model_chunks, *args, **kwargs)
        megatron_args = _megatron_args()
        md = dataclasses.replace(md_config_for_megatron_lm(megatron_args), optimizer=name)
        validate(md, megatron_args)
        extra = dict(kwargs)
        if args:
            if signature is None:
                raise TypeError(f"get_megatron_optimizer: cannot name positional arguments {args!r}")
            bound = signature.bind(config, model_chunks, *args, **kwargs).arguments
            extra = {k: v for k, v in list(bound.items())[2:]}
        from .megatron.builder import get_megatron_optimizer as build  # lazy: heavy, and optional

        params = inspect.signature(build).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        passed = {k: v for k, v in extra.items() if takes_any or (k in params and k not in ("config", "md"))}
        dropped = sorted(k for k in extra if k not in passed and extra[k] is not None)
        if dropped:
            logger.info("megatron_md: %s not used by megatron_md's builder (it does its own param groups and "
                        "process groups)", ", ".join(dropped))
        return build(config, model_chunks, md=md, **passed)

    setattr(get_megatron_optimizer, _ORIGINAL, original)
    return get_megatron_optimizer


def install(*, builtin: Literal["megatron", "md"] = "megatron") -> None:
    """Make Megatron-LM's ``megatron.training.training`` build megatron_md optimizers.

    Replaces the ``get_megatron_optimizer`` name that module imported from megatron-core with a
    wrapper: for an ``--optimizer`` that megatron_md owns (:func:`routes_to_md`) it reads the
    flags (``get_args()``), :func:`validate`\\ s them and calls
    ``megatron_md.megatron.builder.get_megatron_optimizer(config, model_chunks, md=...)``;
    anything else goes to Megatron's original. Idempotent; :func:`uninstall` restores.

    ``builtin``: who builds the names both implement (``adam``, ``muon``).
    Raises ``ImportError`` when Megatron-LM (``megatron.training``) is not importable.
    """
    if builtin not in ("megatron", "md"):
        raise ValueError(f"builtin={builtin!r}: expected 'megatron' or 'md'")
    training = _training_module()
    current = getattr(training, "get_megatron_optimizer", None)
    if current is None:
        raise RuntimeError("megatron.training.training has no get_megatron_optimizer; this Megatron-LM version "
                           "is not supported by megatron_md.megatron_lm.install()")
    original = getattr(current, _ORIGINAL, current)
    training.get_megatron_optimizer = _wrap(original, builtin)


def uninstall() -> bool:
    """Undo :func:`install`; False when it was not installed (or Megatron-LM is absent)."""
    try:
        training = importlib.import_module("megatron.training.training")
    except ImportError:
        return False
    original = getattr(getattr(training, "get_megatron_optimizer", None), _ORIGINAL, None)
    if original is None:
        return False
    training.get_megatron_optimizer = original
    return True


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


def _core_version() -> str:
    try:
        return importlib.import_module("megatron.core.package_info").__version__
    except (ImportError, AttributeError):
        return "unknown"


def register_emerging_optimizers(md: Optional[MDConfig] = None) -> bool:
    """Register :data:`REGISTRY_METHODS` in megatron-core's emerging-optimizer registry (≥ 0.18).

    Then ``OptimizerConfig(optimizer="muon-md", ...)`` works with megatron-core's own
    ``get_megatron_optimizer`` (which routes embeddings, output head and non-2-D params to Adam).
    Hyperparameters come from ``md``, else from Megatron-LM's parsed args, else the defaults.
    Returns False, logging why, when there is no registry (megatron-core 0.16/0.17) or its API
    is not the one this code knows. Names the registry already holds for another class (its own
    ``muon``) are left alone.

    Warning: that path runs our classes without megatron_md's sharding: each TP shard is treated
    as a whole matrix (blockwise, like ``--muon-tp-mode blockwise``; the MD sphere radius comes
    from the local shape), fused QKV is not split, fp32 params only, and megatron-core requires
    the ``emerging-optimizers`` package for any registry entry. :func:`install` has none of
    these limits.
    """
    try:
        module = importlib.import_module("megatron.core.optimizer.emerging_optimizers")
    except ImportError:
        logger.info("megatron_md: megatron-core %s has no emerging-optimizer registry (it arrives in 0.18); "
                    "nothing registered, use megatron_md.megatron_lm.install()", _core_version())
        return False
    registry = getattr(module, "_EMERGING_OPTIMIZERS", None)
    entry_cls = getattr(module, "EmergingOptimizerEntry", None)
    accepted: set = set()
    if entry_cls is not None:
        accepted = ({f.name for f in dataclasses.fields(entry_cls)} if dataclasses.is_dataclass(entry_cls)
                    else set(inspect.signature(entry_cls).parameters))
    if not isinstance(registry, dict) or not {"optimizer_cls", "config_to_kwargs"} <= accepted:
        logger.info("megatron_md: megatron-core %s's emerging_optimizers module has no registry API this version "
                    "of megatron_md knows (_EMERGING_OPTIMIZERS + EmergingOptimizerEntry); nothing registered",
                    _core_version())
        return False
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
    if getattr(module, "HAVE_EMERGING_OPTIMIZERS", True) is False:
        logger.info("megatron_md: registered, but megatron-core refuses every registry optimizer until the "
                    "emerging-optimizers package is installed")
    return True
