"""Model recipes on megatron-core: the architecture options MD's authors train every model with.

The MD paper's dense scripts (haeggee/Megatron-LM, branch ``gainz``: ``submissions/submit.sh`` and
``submissions/110m-gains-transfer.sh``, model code in ``megatron/core/models/gpt/gpt_model.py`` and
``megatron/core/transformer/transformer_layer.py``) pass, for MD *and* for the Muon/AdamW
baselines, five architecture options that a Llama-style GPT does not have. Each is one field
of :class:`ModelRecipe` (one flag each, generated from the field) with the authors' semantics:

* ``qk_layernorm``: a norm (the model's ``--normalization``) over each head's queries and keys
  before RoPE/attention — megatron-core's own ``qk_layernorm`` (its spec argument and config
  field, whose gradients megatron-core all-reduces over TP).
* ``embedding_multiplier`` c: the decoder input is ``c · embedding(tokens)`` (``--upscale-embedding``
  there; √d in their runs, which with unit-norm embedding rows gives an RMS-1 residual stream).
* ``post_norm`` (and ``post_norm_gain``): an RMSNorm (:class:`PostNorm`) on each attention and
  MLP output *before* the residual add, ``h ← h + s · N(branch(LN(h)))``, with a learnable gain or
  without one (``--post-norm-no-gain`` there).
* ``fixed_layer_scale`` s: that branch output times a constant s (1/L in their runs), after the
  post-norm, before the residual add.
* ``scaled_output_init``: megatron-core initialises ``linear_proj``/``linear_fc2`` with
  ``std/√(2L)``; the authors pass ``--no-scaled-output-layer-init`` (every matrix at ``std``).

Plus the init std (Megatron's ``--init-method-std``; 1/√d there) and an untied head. The preset
``--model-recipe md-paper`` sets all of them as those scripts do (:func:`preset_values`); any
flag given explicitly wins over the preset.

How it plugs in (megatron-core's extension points, no fork): the attention and MLP/MoE modules of
the layer spec are replaced by subclasses (:class:`PostNormSelfAttention`, :class:`PostNormMLP`,
:class:`PostNormMoELayer`) that post-process their ``(output, bias)`` and take their options as
``ModuleSpec.params``; parameter names are unchanged except for the added ``<branch>.post_norm``
gain. The embedding multiplier is a forward hook on ``GPTModel.embedding``. Everything is
elementwise along the hidden dimension, which TP never splits in a branch output (row-parallel
outputs are reduced; under sequence parallelism they are split along the sequence, and the gain is
tagged ``sequence_parallel`` so that its gradient is all-reduced over TP).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

__all__ = ["ModelRecipe", "RecipeName", "RECIPES", "preset_values", "PostNorm", "PostNormSelfAttention",
           "PostNormMLP", "PostNormMoELayer", "apply_to_layer_spec", "add_embedding_multiplier",
           "recipe_from_args", "EMBEDDING_MULTIPLIER_ATTR", "add_recipe_args", "apply_recipe_preset",
           "apply_to_any_spec", "recipe_gpt_model", "unscaled_output_init"]

RecipeName = Literal["default", "md-paper", "md-paper-moe"]
RECIPES: tuple[str, ...] = ("default", "md-paper", "md-paper-moe")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture options of the model (module docstring). Defaults: megatron-core's model."""

    qk_layernorm: bool = _f(False, "Norm (--normalization) over each head's queries and keys (megatron-core's "
                                   "qk_layernorm).")
    embedding_multiplier: Optional[float] = _f(None, "Decoder input = this × the embedding output (None: 1; "
                                                     "md-paper: √hidden).")
    post_norm: bool = _f(False, "RMSNorm on every attention and MLP/MoE output before the residual add.")
    post_norm_gain: bool = _f(True, "--post-norm with a learnable gain (off: an RMSNorm without parameters).")
    fixed_layer_scale: Optional[float] = _f(None, "Constant multiplier of every attention and MLP/MoE output "
                                                  "(after --post-norm), before the residual add (md-paper: "
                                                  "1/num-layers).")
    scaled_output_init: bool = _f(True, "Initialise linear_proj/linear_fc2 with --init-method-std/√(2L) "
                                        "(megatron-core's default); off: with --init-method-std.")

    def __post_init__(self) -> None:
        for name in ("embedding_multiplier", "fixed_layer_scale"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')}={v!r}: must be a finite number > 0")

    @property
    def branch_post(self) -> bool:
        """Whether attention/MLP outputs are post-processed (post-norm or a fixed scale)."""
        return self.post_norm or self.fixed_layer_scale is not None


#: where the embedding multiplier hook records its factor (read back by tools and tests)
EMBEDDING_MULTIPLIER_ATTR = "_md_embedding_multiplier"


def preset_values(name: str, hidden_size: int, num_layers: int) -> dict[str, Any]:
    """The values the preset ``name`` gives (argparse ``dest`` → value), for a model of this width and
    depth: recipe fields and the Megatron flags the authors' scripts pass with them. ``default``: none.

    md-paper (haeggee/Megatron-LM ``gainz``, ``110m-gains-transfer.sh`` via ``submit.sh``):
    ``--qk-norm RMSNorm``, ``--upscale-embedding √d``, ``--post-norm`` (with gain),
    ``--fixed-layer-scale 1/L``, init std ``1/√d`` with ``--no-scaled-output-layer-init``,
    ``--untie-embed``, RMSNorm, SwiGLU, RoPE, no linear biases, Adam β2 = 0.99.

    md-paper-moe (their MoE framework, branch ``feat/experiment-framework``,
    ``_research/launch/framework/lib/common.sh``): ``--qk-layernorm``, init std ``1/√d``, untied,
    RMSNorm, SwiGLU, RoPE, Adam β2 = 0.95 — no post-norm, branch scale or embedding multiplier
    (their ``--post-norm`` there is an ablation flag).
    """
    if name == "default":
        return {}
    common = dict(init_method_std=1.0 / math.sqrt(hidden_size), untie_embeddings_and_output_weights=True,
                  normalization="RMSNorm", swiglu=True, position_embedding_type="rope", disable_bias_linear=True)
    if name == "md-paper-moe":
        return dict(common, qk_layernorm=True, adam_beta2=0.95)
    if name != "md-paper":
        raise ValueError(f"--model-recipe {name!r}: expected one of {list(RECIPES)}")
    return dict(qk_layernorm=True, embedding_multiplier=math.sqrt(hidden_size), post_norm=True,
                post_norm_gain=True, fixed_layer_scale=1.0 / num_layers, scaled_output_init=False,
                init_method_std=1.0 / math.sqrt(hidden_size), untie_embeddings_and_output_weights=True,
                normalization="RMSNorm", swiglu=True, position_embedding_type="rope", disable_bias_linear=True,
                adam_beta2=0.99)


def recipe_from_args(args: Any) -> ModelRecipe:
    """The :class:`ModelRecipe` of parsed arguments (attributes it lacks keep their defaults)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelRecipe) if hasattr(args, f.name)}
    return ModelRecipe(**kw)


# ------------------------------------------------------------------------------ modules
class PostNorm(torch.nn.Module):
    """The post-norm of a branch output: ``y = x / sqrt(mean(x², -1) + eps)``, times a learnable gain
    ``w`` (init 1) unless ``gain=False`` (the authors' ``RMSNormNoGain``). Computed in fp32.

    Its own module (not the model's norm class) so that it is the same on the local and the
    Transformer Engine path and carries what megatron-core needs of a replicated parameter: a
    ``sharded_state_dict`` (torch_dist checkpoints; megatron-core's ``MLP`` asks every child for
    one) and, under sequence parallelism, the ``sequence_parallel`` tag by which
    ``finalize_model_grads`` all-reduces the gain's gradient over TP (each rank saw a slice of the
    sequence)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, gain: bool = True):
        super().__init__()
        self.eps = eps
        if gain:
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
            self.weight.sequence_parallel = bool(config.sequence_parallel)
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets)


