#!/usr/bin/env bash
# The one prepared GPU check (run it whenever a GPU is at hand, e.g. through the device tool):
#   build     builds fastcam._C here with its CUDA kernels (a binary built elsewhere will not load);
#   compile-warm  compiles the torch.compile baselines in the background (while the tests run), so
#             that the compile stage finds them in torch's caches;
#   tests     runs the test suite on CUDA tensors for every GPU backend (torch, cuda, triton; the
#             tests on CPU tensors are CI's), in parallel with pytest-xdist where it is installed;
#   variants  the cuda backend's other GEMM paths (GPU_CHECK_VARIANTS, environment assignments;
#             default: FASTCAM_CUDA_MMA=0, the SIMT kernels; FASTCAM_CUDA_GEMM=cublas and =kernels,
#             S and dF forced onto cuBLAS or the kernels; FASTCAM_CUDA_OVERLAP=tiles, the tiled
#             overlap kernels for groups of every size): their tests and memcheck, every path's bench;
#   memcheck  compute-sanitizer memcheck on a small fwd+bwd of every CUDA op and Triton kernel;
#   triton-tune  benchmarks/triton_tune.py: the Triton GEMMs' autotuning at the SPEC shapes (first-step
#             time, each configuration's time, the GEMM ops against their bytes);
#   compare   benchmarks/compare_backends.py --spec: the backends side by side at the SPEC batches;
#   profile   benchmarks/profile_step.py: the kernels of one step per backend and shape (torch.profiler);
#   bench     `fastcam bench` without the torch.compile baselines (SPEC section 5 table, eager part);
#   e2e       `fastcam bench --e2e`: whole ResNet-50 training steps;
#   compile   `fastcam bench` with the torch.compile baselines (tens of seconds per shape and mode);
#   pytest-bench  the pytest-benchmark suite (benchmarks/), short.
# GPU_CHECK_STAGES picks and orders them (default: all, in the order above); each stage is
# time-limited (GPU_CHECK_<STAGE>_S seconds), so a check sized for a lease ends with its logs.
# Without the build stage, a fastcam/_C*.so already in place (e.g. from an earlier run's $OUT) is used.
# Everything lands in $OUT (default gpu-check/): check.log (all of it), build.log, tests.log,
# memcheck.log, bench*.json; BENCHMARKS.md records the results.
# Environment: TORCH_CUDA_ARCH_LIST (default: the arch of GPU 0), MAX_JOBS, PYTHON,
# GPU_CHECK_TESTS_K (pytest -k of the tests stage, default "cuda or test_triton":
# the ids of CUDA cases, and tests/test_triton.py, which runs on CUDA where there is a GPU), GPU_CHECK_WORKERS (xdist),
# GPU_CHECK_SHAPES (shapes of the bench and compile stages, default the six of SPEC section 5).
# Through the device tool (15 min of device time a session, a machine starting in ~30 s), one
# call that fits (2026-11-26, H200, 358 s in all: build 37 s, triton-tune 60 s, tests 88 s,
# one variant 75 s, memcheck 11 s, profile 22 s, the compile stage's bench 48 s after the
# background warm-up), its logs tarred into the tool's $OUT (an outer timeout keeps the tar):
#   GPU_CHECK_STAGES="build triton-tune compile-warm tests variants memcheck profile compile" OUT=/tmp/gc \
#     timeout 540 bash scripts/gpu_check.sh; (cd /tmp/gc && tar czf $OUT/gc.tgz *)
# On an H100 machine (2026-11-26, sixth session; its host slower): build 59 s, tests 152 s (the
# compiled steps autotuned 36 of them), two variants with three benches 179 s, memcheck 14 s,
# profile 41 s, compile 50 s after the warm-up; e2e ~55 s a row (GPU_CHECK_E2E_S >= 170 for three).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
STAGES=${GPU_CHECK_STAGES:-build compile-warm tests variants memcheck triton-tune compare profile bench e2e compile pytest-bench}
status=0
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
limit() {  # limit STAGE DEFAULT_S: the stage's time limit
  local var="GPU_CHECK_$(echo "$1" | tr 'a-z-' 'A-Z_')_S"
  echo "${!var:-$2}"
}
# The scripts under scripts/ and benchmarks/ import fastcam from this checkout.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "versions"
$PYTHON - <<'PY'
import platform, subprocess, torch
print("date", subprocess.run(["date", "-u", "+%Y-%m-%d"], capture_output=True, text=True).stdout.strip())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| sm %d.%d" % torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "")
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton none")
print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
PY
echo "stages: $STAGES"

