"""Which backends exist, which are usable here, and which one a call runs on."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import os

import torch

from fastcam._ext import has_kernel, load_extension

BACKEND_NAMES = ("auto", "torch", "cpu", "cuda", "triton")

# Preference of backend="auto" per device type and shape class, fastest first, from the
# benchmarks (BENCHMARKS.md, H200, 2026-11-26; benchmarks/NOTES.md for the CPU). On a GPU the
# cuda backend is the fastest at every SPEC shape (fifth session: 2.1-5.7x the eager reference at
# the 14-class shapes; 2.02-2.06 ms against 2.30-2.32 with 174 classes, where the triton backend
# took 1.92-2.82 ms between runs, so without the cuda backend the reference comes first there).
# The H100 run (sixth session) agrees: cuda the fastest at all six shapes; triton against the
# reference 3.10-4.00 against 3.25-5.65 ms (faster at three of the five 14-class shapes, 4-16%
# slower at two: host-bound), 4.00 against 3.36 at 174 classes.
# On the CPU the cpu backend wins at every shape.
MANY_CLASSES = 64  # a head with more classes (or maps per group) is of the "many" class
_AUTO_ORDER = {
    ("cuda", "few"): ("cuda", "triton", "torch"),
    ("cuda", "many"): ("cuda", "torch"),
    ("cpu", "few"): ("cpu", "torch"),
    ("cpu", "many"): ("cpu", "torch"),
}


def shape_class(classes: int) -> str:
    """``"many"`` for more than MANY_CLASSES classes, else ``"few"`` (backend="auto"'s shape class)."""
    return "many" if classes > MANY_CLASSES else "few"


def auto_order(device_type: str, classes_class: str = "few") -> tuple[str, ...]:
    """The backends backend="auto" tries, in order, for tensors of ``device_type``."""
    return _AUTO_ORDER.get((device_type, classes_class), ("torch",))


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What :func:`fastcam.backends` reports for one backend."""

    name: str
    usable: bool
    device_types: tuple[str, ...]
    version: str | None = None
    reason: str = ""  # why it is not usable; empty when it is
    archs: tuple[str, ...] = ()  # compiled CUDA architectures, where that applies

    def __str__(self) -> str:
        state = "usable" if self.usable else f"not usable: {self.reason}"
        extra = f" {self.version}" if self.version else ""
        archs = f" archs={','.join(self.archs)}" if self.archs else ""
        return f"{self.name}{extra} ({'/'.join(self.device_types)}){archs}: {state}"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _probe() -> dict[str, BackendInfo]:
    built, ext_reason = load_extension()
    compiled_version, archs, cuda_reason = None, (), ext_reason
    if built is not None:
        compiled_version = f"built for torch {built['torch']}"
        if built["cuda"] != "none":
            compiled_version += f", CUDA {built['cuda']}"
        archs = tuple(a for a in built["archs"].split("_") if a and a != "none")
        if not has_kernel("CUDA"):
            cuda_reason = ("fastcam._C was built without CUDA kernels (nvcc was not found, or FASTCAM_CUDA=0); "
                           "rebuild with nvcc on the PATH: `pip install --no-build-isolation -e .`")  # fmt: skip
        elif not torch.cuda.is_available():
            cuda_reason = "torch sees no CUDA device"
    triton_version, triton_reason = _package_version("triton"), ""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_version is None:
        triton_reason = "triton is not installed (it comes with the CUDA builds of torch on Linux)"
    elif not (torch.cuda.is_available() or interpret):
        triton_reason = ("the Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them on CPU tensors, "
                         "slowly, for tests)")  # fmt: skip
    else:
        try:
            importlib.import_module("fastcam.triton.cam_head")
        except Exception as exc:  # noqa: BLE001 - whatever fails to compile or import is the reason
            triton_reason = f"fastcam's Triton kernels failed to load: {exc}"
    triton_devices = ("cuda", "cpu") if interpret else ("cuda",)
    cpu_version = compiled_version
    if built is not None and torch.ops.fastcam.cpu_bf16_gemm():
        units = "AMX tiles, fastcam's kernels" if torch.ops.fastcam.cpu_amx() else "bf16 matrix units, ATen's brgemm"
        cpu_version += f"; bf16 features on the CPU's {units}"
    return {
        "torch": BackendInfo("torch", True, ("cpu", "cuda"), torch.__version__),
        "cpu": BackendInfo("cpu", built is not None, ("cpu",), cpu_version, ext_reason or ""),
        "cuda": BackendInfo("cuda", cuda_reason is None, ("cuda",), compiled_version, cuda_reason or "", archs),
        "triton": BackendInfo("triton", not triton_reason, triton_devices, triton_version, triton_reason),
    }


def backends() -> dict[str, BackendInfo]:
    """Every backend by name, with whether it is usable here, its version and why not."""
    return dict(_probe())


@torch.compiler.assume_constant_result  # torch.compile bakes the choice in, as eager makes it
def resolve_backend(name, device: torch.device, classes_class: str = "few") -> str:
    """The concrete backend that runs a call on tensors of ``device``.

    ``"auto"`` picks the fastest usable backend for the device type and the shape class
    (``shape_class(number of classes)``), the reference (``"torch"``) when nothing compiled is
    usable. A named backend that cannot run here raises :class:`BackendUnavailableError`; a
    name that does not exist, ``ValueError``.
    """
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    infos = _probe()
    if name == "auto":
        for candidate in auto_order(device.type, classes_class):
            if infos[candidate].usable:
                return candidate
        return "torch"
    info = infos[name]
    if not info.usable:
        raise BackendUnavailableError(f"backend={name!r} is not usable here: {info.reason}")
    if device.type not in info.device_types:
        raise ValueError(
            f"backend={name!r} runs on {'/'.join(info.device_types)} tensors, "
            f"but the inputs are on {device}"
        )
    return name
