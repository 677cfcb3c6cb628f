"""Hugging Face Llama / Mixtral / Qwen3 folders → megatron-core GPT weights: the inverse of :mod:`.hf`.

A folder written by ``save_pretrained`` (``config.json`` plus ``model.safetensors``, or shards with
``model.safetensors.index.json``; fp32 or bf16) is read through ``torch.distributed.checkpoint``'s
``HuggingFaceStorageReader`` (the safetensors headers are its metadata; each tensor is read on access,
nothing else), and mapped tensor by tensor onto the names of the unsharded megatron-core model
(:mod:`.merge`'s naming: ``decoder.layers.<global layer>.…``, experts
``mlp.experts.local_experts.<global expert>.…``):

* ``q_proj``, ``k_proj``, ``v_proj`` → the fused ``linear_qkv`` rows, per query group
  ``[q (heads/groups · d); k (d); v (d)]``; ``o_proj`` → ``linear_proj``;
* ``gate_proj``, ``up_proj`` → ``linear_fc1`` ``[gate; up]``; ``down_proj`` → ``linear_fc2``;
  Mixtral's ``block_sparse_moe.gate`` → ``router``, expert ``e``'s ``w1``/``w3`` → its fc1
  ``[w1; w3]``, ``w2`` → its fc2;
* ``input_layernorm`` / ``post_attention_layernorm`` → ``input_layernorm`` / ``pre_mlp_layernorm``
  (Transformer Engine's fused ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``),
  Qwen3's ``q_norm``/``k_norm`` → ``q_layernorm``/``k_layernorm``, ``model.norm`` → ``final_layernorm``;
* ``embed_tokens`` (and an untied ``lm_head``) padded with zero rows to Megatron's padded vocabulary.

:func:`model_flags` gives the driver flags of the model a ``config.json`` describes, and refuses, naming
the option, every architecture or setting no megatron-core flag of this driver computes exactly.
:func:`load_into` fills a built model (any TP/PP/EP/VPP layout) from the folder: each rank walks its
own ``sharded_state_dict()`` — megatron-core's statement of which box of which global tensor every
local parameter is — and copies that box of the mapped tensor in, one layer's tensor at a time.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch

from ..errors import CheckpointError
from .reader import merge_name, read_box

__all__ = ["ARCHITECTURES", "read_config", "expected_model", "model_flags", "check_model", "HFWeights",
           "megatron_tensor", "load_into", "import_record", "from_hf", "FLAGS_FILE"]

#: the Hugging Face classes from-hf maps
ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen3ForCausalLM")
_LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear"]


def read_config(hf_dir: str) -> dict:
    """``config.json`` of a Hugging Face model folder; a :class:`CheckpointError` naming the file."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"--load-hf {hf_dir}: no config.json there (a Hugging Face model folder "
                              "written by save_pretrained)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc})") from None


