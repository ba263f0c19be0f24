#!/usr/bin/env bash
# Launch a training script with torchrun, on one node or many (one call per node).
#
#   scripts/run_torchrun.sh [--nproc N] [--nnodes M] [--rdzv HOST:PORT] [--id JOB] [--] script.py [args]
#
#   --nproc N         ranks on this node (default: NPROC, else the GPUs here, else 2)
#   --nnodes M        nodes in the job (default: NNODES, else 1). With M = 1 torchrun runs
#                     --standalone (a private rendezvous on this node).
#   --rdzv HOST:PORT  multi-node: the c10d rendezvous endpoint, the same on every node - any
#                     one node's address and a free port (default: RDZV, else MASTER_ADDR:
#                     MASTER_PORT). Run this script on every node; they find each other there.
#   --id JOB          rendezvous id, the same on every node, unique per job (default: RDZV_ID,
#                     else "horovod_iter").
#
# The Python is this repo's .venv (or PYTHON). Anything after the script goes to the script.
# Single node, 4 ranks:   scripts/run_torchrun.sh --nproc 4 scripts/train.py
# Two nodes (on each):    scripts/run_torchrun.sh --nnodes 2 --nproc 8 --rdzv node1:29400 scripts/train.py
set -euo pipefail
root=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # -P: also through a link to scripts/
py=${PYTHON:-$root/.venv/bin/python}
nproc=${NPROC:-}
nnodes=${NNODES:-1}
rdzv=${RDZV:-}
[ -z "$rdzv" ] && [ -n "${MASTER_ADDR:-}" ] && rdzv="$MASTER_ADDR:${MASTER_PORT:-29400}"
id=${RDZV_ID:-horovod_iter}
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc|--nproc-per-node|--nproc_per_node) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --rdzv|--rdzv-endpoint) rdzv=$2; shift 2 ;;
    --id|--rdzv-id) id=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "run_torchrun.sh: name the training script (see --help)" >&2; exit 2; }
if [ -z "$nproc" ]; then
  nproc=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${nproc:-0}" -gt 0 ] || nproc=2
fi
if [ "$nnodes" = 1 ]; then
  rdzv_args=(--standalone)
else
  [ -n "$rdzv" ] || { echo "run_torchrun.sh: --nnodes $nnodes needs --rdzv HOST:PORT" >&2; exit 2; }
  rdzv_args=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$rdzv" --rdzv-id "$id")
fi
set -x
exec "$py" -m torch.distributed.run "${rdzv_args[@]}" --nproc-per-node "$nproc" "$@"
