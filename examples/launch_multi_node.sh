#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0 host> MASTER_PORT=29500 NPROC=8 \
#       examples/launch_multi_node.sh --tensor-model-parallel-size 8 --use-distributed-optimizer ... 
#
# NODE_RANK is optional with c10d rendezvous (torchrun assigns ranks) but keeps rank placement
# stable; RDZV_ID must be the same on all nodes of one job (default: a hash of MASTER_ADDR:PORT).
# SCRIPT selects the entry point (default examples/pretrain_gpt.py).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PYTHON: the interpreter with torch + megatron-core (default: the repo's .venv, else python3)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR (host of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-8}"
NODE_RANK="${NODE_RANK:-}"
RDZV_ID="${RDZV_ID:-megatron_md_$(echo "$MASTER_ADDR:$MASTER_PORT" | cksum | cut -d' ' -f1)}"
SCRIPT="${SCRIPT:-$REPO/examples/pretrain_gpt.py}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# NCCL hints (adjust to the fabric): pick the right NIC, keep errors visible.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL bootstrap / socket transport
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export GLOO_SOCKET_IFNAME=ib0          # gloo groups (Megatron creates some for the distributed optimizer)
ARGS=(--nnodes "$NNODES" --nproc-per-node "$NPROC" --rdzv-backend c10d
      --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" --max-restarts 0)
if [[ -n "$NODE_RANK" ]]; then ARGS+=(--node-rank "$NODE_RANK"); fi
exec "$PYTHON" -m torch.distributed.run "${ARGS[@]}" "$SCRIPT" "$@"
