"""cam_head (logits and all class maps) forward, backward, and forward + backward, per usable
backend (``torch`` is the reference, imported as a backend of fastcam) on the SPEC §5 shapes:
their batch on a GPU, batch 2 on the CPU. Run: ``make bench`` (or ``pytest benchmarks``)."""

import pytest
import torch
from _common import BACKENDS, DEVICE, SHAPES, sync

import fastcam
from fastcam.workloads import make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("part", ["fwd", "bwd", "fwd+bwd"])
def test_cam_head(benchmark, backend, shape, part):
    f, w, b, _, _ = make_inputs(shape, device=DEVICE)
    g = torch.Generator().manual_seed(1)
    grad_logits = torch.randn(shape.B, shape.C, generator=g).to(DEVICE, f.dtype)
    grad_cams = torch.randn(shape.B, shape.C, shape.H, shape.W, generator=g).to(DEVICE)
    if shape.tokens:
        grad_cams = grad_cams.flatten(2)

    def forward():
        return fastcam.cam_head(f, w, b, backend=backend)

    def backward(out):
        torch.autograd.grad(out, (f, w, b), (grad_logits, grad_cams), retain_graph=part == "bwd")

    if part == "fwd":
        def run():
            with torch.no_grad():
                out = forward()
            sync()
            return out
    elif part == "bwd":
        out = forward()

        def run():
            backward(out)
            sync()
    else:
        def run():
            backward(forward())
            sync()

    benchmark.group = f"cam_head {part} {shape.name}"
    benchmark(run)
