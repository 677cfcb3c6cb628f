#!/usr/bin/env bash
# Everything GPU-side in ONE call of the lent device machine (nothing can be fetched there).
#
# Here, once per session (the wheels are git-ignored and not committed; einops for the Megatron-FSDP check):
#     bash benchmarks/gpu_session.sh --fetch          # megatron-core + schedulefree wheels into .whl/
# Then one device call, e.g. run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540):
# it installs the carried wheels into /tmp/site (the device image has CUDA torch, numpy, pytest,
# sentencepiece, safetensors, transformers), runs benchmarks/gpu_all.sh (bf16 matmul peak,
# Newton–Schulz TFLOP/s, the step-time table in bf16, the tests/gpu checks; NCCL multi-rank ones
# skip on a one-GPU machine) and copies docs/gpu_<card>.md to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=("megatron-core==0.16.1" "schedulefree==1.4.1" "einops==0.8.2")  # einops: the Megatron-FSDP test
if [ "${1:-}" = "--fetch" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  exit $?
fi
PY=${PYTHON:-python3}
nvidia-smi -L || true
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_session.sh: no wheels in .whl/ (run --fetch here and carry .whl)" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MEGATRON_MD_NS_DTYPE=auto
PYTHON=$PY bash benchmarks/gpu_all.sh
status=$?
[ -n "${OUT:-}" ] && cp docs/gpu_*.md "$OUT"/ 2>/dev/null
exit $status
