#!/usr/bin/env bash
# Regenerates the charts of docs/performance.md (needs matplotlib: pip install -e .[charts]).
# Run on a quiet machine: the figures are ratios measured side by side in one run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
export PATH="$root/.venv/bin:$PATH"
mkdir -p docs/img
"$py" scripts/bench_loader.py --ranks 2 --chart docs/img/loader.png --json docs/img/loader.json
"$py" scripts/bench_shards.py --chart docs/img/shards.png
