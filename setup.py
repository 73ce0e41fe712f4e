"""Builds the compiled extension ``fastcam._C`` (csrc/) ahead of time; metadata is in pyproject.toml.

torch must be importable while building: ``pip install --no-build-isolation -e .`` (the
Makefile does this). Switches, all environment variables:

  FASTCAM_BUILD_EXT=0     build no extension (the kernels are then JIT-built on first use,
                          see fastcam/_ext.py)
  FASTCAM_CUDA=0|1        leave out / require the CUDA kernels; default: built when nvcc is found
  TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0+PTX" (A100, H100 and newer via PTX)
  MAX_JOBS                parallel compile jobs, default from the CPU count and free memory
  FASTCAM_DEBUG=1         -O0 -g
"""

import importlib.util
import os
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
    if os.environ.get("FASTCAM_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # torch is not importable in this build environment
        print(f"fastcam: not building fastcam._C ({exc}); it will be JIT-built on first use", file=sys.stderr)
        return [], {}
    build = _load_build_helpers()

    os.environ.setdefault("MAX_JOBS", _max_jobs())
    kwargs, with_cuda = build.extension_kwargs(ROOT, cuda=os.environ.get("FASTCAM_CUDA"),
                                         debug=os.environ.get("FASTCAM_DEBUG") == "1")
    make = CUDAExtension if with_cuda else CppExtension
    ext = make("fastcam._C", **kwargs)
    if with_cuda:
        build.fix_cuda_libraries(ext)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _load_build_helpers():
    """fastcam/_build.py, loaded by path: importing the fastcam package would import more."""
    spec = importlib.util.spec_from_file_location("fastcam_build", os.path.join(ROOT, "fastcam", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ext_modules, _cmdclass = _extensions()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
