#!/usr/bin/env bash
# Idempotent set-up of a development/demo environment in ./.venv:
#   torch==2.13.0 (CPU build), Horovod 0.28.1 built from its sdist with Gloo (no MPI),
#   and horovod_iter installed editable with its dev extras.
# Each step is skipped when already done; any failure stops the script loudly.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
py="$venv/bin/python"
cache="${HOROVOD_ITER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/horovod_iter}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0

say() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

base_python=${PYTHON:-}
if [ -z "$base_python" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null 2>&1 && { base_python=$c; break; }; done
fi
[ -n "$base_python" ] || die "no python3 found; install Python 3.11 with pip"

if [ ! -x "$py" ]; then
  say "creating virtual environment $venv"
  "$base_python" -m venv "$venv"
fi
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# 1. torch first, pinned, so that nothing later resolves a multi-GB CUDA build.
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "installing torch==$TORCH_VERSION"
  pip install "torch==$TORCH_VERSION"
fi
"$py" -c "import setuptools, wheel" 2>/dev/null || pip install setuptools wheel
"$py" -c "import numpy" 2>/dev/null || pip install numpy

# 2. Horovod, built once from its sdist and cached as a wheel outside the checkout.
if ! "$py" -c "import horovod.torch, horovod; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null; then
  tag=$("$py" -c "import torch, sys; print(f'torch{torch.__version__.split(\"+\")[0]}-py{sys.version_info[0]}{sys.version_info[1]}')")
  wheel_dir="$cache/wheels/$tag"
  whl=$(ls "$wheel_dir"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    cmake_ok=0
    if command -v cmake >/dev/null 2>&1 && cmake --version | head -n1 | grep -Eq 'version 3\.(1[3-9]|2[0-9]|3[0-9])'; then
      cmake_ok=1
    fi
    if [ $cmake_ok = 0 ]; then
      say "installing the system cmake 3.x (PyPI's cmake 4 rejects Gloo's cmake_minimum_required)"
      if [ "$(id -u)" = 0 ]; then
        (apt-get update -q && apt-get install -y -q cmake) >&2 || die "apt-get install cmake failed"
      elif command -v sudo >/dev/null 2>&1; then
        (sudo apt-get update -q && sudo apt-get install -y -q cmake) >&2 || die "apt-get install cmake failed"
      else
        die "Horovod needs cmake 3.13..3.x on PATH; install it (e.g. apt-get install cmake) and re-run"
      fi
    fi
    command -v g++ >/dev/null 2>&1 || die "Horovod needs a C++ compiler (g++); install build-essential and re-run"
    say "building Horovod $HOROVOD_VERSION from its sdist (Gloo, no MPI; a few minutes, once)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    pip download --no-deps --no-binary=:all: "horovod==$HOROVOD_VERSION" -d "$build" \
      || die "could not download the Horovod $HOROVOD_VERSION sdist"
    tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # torch 2.x headers refuse C++14: raise the standard to 17 in both CMakeLists.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
      || die "could not patch Horovod's CMakeLists.txt to C++17"
    # Horovod's build-time imports (its setup.py and the torch extension check).
    pip install cloudpickle psutil pyyaml packaging
    mkdir -p "$wheel_dir"
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
      HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo \
      MAKEFLAGS="-j$(nproc)" \
      "$py" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation \
        -w "$wheel_dir" "$src" >&2 || die "building Horovod $HOROVOD_VERSION failed (see the log above)"
    whl=$(ls "$wheel_dir"/horovod-$HOROVOD_VERSION-*.whl | head -n1)
  fi
  say "installing $(basename "$whl")"
  pip install "$whl"
  "$py" -c "import horovod.torch as hvd; assert hvd.gloo_built(), 'Horovod was built without Gloo'" \
    || die "Horovod installed but horovod.torch does not import with Gloo"
fi

# 3. The package itself, editable, with its dev extras (test, lint, docs tools) and the
#    frameworks its integration tests run (Lightning, transformers, accelerate, webdataset).
#    editable_mode=compat: a plain path in a .pth file, which mypy (and other static tools)
#    follow to the package and its py.typed; setuptools' default import hook they cannot.
#    An install made with the hook (an older setup.sh) is redone.
hooked=("$venv"/lib/python*/site-packages/__editable___horovod_iter_*_finder.py)
if ! "$py" -c "import horovod_iter, pytest, hypothesis, lightning, transformers, accelerate" \
     2>/dev/null \
   || [ -e "${hooked[0]}" ] \
   || [ "$root/setup.cfg" -nt "$venv/.horovod_iter-installed" ]; then
  say "installing horovod_iter (editable, dev and frameworks extras)"
  pip install -e "$root[dev,frameworks]" "torch==$TORCH_VERSION" \
    --config-settings editable_mode=compat
  touch "$venv/.horovod_iter-installed"
fi
say "environment ready: $venv"
