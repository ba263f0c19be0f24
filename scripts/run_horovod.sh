#!/usr/bin/env bash
# Launch a training script on N Horovod ranks with horovodrun, on one node or many.
#
#   scripts/run_horovod.sh [-np N] [-H HOSTS] [--mpi] [--] script.py [script args...]
#
#   -np N      total ranks (default: NP, else the GPUs on this node, else 2)
#   -H HOSTS   host:slots list, e.g. "node1:4,node2:4" (default: HOSTS, else localhost:N).
#              Multi-node: horovodrun starts the remote ranks over ssh, so every host needs
#              passwordless ssh from this one, the same Python environment at the same path,
#              and the ports between them open (pin the NIC with HOROVOD_ITER_NIC=eth0).
#   --mpi      use MPI instead of Gloo (needs Horovod built with MPI); Gloo is the default.
#
# The Python is this repo's .venv (or PYTHON). Anything after the script goes to the script.
# Single node, 2 ranks:            scripts/run_horovod.sh scripts/train.py --epochs 3
# Two nodes of 4 GPUs each:        scripts/run_horovod.sh -np 8 -H node1:4,node2:4 scripts/train.py
set -euo pipefail
root=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # -P: also through a link to scripts/
py=${PYTHON:-$root/.venv/bin/python}
np=${NP:-}
hosts=${HOSTS:-}
controller=--gloo
while [ $# -gt 0 ]; do
  case "$1" in
    -np|--num-proc) np=$2; shift 2 ;;
    -H|--hosts) hosts=$2; shift 2 ;;
    --mpi) controller=--mpi; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "run_horovod.sh: name the training script (see --help)" >&2; exit 2; }
if [ -z "$np" ]; then
  np=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${np:-0}" -gt 0 ] || np=2
fi
hosts=${hosts:-localhost:$np}
extra=()
[ -n "${HOROVOD_ITER_NIC:-}" ] && extra+=(--network-interface "$HOROVOD_ITER_NIC")
horovodrun=$(dirname "$py")/horovodrun
[ -x "$horovodrun" ] || horovodrun=horovodrun
set -x
exec "$horovodrun" -np "$np" -H "$hosts" "$controller" "${extra[@]}" "$py" "$@"
