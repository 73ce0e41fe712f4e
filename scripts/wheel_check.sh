#!/usr/bin/env bash
# Installs a fastcam wheel into a fresh venv, with the torch it was built against, and runs
# scripts/wheel_smoke.py there from outside the source tree; then deletes the venv. CI runs it
# after `make wheel` (`make wheel-check`).
#   $1 / WHEEL            the wheel (default: the newest dist/fastcam-*.whl)
#   PYTHON                the build environment's interpreter (default .venv/bin/python): its base
#                         Python makes the venv, and its torch version is installed there
#   TORCH_CUDA_ARCH_LIST  the archs the wheel must have been built for (default "8.0;9.0+PTX")
#   WHEEL_VENV            where the fresh venv goes (default: a new folder under $TMPDIR or /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-.venv/bin/python}
WHEEL=${1:-${WHEEL:-$(ls -t dist/fastcam-*.whl | head -n 1)}}
WHEEL=$(realpath "$WHEEL")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastcam-wheel-check.XXXXXX")
WHEEL_VENV=${WHEEL_VENV:-$WORK/venv}
trap 'rm -rf "$WORK" "$WHEEL_VENV"' EXIT
step() { echo "=== $* ($(date -u +%H:%M:%S))"; }

read -r base torch_version < <("$PYTHON" -c \
  'import sys, torch; print(sys._base_executable, torch.__version__.split("+")[0])')
step "fresh venv $WHEEL_VENV ($base)"
rm -rf "$WHEEL_VENV"
"$base" -m venv "$WHEEL_VENV"
start=$SECONDS
step "pip install torch==$torch_version"
"$WHEEL_VENV/bin/python" -m pip install -q "torch==$torch_version"
echo "torch: $((SECONDS - start)) s"
start=$SECONDS
step "pip install $(basename "$WHEEL")"
"$WHEEL_VENV/bin/python" -m pip install -q "$WHEEL"
echo "wheel and its dependencies: $((SECONDS - start)) s"
start=$SECONDS
step "smoke test (in $WORK, outside the checkout)"
cp "$ROOT/scripts/wheel_smoke.py" "$WORK/"
cd "$WORK"
"$WHEEL_VENV/bin/python" wheel_smoke.py "$WHEEL" "${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
echo "smoke test: $((SECONDS - start)) s"
