#!/usr/bin/env bash
# Builds the wheel dist/fastcam-<version>+cu<CUDA major minor>torch<major.minor>-cp3XX-cp3XX-linux_x86_64.whl
# (e.g. fastcam-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl) with the compiled extension
# fastcam._C inside: CPU and CUDA kernels, for the torch and CUDA of $PYTHON's environment.
# `make wheel` runs it with .venv/bin/python; for a wheel matrix, run it once per environment
# (README, "Building wheels for a cluster").
# Environment:
#   PYTHON                the interpreter whose torch the wheel is built against (default .venv/bin/python);
#                         it needs torch, setuptools>=64, wheel, ninja and packaging
#   TORCH_CUDA_ARCH_LIST  CUDA architectures (default "8.0;9.0+PTX")
#   FASTCAM_CUDA          1 (default): CUDA kernels required; 0: a CPU-only wheel, named +cputorchX.Y
#   MAX_JOBS              parallel compile jobs (default: setup.py's, from cores and free memory)
#   DIST                  where the wheel goes (default dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DIST=${DIST:-dist}
export FASTCAM_CUDA=${FASTCAM_CUDA:-1}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export FASTCAM_WHEEL_LOCAL_VERSION=1
unset FASTCAM_BUILD_EXT

# What the wheel's name will say; the same function names it in setup.py.
tag=$("$PYTHON" - <<'PY'
import importlib.util, os, torch
spec = importlib.util.spec_from_file_location("fastcam_build", os.path.join("fastcam", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
print(build.local_version(torch.__version__, torch.version.cuda if os.environ["FASTCAM_CUDA"] != "0" else None))
PY
)
echo "fastcam wheel: +$tag, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, FASTCAM_CUDA=$FASTCAM_CUDA, python $("$PYTHON" -c 'import platform; print(platform.python_version())')"

# Stale build/lib* would go into the wheel with the fresh files; the compiled objects
# (build/temp-*) stay, so that only what changed is compiled again.
rm -rf build/lib.* build/bdist.*
mkdir -p "$DIST"
"$PYTHON" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$DIST" .

wheel=$(ls -t "$DIST"/fastcam-*+"$tag"-*.whl | head -n 1)
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("fastcam/_C") and n.endswith(".so")]
assert libs, f"{sys.argv[1]} has no fastcam/_C*.so"
assert not [n for n in names if "csrc" in n.split("/")], "the C++ sources must not be in the wheel"
print(f"{sys.argv[1]}: {len(names)} files, {', '.join(libs)}")
PY
