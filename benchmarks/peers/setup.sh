#!/usr/bin/env bash
# Creates the peers' virtual environments for benchmarks/vs_peers.py, next to this file:
#   .venv-larq   larq 0.14 on tf-keras (Keras 2) and tensorflow-cpu 2.21
#   .venv-torch  torch 2.13 (CPU build)
# Idempotent: an environment whose marker file exists is left alone. Usage:
#   bash benchmarks/peers/setup.sh [larq|torch ...]   (default: both)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

LARQ_PKGS=(larq==0.14.0 tf-keras==2.21.0 tensorflow-cpu==2.21.0)
TORCH_VERSION=2.13.0

make_venv() {  # make_venv DIR
  if [ ! -x "$1/bin/python" ]; then
    "$PYTHON" -m venv "$1"
    "$1/bin/python" -m pip install -q --upgrade pip
  fi
}

setup_larq() {
  [ -f .venv-larq/.ready ] && return 0
  echo "==> benchmarks/peers/.venv-larq: ${LARQ_PKGS[*]}"
  make_venv .venv-larq
  .venv-larq/bin/python -m pip install -q "${LARQ_PKGS[@]}"
  touch .venv-larq/.ready
}

# The CPU build of torch: a local wheel (torch-2.13.0+cpu-*.whl in a PIP_FIND_LINKS
# directory or TORCH_WHEEL) if there is one; otherwise torch from PyPI WITHOUT its
# dependencies (which would pull several GB of CUDA libraries) and then the few pure
# Python packages torch imports.
setup_torch() {
  [ -f .venv-torch/.ready ] && return 0
  echo "==> benchmarks/peers/.venv-torch: torch ${TORCH_VERSION} (CPU)"
  make_venv .venv-torch
  local wheel=${TORCH_WHEEL:-}
  if [ -z "$wheel" ]; then
    for dir in ${PIP_FIND_LINKS:-}; do
      for w in "$dir"/torch-"${TORCH_VERSION}"+cpu-*.whl; do
        [ -f "$w" ] && wheel=$w
      done
    done
  fi
  if [ -n "$wheel" ]; then
    .venv-torch/bin/python -m pip install -q "$wheel" numpy
  else
    .venv-torch/bin/python -m pip install -q --no-deps "torch==${TORCH_VERSION}"
    .venv-torch/bin/python -m pip install -q numpy filelock typing-extensions sympy networkx jinja2 fsspec
  fi
  touch .venv-torch/.ready
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(larq torch)
for t in "${targets[@]}"; do
  case "$t" in
  larq) setup_larq ;;
  torch) setup_torch ;;
  *) echo "unknown peer '$t' (valid: larq, torch)" >&2; exit 2 ;;
  esac
done
