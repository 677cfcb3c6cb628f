"""megatron_md configuration: one typed dataclass per method; the command-line flags are generated.

Single source of truth
----------------------
Every method-specific hyperparameter lives in exactly one dataclass field below
(``MuonConfig.momentum``, ``MuonMDConfig.gains_lr``, ...), with its default *equal to the
optimizer class's keyword default* (a unit test introspects the class signatures) and its help
text in ``field(metadata={"help": ...})``. :func:`add_md_args` turns the fields into argparse
flags (``Literal`` → ``choices``, ``bool`` → ``--x/--no-x``, ``tuple`` → ``nargs``,
``Optional[float]`` → ``type=float, default=None``); :func:`md_config_from_args` reads them back.

What stays Megatron's
---------------------
The learning rate and everything Megatron already has a flag for are *not* duplicated here:
``--lr``, ``--min-lr``, ``--weight-decay``, ``--clip-grad``, ``--bf16``/``--fp16``,
``--use-distributed-optimizer``, ``--adam-beta1/2``, ``--adam-eps`` (the AdamW partner of the
matrix methods), ``--lr-decay-style`` and the ``--lr-warmup-*`` flags. The builder passes
``lr``/``weight_decay`` itself, which is why :meth:`MDConfig.matrix_kwargs` leaves them out.

Flag names: ``--optimizer``, ``--ns-mode``, ``--dp-mode``, ``--split-qkv/--no-split-qkv``, ``--split-fc1``,
``--router-on-matrix``, ``--md-residual-scaling``, ``--partner-lr`` and, per method,
``--<method>-<field>`` (``--muon-momentum``, ``--muon-md-gains-lr``,
``--sf-normuon-warmup-steps``, ...). When a host parser already owns one of a method's option
strings (Megatron-LM defines ``--muon-momentum`` and ``--muon-nesterov`` for its own Muon), that
method's flags are spelled ``--md-<method>-<field>`` instead, and an existing ``--optimizer``
gets our names added to its choices rather than a second definition. Parsed values are stored
under ``md_``-prefixed attribute names, so they never shadow a host attribute (Megatron-LM copies
every ``args`` attribute named like an ``OptimizerConfig`` field into its optimizer config).

:func:`validate` rejects unsupported combinations (``--fp16``, schedule-free with a decaying
LR schedule or Megatron's warmup, MD/hyperball with weight decay, ``--md-init factor`` with
``--md-embedding-unit-norm``, a ``to-md`` checkpoint loaded without the flags it needs,
``--dp-mode layer-wise`` with ``--use-distributed-optimizer``) before training, naming the flags.

How to add a method
-------------------
1. Write the optimizer class (``megatron_md/optim``; keyword-only arguments).
2. Add ``@dataclass class FooConfig(MethodConfig, <mixins>)`` with ``name = "foo"``,
   ``optimizer_class = Foo`` and one field per constructor keyword (defaults equal to the
   class's), overriding :meth:`MethodConfig.to_kwargs` only when a field is not a keyword 1:1.
3. Add ``"foo"`` to :data:`OptimizerName` and a ``foo: FooConfig`` field to :class:`MDConfig`.
   Flags, ``--help``, parsing and the default-equality test follow automatically.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Literal, NamedTuple, Optional, Union, get_args, get_origin

import torch

from ..ops.scaling import SCALE_NAMES, ScaleName
from ..optim import AdamH, AdamMD, Muon, MuonH, MuonMD, NorMuon, RMNP, SFAdamW, SFNorMuon

logger = logging.getLogger(__name__)

__all__ = [
    "OptimizerName", "OPTIMIZER_CHOICES", "METHOD_CONFIGS", "SCHEDULE_FREE", "NO_WEIGHT_DECAY",
    "BUILDER_SUPPLIED", "MethodConfig", "MuonConfig", "NorMuonConfig", "RMNPConfig", "AdamHConfig",
    "MuonHConfig", "AdamMDConfig", "MuonMDConfig", "SFAdamWConfig", "SFNorMuonConfig", "MDConfig",
    "FlagSpec", "flag_specs", "add_md_args", "md_config_from_args", "validate", "MD_METHODS",
]

OptimizerName = Literal["adam", "muon", "normuon", "rmnp", "adamh", "muonh", "adam-md", "muon-md",
                        "sf-adamw", "sf-normuon"]
OPTIMIZER_CHOICES: tuple[str, ...] = get_args(OptimizerName)
NsMode = Literal["owner", "gather"]
DpMode = Literal["auto", "layer-wise"]
NsDtype = Literal["auto", "fp32", "bf16"]
NsCoefficients = Literal["jordan", "quintic"]
StepForm = Literal["rescale", "rms_match"]
WeightDecayAt = Literal["y", "z"]
MdInit = Literal["project", "factor"]

#: ``--<method>-ns-dtype`` string → the optimizer's ``ns_dtype`` (None = auto: bf16 on CUDA; on CPU bf16 only where
#: the CPU has native bf16 and a probe measures it faster — megatron_md.ops.ns_dtype).
NS_DTYPES: dict[str, Optional[torch.dtype]] = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}
#: Constructor keywords the builder supplies (from Megatron's flags or its own sharding logic; ``sphere``:
#: AdamMD's rows sphere is the builder's MD output-head rule, never a flag of the hidden matrices; ``init``:
#: --md-init, one flag for the hidden matrices and the head).
BUILDER_SUPPLIED: tuple[str, ...] = ("lr", "weight_decay", "shards", "ns_mode", "nonfinite_group", "sphere", "init")
#: The MD methods (their recipe flags --md-* apply to these only).
MD_METHODS: tuple[str, ...] = ("adam-md", "muon-md")
SCHEDULE_FREE: tuple[str, ...] = ("sf-adamw", "sf-normuon")
#: Methods that fix a weight norm and take no weight decay (their classes reject a nonzero one).
NO_WEIGHT_DECAY: tuple[str, ...] = ("adamh", "muonh", "adam-md", "muon-md")

assert tuple(get_args(ScaleName)) == tuple(SCALE_NAMES)


def _f(default: Any, help: str, check: Optional[str] = None) -> Any:
    """A dataclass field with its help text (and an optional range check, see ``_CHECKS``)."""
    return field(default=default, metadata={"help": help, "check": check})


_CHECKS = {
    "unit": ("must be in [0, 1)", lambda v: 0.0 <= v < 1.0),
    "positive": ("must be a finite number > 0", lambda v: math.isfinite(v) and v > 0),
    "nonneg": ("must be a finite number >= 0", lambda v: math.isfinite(v) and v >= 0),
    "nonneg_int": ("must be an integer >= 0", lambda v: isinstance(v, int) and v >= 0),
    "pos_int": ("must be an integer >= 1", lambda v: isinstance(v, int) and v >= 1),
}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional_inner(hint: Any) -> Any:
    """``Optional[X]`` → X; anything else → None."""
    if get_origin(hint) is Union:
        rest = [a for a in get_args(hint) if a is not type(None)]
        if len(rest) == 1 and len(get_args(hint)) == 2:
            return rest[0]
    return None


def _check_value(flag: str, hint: Any, value: Any, check: Optional[str]) -> None:
    """Type/choice/range check of one field value; the error names the flag."""
    inner = _optional_inner(hint)
    if inner is not None:
        if value is None:
            return
        hint = inner
    bad = None
    if get_origin(hint) is Literal:
        if value not in get_args(hint):
            bad = f"expected one of {list(get_args(hint))}"
    elif hint is bool:
        if not isinstance(value, bool):
            bad = "expected a bool"
    elif get_origin(hint) is tuple:
        n = len(get_args(hint))
        if not isinstance(value, (tuple, list)) or len(value) != n or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            bad = f"expected {n} numbers"
        elif check and not all(_CHECKS[check][1](float(v)) for v in value):
            bad = f"each value {_CHECKS[check][0]}"
    elif hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            bad = "expected an integer"
    elif hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            bad = "expected a number"
    if bad is None and check and get_origin(hint) is not tuple and not _CHECKS[check][1](value):
        bad = _CHECKS[check][0]
    if bad:
        raise ValueError(f"{flag}={value!r}: {bad}")


# ------------------------------------------------------------------------------ method configs
@dataclass
class MethodConfig:
    """Base of the per-method configs: fields map 1:1 to the optimizer class's keyword arguments.

    ``name`` is the ``--optimizer`` value and the flag prefix; ``optimizer_class`` the class the
    builder constructs with ``lr=``, ``weight_decay=`` and sharding arguments plus
    :meth:`to_kwargs`.
    """

    name: ClassVar[str] = ""
    optimizer_class: ClassVar[type] = type(None)

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def flag(cls, field_name: str) -> str:
        """The canonical command-line flag of ``field_name`` (``--muon-md-gains-lr``)."""
        return f"--{cls.name}-{field_name.replace('_', '-')}"

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag for any out-of-range or mistyped field."""
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # argparse nargs gives lists; the config holds tuples
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            _check_value(self.flag(f.name), hints[f.name], value, f.metadata.get("check"))

    def to_kwargs(self) -> dict[str, Any]:
        """Constructor keywords for :attr:`optimizer_class` (without lr / weight_decay / sharding)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "ns_dtype" in kw:
            kw["ns_dtype"] = NS_DTYPES[kw["ns_dtype"]]
        return kw


@dataclass
class _Momentum:
    momentum: float = _f(0.95, "Momentum μ of the EMA M ← μM + (1−μ)G.", "unit")
    nesterov: bool = _f(True, "Nesterov direction U = (1−μ)G + μM (off: U = M).")


@dataclass
class _NewtonSchulz:
    ns_coefficients: NsCoefficients = _f(
        "jordan", "Newton–Schulz coefficients: 'jordan' = (3.4445, −4.7750, 2.0315) repeated; "
                  "'quintic' = the 5-triple schedule (docs/optimizer_spec.md).")
    ns_steps: Optional[int] = _f(None, "Newton–Schulz iterations (None = 5).", "pos_int")
    ns_dtype: NsDtype = _f("auto", "Newton–Schulz matmul dtype: auto = bf16 on CUDA; on CPU bf16 only "
                              "where native bf16 is measured faster than fp32 (logged).")


_SCALE_HELP = ("Update scale from the logical (unsharded) shape m×n: shape_scaling = max(1, √(m/n)), "
               "unit_rms = √(m/n), shape_up = √max(m/n, n/m), rms_match = 0.2·√max(m, n), none = 1.")
_EPS_HELP = "ε added to the denominator."


@dataclass
class MuonConfig(MethodConfig, _NewtonSchulz, _Momentum):
    """Muon: W ← (1−ηλ)W − η·scale·NS(U) (Jordan et al., 2024)."""

    name: ClassVar[str] = "muon"
    optimizer_class: ClassVar[type] = Muon
    scale: ScaleName = _f("shape_scaling", _SCALE_HELP)


@dataclass
class NorMuonConfig(MuonConfig):
    """NorMuon: Muon with a per-row second moment of the orthogonalized update."""

    name: ClassVar[str] = "normuon"
    optimizer_class: ClassVar[type] = NorMuon
    beta2: float = _f(0.95, "β2 of the per-row second moment v ← β2 v + (1−β2)·rowmean(O⊙O) "
                            "(the class's betas=(β2,)).", "unit")
    eps: float = _f(1e-8, _EPS_HELP, "positive")
    step_form: StepForm = _f("rescale", "rescale: restore ‖O‖_F after row normalization (official code); "
                                        "rms_match: η̂ = 0.2·η·√(mn)/‖Ô‖_F (paper).")

    def to_kwargs(self) -> dict[str, Any]:
        kw = super().to_kwargs()
        kw["betas"] = (kw.pop("beta2"),)
        return kw


@dataclass
class RMNPConfig(MethodConfig, _Momentum):
    """RMNP: row-wise L2-normalized momentum, R = U / (‖U_i,:‖₂ + ε) (arXiv 2603.20527)."""

    name: ClassVar[str] = "rmnp"
    optimizer_class: ClassVar[type] = RMNP
    eps: float = _f(1e-8, _EPS_HELP, "positive")
    scale: ScaleName = _f("shape_scaling", _SCALE_HELP)


@dataclass
class AdamHConfig(MethodConfig):
    """AdamH: Adam direction retracted onto the hyperball ‖W‖_F = ‖W₀‖_F (no weight decay)."""

    name: ClassVar[str] = "adamh"
    optimizer_class: ClassVar[type] = AdamH
    betas: tuple[float, float] = _f((0.9, 0.95), "Adam (β1, β2).", "unit")
    eps: float = _f(1e-8, _EPS_HELP, "positive")


@dataclass
class MuonHConfig(MethodConfig, _NewtonSchulz, _Momentum):
    """MuonH: Muon direction retracted onto the hyperball ‖W‖_F = ‖W₀‖_F (no weight decay)."""

    name: ClassVar[str] = "muonh"
    optimizer_class: ClassVar[type] = MuonH


@dataclass
class _MagnitudeDirection:
    gains_lr: Optional[float] = _f(None, "LR of the row/column gains' Adam (None = the partner LR, --partner-lr "
                                         "or --lr: the base LR, as the MD paper and the authors' MoE recipe; "
                                         "docs/md_fidelity.md); kept as a ratio to --lr, so the LR schedule "
                                         "scales both.", "nonneg")
    betas: tuple[float, float] = _f((0.9, 0.99), "Adam (β1, β2) of the gains (AdamMD: also of the direction).",
                                    "unit")
    eps: float = _f(1e-8, _EPS_HELP, "positive")
    radius_scale: float = _f(1.0, "Multiplier of every sphere radius R = √max(m, n) (--md-residual-scaling "
                                   "further shrinks linear_proj/linear_fc2 by √(1/(2L))).", "positive")
    radius_scales_update: bool = _f(True, "Scale the step of D by the same factor ρ as its radius (η·ρ·U for "
                                          "R = ρ·√max(m, n), --md-residual-scaling included): the angular step "
                                          "stays, as in the authors' optimizer. Off: only R shrinks.")
    shared_qkv_col_gains: bool = _f(True, "One column-gain vector for Q, K and V of a fused QKV (its gradient the "
                                          "sum of theirs), as the authors' code (their --split-qkv-gains turns it "
                                          "off); off: each block its own.")


@dataclass
class AdamMDConfig(MethodConfig, _MagnitudeDirection):
    """AdamMD: W = diag(softplus(g_r))·D·diag(softplus(g_c)), D on a sphere, Adam base (arXiv 2606.25971)."""

    name: ClassVar[str] = "adam-md"
    optimizer_class: ClassVar[type] = AdamMD


@dataclass
class MuonMDConfig(MethodConfig, _NewtonSchulz, _Momentum, _MagnitudeDirection):
    """MuonMD: MD decoupling over a Muon base; gains on Adam (arXiv 2606.25971)."""

    name: ClassVar[str] = "muon-md"
    optimizer_class: ClassVar[type] = MuonMD
    scale: ScaleName = _f("shape_up", _SCALE_HELP)
    ns_coefficients: NsCoefficients = _f(
        "quintic", "Newton–Schulz coefficients: 'quintic' = the 5-triple schedule (the MD authors' optimizer); "
                   "'jordan' = (3.4445, −4.7750, 2.0315) repeated (docs/optimizer_spec.md).")


@dataclass
class _ScheduleFreeFields:
    eps: float = _f(1e-8, _EPS_HELP, "positive")
    warmup_steps: int = _f(0, "Schedule-free linear warmup steps (use this, not Megatron's --lr-warmup-*).",
                           "nonneg_int")
    r: float = _f(0.0, "Averaging weight exponent: w_k = (k+1)^r · lr_max^p.", "nonneg")
    weight_lr_power: float = _f(2.0, "Averaging weight power p of lr_max.", "nonneg")


@dataclass
class SFAdamWConfig(MethodConfig, _ScheduleFreeFields):
    """Schedule-free AdamW (Defazio et al., 2024): ``--optimizer sf-adamw`` and the partner of sf-normuon.

    Its betas are its own (β1 is the y = (1−β1)z + β1x interpolation, not a first moment), not
    --adam-beta1/2. Weight decay is --weight-decay.
    """

    name: ClassVar[str] = "sf-adamw"
    optimizer_class: ClassVar[type] = SFAdamW
    betas: tuple[float, float] = _f((0.9, 0.999), "(β1, β2): interpolation y = (1−β1)z + β1x and "
                                                  "second-moment β2.", "unit")
    weight_decay_at: WeightDecayAt = _f("y", "Where --weight-decay is evaluated: 'y' (as schedulefree) or 'z'.")


@dataclass
class SFNorMuonConfig(MethodConfig, _NewtonSchulz, _Momentum, _ScheduleFreeFields):
    """Schedule-free NorMuon (arXiv 2605.23061); weight decay (--weight-decay; the class default
    is 0.05) on the fast iterate z. Non-matrix params use SF-AdamW (--sf-adamw-* flags)."""

    name: ClassVar[str] = "sf-normuon"
    optimizer_class: ClassVar[type] = SFNorMuon
    nesterov: bool = _f(False, "Nesterov direction U = (1−μ)G + μM (off: U = M).")
    betas: tuple[float, float] = _f((0.9, 0.95), "(β, β2): interpolation y = (1−β)z + βx and row-moment β2.",
                                    "unit")


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {c.name: c for c in (
    MuonConfig, NorMuonConfig, RMNPConfig, AdamHConfig, MuonHConfig, AdamMDConfig, MuonMDConfig,
    SFAdamWConfig, SFNorMuonConfig)}


def _method_field(cls: type[MethodConfig]) -> Any:
    return field(default_factory=cls, metadata={"help": (cls.__doc__ or cls.name).strip().splitlines()[0]})


# ------------------------------------------------------------------------------ top-level config
@dataclass
class MDConfig:
    """megatron_md options: which optimizer, how it is distributed, and every method's hyperparameters."""

    optimizer: OptimizerName = _f(
        "muon-md", "Optimizer for hidden matrices; embeddings, output head, norms and biases use the AdamW "
                   "partner (SF-AdamW for the schedule-free methods). adam = AdamW on everything.")
    ns_mode: NsMode = _f("owner", "Newton–Schulz of sharded matrices: owner = one rank per matrix orthogonalizes "
                                  "and scatters; gather = every rank gathers and orthogonalizes. Ignored by "
                                  "methods without Newton–Schulz.")
    ns_split: bool = _f(False, "Owner Newton–Schulz may split a matrix over its tensor-parallel group (each rank "
                               "keeps its block of the long side; the m×m Gram is all-reduced every step) when "
                               "that lowers the busiest rank's load; same as MEGATRON_MD_NS_SPLIT=1. Off: one "
                               "owner per matrix.")
    dp_mode: DpMode = _f("auto", "auto = follow --use-distributed-optimizer (ZeRO-1 flat shards when set, plain DDP "
                                 "otherwise); layer-wise = whole matrices distributed across DP ranks (plain DDP, "
                                 "without --use-distributed-optimizer).")
    split_qkv: bool = _f(True, "Treat Q, K and V of a fused linear_qkv as separate matrices (methods that "
                               "see the whole matrix; RMNP is row-wise and needs no split).")
    split_fc1: bool = _f(False, "Treat the gate and up halves of a SwiGLU linear_fc1 as separate matrices "
                                "(methods that see the whole matrix; no effect without --swiglu).")
    router_on_matrix: bool = _f(False, "Give MoE router weights to the matrix optimizer instead of the "
                                       "AdamW partner.")
    md_residual_scaling: bool = _f(False, "MD: shrink the sphere radius of linear_proj/linear_fc2 by √(1/(2L)).")
    md_init: MdInit = _f(
        "project", "MD (adam-md, muon-md): how the hidden matrices and the head enter MD. project = onto their "
                   "spheres with gains 1 (the paper's recipe; changes a trained model); factor = weights unchanged, "
                   "gains factored from the row norms (D on its sphere, W = diag(s_r)·D·diag(s_c)), also for weights "
                   "loaded after the optimizer is built: for a model trained with another optimizer "
                   "(tools/convert_checkpoint.py to-md). Needs --no-md-embedding-unit-norm.")
    md_embedding_unit_norm: bool = _f(
        True, "MD (adam-md, muon-md): the word embedding on Adam with every vocabulary row projected back to "
              "unit norm after each step (no gains). A head tied to the embedding follows this rule.")
    md_head_gains: Optional[bool] = _f(
        None, "MD (adam-md, muon-md): the untied output head on Adam with one unit sphere per row and row and "
              "column gains (AdamMD with sphere='rows', at the partner LR). Default (None): on for an untied head; "
              "a tied head silently follows --md-embedding-unit-norm. --md-head-gains on a tied head warns.")
    md_router: bool = _f(
        True, "MD (adam-md, muon-md) with MoE: the router weight under MD, one unit sphere per row with row and "
              "column gains (MuonMD: Muon with unit scale), as the authors' MoE recipe (docs/md_fidelity.md); "
              "off: the router follows --router-on-matrix (AdamW partner by default).")
    md_embedding_lr: Optional[float] = _f(None, "MD: LR of the word embedding under --md-embedding-unit-norm "
                                                "(None = the partner LR).", "positive")
    partner_lr: Optional[float] = _f(None, "LR of the AdamW partner (embeddings, output head, norms, biases); "
                                           "None = --lr.", "positive")
    muon: MuonConfig = _method_field(MuonConfig)
    normuon: NorMuonConfig = _method_field(NorMuonConfig)
    rmnp: RMNPConfig = _method_field(RMNPConfig)
    adamh: AdamHConfig = _method_field(AdamHConfig)
    muonh: MuonHConfig = _method_field(MuonHConfig)
    adam_md: AdamMDConfig = _method_field(AdamMDConfig)
    muon_md: MuonMDConfig = _method_field(MuonMDConfig)
    sf_adamw: SFAdamWConfig = _method_field(SFAdamWConfig)
    sf_normuon: SFNorMuonConfig = _method_field(SFNorMuonConfig)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` (naming the flag) for any invalid value, nested configs included."""
        hints = _hints(MDConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, MethodConfig):
                value.check()
            else:
                _check_value(_top_flag(f.name), hints[f.name], value, f.metadata.get("check"))

    def method_config(self) -> Optional[MethodConfig]:
        """The chosen method's config (None for ``adam``: Megatron's own flags configure it)."""
        if self.optimizer == "adam":
            return None
        if self.optimizer not in METHOD_CONFIGS:
            raise ValueError(f"--optimizer={self.optimizer!r}: expected one of {list(OPTIMIZER_CHOICES)}")
        return getattr(self, self.optimizer.replace("-", "_"))

    def method_class(self) -> Optional[type]:
        """The optimizer class built for the chosen method's matrices (SFAdamW for ``sf-adamw``;
        None for ``adam``)."""
        cfg = self.method_config()
        return None if cfg is None else cfg.optimizer_class

    def matrix_kwargs(self) -> dict[str, Any]:
        """Constructor keywords of :meth:`method_class` (``ns_dtype`` as a torch dtype or None).

        Leaves out ``lr``, ``weight_decay``, ``shards``, ``ns_mode`` and ``nonfinite_group``,
        which the builder supplies; ``{}`` for ``adam``.
        """
        cfg = self.method_config()
        return {} if cfg is None else cfg.to_kwargs()

    def partner_kwargs(self) -> dict[str, Any]:
        """Extra SF-AdamW keywords for the partner of the schedule-free methods (from
        ``--sf-adamw-*``); ``{}`` otherwise (the AdamW partner uses --adam-beta1/2, --adam-eps)."""
        return self.sf_adamw.to_kwargs() if self.optimizer in SCHEDULE_FREE else {}


# ------------------------------------------------------------------------------ flags
def _top_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class FlagSpec(NamedTuple):
    """One generated flag: where its value lives in :class:`MDConfig` and how it is spelled."""

    path: tuple[str, ...]           # ("muon_md", "gains_lr")
    option: str                     # canonical spelling: "--muon-md-gains-lr"
    dest: str                       # argparse attribute: "md_muon_md_gains_lr"
    default: Any
    hint: Any                       # resolved type annotation
    help: str
    method: Optional[str]           # "muon-md", or None for top-level flags


def flag_specs() -> Iterator[FlagSpec]:
    """Every generated flag, in :class:`MDConfig` field order (methods' fields after the top level)."""
    hints = _hints(MDConfig)
    for f in dataclasses.fields(MDConfig):
        hint = hints[f.name]
        if isinstance(hint, type) and issubclass(hint, MethodConfig):
            sub_hints = _hints(hint)
            for sf in dataclasses.fields(hint):
                yield FlagSpec((f.name, sf.name), hint.flag(sf.name), f"md_{f.name}_{sf.name}", sf.default,
                               sub_hints[sf.name], sf.metadata["help"], hint.name)
        else:
            dest = f.name if f.name == "optimizer" or f.name.startswith("md_") else f"md_{f.name}"
            yield FlagSpec((f.name,), _top_flag(f.name), dest, f.default, hint, f.metadata["help"], None)


def _bool_action_appends_default() -> bool:
    """``BooleanOptionalAction`` appends "(default: ...)" to the help itself on Python 3.10."""
    return argparse.BooleanOptionalAction(["--x"], "x", default=True, help="h").help != "h"


_BOOL_SHOWS_DEFAULT = _bool_action_appends_default()


def _argparse_kwargs(spec: FlagSpec) -> dict[str, Any]:
    hint = _optional_inner(spec.hint) or spec.hint
    help_ = spec.help.replace("%", "%%")
    kw: dict[str, Any] = dict(dest=spec.dest, default=spec.default)
    if hint is bool:
        kw.update(action=argparse.BooleanOptionalAction,
                  help=help_ if _BOOL_SHOWS_DEFAULT else help_ + " (default: %(default)s)")
        return kw
    kw["help"] = help_ + " (default: %(default)s)"
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        kw.update(type=type(choices[0]), choices=choices)
    elif get_origin(hint) is tuple:
        args = get_args(hint)
        kw.update(type=args[0], nargs=len(args), metavar=spec.path[-1].upper().rstrip("S"))
    elif hint in (int, float, str):
        kw.update(type=hint, metavar=spec.path[-1].upper())
    else:
        raise TypeError(f"{spec.option}: no flag type for annotation {spec.hint!r}")
    return kw


def _option_strings(option: str, hint: Any) -> list[str]:
    return [option, "--no-" + option[2:]] if hint is bool else [option]


def _existing_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    # argparse has no public lookup of an option string's action; this mapping has been stable
    # since Python 2.7 and is shared by the parser and all its argument groups.
    return parser._option_string_actions


def _extend_optimizer_choices(action: argparse.Action) -> None:
    if action.choices is None:
        return
    extra = [c for c in OPTIMIZER_CHOICES if c not in action.choices]
    if extra:
        action.choices = list(action.choices) + extra
        if action.help:
            action.help += " megatron_md adds: " + ", ".join(extra) + "."


def add_md_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the generated megatron_md flags to ``parser`` (returned, for ``extra_args_provider``).

    An existing ``--optimizer`` (Megatron-LM's) keeps its definition and default and gets our
    names appended to its choices. A method whose option strings clash with existing ones is
    spelled ``--md-<method>-<field>`` (logged).
    """
    existing = _existing_options(parser)
    specs = list(flag_specs())
    top = parser.add_argument_group("megatron_md", MDConfig.__doc__)
    groups: dict[str, argparse._ArgumentGroup] = {}
    prefix_md: dict[str, bool] = {}
    for spec in specs:
        if spec.method is None:
            if spec.option == "--optimizer" and "--optimizer" in existing:
                _extend_optimizer_choices(existing["--optimizer"])
                continue
            option = spec.option
            if any(o in existing for o in _option_strings(option, spec.hint)):
                option = "--md-" + option[2:]
                logger.info("megatron_md: %s is already defined by the host parser; ours is %s", spec.option, option)
            top.add_argument(option, **_argparse_kwargs(spec))
            continue
        if spec.method not in groups:
            cls = METHOD_CONFIGS[spec.method]
            own = [o for s in specs if s.method == spec.method for o in _option_strings(s.option, s.hint)]
            clash = [o for o in own if o in existing]
            prefix_md[spec.method] = bool(clash)
            if clash:
                logger.info("megatron_md: the host parser already defines %s; the %s flags are spelled --md-%s-*",
                            ", ".join(clash), spec.method, spec.method)
            groups[spec.method] = parser.add_argument_group(f"megatron_md: {spec.method}", cls.__doc__)
        option = "--md-" + spec.option[2:] if prefix_md[spec.method] else spec.option
        groups[spec.method].add_argument(option, **_argparse_kwargs(spec))
    return parser


def md_config_from_args(args: Any) -> MDConfig:
    """Build (and check) an :class:`MDConfig` from parsed arguments; an attribute that ``args``
    lacks keeps its dataclass default. Raises ``ValueError`` naming the flag of a bad value."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for spec in flag_specs():
        if not hasattr(args, spec.dest):
            continue
        value = getattr(args, spec.dest)
        if isinstance(value, list):
            value = tuple(value)
        if len(spec.path) == 1:
            top[spec.path[0]] = value
        else:
            nested.setdefault(spec.path[0], {})[spec.path[1]] = value
    hints = _hints(MDConfig)
    for attr, kw in nested.items():
        top[attr] = hints[attr](**kw)
    return MDConfig(**top)


# ------------------------------------------------------------------------------ validation
_WARMUP_FLAGS = (("lr_warmup_iters", "--lr-warmup-iters"), ("lr_warmup_samples", "--lr-warmup-samples"),
                 ("lr_warmup_fraction", "--lr-warmup-fraction"))


def validate(md: MDConfig, args_or_optimizer_config: Any = None) -> MDConfig:
    """Reject unsupported combinations before training; every ``ValueError`` names the flags.

    ``args_or_optimizer_config``: the argparse ``Namespace`` (all checks) or a megatron-core
    ``OptimizerConfig`` (which has no LR-schedule fields: the schedule-free schedule checks then
    cannot run). Attributes it lacks count as unset. Returns ``md``.
    """
    cfg = args_or_optimizer_config

    def get(attr: str, default: Any = None) -> Any:
        return getattr(cfg, attr, default) if cfg is not None else default

    name = md.optimizer
    if name not in OPTIMIZER_CHOICES:
        raise ValueError(f"--optimizer {name!r}: unknown optimizer; expected one of {list(OPTIMIZER_CHOICES)}")
    md.check()
    if name != "adam" and get("fp16", False):
        raise ValueError(
            f"--optimizer {name} with --fp16: fp16 loss scaling is not supported by megatron_md's optimizers; "
            f"use --bf16 (or --optimizer adam for Megatron's fp16 Adam)")
    if name in SCHEDULE_FREE:
        style = get("lr_decay_style")
        if style is not None and style != "constant":
            raise ValueError(
                f"--optimizer {name} is schedule-free (it averages iterates instead of decaying the LR) but "
                f"--lr-decay-style is {style!r}: pass --lr-decay-style constant")
        own = METHOD_CONFIGS[name].flag("warmup_steps")
        for attr, flag in _WARMUP_FLAGS:
            value = get(attr)
            if value:
                raise ValueError(
                    f"--optimizer {name} with {flag} {value}: schedule-free methods do their own warmup; Megatron's "
                    f"LR warmup would be applied on top of it. Drop {flag} and use {own} instead"
                    + (" (and --sf-adamw-warmup-steps for its SF-AdamW partner)" if name == "sf-normuon" else ""))
    wd = get("weight_decay", 0.0)
    if name in NO_WEIGHT_DECAY and wd:
        kind = ("MD decoupling (the sphere fixes ‖D‖_F)" if name.endswith("-md")
                else "the hyperball (fixed ‖W‖_F)")
        raise ValueError(
            f"--optimizer {name} with --weight-decay {wd}: {kind} uses no weight decay; pass --weight-decay 0 "
            f"(Megatron-LM's default is 0.01)")
    if name in MD_METHODS and md.md_init == "factor" and md.md_embedding_unit_norm:
        raise ValueError(
            f"--optimizer {name} with --md-init factor and --md-embedding-unit-norm (on by default): factoring keeps "
            "the model's outputs, but the embedding rule rescales every vocabulary row to norm 1, which no gain "
            "absorbs; pass --no-md-embedding-unit-norm (the embedding then trains on the Adam partner)")
    if md.dp_mode == "layer-wise" and get("use_distributed_optimizer", False):
        raise ValueError(
            "--dp-mode layer-wise with --use-distributed-optimizer: layer-wise distributes whole matrices over "
            "plain-DDP replicas; drop --use-distributed-optimizer (or use --dp-mode auto for ZeRO-1 flat shards)")
    return md
