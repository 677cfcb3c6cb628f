#!/usr/bin/env bash
# Run every GPU check (TE layers, FP8, bf16 Newton–Schulz, CUDA optimizers, NCCL multi-rank).
# Usage on a GPU machine, from the repo root: bash tests/gpu/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"
python -m pytest -q -rs -m gpu tests/gpu "$@"
