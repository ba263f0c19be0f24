#!/usr/bin/env bash
# Sets up whatever is missing (scripts/setup.sh), then trains a small model on 2 Horovod ranks
# (scripts/run_horovod.sh: horovodrun --gloo on this machine) through horovod_iter and prints
# what each epoch did. Extra arguments go to scripts/train.py (e.g. --epochs 5 --progress).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec bash scripts/run_horovod.sh -np 2 scripts/train.py "$@"
