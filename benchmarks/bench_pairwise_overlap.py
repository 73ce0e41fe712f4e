"""pairwise_overlap of every pair of class maps of an image (the distinctiveness term's
overlaps), forward and forward + backward, per usable backend and measure, on the maps of the
SPEC §5 shapes (their batch on a GPU, batch 2 on the CPU). Run: ``make bench``."""

import pytest
import torch
from _common import BACKENDS, DEVICE, SHAPES, sync

import fastcam

MEASURES = ("cosine", "dice")  # a Gram-matrix measure and a min/sum one


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("part", ["fwd", "fwd+bwd"])
def test_pairwise_overlap(benchmark, backend, shape, measure, part):
    g = torch.Generator().manual_seed(2)
    cams = torch.rand(shape.B, shape.C, shape.N, generator=g).to(DEVICE).requires_grad_(part != "fwd")
    grad = torch.randn(shape.B, shape.C, shape.C, generator=g).to(DEVICE)

    def run():
        out = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
        if part != "fwd":
            torch.autograd.grad(out, cams, grad)
        sync()

    benchmark.group = f"pairwise_overlap {part} {measure} {shape.name}"
    benchmark(run)