required=torch,triton
# pytest's options in the test stages: parallel with pytest-xdist, a time limit per test, where installed.
pytest_base=(-q -p no:cacheprovider -rfE --tb=short)
$PYTHON -c "import pytest_timeout" 2>/dev/null && pytest_base+=(--timeout 300)
if $PYTHON -c "import xdist" 2>/dev/null; then
  pytest_base+=(-n "${GPU_CHECK_WORKERS:-$(( $(nproc) < 12 ? $(nproc) : 12 ))}")
fi
# The tests and memcheck run one configuration per Triton GEMM (the summed dimensions' blocks
# are fixed, so the configuration changes no result): autotuning every test's shape would take
# minutes, and under compute-sanitizer much longer. The timing stages tune.
untuned() { FASTCAM_TRITON_AUTOTUNE=${FASTCAM_TRITON_AUTOTUNE:-0} "$@"; }
tag_of() { echo "$1" | tr -c 'A-Za-z0-9\n' '_'; }  # a file-name tag of a variant
for stage in $STAGES; do
  case $stage in
  build)
    step "build fastcam._C with CUDA kernels"
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
      TORCH_CUDA_ARCH_LIST=$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
      export TORCH_CUDA_ARCH_LIST
    fi
    export FASTCAM_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
    start=$(date +%s)
    if timeout "$(limit build 300)" $PYTHON setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
      echo "built in $(( $(date +%s) - start )) s for sm ${TORCH_CUDA_ARCH_LIST}"
      required=torch,cpu,cuda,triton
    else
      # Keep going: the torch and triton backends can still be tested on the GPU.
      grep -E "error|Error" "$OUT/build.log" | head -30; echo "BUILD FAILED (see $OUT/build.log)"; status=1
      export FASTCAM_JIT=0
    fi
    $PYTHON -m fastcam.cli info
    ;;
  compile-warm)
    step "compile the torch.compile baselines in the background (scripts/warm_compile_cache.py)"
    timeout "$(limit compile-warm 400)" $PYTHON scripts/warm_compile_cache.py ${GPU_CHECK_SHAPES:-} \
      > "$OUT/compile_warm.log" 2>&1 &
    warm_pid=$!
    ;;
  tests)
    step "tests on CUDA tensors, every GPU backend (-k ${GPU_CHECK_TESTS_K:-cuda or test_triton})"
    args=("${pytest_base[@]}" -k "${GPU_CHECK_TESTS_K:-cuda or test_triton}")
    # A fastcam._C that did not build must not pass as "not usable here".
    ls fastcam/_C*.so > /dev/null 2>&1 && required=torch,cpu,cuda,triton
    start=$(date +%s)
    FASTCAM_REQUIRE_BACKENDS=$required untuned timeout "$(limit tests 420)" $PYTHON -m pytest "${args[@]}" tests \
      --deselect tests/test_build.py::test_jit_build_on_first_use > "$OUT/tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -60
    tail -2 "$OUT/tests.log"
    # The compiled training steps again with the Triton GEMMs autotuned (inductor tunes user
    # kernels' configurations itself).
    FASTCAM_TRITON_AUTOTUNE=1 timeout 180 $PYTHON -m pytest "${pytest_base[@]}" -k "compiled and (triton or cuda)" \
      tests > "$OUT/tests_compiled_tuned.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)" "$OUT/tests_compiled_tuned.log" | cut -c1-300 | head -20
    tail -1 "$OUT/tests_compiled_tuned.log" | sed "s/^/compiled steps, Triton autotuned: /"
    echo "tests took $(( $(date +%s) - start )) s"
    ;;
  variants)
    # The cuda backend's other paths, each an environment assignment (GPU_CHECK_VARIANTS;
    # csrc/cuda/cam_head.cu, cam_head_binding.cpp, overlap.cuh): each one's tests and memcheck,
    # then every path's bench beside the default's.
    variants=${GPU_CHECK_VARIANTS:-FASTCAM_CUDA_MMA=0 FASTCAM_CUDA_GEMM=cublas FASTCAM_CUDA_GEMM=kernels FASTCAM_CUDA_OVERLAP=tiles}
    for v in $variants; do
      tag=$(tag_of "$v")
      step "$v: the cuda backend's tests and memcheck"
      untuned env "$v" timeout "$(limit variants 150)" $PYTHON -m pytest "${pytest_base[@]}" -k "cuda-cuda" \
        tests > "$OUT/tests_$tag.log" 2>&1 || status=1
      grep -E "^(FAILED|ERROR)" "$OUT/tests_$tag.log" | cut -c1-300 | head -30
      tail -1 "$OUT/tests_$tag.log"
      if command -v compute-sanitizer > /dev/null; then
        untuned env "$v" timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
          $PYTHON scripts/memcheck_case.py > "$OUT/memcheck_$tag.log" 2>&1 || status=1
        grep -E "ERROR SUMMARY" "$OUT/memcheck_$tag.log" | sed "s/^/$v /"
      fi
    done
    for v in default $variants; do
      tag=$(tag_of "$v")
      env $([ "$v" = default ] || echo "$v") timeout 45 $PYTHON -m fastcam.cli bench --backends cuda \
        --skip compile reduce-overhead gradcam ${GPU_CHECK_SHAPES:+--shapes $GPU_CHECK_SHAPES} \
        --json "$OUT/bench_cuda_$tag.json" | sed "s/^/$v  /"
    done
    ;;
  memcheck)
    step "compute-sanitizer memcheck"
    if command -v compute-sanitizer > /dev/null; then
      untuned timeout "$(limit memcheck 180)" compute-sanitizer --tool memcheck --error-exitcode 9 \
        $PYTHON scripts/memcheck_case.py > "$OUT/memcheck.log" 2>&1 || status=1
      grep -E "ERROR SUMMARY|Invalid|memcheck" "$OUT/memcheck.log" | head -20
    else
      echo "compute-sanitizer not found"; status=1
    fi
    ;;
  triton-tune)
    step "benchmarks/triton_tune.py: the Triton GEMMs' autotuning"
    timeout "$(limit triton-tune 150)" $PYTHON benchmarks/triton_tune.py ${GPU_CHECK_SHAPES:+--shapes $GPU_CHECK_SHAPES} \
      --json "$OUT/triton_tune.json" > "$OUT/triton_tune.log" 2>&1 || status=1
    grep -A20 "^shape " "$OUT/triton_tune.log" || tail -20 "$OUT/triton_tune.log"
    ;;
  compare)
    step "benchmarks/compare_backends.py --spec"
    timeout "$(limit compare 150)" $PYTHON benchmarks/compare_backends.py --spec --reps 20 || status=1
    ;;
  bench)
    step "fastcam bench: the SPEC section 5 table, eager reference, Grad-CAM and the backends"
    timeout "$(limit bench 240)" $PYTHON -m fastcam.cli bench --skip compile reduce-overhead \
      ${GPU_CHECK_SHAPES:+--shapes $GPU_CHECK_SHAPES} --json "$OUT/bench_eager.json" || status=1
    ;;
  e2e)
    step "fastcam bench --e2e: whole ResNet-50 training steps (SPEC section 5 item 6)"
    timeout "$(limit e2e 180)" $PYTHON -m fastcam.cli bench --e2e --json "$OUT/bench_e2e.json" \
      || echo "fastcam bench --e2e did not finish"
    ;;
  compile)
    if [ -n "${warm_pid:-}" ]; then
      step "waiting for the background compiles"; wait "$warm_pid"; grep -v "^[WI][0-9]" "$OUT/compile_warm.log" | tail -8
    fi
    step "fastcam bench with the torch.compile baselines"
    timeout "$(limit compile 300)" $PYTHON -m fastcam.cli bench ${GPU_CHECK_SHAPES:+--shapes $GPU_CHECK_SHAPES} \
      --json "$OUT/bench.json" 2>&1 | grep -vE "^[WI][0-9]{4} " || echo "fastcam bench with torch.compile did not finish"
    ;;
  profile)
    step "benchmarks/profile_step.py: the kernels of a step per backend and shape"
    timeout "$(limit profile 120)" $PYTHON benchmarks/profile_step.py ${GPU_CHECK_SHAPES:+--shapes $GPU_CHECK_SHAPES} \
      > "$OUT/profile.log" 2>&1 || status=1
    grep -A5 "^###" "$OUT/profile.log" | grep -E "^###|^ +[A-Za-z_]" | cut -c1-130 | head -60
    ;;
  pytest-bench)
    step "pytest-benchmark suite"
    timeout "$(limit pytest-bench 240)" $PYTHON -m pytest -q -p no:cacheprovider benchmarks \
      --benchmark-max-time=0.25 --benchmark-columns=min,median,iqr --benchmark-json "$OUT/benchmarks.json" \
      > "$OUT/benchmarks.txt" 2>&1 || status=1
    grep -vE "^(\.|$)" "$OUT/benchmarks.txt" | tail -80
    ;;
  *)
    echo "unknown stage $stage (GPU_CHECK_STAGES)"; status=1
    ;;
  esac
done
step "done, status $status"
exit $status
