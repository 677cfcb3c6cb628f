#!/usr/bin/env bash
# The evidence runs on the MD authors' architecture (docs/results/md_paper.toml; issue 17), in order;
# resumable (every finished run is kept and never rerun), so a stopped queue continues where it stopped:
#     nohup nice -n 10 bash docs/results/queue_md_paper.sh > runs/queue_md_paper.log 2>&1 &
# One run at a time on one thread (a 2-core machine keeps a core free).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
Q=docs/results/md_paper
C="--config docs/results/md_paper.toml"
sweep() { "$PY" tools/sweep.py --no-progress "$@" || echo "queue: a sweep step had failed runs ($*)"; }
best() { "$PY" tools/results_table.py "$1" --out docs/results --best-lrs --optimizers "$2" "${@:3}"; }
edges() { "$PY" tools/results_table.py "$1" --out docs/results --edge-lrs --optimizers "$2" "${@:3}"; }
names() { echo "$1" | sed 's/=[^;]*//g; s/;/,/g'; }
# LR sweep (seed 1); a best LR at an end of its grid: two more LRs beyond it (twice at most); then
# seeds 2 and 3 at the best. $1: optimizers; further arguments go to every sweep call.
tune() {
  local opts=$1; shift
  sweep $C --out "$Q" --optimizers "$opts" "$@"
  for _ in 1 2; do
    local ext; ext=$(edges "$Q" "$opts")
    [ -z "$ext" ] || sweep $C --out "$Q" --seeds 1 --lrs "$ext" --optimizers "$(names "$ext")" "$@"
  done
  local b; b=$(best "$Q" "$opts")
  [ -z "$b" ] || sweep $C --out "$Q" --seeds 2,3 --lrs "$b" --optimizers "$(names "$b")" "$@"
}
# 1. MuonMD against its baselines, Muon and AdamW, each with its own recipe
tune muon-md,muon,adam
# 2. MuonMD with its gains at the matrix LR (the code path of the authors' dense scripts) instead of
#    the base LR: one run per LR, the gains LR set to it
Q=docs/results/md_paper_gains_matrix
for lr in 1e-2 2e-2 4e-2 8e-2; do
  sweep $C --out "$Q" --optimizers muon-md --lrs "muon-md=$lr" \
    --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --md-embedding-lr 9e-3 --muon-md-gains-lr $lr"
done
# seeds 2 and 3 at its best LR (the gains LR set to it as well)
GB=$(best "$Q" muon-md | sed 's/.*=//')
[ -z "$GB" ] || sweep $C --out "$Q" --optimizers muon-md --lrs "muon-md=$GB" --seeds 2,3 \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --md-embedding-lr 9e-3 --muon-md-gains-lr $GB"
# 3. AdamMD
Q=docs/results/md_paper
tune adam-md
# 4. MuonMD sphere only (hidden-matrix gains frozen at 1), swept like MuonMD
Q=docs/results/md_paper_sphere_only
tune muon-md --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --md-embedding-lr 9e-3 --muon-md-gains-lr 0"
# 5. width: hidden 64 and 256 (128: step 1), each width tuned on its own like step 1 (a best LR at the
#    grid's edge: two more LRs, twice at most; then seeds 2 and 3 at the best)
Q=docs/results/md_paper_width
for N in 64 256; do
  W="--where hidden_size=$N"
  sweep $C --out "$Q" --optimizers muon-md,muon,adam --hidden-sizes $N
  for _ in 1 2; do
    EXT=$(edges "$Q" muon-md,muon,adam $W)
    [ -z "$EXT" ] || sweep $C --out "$Q" --seeds 1 --lrs "$EXT" --optimizers "$(names "$EXT")" --hidden-sizes $N
  done
  B=$(best "$Q" muon-md,muon,adam $W)
  [ -z "$B" ] || sweep $C --out "$Q" --seeds 2,3 --lrs "$B" --optimizers "$(names "$B")" --hidden-sizes $N
done
# 6. MoE on the authors' MoE framework's recipe (--model-recipe md-paper-moe; 4 experts, top-2, aux loss,
#    alltoall): MuonMD with the router under MD (the default), embedding and head off the sphere and the
#    residual outputs' radius (and step) scaled, as their recipes/md_decoupling.sh; AdamW its own recipe
Q=docs/results/md_paper_moe
MOE="--model-recipe md-paper-moe --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall"
moe() { sweep $C --out "$Q" --optimizers "$(names "$1")" --lrs "$1" --seeds "${2:-1}" \
  --optimizer-args "adam=--weight-decay 0.1 --lr-warmup-iters 30 $MOE" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --no-md-embedding-unit-norm --no-md-head-gains --md-residual-scaling $MOE"; }
moe "adam=2e-3,4e-3,8e-3;muon-md=5e-3,1e-2,2e-2,4e-2,8e-2"
for _ in 1 2; do
  EXT=$(edges "$Q" adam,muon-md)
  [ -z "$EXT" ] || moe "$EXT"
done
B=$(best "$Q" adam,muon-md)
[ -z "$B" ] || moe "$B" 2,3
echo "queue: done"
