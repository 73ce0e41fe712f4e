"""cam_head (logits and all class maps) forward, backward, and forward + backward, per
contender: each usable backend (``torch`` is the reference, imported as a backend of fastcam)
and the torch.compile baselines of the reference, on the SPEC §5 shapes: their batch on a GPU,
batch 2 on the CPU. Run: ``make bench`` (or ``pytest benchmarks``)."""

import pytest
import torch
from _common import CONTENDERS, DEVICE, SHAPES, implementation, skip_unless_compiled_here, sync

import fastcam
from fastcam.workloads import make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("part", ["fwd", "bwd", "fwd+bwd"])
def test_cam_head(benchmark, contender, shape, part):
    skip_unless_compiled_here(contender, shape)
    f, w, b, _, _ = make_inputs(shape, device=DEVICE)
    head = implementation(contender, lambda f, w, b, backend: fastcam.cam_head(f, w, b, backend=backend))
    g = torch.Generator().manual_seed(1)
    grad_logits = torch.randn(shape.B, shape.C, generator=g).to(DEVICE, f.dtype)
    grad_cams = torch.randn(shape.B, shape.C, shape.H, shape.W, generator=g).to(DEVICE)
    if shape.tokens:
        grad_cams = grad_cams.flatten(2)

    def forward():
        return head(f, w, b)

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
