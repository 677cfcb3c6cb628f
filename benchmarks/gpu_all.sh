#!/usr/bin/env bash
# One call on a CUDA machine: NS TFLOP/s vs the measured bf16 matmul peak, the step-time table in
# bf16, and the GPU/NCCL checks of tests/gpu; writes docs/gpu_<card>.md.
# Usage (repo root, a venv with a CUDA torch and megatron-core): bash benchmarks/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
card=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_').replace('/', '_'))" 2>/dev/null) || {
  echo "gpu_all.sh: no CUDA device visible to $PY" >&2; exit 2; }
out=docs/gpu_${card}.md
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "# GPU measurements: ${card}"
  echo
  echo "Command: \`bash benchmarks/gpu_all.sh\` (repository at commit ${rev}); $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  PYTHONPATH=. timeout 900 $PY benchmarks/gpu_ns.py 2>&1
  echo
  echo "## GPU and NCCL checks (tests/gpu)"
  echo
  echo '```'
  PYTHONPATH=. timeout 900 $PY -m pytest -q -rs -m gpu tests/gpu 2>&1 | tail -40
  echo '```'
} > "$out"
echo "written to $out"
