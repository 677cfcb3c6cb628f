"""What differs between megatron-core releases (0.16.1 … 0.19.x), detected in one place.

Each function here looks for the feature itself (a module, an attribute, a dataclass field),
never at a version number, and returns what the rest of megatron_md needs, so that
``builder.py``, ``hybrid.py`` and ``megatron_lm.py`` contain no version branches. Verified
releases and what was run on each: ``docs/compatibility.md``.

* :func:`param_group_identifier`: how Megatron matches saved param groups to current ones
  (``param_group_identifier_keys``; 0.16 names six keys that every group carries, 0.19 names
  more — ``start_wd``, ``end_wd``, ``optimizer``, … — and treats a missing key as ``None``).
* :func:`process_groups_for_optimizer`: ``ProcessGroupCollection.setup_process_groups_for_
  optimizer`` where it exists, else the ``parallel_state`` getters.
* :func:`emerging_registry`: megatron-core's emerging-optimizer registry (0.18+), or why not.
* :func:`core_version`.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, NamedTuple, Optional

__all__ = ["core_version", "param_group_identifier", "process_groups_for_optimizer", "emerging_registry",
           "Registry"]


def core_version() -> str:
    """megatron-core's ``__version__`` (``"unknown"`` when it cannot be read)."""
    try:
        return importlib.import_module("megatron.core.package_info").__version__
    except (ImportError, AttributeError):
        return "unknown"


def param_group_identifier(group: dict) -> tuple:
    """Megatron's identity of a param group (its ``param_group_identifier_keys``; a key the group
    lacks reads ``pre_<key>`` (NeMo's alias), else ``None`` — 0.19's rule, the same result on
    0.16 where every group has every key)."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys as keys

    out = []
    for k in keys:
        out.append(group[k] if k in group else group.get(f"pre_{k}"))
    return tuple(out)


def process_groups_for_optimizer(model_chunks, use_gloo: bool) -> dict:
    """The optimizer's process groups by megatron-core's own names (``intra_dp_cp_group``,
    ``intra_expt_dp_group``, ``mp_group``, ``expt_tp_pp_group``, ``intra_dist_opt_group``, the
    ``*_gloo`` ones when ``use_gloo``)."""
    from megatron.core import parallel_state as ps
    try:
        from megatron.core.process_groups_config import ProcessGroupCollection
        setup = ProcessGroupCollection.setup_process_groups_for_optimizer
    except (ImportError, AttributeError):
        setup = None
    if setup is not None:
        return setup(None, model_chunks, use_gloo)
    return dict(intra_dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
                intra_dp_cp_group_gloo=ps.get_data_parallel_group_gloo(with_context_parallel=True) if use_gloo else None,
                intra_expt_dp_group=ps.get_expert_data_parallel_group(),
                intra_expt_dp_group_gloo=ps.get_expert_data_parallel_group_gloo() if use_gloo else None,
                mp_group=ps.get_model_parallel_group(),
                expt_tp_pp_group=ps.get_expert_tensor_model_pipeline_parallel_group(),
                intra_dist_opt_group=ps.get_data_parallel_group(with_context_parallel=True))


class Registry(NamedTuple):
    """megatron-core's emerging-optimizer registry: the dict, the entry class, its fields."""

    module: Any
    entries: dict
    entry_cls: type
    fields: frozenset


def emerging_registry() -> tuple[Optional[Registry], str]:
    """``(Registry, "")`` on megatron-core ≥ 0.18, else ``(None, why)``."""
    try:
        module = importlib.import_module("megatron.core.optimizer.emerging_optimizers")
    except ImportError:
        return None, f"megatron-core {core_version()} has no emerging-optimizer registry (it arrives in 0.18)"
    entries = getattr(module, "_EMERGING_OPTIMIZERS", None)
    entry_cls = getattr(module, "EmergingOptimizerEntry", None)
    fields: frozenset = frozenset()
    if entry_cls is not None:
        fields = frozenset(f.name for f in dataclasses.fields(entry_cls)) if dataclasses.is_dataclass(entry_cls) \
            else frozenset(inspect.signature(entry_cls).parameters)
    if not isinstance(entries, dict) or not {"optimizer_cls", "config_to_kwargs"} <= fields:
        return None, (f"megatron-core {core_version()}'s emerging_optimizers module has no registry API this version "
                      f"of megatron_md knows (_EMERGING_OPTIMIZERS + EmergingOptimizerEntry)")
    return Registry(module, entries, entry_cls, fields), ""
