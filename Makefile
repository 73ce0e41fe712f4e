# The README's commands. Each installs what is missing into .venv, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastcam-installed

.PHONY: demo test bench info clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test,bench]'
	touch $@

demo: $(STAMP)  ## the main job (until `fastcam demo` lands: the quickstart training loop)
	$(PY) examples/quickstart.py

test: $(STAMP)  ## the whole test suite
	$(PY) -m pytest -q

bench: $(STAMP)  ## pytest-benchmark on this machine's device
	$(PY) -m pytest -q benchmarks

info: $(STAMP)
	$(VENV)/bin/fastcam info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
