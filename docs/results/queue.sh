#!/usr/bin/env bash
# The evidence runs of docs/RESULTS.md, in order; resumable (every finished run is kept and
# never rerun), so a stopped queue continues where it stopped:
#     nohup nice -n 10 bash docs/results/queue.sh > runs/queue.log 2>&1 &
# Each step is a tools/sweep.py directory under docs/results/; tools/results_table.py turns
# them into the tables. One run at a time on one thread (a 2-core machine keeps a core free).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
Q=docs/results/quality
sweep() { "$PY" tools/sweep.py --no-progress "$@" || echo "queue: a sweep step had failed runs ($*)"; }
best() { "$PY" tools/results_table.py "$Q" --out docs/results --best-lrs --optimizers "$1"; }
# seeds 2 and 3 at the best LRs "opt=lr;opt=lr" (optimizers whose best is at the grid's edge are left out)
# the optimizer names of an "opt=lr,lr;opt=lr" spec, comma-separated
names() { echo "$1" | sed 's/=[^;]*//g; s/;/,/g'; }
seeds() { [ -z "$1" ] || sweep --config docs/results/quality.toml --out "$Q" --seeds 2,3 --lrs "$1" \
            --optimizers "$(names "$1")"; }

# 1. the README demo's pair first: LR sweep (seed 1), then seeds 2 and 3 at the best LR
sweep --config docs/results/quality.toml --out "$Q" --optimizers adam,muon-md
seeds "$(best adam,muon-md)"
# 2. every optimizer's LR sweep, then its seeds
sweep --config docs/results/quality.toml --out "$Q"
ALL=adam,muon,normuon,rmnp,adamh,muonh,adam-md,muon-md,sf-adamw,sf-normuon
# a best LR at an end of its grid: two more LRs beyond that end (twice, if still at the edge)
for _ in 1 2; do
  EXT=$("$PY" tools/results_table.py "$Q" --out docs/results --edge-lrs --optimizers $ALL)
  [ -z "$EXT" ] || sweep --config docs/results/quality.toml --out "$Q" --seeds 1 --lrs "$EXT" \
                     --optimizers "$(names "$EXT")"
done
seeds "$(best $ALL)"

