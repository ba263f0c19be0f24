#!/usr/bin/env bash
# Sets up whatever is missing (scripts/setup.sh), then runs the whole suite:
# ruff, mypy, the docs build, and pytest (real multi-process runs under horovodrun and torchrun).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sampler`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/setup.sh
py="$root/.venv/bin/python"
export PATH="$root/.venv/bin:$PATH"   # horovodrun and torchrun of the venv

echo "== ruff"
# ruff reads no setup.cfg: pass its [tool:ruff] section as --config overrides.
mapfile -t ruff_cfg < <("$py" - <<'PY'
import configparser
c = configparser.ConfigParser()
c.read("setup.cfg")
for k, v in c["tool:ruff"].items():
    print("--config")
    print(f"{k} = {v.strip()}")
PY
)
"$py" -m ruff check "${ruff_cfg[@]}" horovod_iter tests scripts
echo "== mypy"
"$py" -m mypy horovod_iter
if [ -f mkdocs.yml ]; then
  echo "== docs"
  site=$(mktemp -d)
  # no --quiet: it raises mkdocs' log level above WARNING, so --strict would count nothing
  "$py" -m mkdocs build --strict --site-dir "$site"
  # the site renders Markdown, not reST: a Sphinx role or a doctest prompt would show raw
  if grep -rlE ':(class|func|meth|mod|attr|exc|data):`|&gt;&gt;&gt; ' "$site" --include=*.html; then
    echo "docs: raw Sphinx roles or doctest prompts in the pages above; use backticks and" \
         "fenced python blocks in docstrings" >&2
    exit 1
  fi
  rm -rf "$site"
fi
echo "== pytest"
"$py" -m pytest "$@"
