"""``--load-hf`` in Megatron-LM's own ``pretrain_gpt.py`` with our plugin: a Hugging Face Llama folder
as the starting weights (Megatron-LM tier: needs ``MEGATRON_LM_PATH``; see test_pretrain_gpt.py).

A tiny ``LlamaForCausalLM`` (GQA 4 heads / 2 groups, untied head, RMSNorm eps 1e-5, RoPE) made by
``transformers`` with random weights is saved with ``save_pretrained``; Megatron-LM trains from it
at TP=2 with the flags ``from-hf --print-flags --megatron-lm`` gives, on its mock data:

* with its own ``adam`` and with our ``muon-md`` (``--md-init factor --no-md-embedding-unit-norm``)
  the first iteration's loss is the same — the imported model's, on the same batch — and differs from
  the same run without ``--load-hf`` (a random init);
* a flag that builds another model (``--ffn-hidden-size``) stops before training with one ``error:``
  line naming it, and so does muon-md without the factor flags.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


base = _sibling("test_pretrain_gpt")
pytestmark = base.pytestmark

#: TINY_GPT's model flags are replaced by the folder's (Llama-style: RoPE, RMSNorm, SwiGLU, no biases)
_DROP = {"--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--max-position-embeddings",
         "--position-embedding-type"}


def _hf_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
                      tie_word_embeddings=False)
    torch.manual_seed(5)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _run(folder: Path, *flags: str, load: bool = True):
    """Megatron-LM on the folder's model flags (TINY_GPT's own model flags left out), TP=2, 2 iterations;
    ``load``: its weights through --load-hf (else a random init of the same model)."""
    from megatron_md.checkpoint.hf_import import model_flags, read_config
    tiny, it = [], iter(base.TINY_GPT)
    for f in it:
        if f in _DROP:
            next(it)
        else:
            tiny.append(f)
    return base._run(*model_flags(read_config(str(folder)), megatron_lm=True), "--train-iters", "2",
                     "--eval-interval", "100", "--eval-iters", "0", "--tensor-model-parallel-size", "2",
                     *(["--load-hf", str(folder)] if load else []), *flags, tiny=tiny)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    _hf_llama(path)
    return path


MD = ["--optimizer", "muon-md", "--weight-decay", "0", "--md-init", "factor", "--no-md-embedding-unit-norm"]


def test_megatron_lm_trains_from_a_hugging_face_folder(hf_folder):
    runs = {"adam": _run(hf_folder, "--optimizer", "adam"), "muon-md": _run(hf_folder, *MD),
            "random": _run(hf_folder, "--optimizer", "adam", load=False)}
    for name, (rc, out, iters, _) in runs.items():
        assert rc == 0, (name, out[-4000:])
        assert sorted(iters) == [1, 2], (name, out[-3000:])
    for name in ("adam", "muon-md"):
        assert "megatron_md: initialized from the Hugging Face model" in runs[name][1], runs[name][1][-3000:]
    first = {k: v[2][1][0] for k, v in runs.items()}
    assert first["adam"] == first["muon-md"], first        # the imported model on the same batch
    assert abs(first["adam"] - first["random"]) > 1e-3, first


def test_megatron_lm_refuses_another_model_or_md_without_factor(hf_folder):
    for flags, needles in ((["--optimizer", "adam", "--ffn-hidden-size", "96"], ["--ffn-hidden-size 128"]),
                           (["--optimizer", "muon-md", "--weight-decay", "0"], ["--md-init factor",
                                                                               "--no-md-embedding-unit-norm"])):
        rc, out, iters, _ = _run(hf_folder, *flags)
        errors = [ln for ln in out.splitlines() if "megatron_md: error:" in ln]
        assert rc != 0 and not iters and len(errors) == 1, (flags, out[-3000:])
        assert all(n in errors[0] for n in needles), (flags, errors)
