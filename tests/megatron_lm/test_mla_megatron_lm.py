"""Multi-latent attention in Megatron-LM's own ``pretrain_gpt.py`` through our plugin (CPU, local spec).

megatron-core 0.16's local MLA spec cannot build a model (its ``DotProductAttention`` takes no
``k_channels``), and without Transformer Engine its MLA module believes TE is there: the plugin builds
Megatron-LM's ``GPTModel`` with our core attention and the flag corrected
(``megatron_md.megatron.mla.mla_gpt_model``). Needs ``MEGATRON_LM_PATH`` like test_pretrain_gpt.py (whose
launcher and tiny GPT it reuses); skipped without it.
"""
from __future__ import annotations

from importlib import util
from pathlib import Path

_spec = util.spec_from_file_location("_mlm_pretrain", Path(__file__).with_name("test_pretrain_gpt.py"))
_mlm = util.module_from_spec(_spec)
_spec.loader.exec_module(_mlm)
pytestmark = _mlm.pytestmark

MLA = ["--multi-latent-attention", "--q-lora-rank", "32", "--kv-lora-rank", "32", "--qk-head-dim", "16",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--position-embedding-type", "rope",
       "--normalization", "RMSNorm", "--qk-layernorm"]
#: the tiny GPT without its learned positions (MLA rotates its own dims)
TINY = [a for a in _mlm.TINY_GPT if a != "learned_absolute" and a != "--position-embedding-type"]


def test_mla_trains_in_megatron_lm_at_tp1_and_tp2():
    """MuonMD and NorMuon on an MLA GPT train in Megatron-LM's loop at TP=1 (DP=2) and TP=2 (the MLA
    projections TP-split, each one matrix to the optimizer). Megatron-LM draws another initial model at
    each TP size (its iteration-1 losses differ for plain attention too), so the layouts' losses are not
    compared here; tests/megatron/test_mla.py does that in our driver."""
    import re
    for name, tp in (("muon-md", "2"), ("normuon", "1")):
        rc, out, iters, valid = _mlm._run("--optimizer", name, "--tensor-model-parallel-size", tp, *MLA, tiny=TINY)
        _mlm._trained(rc, out, iters, valid, name)
        assert re.search(r"^\s*multi_latent_attention \.+ True$", out, re.M), out[-2000:]
        assert re.search(r"^\s*q_lora_rank \.+ 32$", out, re.M), out[-2000:]