def _rope(cfg: dict) -> tuple[Optional[str], float]:
    """(rope type, theta) from either transformers 4's ``rope_theta``/``rope_scaling`` or 5's
    ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return kind, float(theta)


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def expected_model(cfg: dict) -> dict:
    """The driver's model settings (argument dests → values) of the model of ``config.json``
    ``cfg``. Raises ``ValueError`` naming the architecture or the ``config.json`` setting when no
    flag of the driver computes that model exactly."""
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"config.json architectures {cfg.get('architectures')}: from-hf maps "
                         f"{', '.join(ARCHITECTURES)} only")
    wrong = []
    if cfg.get("hidden_act", "silu") != "silu":
        wrong.append(f"hidden_act {cfg['hidden_act']!r} (the SwiGLU MLP is SiLU-gated)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            wrong.append(f"{key} true (--disable-bias-linear models only)")
    kind, theta = _rope(cfg)
    if kind == "yarn":
        wrong.append("RoPE scaling 'yarn' (from-hf reads plain-RoPE folders only; the driver's --rope-type yarn "
                     "extends a plain-RoPE model, and to-hf exports YaRN)")
    elif kind != "default":
        wrong.append(f"RoPE scaling {kind!r} (plain RoPE only; megatron-core's --use-rope-scaling is not exposed)")
    if theta != int(theta):
        wrong.append(f"rope_theta {theta} (--rotary-base takes an integer)")
    if cfg.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        wrong.append(f"partial_rotary_factor {cfg['partial_rotary_factor']}")
    if cfg.get("use_sliding_window") or (arch == "MixtralForCausalLM" and cfg.get("sliding_window")):
        wrong.append("sliding-window attention")
    if cfg.get("router_jitter_noise"):
        wrong.append(f"router_jitter_noise {cfg['router_jitter_noise']}")
    if wrong:
        raise ValueError(f"config.json ({arch}): {'; '.join(wrong)}: no megatron-core flag of this driver "
                         "computes it; it cannot be imported")
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    moe = arch == "MixtralForCausalLM"
    return {
        "num_layers": int(cfg["num_hidden_layers"]), "hidden_size": h, "num_attention_heads": heads,
        "num_query_groups": int(cfg.get("num_key_value_heads") or heads), "kv_channels": _head_dim(cfg),
        "ffn_hidden_size": int(cfg["intermediate_size"]),
        "max_position_embeddings": int(cfg["max_position_embeddings"]), "vocab_size": int(cfg["vocab_size"]),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)), "rotary_base": int(theta),
        "normalization": "RMSNorm", "swiglu": True, "position_embedding_type": "rope", "disable_bias_linear": True,
        "untie_embeddings_and_output_weights": not cfg.get("tie_word_embeddings", False),
        "qk_layernorm": arch == "Qwen3ForCausalLM",
        "num_experts": int(cfg["num_local_experts"]) if moe else None,
        "moe_router_topk": int(cfg["num_experts_per_tok"]) if moe else None,
        "moe_ffn_hidden_size": int(cfg["intermediate_size"]) if moe else None,
        "moe_router_pre_softmax": False if moe else None,
        "moe_shared_expert_intermediate_size": None,
    }


def model_flags(cfg: dict, *, megatron_lm: bool = False) -> list[str]:
    """The driver's model flags (and ``--vocab-size``) for the model of ``config.json`` ``cfg``
    (:func:`expected_model` as flags; ``--kv-channels`` only where it is not hidden/heads).
    ``megatron_lm``: Megatron-LM's spelling (``--group-query-attention``; no ``--vocab-size``, which
    there is its tokenizer's)."""
    m = expected_model(cfg)
    gqa = megatron_lm and m["num_query_groups"] != m["num_attention_heads"]
    f = ["--num-layers", m["num_layers"], "--hidden-size", m["hidden_size"],
         "--num-attention-heads", m["num_attention_heads"], *(["--group-query-attention"] if gqa else []),
         "--num-query-groups", m["num_query_groups"],
         "--ffn-hidden-size", m["ffn_hidden_size"], "--max-position-embeddings", m["max_position_embeddings"],
         *([] if megatron_lm else ["--vocab-size", m["vocab_size"]]),
         "--norm-epsilon", repr(m["norm_epsilon"]), "--rotary-base", m["rotary_base"], *_LLAMA]
    if m["kv_channels"] != m["hidden_size"] // m["num_attention_heads"]:
        f += ["--kv-channels", m["kv_channels"]]
    f += ["--untie-embeddings-and-output-weights"] if m["untie_embeddings_and_output_weights"] else []
    f += ["--qk-layernorm"] if m["qk_layernorm"] else []
    if m["num_experts"]:
        f += ["--num-experts", m["num_experts"], "--moe-router-topk", m["moe_router_topk"],
              "--moe-ffn-hidden-size", m["moe_ffn_hidden_size"]]
    return [str(x) for x in f]


def check_model(cfg: dict, have: dict) -> Optional[str]:
    """Why a run whose model settings are ``have`` (:func:`expected_model`'s keys) does not build the
    model of ``cfg``: every setting that differs, as the flag to pass; None if it builds it."""
    want = expected_model(cfg)
    diffs = [f"{_as_flag(k, want[k])} (this run: {_as_flag(k, have.get(k))})" for k in want if have.get(k) != want[k]]
    return "; ".join(diffs) or None


def _as_flag(key: str, value) -> str:
    """A setting as its driver flag: ``--swiglu``, ``no --num-experts``, ``--hidden-size 64``."""
    flag = "--" + key.replace("_", "-")
    if value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    return f"{flag} {value}"


def import_record(hf_dir: str, cfg: dict) -> dict:
    """The manifest record of a checkpoint that holds exactly a Hugging Face model's weights (no
    training, no optimizer state): what :mod:`.md`'s resume check reads (weights only; MD keeps them
    with ``--md-init factor --no-md-embedding-unit-norm``)."""
    return {"from": f"hf:{(cfg.get('architectures') or ['?'])[0]}", "by": "from-hf", "source": os.path.abspath(hf_dir),
            "init": "factor", "embedding_unit_norm": False,
            "resume_flags": ["--no-load-optim", "--md-init", "factor", "--no-md-embedding-unit-norm"]}