class _BranchPost:
    """Mixin of the branch modules: ``(out, bias) ↦ (s · N(out + bias), None)`` — the post-norm ``N``
    (a module ``post_norm``, or none) and the fixed scale ``s`` (or 1), applied to the branch output
    before the layer adds it to the residual stream. A bias is added first (a norm of the
    output without its bias would be another function). Placed before the megatron-core class in
    the bases: it takes its own keywords (``post_norm``, ``fixed_layer_scale``: the spec's params)
    out of the constructor's and wraps ``forward``."""

    def __init__(self, *args, **kwargs):
        post_norm, scale = _pop_post(kwargs)
        super().__init__(*args, **kwargs)
        self._init_branch_post(self.config, post_norm, scale)

    def forward(self, *args, **kwargs):
        return self._branch_post(super().forward(*args, **kwargs))

    def _init_branch_post(self, config, post_norm: Optional[str], fixed_layer_scale: Optional[float]) -> None:
        self.post_norm = (PostNorm(config, config.hidden_size, config.layernorm_epsilon, gain=post_norm == "gain")
                          if post_norm is not None else None)
        self.fixed_layer_scale = fixed_layer_scale

    def _branch_post(self, out_with_bias):
        out, bias = out_with_bias
        if bias is not None:
            out = out + bias
        if self.post_norm is not None:
            out = self.post_norm(out)
        if self.fixed_layer_scale is not None:
            out = out * self.fixed_layer_scale
        return out, None


def _pop_post(kwargs: dict) -> tuple[Any, Optional[float]]:
    return kwargs.pop("post_norm", None), kwargs.pop("fixed_layer_scale", None)


