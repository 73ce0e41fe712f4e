"""pairwise_overlap of every pair of class maps of an image (the distinctiveness term's
overlaps), forward, backward, and forward + backward, per contender (each usable backend and
the torch.compile baselines of the reference) and measure, on the maps of the SPEC §5 shapes
(their batch on a GPU, batch 2 on the CPU). Run: ``make bench``."""

import pytest
import torch
from _common import CONTENDERS, DEVICE, SHAPES, implementation, skip_unless_compiled_here, sync

import fastcam

MEASURES = ("cosine", "dice")  # a Gram-matrix measure and a min/sum one


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("part", ["fwd", "bwd", "fwd+bwd"])
def test_pairwise_overlap(benchmark, contender, shape, measure, part):
    skip_unless_compiled_here(contender, shape)
    g = torch.Generator().manual_seed(2)
    cams = torch.rand(shape.B, shape.C, shape.N, generator=g).to(DEVICE).requires_grad_(part != "fwd")
    grad = torch.randn(shape.B, shape.C, shape.C, generator=g).to(DEVICE)
    overlap = implementation(contender, lambda c, backend: fastcam.pairwise_overlap(c, measure=measure,
                                                                                     backend=backend))  # fmt: skip

    if part == "fwd":
        def run():
            out = overlap(cams)
            sync()
            return out
    elif part == "bwd":
        out = overlap(cams)

        def run():
            torch.autograd.grad(out, cams, grad, retain_graph=True)
            sync()
    else:
        def run():
            torch.autograd.grad(overlap(cams), cams, grad)
            sync()

    benchmark.group = f"pairwise_overlap {part} {measure} {shape.name}"
    benchmark(run)
