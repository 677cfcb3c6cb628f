"""to-hf's writer (megatron_md.checkpoint.hf) without megatron-core: the streaming safetensors
files read back bit for bit by the ``safetensors`` library, shards with an index as the Hub lays
them out, ``--dtype``, and sizes."""
import json
import os

import pytest
import torch

safetensors = pytest.importorskip("safetensors.torch")

from megatron_md.checkpoint.hf import hf_tensors, parse_size, to_hf_state, write_hf, write_safetensors  # noqa: E402

L, H, HEADS, GROUPS, FFN, VOCAB, PADDED = 2, 16, 4, 2, 24, 50, 64


def _llama():
    """A Llama-style unsharded state dict and manifest topology, random weights."""
    g = torch.Generator().manual_seed(0)
    d = H // HEADS
    state = {"embedding.word_embeddings.weight": torch.randn(PADDED, H, generator=g),
             "decoder.final_layernorm.weight": torch.randn(H, generator=g),
             "output_layer.weight": torch.randn(PADDED, H, generator=g)}
    for i in range(L):
        p = f"decoder.layers.{i}."
        state[p + "self_attention.linear_qkv.weight"] = torch.randn((HEADS + 2 * GROUPS) * d, H, generator=g)
        state[p + "self_attention.linear_qkv.layer_norm_weight"] = torch.randn(H, generator=g)
        state[p + "self_attention.linear_proj.weight"] = torch.randn(H, HEADS * d, generator=g)
        state[p + "mlp.linear_fc1.weight"] = torch.randn(2 * FFN, H, generator=g)
        state[p + "mlp.linear_fc1.layer_norm_weight"] = torch.randn(H, generator=g)
        state[p + "mlp.linear_fc2.weight"] = torch.randn(H, FFN, generator=g)
    model = {"num_layers": L, "hidden_size": H, "num_attention_heads": HEADS, "num_query_groups": GROUPS,
             "ffn_hidden_size": FFN, "kv_channels": None, "swiglu": True, "normalization": "RMSNorm",
             "position_embedding_type": "rope", "max_position_embeddings": 32, "untie": True, "bias_linear": False,
             "padded_vocab_size": PADDED, "num_experts": None, "moe_ffn_hidden_size": None, "rotary_base": 10000,
             "moe_router_topk": None, "moe_router_pre_softmax": None}
    return state, {"model": model, "info": {"vocab_size": VOCAB, "layernorm_epsilon": 1e-5}}


def _read(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(safetensors.load_file(os.path.join(folder, f)))
    return out


def test_streamed_file_reads_back_bit_for_bit(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "empty": torch.zeros(0, 4),
          "strided": torch.randn(4, 6)[:, 1:4]}
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, [(k, tuple(v.shape), "BF16" if v.dtype == torch.bfloat16 else "F32")
                             for k, v in ts.items()], iter(ts.values()))
    back = safetensors.load_file(path)
    assert back.keys() == ts.keys() and all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in ts.items())
    assert os.listdir(tmp_path) == ["x.safetensors"]
    with pytest.raises(RuntimeError, match="b: shape"):
        write_safetensors(path, [("a", (3, 5), "F32"), ("b", (8,), "F32")], iter([ts["a"], torch.zeros(7)]))


def test_one_file_equals_the_in_memory_mapping(tmp_path):
    state, topo = _llama()
    cfg = write_hf(state, topo, str(tmp_path / "one"))
    ref, ref_cfg = to_hf_state(state, topo)
    got = _read(tmp_path / "one")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert cfg == ref_cfg and sorted(os.listdir(tmp_path / "one")) == ["config.json", "generation_config.json",
                                                                      "model.safetensors"]
    assert got["model.embed_tokens.weight"].shape == (VOCAB, H) and got["lm_head.weight"].shape == (VOCAB, H)
    # the order of the stream is the order of the plan (shapes from meta tensors, no data read)
    assert [k for k, _ in hf_tensors(state, topo)] == list(got)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shards_with_an_index(tmp_path, dtype):
    state, topo = _llama()
    limit = 2000
    write_hf(state, topo, str(tmp_path), dtype=dtype, max_shard_size=limit)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    n = len(files)
    assert n > 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    ref, _ = to_hf_state(state, topo, dtype)
    assert set(index["weight_map"]) == set(ref) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    for f in files:   # within the limit, unless one tensor alone is larger
        part = safetensors.load_file(str(tmp_path / f))
        assert all(index["weight_map"][k] == f for k in part)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= limit or len(part) == 1
    got = _read(tmp_path)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert all(got[k].dtype == want and torch.equal(got[k], ref[k]) for k in ref)
    assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == ("bfloat16" if dtype == "bf16" else "float32")


def test_sizes_and_bad_values():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1000") == 1000 and parse_size("1.5kb") == 1500
    for bad in ("five", "0", "-1GB", "10XB"):
        with pytest.raises(ValueError, match="--max-shard-size"):
            parse_size(bad)
    state, topo = _llama()
    with pytest.raises(ValueError, match="--dtype"):
        write_hf(state, topo, "/nonexistent/never", dtype="fp16")
    topo["model"]["post_norm"] = True
    with pytest.raises(ValueError, match="--post-norm"):
        write_hf(state, topo, "/nonexistent/never")


def test_qk_norm_exports_as_qwen3_and_other_recipes_are_refused(tmp_path):
    state, topo = _llama()
    d = H // HEADS
    for i in range(L):
        state[f"decoder.layers.{i}.self_attention.q_layernorm.weight"] = torch.randn(d)
        state[f"decoder.layers.{i}.self_attention.k_layernorm.weight"] = torch.randn(d)
    topo["model"]["qk_layernorm"] = True
    tensors, cfg = to_hf_state(state, topo)
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3" and cfg["head_dim"] == d
    assert torch.equal(tensors["model.layers.1.self_attn.k_norm.weight"],
                       state["decoder.layers.1.self_attention.k_layernorm.weight"])
    moe = dict(topo, model=dict(topo["model"], num_experts=4, moe_router_pre_softmax=False, moe_router_topk=2))
    with pytest.raises(ValueError, match="--qk-layernorm exports as Qwen3, dense models only"):
        to_hf_state(state, moe)
    topo["model"]["post_norm"] = True
    with pytest.raises(ValueError, match="uses --post-norm, --qk-layernorm"):
        to_hf_state(state, topo)
