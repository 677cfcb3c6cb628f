#!/usr/bin/env python3
"""Pretrain a dense GPT with Megatron-Core and a megatron_md optimizer.

    # CPU, 2 gloo ranks, TP=2 (data from tools/preprocess_data.py)
    torchrun --nproc-per-node 2 examples/pretrain_gpt.py \
        --tensor-model-parallel-size 2 --num-layers 4 --hidden-size 128 --num-attention-heads 4 \
        --seq-length 256 --micro-batch-size 8 --train-iters 200 --lr 0.01 --optimizer muon-md \
        --data-path data/megatron/<key>-doc1024 --eval-interval 50 --eval-iters 4 --log-interval 10

All flags: ``--help`` (Megatron-LM names; megatron_md's under "megatron_md"). See
megatron_md/training/pretrain.py for what the loop does and examples/launch_*.sh for launchers.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running without an editable install
    sys.path.insert(0, str(REPO))

from megatron_md.training.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="pretrain_gpt.py"))