def _branch_classes():
    """The three branch subclasses, created on first use so that importing this module does not
    import megatron-core."""
    global PostNormSelfAttention, PostNormMLP, PostNormMoELayer
    if PostNormSelfAttention is not None:
        return PostNormSelfAttention, PostNormMLP, PostNormMoELayer
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    class _PostNormSelfAttention(_BranchPost, SelfAttention):
        """megatron-core's ``SelfAttention`` whose ``(output, bias)`` goes through :class:`_BranchPost`."""

    class _PostNormMLP(_BranchPost, MLP):
        """megatron-core's dense ``MLP`` whose ``(output, bias)`` goes through :class:`_BranchPost`."""

    class _PostNormMoELayer(_BranchPost, MoELayer):
        """megatron-core's ``MoELayer`` (routed + shared experts, combined) whose output goes
        through :class:`_BranchPost`."""

        def forward(self, hidden_states, *args, **kwargs):
            if kwargs.get("intermediate_tensors") is not None or (args and args[0] is not None):
                # megatron-core's partial CUDA-graph capture splits the MoE forward in pieces
                raise NotImplementedError("--post-norm / --fixed-layer-scale with a split MoE forward "
                                          "(partial CUDA-graph capture) is not supported")
            return self._branch_post(super().forward(hidden_states, *args, **kwargs))

    PostNormSelfAttention, PostNormMLP, PostNormMoELayer = _PostNormSelfAttention, _PostNormMLP, _PostNormMoELayer
    return PostNormSelfAttention, PostNormMLP, PostNormMoELayer


PostNormSelfAttention = PostNormMLP = PostNormMoELayer = None  # created by _branch_classes()


def apply_to_layer_spec(spec, recipe: ModelRecipe):
    """``spec`` (a megatron-core ``TransformerLayer`` ModuleSpec) with the recipe's branch
    post-processing: a new spec whose ``self_attention`` / ``mlp`` modules are the post-norm
    subclasses, options in their ``params``. ``spec`` itself is not modified (megatron-core
    caches some specs). Unchanged when the recipe post-processes nothing."""
    if not recipe.branch_post:
        return spec
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    attn_cls, mlp_cls, moe_cls = _branch_classes()
    extra = dict(post_norm=("gain" if recipe.post_norm_gain else "no-gain") if recipe.post_norm else None,
                 fixed_layer_scale=recipe.fixed_layer_scale)

    def swap(sub, want):
        base = sub.module
        if base is SelfAttention:
            new = attn_cls
        elif base is MLP:
            new = mlp_cls
        elif base is MoELayer:
            new = moe_cls
        else:
            raise ValueError(f"--post-norm / --fixed-layer-scale: the layer spec's {want} is {base.__name__}, "
                             "not megatron-core's SelfAttention / MLP / MoELayer")
        return dataclasses.replace(sub, module=new, params={**(sub.params or {}), **extra})

    sm = spec.submodules
    sm = dataclasses.replace(sm, self_attention=swap(sm.self_attention, "self_attention"),
                             mlp=swap(sm.mlp, "mlp"))
    return dataclasses.replace(spec, submodules=sm)


def _scale_output(module, inputs, output):
    return output * getattr(module, EMBEDDING_MULTIPLIER_ATTR)


def add_embedding_multiplier(gpt_model, multiplier: Optional[float]) -> None:
    """Decoder input ``= multiplier · embedding(...)``: a forward hook on ``gpt_model.embedding``
    (stages without the embedding — ``pre_process=False`` — have nothing to scale)."""
    if multiplier is None or multiplier == 1.0 or not getattr(gpt_model, "pre_process", True):
        return
    emb = gpt_model.embedding
    setattr(emb, EMBEDDING_MULTIPLIER_ATTR, float(multiplier))
    emb.register_forward_hook(_scale_output)


# ------------------------------------------------------------------------------ flags
def _flag_specs():
    from .config import FlagSpec, _hints
    hints = _hints(ModelRecipe)
    for f in dataclasses.fields(ModelRecipe):
        yield FlagSpec((f.name,), "--" + f.name.replace("_", "-"), f.name, f.default, hints[f.name],
                       f.metadata["help"], None)


