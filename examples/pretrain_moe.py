#!/usr/bin/env python3
"""Pretrain a Mixture-of-Experts GPT with Megatron-Core and a megatron_md optimizer.

Same flags as pretrain_gpt.py; MoE defaults here: 4 experts, top-2 router, load-balancing aux
loss (coefficient 1e-2), alltoall token dispatcher, RoPE, no linear biases. Experts are split
over ranks with ``--expert-model-parallel-size``:

    torchrun --nproc-per-node 2 examples/pretrain_moe.py --expert-model-parallel-size 2 \
        --num-layers 2 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
        --micro-batch-size 4 --train-iters 50 --lr 0.01 --optimizer muon \
        --data-path data/megatron/<key>-doc1024 --eval-interval 25 --eval-iters 2 --log-interval 5

Router weights go to the AdamW partner unless ``--router-on-matrix``; expert matrices to the
matrix optimizer (per expert), over the expert-data-parallel group.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_md.training.pretrain import main  # noqa: E402

MOE_DEFAULTS = dict(num_experts=4, moe_router_topk=2, moe_aux_loss_coeff=1e-2,
                    moe_token_dispatcher_type="alltoall", position_embedding_type="rope",
                    disable_bias_linear=True)

if __name__ == "__main__":
    sys.exit(main(defaults=MOE_DEFAULTS, prog="pretrain_moe.py"))
