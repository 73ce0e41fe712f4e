"""Loading of the compiled extension ``fastcam._C`` (CPU and CUDA kernels, csrc/).

``fastcam._C`` is built ahead of time by setup.py. When it is missing (installed without
building) and the sources are at hand, it is built on first use with
``torch.utils.cpp_extension.load`` and cached by torch (``FASTCAM_JIT=0`` turns that off).
Kernels never import this module; the functional API asks it whether the extension is
there and, if not, why.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch


@functools.cache
def load_extension():
    """``(build_info, None)`` once the ops are registered, else ``(None, reason)``.

    ``build_info`` maps "torch", "cuda" and "archs" to what the library was built for.
    """
    try:
        importlib.import_module("fastcam._C")
    except ImportError as exc:
        if os.environ.get("FASTCAM_JIT", "1") == "0":
            return None, (f"the compiled extension fastcam._C is not built ({exc}) and FASTCAM_JIT=0; "
                          "build it with `pip install --no-build-isolation -e .`")  # fmt: skip
        from fastcam import _build

        try:
            print("fastcam: fastcam._C is not built; compiling it now (once, cached by torch)", file=sys.stderr)
            _build.jit_load()
        except Exception as jit_exc:  # noqa: BLE001 - any build failure becomes the reason
            return None, (f"the compiled extension fastcam._C is not built ({exc}) and building it on first "
                          f"use failed ({jit_exc}); build it with `pip install --no-build-isolation -e .`")  # fmt: skip
    info = dict(item.split("=", 1) for item in torch.ops.fastcam.build_info().split())
    mismatch = version_mismatch(info, torch.__version__, torch.version.cuda)
    if mismatch:
        return None, mismatch
    importlib.import_module("fastcam._ops")  # the ops' fake kernels
    return info, None


def version_mismatch(built: dict, torch_version: str, cuda_version: str | None) -> str | None:
    """Why a library built for ``built`` (build_info: "torch", "cuda") must not run under this
    torch, or None. torch must match in major.minor (its C++ ABI changes between minor
    releases) and the CUDA kernels' major version must be the running torch's."""
    from packaging.version import InvalidVersion, Version

    rebuild = ("rebuild it for this torch: `pip install --no-build-isolation -e .` in a checkout "
               "(or install a fastcam build made for this torch)")  # fmt: skip
    try:
        have, want = Version(torch_version).release[:2], Version(built["torch"]).release[:2]
    except (InvalidVersion, KeyError):
        return None  # an unknown build (e.g. a hand-made one): nothing to compare
    if have != want:
        return (f"fastcam._C was built for torch {built['torch']} but torch {torch_version} is running; "
                + rebuild)  # fmt: skip
    built_cuda = built.get("cuda", "none")
    if built_cuda != "none" and cuda_version is not None:
        if Version(built_cuda).release[:1] != Version(cuda_version).release[:1]:
            return (f"fastcam._C's CUDA kernels were built with CUDA {built_cuda} but this torch uses CUDA "
                    f"{cuda_version}; " + rebuild)  # fmt: skip
    return None


def has_kernel(device_type: str) -> bool:
    """Whether the loaded library has kernels for ``device_type`` ("CPU" or "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastcam::cam_head", device_type)
