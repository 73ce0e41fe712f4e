"""What the benchmark files share: the device, the contenders usable on it and the shapes
(SPEC §5 at their batch on a GPU, batch 2 on the CPU so that the suite takes seconds).

The contenders are fastcam's usable backends (``torch`` is the reference) and the
``torch.compile`` baselines of that reference, ``compile`` (default mode) and, on a GPU,
``reduce-overhead`` (CUDA graphs). Compiling takes tens of seconds a graph on two CPU cores, so
on the CPU the baselines run at one shape (COMPILE_SHAPES); ``FASTCAM_BENCH_COMPILE=all``
runs them at every shape, ``=none`` at none.
"""

import os

import torch

import fastcam
from fastcam.workloads import SPEC_SHAPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [n for n, b in fastcam.backends().items() if b.usable and DEVICE in b.device_types]
SHAPES = SPEC_SHAPES if DEVICE == "cuda" else [s.scaled(2) for s in SPEC_SHAPES]
COMPILE_MODES = ["compile"] + (["reduce-overhead"] if DEVICE == "cuda" else [])
_which = os.environ.get("FASTCAM_BENCH_COMPILE", "all" if DEVICE == "cuda" else "one")
COMPILE_SHAPES = {"all": {s.name for s in SHAPES}, "none": set()}.get(_which, {"resnet50@224"})
CONTENDERS = BACKENDS + COMPILE_MODES


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def skip_unless_compiled_here(contender: str, shape) -> None:
    """Skip a torch.compile baseline at a shape where this run does not compile (see above)."""
    import pytest

    if contender in COMPILE_MODES and shape.name not in COMPILE_SHAPES:
        pytest.skip(f"{contender} baseline only at {sorted(COMPILE_SHAPES)} here (FASTCAM_BENCH_COMPILE=all)")


def implementation(contender: str, reference_fn):
    """``reference_fn(*args, backend=...)`` for a fastcam backend; for a compile mode, the
    reference (backend="torch") compiled in that mode, compiled afresh for each benchmark."""
    if contender not in COMPILE_MODES:
        return lambda *args: reference_fn(*args, backend=contender)
    torch._dynamo.reset()  # each benchmark compiles its own graph, not against dynamo's recompile limit
    mode = "default" if contender == "compile" else contender
    return torch.compile(lambda *args: reference_fn(*args, backend="torch"), mode=mode, dynamic=False)