# 3. the claims of docs/RESULTS.md (each a separate directory: the run ids do not encode the flags)
lr_of() { best "$1" | sed 's/.*=//'; }
MD=$(lr_of muon-md); MU=$(lr_of muon); AD=$(lr_of adam); SFN=$(lr_of sf-normuon); SFA=$(lr_of sf-adamw)
C="--config docs/results/quality.toml"
R=docs/results/claims
# MD: the sphere alone (hidden-matrix gains frozen at 1) swept like MuonMD
sweep $C --out $R/md_sphere_only --optimizers muon-md --lrs "muon-md=2.5e-3,5e-3,1e-2,2e-2,4e-2" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --muon-md-gains-lr 0"
# its best was at the grid's top (0.04): two more LRs above, then seeds 2, 3 at the best
sweep $C --out $R/md_sphere_only --optimizers muon-md --lrs "muon-md=8e-2,1.6e-1" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --muon-md-gains-lr 0"
SO=$("$PY" tools/results_table.py $R/md_sphere_only --out docs/results --best-lrs --optimizers muon-md | sed 's/.*=//')
[ -n "$SO" ] && sweep $C --out $R/md_sphere_only --optimizers muon-md --lrs "muon-md=$SO" --seeds 2,3 \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --muon-md-gains-lr 0"
# MD's recipe for embedding and head switched off (hidden matrices still MD): what the recipe adds
sweep $C --out $R/md_no_recipe --optimizers muon-md --lrs "muon-md=2e-2,4e-2,8e-2,1.6e-1" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --no-md-embedding-unit-norm --no-md-head-gains"
# MD's sphere radius: the paper's R = sqrt(max(d_out, d_in)) is ~4x the norm of the usual init here
sweep $C --out $R/md_radius_quarter --optimizers muon-md --lrs "muon-md=2.5e-3,5e-3,1e-2,2e-2,4e-2,8e-2" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 --muon-md-radius-scale 0.25"
# seeds 2, 3 at the best LR of the two single-seed MD claims above
for spec in "md_no_recipe|--no-md-embedding-unit-norm --no-md-head-gains" "md_radius_quarter|--muon-md-radius-scale 0.25"; do
  dir=${spec%%|*}; flags=${spec#*|}
  L=$("$PY" tools/results_table.py $R/$dir --out docs/results --best-lrs --optimizers muon-md | sed 's/.*=//')
  [ -n "$L" ] && sweep $C --out $R/$dir --optimizers muon-md --lrs "muon-md=$L" --seeds 2,3 \
    --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 $flags"
done
# MD without warmup (the quality runs) vs with it; Muon with weight decay (the quality runs) vs without
[ -n "$MD" ] && sweep $C --out $R/md_warmup --optimizers muon-md --lrs "muon-md=$MD" --seeds 1,2,3 \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 30 --partner-lr 3e-3"
[ -n "$MU" ] && sweep $C --out $R/muon_no_wd --optimizers muon --lrs "muon=$MU" --seeds 1,2,3 \
  --optimizer-args "muon=--weight-decay 0 --lr-warmup-iters 30 --partner-lr 3e-3"
# SF-AdamW: no weight decay, and decay at z (the quality runs decay at y)
[ -n "$SFA" ] && sweep $C --out $R/sf_adamw_no_wd --optimizers sf-adamw --lrs "sf-adamw=$SFA" --seeds 1,2 \
  --optimizer-args "sf-adamw=--weight-decay 0 --lr-decay-style constant --sf-adamw-warmup-steps 30"
[ -n "$SFA" ] && sweep $C --out $R/sf_adamw_wd_z --optimizers sf-adamw --lrs "sf-adamw=$SFA" --seeds 1,2 \
  --optimizer-args "sf-adamw=--weight-decay 0.1 --lr-decay-style constant --sf-adamw-warmup-steps 30 --sf-adamw-weight-decay-at z"
# SF-NorMuon without momentum
[ -n "$SFN" ] && sweep $C --out $R/sf_normuon_no_momentum --optimizers sf-normuon --lrs "sf-normuon=$SFN" --seeds 1,2 \
  --optimizer-args "sf-normuon=--weight-decay 0.05 --lr-decay-style constant --sf-normuon-warmup-steps 30 --sf-adamw-warmup-steps 30 --partner-lr 3e-3 --sf-normuon-momentum 0"
# SF-NorMuon, one configuration, vs cosine AdamW tuned per horizon: 1x, 2x, 4x the base budget
sweep $C --out $R/horizons --optimizers adam --train-iters 300,600,1200 --lrs "adam=2e-3,4e-3,8e-3,1.6e-2" \
  --optimizer-args "adam=--weight-decay 0.1 --lr-warmup-iters 30 --lr-decay-style cosine"
[ -n "$SFN" ] && sweep $C --out $R/horizons --optimizers sf-normuon --train-iters 300,600,1200 --lrs "sf-normuon=$SFN"
# AdamW's 1200-iteration best was at the grid's low end (2e-3): one LR below it
sweep $C --out $R/horizons --optimizers adam --train-iters 1200 --lrs "adam=1e-3" \
  --optimizer-args "adam=--weight-decay 0.1 --lr-warmup-iters 30 --lr-decay-style cosine"
# the 4x horizon's gap is about one seed half-range: seeds 2 and 3 there, both sides
sweep $C --out $R/horizons --optimizers adam --train-iters 1200 --lrs "adam=2e-3" --seeds 2,3 \
  --optimizer-args "adam=--weight-decay 0.1 --lr-warmup-iters 30 --lr-decay-style cosine"
[ -n "$SFN" ] && sweep $C --out $R/horizons --optimizers sf-normuon --train-iters 1200 --lrs "sf-normuon=$SFN" --seeds 2,3
# MD's LR transfer across width: MuonMD and AdamW at hidden 64 and 256 (128: the quality runs)
sweep $C --out $R/width --optimizers adam,muon-md --hidden-sizes 64,256
# MD at MoE (4 experts, top-2, aux loss, alltoall): MuonMD vs AdamW, tokens to equal loss
MOE="--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --moe-token-dispatcher-type alltoall"
moe() { sweep $C --out $R/moe --optimizers "$(names "$1")" --lrs "$1" --seeds "${2:-1}" \
  --optimizer-args "adam=--weight-decay 0.1 --lr-warmup-iters 30 $MOE" \
  --optimizer-args "muon-md=--weight-decay 0 --lr-warmup-iters 0 --partner-lr 3e-3 $MOE"; }
moe "adam=2e-3,4e-3,8e-3;muon-md=2e-2,4e-2,8e-2"
# a best LR at an end of its grid: two more LRs beyond it (twice at most); then seeds 2, 3 at the best
for _ in 1 2; do
  EXT=$("$PY" tools/results_table.py $R/moe --out docs/results --edge-lrs --optimizers adam,muon-md)
  [ -z "$EXT" ] || moe "$EXT"
done
B=$("$PY" tools/results_table.py $R/moe --out docs/results --best-lrs --optimizers adam,muon-md)
[ -z "$B" ] || moe "$B" 2,3
# MD-4's best LRs rest on one seed (a flat basin for MuonMD): seeds 2 and 3 at each width's seed-1
# best LR and its two grid neighbours (128: beside the quality runs' seeds at the best), so the
# width table can also pick the best LR by the seed-mean loss
sweep $C --out $R/width --optimizers adam,muon-md --hidden-sizes 64 --seeds 2,3 --lrs "adam=4e-3,8e-3,1.6e-2;muon-md=2e-2,4e-2,8e-2"
sweep $C --out $R/width --optimizers adam,muon-md --hidden-sizes 128 --seeds 2,3 --lrs "adam=2e-3,8e-3;muon-md=4e-2,1.6e-1"
sweep $C --out $R/width --optimizers adam,muon-md --hidden-sizes 256 --seeds 2,3 --lrs "adam=1e-3,2e-3,4e-3;muon-md=1e-2,2e-2,4e-2"
echo "queue: done"
