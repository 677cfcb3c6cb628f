#!/usr/bin/env bash
# One node, NPROC ranks (GPUs, or CPU processes with gloo when there is no CUDA):
#
#   NPROC=8 examples/launch_single_node.sh --tensor-model-parallel-size 2 --use-distributed-optimizer \
#       --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \
#       --micro-batch-size 4 --global-batch-size 256 --train-iters 10000 --lr 0.02 --optimizer muon-md \
#       --bf16 --data-path data/megatron/<key>-doc1024 --save ckpt/run1 --load ckpt/run1 --save-interval 1000
#
# SCRIPT selects the entry point (default examples/pretrain_gpt.py; e.g. SCRIPT=examples/pretrain_moe.py).
# All remaining arguments go to the training script (see `python examples/pretrain_gpt.py --help`).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PYTHON: the interpreter with torch + megatron-core (default: the repo's .venv, else python3)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)}"
SCRIPT="${SCRIPT:-$REPO/examples/pretrain_gpt.py}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# Megatron-Core's TP/SP communication overlap expects one CUDA work queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" "$SCRIPT" "$@"
