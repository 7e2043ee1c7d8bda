#!/usr/bin/env bash
# binax developer entry point: `bash dev.sh run` trains the default config,
# `bash dev.sh test` runs the whole test suite (what CI runs), `bash dev.sh test-fast`
# the tests not marked slow, `bash dev.sh notebooks` opens notebooks/ in JupyterLab
# (`--execute`: runs each into an .ipynb). All set up everything first: Debian's
# Fashion-MNIST package and a virtual environment at .venv/.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
FMNIST_DIR=/usr/share/datasets/fashion-mnist

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@"
}

setup() {
  if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "==> installing Debian's dataset-fashion-mnist"
    apt_install dataset-fashion-mnist
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv 2>/dev/null || { apt_install python3-venv; rm -rf .venv; "$PYTHON" -m venv .venv; }
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  if [ ! -f .venv/.binax-installed ] || [ pyproject.toml -nt .venv/.binax-installed ]; then
    echo "==> installing binax and its test dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[test]"
    touch .venv/.binax-installed
  fi
  setup_lce
}

# Larq Compute Engine for the LCE export tests (binax[lce], docs/export.md), without moving
# .venv off numpy 2: larq 0.14 declares numpy<2 (pip would then resolve jax to 0.7), so
# larq and tf-keras go in without their pins (conversion runs under numpy 2), and LCE's
# interpreter, compiled against NumPy 1, runs from .venv/lce: a venv whose own numpy<2
# comes before .venv's packages. Only where LCE has a wheel; the tests skip elsewhere.
setup_lce() {
  if [ -x .venv/lce/bin/python ]; then return; fi
  local tf base site
  tf=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('tensorflow-cpu'))" 2>/dev/null) || return 0
  echo "==> installing Larq Compute Engine (binax[lce]) and its NumPy 1 interpreter layer .venv/lce"
  if ! .venv/bin/python -m pip install -q "larq-compute-engine>=0.16" "terminaltables>=3.1"; then
    echo "    no larq-compute-engine wheel for this platform: the LCE tests will skip" >&2
    return 0
  fi
  .venv/bin/python -m pip install -q --no-deps "larq>=0.14" "tf-keras==${tf%.*}.*"
  base=$(.venv/bin/python -c "import sys; print(sys.base_prefix)")
  "$base/bin/python3" -m venv --without-pip .venv/lce
  site=$(.venv/lce/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  .venv/bin/python -m pip install -q --no-deps --target "$site" "numpy<2" "ml_dtypes<0.6"
  .venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/zz_binax_venv.pth"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) setup ;;
  run)
    setup
    # XLA:CPU mallocs every step's buffers; glibc would mmap (and page-fault) the large
    # ones afresh each step. One arena, no mmap, no trimming: ~15% faster CPU steps on
    # VGG-small (docs/performance.md). glibc reads this only at process start.
    export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736}
    exec .venv/bin/python -m experiments.run "$@"
    ;;
  notebooks)
    setup
    if [ "${1:-}" = "--execute" ]; then
      shift
      # Each notebooks/NN.py runs top to bottom into notebooks/NN.ipynb, outputs included.
      for nb in notebooks/[0-9]*.py; do .venv/bin/jupytext --to ipynb --execute "$@" "$nb"; done
    else
      # Double-clicking a notebooks/*.py opens it as a notebook (jupytext), for this
      # .venv's JupyterLab only: the default viewer is set in the venv, not in ~/.jupyter.
      settings=.venv/share/jupyter/lab/settings
      mkdir -p "$settings"
      [ -f "$settings/overrides.json" ] || printf '%s\n' \
        '{"@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"python": "Jupytext Notebook"}}}' \
        > "$settings/overrides.json"
      exec .venv/bin/jupyter lab notebooks "$@"
    fi
    ;;
  test | test-fast)
    setup
    # test-fast: the tier without end-to-end runs (pytest -m "not slow"), for edit-test loops.
    fast=()
    if [ "$cmd" = test-fast ]; then fast=(-m "not slow"); fi
    # LCE's interpreter runs under NumPy 1 (setup_lce).
    if [ -x .venv/lce/bin/python ]; then export BINAX_LCE_PYTHON=${BINAX_LCE_PYTHON:-$PWD/.venv/lce/bin/python}; fi
    # -n 2: one worker per core, idle workers steal queued tests (a long test last does not
    # leave the other core idle); pytest's exit 5 (no tests collected) is a failure.
    set +e
    .venv/bin/python -m pytest -n 2 --dist worksteal --durations=15 "${fast[@]}" "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash dev.sh {setup|run [flags for experiments.run]|test|test-fast [pytest args]|notebooks [--execute]}" >&2
    exit 2
    ;;
esac