def add_recipe_args(parser) -> None:
    """``--model-recipe`` and one flag per :class:`ModelRecipe` field (generated from the fields;
    a flag the host parser already defines — Megatron-LM's ``--qk-layernorm`` — is the host's)."""
    from .config import _argparse_kwargs, _existing_options, _option_strings
    existing = _existing_options(parser)
    g = parser.add_argument_group("model recipe", "Architecture options of MD's authors (megatron_md.megatron."
                                  "model_recipe); --model-recipe sets several at once, explicit flags win.")
    if "--model-recipe" not in existing:
        g.add_argument("--model-recipe", choices=RECIPES, default="default",
                       help="default: the model the other flags describe; md-paper: the MD paper's dense "
                            "architecture (QK-norm, embedding ×√d, post-norm, branch scale 1/L, init std 1/√d "
                            "without the residual-output shrink, untied head, RMSNorm, SwiGLU, RoPE, no linear "
                            "biases, Adam β2 0.99); md-paper-moe: their MoE framework's (QK-norm, init std 1/√d, "
                            "untied, RMSNorm, SwiGLU, RoPE, Adam β2 0.95)")
    for spec in _flag_specs():
        opts = _option_strings(spec.option, spec.hint)
        if any(o in existing for o in opts):
            continue
        g.add_argument(*opts, **_argparse_kwargs(spec))


def _given_dests(parser, argv) -> set:
    """The ``dest`` of every option that ``argv`` spells out (``--x v``, ``--x=v``, ``--no-x``)."""
    from .config import _existing_options
    actions = _existing_options(parser)
    out = set()
    for tok in argv:
        if isinstance(tok, str) and tok.startswith("--"):
            a = actions.get(tok.split("=", 1)[0])
            if a is not None:
                out.add(a.dest)
    return out


#: Megatron-LM spells some of the preset's flags with another ``dest`` (value mapped)
_HOST_DESTS = {"disable_bias_linear": ("add_bias_linear", lambda v: not v)}


def apply_recipe_preset(parser, args, argv) -> dict:
    """Set ``args``' attributes to the values of ``args.model_recipe``'s preset (:func:`preset_values`)
    wherever ``argv`` does not give the flag itself. Returns what was set (dest → value).
    Raises ``ValueError`` naming the flag for an invalid recipe value."""
    name = getattr(args, "model_recipe", "default")
    hidden, layers = getattr(args, "hidden_size", None), getattr(args, "num_layers", None)
    if name == "default" or hidden is None or layers is None:
        if name not in RECIPES:
            raise ValueError(f"--model-recipe {name!r}: expected one of {list(RECIPES)}")
        recipe_from_args(args)  # validates the explicit values
        return {}
    given = _given_dests(parser, argv)
    done = {}
    for dest, value in preset_values(name, hidden, layers).items():
        if not hasattr(args, dest) and dest in _HOST_DESTS:
            dest, conv = _HOST_DESTS[dest]
            value = conv(value)
        if hasattr(args, dest) and dest not in given:
            setattr(args, dest, value)
            done[dest] = value
    recipe_from_args(args)
    return done


# ------------------------------------------------------------------------------ other hosts (Megatron-LM)
def apply_to_any_spec(spec, recipe: ModelRecipe):
    """:func:`apply_to_layer_spec` for what a host passes as ``GPTModel(transformer_layer_spec=...)``:
    a layer ``ModuleSpec`` or a decoder block spec (``TransformerBlockSubmodules``, e.g. megatron-core's
    ``get_gpt_decoder_block_spec`` for MoE), each of whose ``layer_specs`` gets the recipe."""
    if not recipe.branch_post or spec is None:
        return spec
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[apply_to_layer_spec(s, recipe) for s in spec.layer_specs])
    return apply_to_layer_spec(spec, recipe)


def recipe_gpt_model(base: type, recipe_of) -> type:
    """A subclass of the host's ``GPTModel`` class ``base`` that builds the model with the recipe
    ``recipe_of()`` returns at construction: the branch post-processing in its layer spec and the
    embedding multiplier on its embedding (megatron-core's own constructor does everything else)."""

    class RecipeGPTModel(base):
        """megatron-core's ``GPTModel`` with megatron_md's model recipe (``--model-recipe`` and its flags)."""

        def __init__(self, *args, **kwargs):
            recipe = recipe_of()
            if "transformer_layer_spec" in kwargs:
                kwargs["transformer_layer_spec"] = apply_to_any_spec(kwargs["transformer_layer_spec"], recipe)
            elif len(args) >= 2:  # GPTModel(config, transformer_layer_spec, ...)
                args = (args[0], apply_to_any_spec(args[1], recipe), *args[2:])
            super().__init__(*args, **kwargs)
            add_embedding_multiplier(self, recipe.embedding_multiplier)

    RecipeGPTModel.__qualname__ = RecipeGPTModel.__name__ = f"Recipe{base.__name__}"
    return RecipeGPTModel


def unscaled_output_init(config, args) -> Any:
    """``config`` (a megatron-core ``TransformerConfig``) with ``output_layer_init_method`` at
    ``init_method_std`` when ``args`` asks for ``--no-scaled-output-init`` (unchanged otherwise)."""
    if getattr(args, "scaled_output_init", True):
        return config
    from megatron.core.utils import init_method_normal
    config.output_layer_init_method = init_method_normal(config.init_method_std)
    return config
