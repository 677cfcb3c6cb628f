#!/usr/bin/env bash
# Megatron-LM's pretrain_gpt.py with megatron_md's MuonMD: a tiny GPT on Megatron's mock data.
# On a GPU node: drop the CPU-only lines marked (CPU) and raise the sizes. On a CPU-only machine
# Megatron-LM's start-up needs test-only shims: run through tests/megatron_lm/cpu_megatron_lm.py
# (CPU=1 below), as tests/megatron_lm/test_pretrain_gpt.py does.
#   MEGATRON_LM_PATH=/path/to/Megatron-LM bash examples/megatron_lm/launch_megatron_lm.sh [extra flags]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout}"
export CUDA_DEVICE_MAX_CONNECTIONS=1          # Megatron-LM requires it with tensor parallelism
NPROC=${NPROC:-2}
PYTHON=${PYTHON:-python}
ENTRY=(examples/megatron_lm/pretrain_gpt_md.py)
if [[ "${CPU:-0}" == 1 ]]; then   # (+ typing.override for Python 3.11 in every interpreter, spawned ones too)
  ENTRY=(tests/megatron_lm/cpu_megatron_lm.py "${ENTRY[@]}")
  export PYTHONPATH="$PWD/tests/megatron_lm/py311${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" "${ENTRY[@]}" \
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 \
  --seq-length 32 --max-position-embeddings 32 --position-embedding-type learned_absolute \
  --micro-batch-size 2 --global-batch-size 4 --train-iters 6 --eval-interval 3 --eval-iters 2 --log-interval 1 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 128 --seed 1234 \
  --tensor-model-parallel-size 2 \
  --optimizer muon-md --lr 0.01 --lr-decay-style constant --weight-decay 0 --clip-grad 1.0 \
  --distributed-backend gloo --transformer-impl local --use-cpu-initialization \
  --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion \
  --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion \
  --attention-dropout 0 --hidden-dropout 0 "$@"                   # (CPU) the last four lines
