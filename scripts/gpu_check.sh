#!/usr/bin/env bash
# The one prepared GPU check (run it whenever a GPU is at hand, e.g. through the device tool):
#   1. builds fastcam._C here with its CUDA kernels (a binary built elsewhere will not load);
#   2. runs the whole test suite on every usable backend, CUDA tensors included;
#   3. runs compute-sanitizer memcheck on a small fwd+bwd of every CUDA op;
#   4. prints the benchmark tables (backends side by side; pytest-benchmark; `fastcam bench`, the
#      SPEC section 5 table; `fastcam bench --e2e`, whole ResNet-50 steps; the torch.compile
#      baselines last; the last two time-limited).
# It is sized for a few minutes on one H100/H200 (build for the card's arch only).
# Everything it prints also lands in $OUT (default gpu-check/), for BENCHMARKS.md.
# Environment: TORCH_CUDA_ARCH_LIST (default: the arch of GPU 0), MAX_JOBS, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "versions"
$PYTHON - <<'PY' | tee "$OUT/versions.txt"
import platform, subprocess, torch
print("date", subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton none")
print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
PY

step "build fastcam._C with CUDA kernels"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST
fi
export FASTCAM_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
required=torch,cpu,cuda,triton
if $PYTHON setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - start )) s for sm ${TORCH_CUDA_ARCH_LIST}"
else
  # Keep going: the torch and triton backends can still be tested on the GPU.
  grep -E "error" "$OUT/build.log" | head -30; echo "BUILD FAILED (see $OUT/build.log)"; status=1
  required=torch,triton
  export FASTCAM_JIT=0
fi
$PYTHON -m fastcam.cli info | tee "$OUT/info.txt"

step "tests on every usable backend (CUDA included)"
# The device image has no torchvision, matplotlib, scikit-learn or tqdm (no network to add them):
# the tests that need them (models, README example, demo, AUC) run in CI.
ignore=()
$PYTHON -c "import torchvision" 2>/dev/null || ignore+=(--ignore=tests/test_models.py --ignore=tests/test_readme.py)
$PYTHON -c "import matplotlib, sklearn, tqdm" 2>/dev/null || ignore+=(--ignore=tests/test_demo.py)
$PYTHON -c "import sklearn" 2>/dev/null || ignore+=(--ignore=tests/test_metrics.py)
FASTCAM_REQUIRE_BACKENDS=$required $PYTHON -m pytest -q -p no:cacheprovider tests "${ignore[@]}" \
  --deselect tests/test_build.py::test_jit_build_on_first_use > "$OUT/tests.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"

step "compute-sanitizer memcheck"
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 9 $PYTHON scripts/memcheck_case.py > "$OUT/memcheck.log" 2>&1 \
    || status=1
  tail -5 "$OUT/memcheck.log"
else
  echo "compute-sanitizer not found"; status=1
fi

step "benchmarks"
$PYTHON benchmarks/compare_backends.py --spec --reps 20 2>&1 | tee "$OUT/compare_backends.txt"
$PYTHON -m pytest -q -p no:cacheprovider benchmarks --benchmark-max-time=0.25 --benchmark-columns=min,median,iqr \
  --benchmark-json "$OUT/benchmarks.json" 2>&1 | tee "$OUT/benchmarks.txt" | grep -vE "^(\.|$)" | tail -80

step "fastcam bench: the SPEC section 5 table (eager, Grad-CAM, backends; then with torch.compile)"
$PYTHON -m fastcam.cli bench --skip compile reduce-overhead --json "$OUT/bench_eager.json" 2>&1 \
  | tee "$OUT/bench_eager.txt"
step "fastcam bench --e2e: whole ResNet-50 training steps (SPEC section 5 item 6)"
timeout "${FASTCAM_BENCH_E2E_S:-180}" $PYTHON -m fastcam.cli bench --e2e --json "$OUT/bench_e2e.json" 2>&1 \
  | tee "$OUT/bench_e2e.txt" || echo "fastcam bench --e2e did not finish"
# Compiling the reference takes tens of seconds per shape and mode: last, and time-limited.
timeout "${FASTCAM_BENCH_COMPILE_S:-240}" $PYTHON -m fastcam.cli bench --json "$OUT/bench.json" 2>&1 \
  | tee "$OUT/bench.txt" | grep -vE "^[WI][0-9]{4} " || echo "fastcam bench with torch.compile did not finish"

exit $status
