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
seeds() { [ -z "$1" ] || sweep --config docs/results/quality.toml --out "$Q" --seeds 2,3 --lrs "$1" \
            --optimizers "$(echo "$1" | sed 's/=[^;]*//g; s/;/,/g')"; }

# 1. the README demo's pair first: LR sweep (seed 1), then seeds 2 and 3 at the best LR
sweep --config docs/results/quality.toml --out "$Q" --optimizers adam,muon-md
seeds "$(best adam,muon-md)"
# 2. every optimizer's LR sweep, then its seeds
sweep --config docs/results/quality.toml --out "$Q"
ALL=adam,muon,normuon,rmnp,adamh,muonh,adam-md,muon-md,sf-adamw,sf-normuon
seeds "$(best $ALL)"
echo "queue: done"
