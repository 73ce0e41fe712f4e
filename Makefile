# The README's commands. Each installs what is missing into .venv, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastcam-installed
BUILD_DEPS := $(VENV)/.fastcam-build-deps
CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: demo test bench info wheel wheel-check clean

# torch first: building fastcam._C (csrc/) needs it importable (--no-build-isolation).
$(BUILD_DEPS):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install 'torch>=2.4' torchvision 'setuptools>=64' wheel ninja packaging
	touch $@

$(STAMP): pyproject.toml setup.py fastcam/_build.py $(CSRC) | $(BUILD_DEPS)
	$(PY) -m pip install --no-build-isolation -e '.[test,bench]'
	touch $@

demo: $(STAMP)  ## the main job: `fastcam demo` (SPEC §6)
	$(VENV)/bin/fastcam demo

test: $(STAMP)  ## the whole test suite, on every backend usable here, and each benchmark once
	$(PY) -m pytest -q
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable

bench: $(STAMP)  ## pytest-benchmark on this machine's device
	$(PY) -m pytest -q benchmarks

info: $(STAMP)
	$(VENV)/bin/fastcam info

wheel: $(BUILD_DEPS)  ## dist/fastcam-<ver>+cu<XY>torch<X.Y>-*.whl for .venv's torch (TORCH_CUDA_ARCH_LIST, MAX_JOBS)
	PYTHON=$(PY) scripts/build_wheel.sh

wheel-check:  ## the newest dist/ wheel installed in a fresh venv (deleted after), smoke-tested outside the checkout
	PYTHON=$(PY) scripts/wheel_check.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks fastcam/*.so
