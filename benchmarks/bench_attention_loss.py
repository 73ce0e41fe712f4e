"""attention_loss forward + backward (the unit of work of SPEC §5) per usable backend.

On the CPU the SPEC shapes run at batch 2 so that the suite takes seconds; on a GPU at
their full batch. Run: ``make bench`` (or ``pytest benchmarks``).
"""

import pytest
import torch
from _common import BACKENDS, DEVICE, SHAPES, sync

import fastcam
from fastcam.workloads import make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_loss_fwd_bwd(benchmark, backend, shape):
    features, weight, bias, labels, mask = make_inputs(shape, device=DEVICE)

    def step():
        out = fastcam.attention_loss(features, weight, bias, labels, mask, backend=backend)
        torch.autograd.grad(out.loss, (features, weight, bias))  # no accumulation into .grad
        sync()
        return out.loss

    benchmark.group = shape.name
    loss = benchmark(step)
    assert torch.isfinite(loss)