class HFWeights(Mapping):
    """``Hugging Face name → tensor`` of a model folder, one tensor read per access, through
    ``torch.distributed.checkpoint.HuggingFaceStorageReader`` (single file or index-sharded)."""

    def __init__(self, hf_dir: str):
        try:
            from torch.distributed.checkpoint import HuggingFaceStorageReader
            import safetensors  # noqa: F401 - the reader's own dependency; a clear message if absent
        except ImportError as exc:
            raise CheckpointError(f"reading Hugging Face safetensors needs the 'safetensors' package ({exc}): "
                                  "pip install 'megatron_md[hf]'") from None
        if not any(f.endswith(".safetensors") for f in os.listdir(hf_dir)):
            raise CheckpointError(f"--load-hf {hf_dir}: no .safetensors files (save the model with "
                                  "save_pretrained(..., safe_serialization=True))")
        self.dir, self._reader_cls = hf_dir, HuggingFaceStorageReader
        self._meta = HuggingFaceStorageReader(hf_dir).read_metadata().state_dict_metadata

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __contains__(self, name) -> bool:
        return name in self._meta

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._meta:
            raise CheckpointError(f"{self.dir}: the model has no tensor {name!r}")
        m = self._meta[name]
        buf = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        return read_box(self._reader_cls(self.dir), name, buf, (0,) * buf.dim())


def megatron_tensor(hf: Mapping, name: str, cfg: dict, padded_vocab: int) -> torch.Tensor:
    """The unsharded megatron-core tensor ``name`` (merge naming) of the Hugging Face model ``hf``
    (``config.json`` ``cfg``), in the file's dtype; ``KeyError`` when no Hugging Face tensor maps to it."""
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_key_value_heads") or heads)
    d, qpg = _head_dim(cfg), heads // groups

    def padded(t):
        out = t.new_zeros((padded_vocab,) + tuple(t.shape[1:]))
        out[:t.shape[0]] = t
        return out

    if name == "embedding.word_embeddings.weight":
        return padded(hf["model.embed_tokens.weight"])
    if name == "output_layer.weight":
        return padded(hf["lm_head.weight"] if "lm_head.weight" in hf else hf["model.embed_tokens.weight"])
    if name == "decoder.final_layernorm.weight":
        return hf["model.norm.weight"]
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"] or not parts[2].isdigit():
        raise KeyError(name)
    o, rest = f"model.layers.{parts[2]}.", ".".join(parts[3:])
    simple = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight",
              "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
              "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
              "input_layernorm.weight": "input_layernorm.weight",
              "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
              "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
              "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
              "mlp.linear_fc2.weight": "mlp.down_proj.weight",
              "mlp.router.weight": "block_sparse_moe.gate.weight"}
    if rest in simple:
        return hf[o + simple[rest]]
    if rest == "self_attention.linear_qkv.weight":
        q = hf[o + "self_attn.q_proj.weight"].reshape(groups, qpg * d, h)
        k = hf[o + "self_attn.k_proj.weight"].reshape(groups, d, h)
        v = hf[o + "self_attn.v_proj.weight"].reshape(groups, d, h)
        return torch.cat([q, k, v], dim=1).reshape(groups * (qpg + 2) * d, h)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf[o + "mlp.gate_proj.weight"], hf[o + "mlp.up_proj.weight"]])
    if rest.startswith("mlp.experts.local_experts."):
        e, leaf = rest.split(".")[3], ".".join(rest.split(".")[4:])
        x = f"{o}block_sparse_moe.experts.{e}."
        if leaf == "linear_fc1.weight":
            return torch.cat([hf[x + "w1.weight"], hf[x + "w3.weight"]])
        if leaf == "linear_fc2.weight":
            return hf[x + "w2.weight"]
    raise KeyError(name)


