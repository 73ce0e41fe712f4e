"""What the benchmark files share: the device, the backends usable on it and the shapes
(SPEC §5 at their batch on a GPU, batch 2 on the CPU so that the suite takes seconds)."""

import torch

import fastcam
from fastcam.workloads import SPEC_SHAPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [n for n, b in fastcam.backends().items() if b.usable and DEVICE in b.device_types]
SHAPES = SPEC_SHAPES if DEVICE == "cuda" else [s.scaled(2) for s in SPEC_SHAPES]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
