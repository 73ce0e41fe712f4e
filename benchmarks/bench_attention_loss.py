"""attention_loss (the unit of work of SPEC §5) forward, backward, and forward + backward, per
contender: each usable backend and the torch.compile baselines of the reference.

On the CPU the SPEC shapes run at batch 2 so that the suite takes seconds; on a GPU at
their full batch. Run: ``make bench`` (or ``pytest benchmarks``).
"""

import pytest
import torch
from _common import CONTENDERS, DEVICE, SHAPES, implementation, skip_unless_compiled_here, sync

import fastcam
from fastcam.workloads import make_inputs


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("part", ["fwd", "bwd", "fwd+bwd"])
def test_attention_loss(benchmark, contender, shape, part):
    skip_unless_compiled_here(contender, shape)
    features, weight, bias, labels, mask = make_inputs(shape, device=DEVICE)
    loss_of = implementation(contender, lambda f, w, b, backend: fastcam.attention_loss(
        f, w, b, labels, mask, backend=backend).loss)  # fmt: skip

    def grads(loss, retain=False):  # no accumulation into .grad, as in training where F comes from the body
        torch.autograd.grad(loss, (features, weight, bias), retain_graph=retain)

    if part == "fwd":
        def run():
            with torch.no_grad():
                loss = loss_of(features, weight, bias)
            sync()
            return loss
    elif part == "bwd":
        loss = loss_of(features, weight, bias)

        def run():
            grads(loss, retain=True)
            sync()
            return loss
    else:
        def run():
            loss = loss_of(features, weight, bias)
            grads(loss)
            sync()
            return loss

    benchmark.group = f"attention_loss {part} {shape.name}"
    loss = benchmark(run)
    assert torch.isfinite(loss)