# ------------------------------------------------------------------------- filling a built model
def load_into(model_chunks, hf_dir: str, padded_vocab: int) -> int:
    """Copy the Hugging Face model in ``hf_dir`` into this rank's parameters of ``model_chunks``
    (each chunk unwrapped down to its ``GPTModel``); returns the number of elements written.

    For every local ``ShardedTensor`` (key, global shape, this rank's offsets; layers and experts as
    leading axes) the mapped global tensor of each layer (expert) in its box is built and the box cut
    out of it; a key no Hugging Face tensor maps to is a :class:`CheckpointError` naming it. Holds one
    layer's mapped tensor at a time."""
    from .dist import model_templates, sharded_tensors_with_lead   # megatron-core: where a built model is at hand
    cfg = read_config(hf_dir)
    hf = HFWeights(hf_dir)
    written = 0
    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for template in model_templates(model_chunks):   # FSDP2: each rank's rows (megatron_md.megatron.fsdp)
            for st, lead_n in sharded_tensors_with_lead(template):
                if st.key.endswith("_extra_state"):
                    continue
                if st.flattened_range is not None:
                    raise CheckpointError(f"{st.key}: a flattened (distributed-optimizer) shard; load the model "
                                          "before the optimizer flattens it")
                lead = tuple(st.global_offset[:lead_n])
                name = merge_name(st.key, lead)
                try:
                    if name not in cache:
                        cache.clear()   # one mapped tensor at a time
                        cache[name] = megatron_tensor(hf, name, cfg, padded_vocab)
                    full = cache[name]
                except KeyError:
                    raise CheckpointError(f"{hf_dir}: no Hugging Face tensor maps to the model's {name} "
                                          "(a model built with other flags than from-hf gives?)") from None
                own = st.local_shape[len(st.local_shape) - (len(st.global_shape) - lead_n):]  # without lead axes
                box = tuple(slice(o, o + n) for o, n in zip(st.global_offset[lead_n:], own))
                if tuple(full.shape) != tuple(st.global_shape[lead_n:]):
                    raise CheckpointError(f"{hf_dir}: {name} has shape {tuple(full.shape)} from the Hugging Face "
                                          f"tensors, the model {tuple(st.global_shape[lead_n:])}")
                st.data.copy_(full[box].reshape(st.data.shape))
                written += st.data.numel()
    return written


# ------------------------------------------------------------------------------- the converter
FLAGS_FILE = "from_hf.json"


def from_hf(hf_dir: str, save: str, *, nproc: int = 1, layout: Sequence[str] = (), ckpt_format: str = "torch_dist",
            divisible_by: int = 128, extra: Sequence[str] = (), dry_run: bool = False) -> dict:
    """``tools/convert_checkpoint.py from-hf``: the Hugging Face model in ``hf_dir`` as a checkpoint
    (iteration 0, weights only) in ``save``, written by the driver itself on ``nproc`` ranks at
    ``layout`` (``--train-iters 0 --load-hf``: every rank reads only its own boxes of the tensors it
    holds). A torch_dist checkpoint then loads at any layout whose padded vocabulary is the same
    (``--make-vocab-size-divisible-by`` × TP). Writes ``save/from_hf.json`` (the model flags a run
    that loads it passes; the manifest records them too and the load checks them). Returns
    ``{"command", "model_flags", "resume_flags", "architecture"}``."""
    cfg = read_config(hf_dir)
    flags = model_flags(cfg)
    from .integrity import atomic_write_text, read_latest
    from .reshard import driver_command, run_driver
    if read_latest(save) is not None:
        raise CheckpointError(f"--save {save}: already a checkpoint directory; choose a new one (nothing is overwritten)")
    HFWeights(hf_dir)   # the weights are there and readable, before any rank starts
    m = expected_model(cfg)
    seq = min(m["max_position_embeddings"], 128)   # no token is read: any length the model takes
    vocab = ["--make-vocab-size-divisible-by", str(divisible_by)]
    cmd = driver_command(nproc, *flags, *vocab, *layout, "--seq-length", str(seq), "--micro-batch-size", "1",
                         "--lr", "1e-3", "--optimizer", "adam", "--mock-data", "--eval-iters", "0", "--train-iters", "0",
                         "--load-hf", hf_dir, "--save", save, "--ckpt-format", ckpt_format, *extra)
    out = {"command": cmd, "model_flags": flags + vocab, "architecture": cfg["architectures"][0],
           "resume_flags": import_record(hf_dir, cfg)["resume_flags"]}
    if dry_run:
        return out
    run_driver(cmd, "from-hf", save, 0)
    atomic_write_text(os.path.join(save, FLAGS_FILE), json.dumps(
        {"source": os.path.abspath(hf_dir), "architecture": out["architecture"], "model_flags": out["model_flags"],
         "resume_flags": out["resume_flags"]}, indent=1) + "\n")
    return out
