#!/usr/bin/env bash
# Sets up whatever is missing (scripts/setup.sh), then trains a small model on 2 Horovod ranks
# (horovodrun --gloo on this machine) through horovod_iter and prints what each epoch did.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/horovodrun" -np 2 -H localhost:2 --gloo \
  "$root/.venv/bin/python" scripts/train.py "$@"
