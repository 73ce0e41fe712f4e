"""Builds the compiled extension ``fastcam._C`` (csrc/) ahead of time; metadata is in pyproject.toml.

torch must be importable while building: ``pip install --no-build-isolation -e .`` (the
Makefile does this). Switches, all environment variables:

  FASTCAM_BUILD_EXT=0     build no extension (the kernels are then JIT-built on first use,
                          see fastcam/_ext.py)
  FASTCAM_CUDA=0|1        leave out / require the CUDA kernels; default: built when nvcc is found
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0+PTX" (A100, H100 and newer via PTX)
  MAX_JOBS                parallel compile jobs, default from the CPU count and free memory
  FASTCAM_DEBUG=1         -O0 -g
  FASTCAM_WHEEL_LOCAL_VERSION=1
                          version the build with what it was built against, e.g.
                          0.1.0+cu130torch2.14 (scripts/build_wheel.sh, `make wheel`);
                          otherwise the plain version from fastcam/__init__.py

Compiled objects are kept in build/temp-<python>-torch<version>/, so that the next build from
this checkout (an editable install, then a wheel) compiles only what changed (ninja).
"""

import importlib.util
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    """One job per core, but at most one per 3 GB of free memory (nvcc is hungry)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gb = int(info["MemAvailable"].split()[0]) / 2**20
        return str(max(1, min(cores, int(free_gb // 3))))
    except (OSError, KeyError, ValueError):
        return str(cores)


def _extensions():
    """(ext_modules, cmdclass, local version or None)"""
    if os.environ.get("FASTCAM_BUILD_EXT", "1") == "0":
        return [], {}, None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # torch is not importable in this build environment
        print(f"fastcam: not building fastcam._C ({exc}); it will be JIT-built on first use", file=sys.stderr)
        return [], {}, None
    build = _load_build_helpers()

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    kwargs, with_cuda = build.extension_kwargs(ROOT, cuda=os.environ.get("FASTCAM_CUDA"),
                                         debug=os.environ.get("FASTCAM_DEBUG") == "1")
    make = CUDAExtension if with_cuda else CppExtension
    ext = make("fastcam._C", **kwargs)
    if with_cuda:
        build.fix_cuda_libraries(ext)
    temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}-torch{torch.__version__}")

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = temp  # also for editable installs, which would compile in a fresh temp folder

    local = build.local_version(torch.__version__, torch.version.cuda if with_cuda else None)
    return [ext], {"build_ext": BuildExt}, local


def _load_build_helpers():
    """fastcam/_build.py, loaded by path: importing the fastcam package would import more."""
    spec = importlib.util.spec_from_file_location("fastcam_build", os.path.join(ROOT, "fastcam", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(local: str | None) -> str:
    with open(os.path.join(ROOT, "fastcam", "__init__.py")) as f:
        version = re.search(r'^__version__ = "([^"]+)"', f.read(), flags=re.M).group(1)
    if os.environ.get("FASTCAM_WHEEL_LOCAL_VERSION") != "1":
        return version
    if local is None:
        sys.exit("fastcam: FASTCAM_WHEEL_LOCAL_VERSION=1 needs fastcam._C (torch importable, FASTCAM_BUILD_EXT not 0)")
    return f"{version}+{local}"


_ext_modules, _cmdclass, _local = _extensions()
setup(version=_version(_local), ext_modules=_ext_modules, cmdclass=_cmdclass)
