"""Loading of the compiled extension ``fastcam._C`` (CPU and CUDA kernels, csrc/).

``fastcam._C`` is built ahead of time by setup.py. When it is missing (installed without
building) and the sources are at hand, it is built on first use with
``torch.utils.cpp_extension.load`` and cached by torch (``FASTCAM_JIT=0`` turns that off).
A wheel (scripts/build_wheel.sh) ships ``fastcam._C`` without the sources: built for another
torch, it is not used, and the reason names the wheel or the command that builds it.
Kernels never import this module; the functional API asks it whether the extension is
there and, if not, why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import sys
import sysconfig

import torch


@functools.cache
def load_extension():
    """``(build_info, None)`` once the ops are registered, else ``(None, reason)``.

    ``build_info`` maps "torch", "cuda" and "archs" to what the library was built for.
    """
    try:
        importlib.import_module("fastcam._C")
    except ImportError as exc:
        from fastcam import _build

        # Built for another torch, the library usually fails to load (undefined symbols) before
        # build_info can be asked; the string is read from the file instead. Where the sources
        # are at hand (a checkout), the JIT build below replaces it.
        built = build_info_from_file()
        mismatch = version_mismatch(built, torch.__version__, torch.version.cuda) if built else None
        if mismatch and (os.environ.get("FASTCAM_JIT", "1") == "0" or _build.find_csrc() is None):
            return None, f"{mismatch} (loading it failed: {exc})"
        if os.environ.get("FASTCAM_JIT", "1") == "0":
            return None, (f"the compiled extension fastcam._C is not built ({exc}) and FASTCAM_JIT=0; "
                          "build it with `pip install --no-build-isolation -e .`")  # fmt: skip
        try:
            print("fastcam: fastcam._C is not built; compiling it now (once, cached by torch)", file=sys.stderr)
            _build.jit_load()
        except Exception as jit_exc:  # noqa: BLE001 - any build failure becomes the reason
            return None, (f"the compiled extension fastcam._C is not built ({exc}) and building it on first "
                          f"use failed ({jit_exc}); build it with `pip install --no-build-isolation -e .`")  # fmt: skip
    info = parse_build_info(torch.ops.fastcam.build_info())
    mismatch = version_mismatch(info, torch.__version__, torch.version.cuda)
    if mismatch:
        return None, mismatch
    importlib.import_module("fastcam._ops")  # the ops' fake kernels
    return info, None


def parse_build_info(text: str) -> dict[str, str]:
    """fastcam::build_info()'s "torch=2.14.1+cu130 cuda=13.0 archs=8.0_9.0+PTX" as a dict."""
    return dict(item.split("=", 1) for item in text.split())


def build_info_from_file(path: str | None = None) -> dict[str, str] | None:
    """The build info compiled into the fastcam._C file (default: the one Python would import),
    read without loading it; None where there is no such file or string."""
    if path is None:
        try:
            spec = importlib.util.find_spec("fastcam._C")
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec is not None else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        found = re.search(rb"torch=[^\s\x00]+ cuda=[^\s\x00]+ archs=[^\s\x00]+(?=\x00)", f.read())
    return parse_build_info(found.group().decode("ascii", "replace")) if found else None


def rebuild_hint(built: dict, torch_version: str, cuda_version: str | None) -> str:
    """What to install or build for the running torch: the wheel's name, the exact command."""
    from fastcam._build import DEFAULT_ARCH_LIST, local_version

    archs = built.get("archs", "none").replace("_", ";")
    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    wheel = f"fastcam-*+{local_version(torch_version, cuda_version)}-{py}-{py}-{platform}.whl"
    if archs == "none":
        archs = DEFAULT_ARCH_LIST
    env = f'TORCH_CUDA_ARCH_LIST="{archs}"' if cuda_version else "FASTCAM_CUDA=0"
    return (f"install the fastcam wheel built for this torch ({wheel}), or build it in a fastcam checkout: "
            f"`PYTHON={sys.executable} {env} scripts/build_wheel.sh` (`{env} make wheel` with the checkout's "
            "own .venv), or, to develop there, `pip install --no-build-isolation -e .`")  # fmt: skip


def version_mismatch(built: dict, torch_version: str, cuda_version: str | None) -> str | None:
    """Why a library built for ``built`` (build_info: "torch", "cuda", "archs") must not run
    under this torch, or None; the reason ends with what to install or build instead. torch
    must match in major.minor (its C++ ABI changes between minor releases) and the CUDA
    kernels' major version must be the running torch's."""
    from packaging.version import InvalidVersion, Version

    try:
        have, want = Version(torch_version).release[:2], Version(built["torch"]).release[:2]
    except (InvalidVersion, KeyError):
        return None  # an unknown build (e.g. a hand-made one): nothing to compare
    rebuild = rebuild_hint(built, torch_version, cuda_version)
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
