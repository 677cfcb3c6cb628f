"""The MD authors' model recipe in Megatron-LM's own ``pretrain_gpt.py`` through our plugin.

Megatron-LM has ``--qk-layernorm`` and ``--init-method-std`` but no post-norm, branch scale or
embedding multiplier: ``megatron_lm.install()`` builds its ``GPTModel`` as a subclass that puts the
recipe into the layer spec and the embedding hook, and applies ``--model-recipe``'s preset in its
argument validation. Needs ``MEGATRON_LM_PATH`` like test_pretrain_gpt.py (whose launcher and tiny
GPT it reuses); skipped without it.
"""
from __future__ import annotations

import re
from importlib import util
from pathlib import Path

import pytest

_spec = util.spec_from_file_location("_mlm_pretrain", Path(__file__).with_name("test_pretrain_gpt.py"))
_mlm = util.module_from_spec(_spec)
_spec.loader.exec_module(_mlm)
pytestmark = _mlm.pytestmark

PARAMS = re.compile(r"number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): (\d+)")


def _params(out: str) -> int:
    counts = {int(m) for m in PARAMS.findall(out)}
    assert len(counts) == 1, (counts, out[-3000:])
    return counts.pop()


def test_recipe_flags_build_their_modules_and_train():
    """``--post-norm`` adds one gain of width hidden per attention and per MLP branch (2 layers ×
    2 × 64 parameters); with ``--fixed-layer-scale`` and ``--embedding-multiplier`` the run is another
    function (other losses) and trains; ``--no-post-norm-gain`` adds no parameter."""
    base = ["--optimizer", "muon-md", "--tensor-model-parallel-size", "2"]
    rc, out, iters, valid = _mlm._run(*base)
    _mlm._trained(rc, out, iters, valid, "muon-md")
    recipe = ["--post-norm", "--fixed-layer-scale", "0.5", "--embedding-multiplier", "8"]
    rc2, out2, iters2, valid2 = _mlm._run(*base, *recipe)
    _mlm._trained(rc2, out2, iters2, valid2, "muon-md")
    assert _params(out2) - _params(out) == 2 * 2 * 64, (_params(out2), _params(out))
    assert iters2[1][0] != iters[1][0], (iters2[1], iters[1])
    rc3, out3, *_ = _mlm._run(*base, *recipe, "--no-post-norm-gain")
    assert rc3 == 0 and _params(out3) == _params(out), out3[-3000:]


def test_model_recipe_preset_in_megatron_lm_validation():
    """``--model-recipe md-paper`` fills Megatron-LM's own flags (QK-norm, RMSNorm, SwiGLU, untied
    head, no linear biases, Adam β2) and ours; an explicit flag wins (the tiny GPT's learned
    positions stay)."""
    rc, out, iters, valid = _mlm._run("--optimizer", "muon-md", "--tensor-model-parallel-size", "2",
                                      "--model-recipe", "md-paper")
    _mlm._trained(rc, out, iters, valid, "muon-md")
    for key, value in (("qk_layernorm", "True"), ("normalization", "RMSNorm"), ("swiglu", "True"),
                       ("untie_embeddings_and_output_weights", "True"), ("add_bias_linear", "False"),
                       ("adam_beta2", "0.99"), ("post_norm", "True"), ("fixed_layer_scale", "0.5"),
                       ("position_embedding_type", "learned_absolute")):
        assert re.search(rf"^\s*{key} \.+ {re.escape(value)}$", out, re.M), (key, value)
