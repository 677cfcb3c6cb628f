#!/usr/bin/env python3
"""How much of the token embedding reaches the end of the residual stream at initialization.

For the README demo's model shape (4 layers, hidden 128, 4 heads, vocabulary 4096) on megatron-core
(one CPU rank), built as a training run builds it — the model, then the optimizer (MD projects every
hidden matrix onto its sphere and every embedding row to unit norm at construction) — this prints,
per configuration, the mean over tokens of ``cos(h_L, e)``: ``h_L`` the residual stream entering the
final norm, ``e`` the decoder input of the same token (the embedding, times the recipe's multiplier).
A stream that has forgotten its token (cos ≈ 0) must be rebuilt by training.

    python benchmarks/md_init_stream.py            # writes docs/md_init_stream.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import cpu_name, git_rev  # noqa: E402

BASE = ("--num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --micro-batch-size 4 "
        "--train-iters 1 --lr 0.01 --mock-data --vocab-size 4096 --weight-decay 0").split()
LLAMA = "--normalization RMSNorm --swiglu --position-embedding-type rope --untie-embeddings-and-output-weights " \
        "--disable-bias-linear"
CONFIGS = {
    "Llama architecture, 0.02 init, Muon (no projection)": f"{LLAMA} --optimizer muon",
    "Llama architecture, MuonMD (R = sqrt(max) sphere, unit embedding rows)": f"{LLAMA} --optimizer muon-md",
    "Llama architecture, MuonMD, --muon-md-radius-scale 0.25": f"{LLAMA} --optimizer muon-md --muon-md-radius-scale 0.25",
    "--model-recipe md-paper, Muon": "--model-recipe md-paper --optimizer muon",
    "--model-recipe md-paper, MuonMD": "--model-recipe md-paper --optimizer muon-md",
}


def measure(flags: list[str], seeds: int) -> float:
    import torch

    from megatron_md.megatron.builder import get_megatron_optimizer
    from megatron_md.training import model as M
    from megatron_md.training.arguments import optimizer_config, parse_args

    vals = []
    for seed in range(1, seeds + 1):
        args = parse_args(BASE + flags + ["--seed", str(seed)], world_size=1)
        args.padded_vocab_size = 4096
        created = M.initialize(args)
        try:
            chunks = M.build_model(args, M.transformer_config(args))
            get_megatron_optimizer(optimizer_config(args), chunks, args.md)  # MD: projection at construction
            gpt = M.unwrap(chunks[0])
            seen = {}
            gpt.decoder.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["hidden_states"]),
                                                  with_kwargs=True)
            gpt.decoder.final_layernorm.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
            g = torch.Generator().manual_seed(seed)
            tok = torch.randint(0, 4096, (4, args.seq_length), generator=g)
            pos = torch.arange(args.seq_length)[None].expand(4, -1)
            with torch.no_grad():
                gpt(tok, pos, None)
            vals.append(torch.nn.functional.cosine_similarity(seen["h"], seen["x"], dim=-1).mean().item())
        finally:
            M.shutdown(created)
    return sum(vals) / len(vals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "docs" / "md_init_stream.md"))
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [(name, measure(flags.split(), a.seeds)) for name, flags in CONFIGS.items()]
    lines = ["# The token embedding in the residual stream at initialization", "",
             f"`python benchmarks/md_init_stream.py` ({git_rev(REPO)}; {cpu_name()}; mean over {a.seeds} seeds and "
             "512 random tokens each): the cosine between the residual stream entering the final norm and the "
             "decoder input of the same token, on the README demo's model shape, after the optimizer is built "
             "(MD projects at construction). The configurations of docs/RESULTS.md's Llama rows and of the "
             "MD authors' architecture (docs/md_fidelity.md).", "",
             "| model and optimizer | cos(h_L, embedding) |", "|---|---:|"]
    lines += [f"| {n} | {v:.3f} |" for n, v in rows]
    text = "\n".join(lines) + "\n"
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
