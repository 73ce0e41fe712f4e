"""Property-based tests (hypothesis): every usable backend against the reference on random
problems — B 0-9, C 1-20, K 1-70, N 1-70 (any H x W, or tokens), float64 / float32 / bfloat16
features in every layout, every normalization and overlap measure, labels partly unknown —
values and the gradients of features, weight and bias.

Profiles: ``ci`` (the default: 300 examples per backend, derandomized, so a CI run is
repeatable), ``gpu`` (the default where CUDA is available: 40, as each new shape compiles
Triton kernels) and ``long`` (3,000 examples from a random seed, for local runs:
``FASTCAM_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``).
"""

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="the property tests need hypothesis (pip install '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastcam  # noqa: E402
from conftest import BACKEND_DEVICES  # noqa: E402
from fastcam.reference import MEASURES, NORMALIZE_MODES  # noqa: E402
from helpers import max_rel_error  # noqa: E402

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# With a GPU every random shape compiles new Triton kernels: fewer examples there.
settings.register_profile("gpu", max_examples=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("FASTCAM_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

# The reference is the ground truth; the compiled backends are checked against it.
CHECKED = [(b, d) for b, d in BACKEND_DEVICES if b != "torch"]
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@st.composite
def problems(draw):
    layout = draw(st.sampled_from(["nchw", "channels_last", "tokens"]))
    B, C, K = draw(st.integers(0, 9)), draw(st.integers(1, 20)), draw(st.integers(1, 70))
    H = draw(st.integers(1, 10))
    W = draw(st.integers(1, 70 // H))
    return dict(layout=layout, B=B, C=C, K=K, H=H, W=W, dtype=draw(st.sampled_from(sorted(DTYPES))),
                normalize=draw(st.sampled_from(NORMALIZE_MODES)), measure=draw(st.sampled_from(MEASURES)),
                lambdas=draw(st.sampled_from([(1.0, 0.0, 0.0), (1.0, 0.5, 0.25), (0.0, 1.0, 0.0)])),
                unlabeled=draw(st.sampled_from(["predicted", "ignore"])),
                seed=draw(st.integers(0, 2**31 - 1)))  # fmt: skip


def _inputs(p, device):
    g = torch.Generator().manual_seed(p["seed"])
    B, C, K, H, W = p["B"], p["C"], p["K"], p["H"], p["W"]
    feats = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    if p["layout"] == "tokens":
        feats = feats.flatten(2).transpose(1, 2).contiguous()
    weight = torch.randn(C, K, generator=g, dtype=torch.float64) / K**0.5
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    labels = (torch.rand(B, C, generator=g) < 0.3).double()
    mask = torch.rand(B, C, generator=g) < 0.7
    dtype = DTYPES[p["dtype"]]
    feats = feats.to(dtype)  # the features' own rounding is part of the input, for every backend
    if p["layout"] == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    head = torch.float64 if dtype == torch.float64 else torch.float32
    return (feats.to(device), weight.to(device, head), bias.to(device, head), labels.to(device, head),
            mask.to(device))  # fmt: skip


def _run(inputs, p, backend):
    f, w, b, labels, mask = (t.detach().clone() for t in inputs)
    for t in (f, w, b):
        t.requires_grad_()
    ld, lc, lh = p["lambdas"]
    grid = (p["H"], p["W"]) if p["layout"] == "tokens" else None
    out = fastcam.attention_loss(f, w, b, labels, mask, normalize=p["normalize"], measure=p["measure"],
                                 lambda_distinct=ld, lambda_consist=lc, lambda_coherence=lh, grid=grid,
                                 unlabeled=p["unlabeled"], backend=backend)  # fmt: skip
    grads = torch.autograd.grad(out.loss, (f, w, b), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (f, w, b))]
    return [out.loss, out.logits, out.cams, *grads]


NAMES = ("loss", "logits", "cams", "grad features", "grad weight", "grad bias")


@pytest.mark.parametrize("backend,device", CHECKED, ids=[f"{b}-{d}" for b, d in CHECKED])
@given(p=problems())
def test_backends_agree_with_the_reference(backend, device, p):
    inputs = _inputs(p, device)
    got = _run(inputs, p, backend)
    ref = _run(inputs, p, "torch")
    exact = _run([t.double() if t.is_floating_point() else t for t in inputs], p, "torch")
    # Errors against a float64 run of the reference on the same (rounded) inputs, relative to
    # the largest value of each output: 1e-6 for float64; otherwise four times the reference's
    # own error (summation orders differ) with a floor of 2e-3, since random problems include
    # ill-conditioned ones (the gradient of a cosine overlap is orthogonal to the map, so with
    # K = 1 the weight's gradient is a sum of large terms that cancel, and each summation order
    # rounds it differently), and one bf16 rounding step for the outputs returned in bf16.
    atol = 1e-18 if p["dtype"] == "float64" else 1e-9
    if p["dtype"] == "float64":
        budgets = [1e-6] * 6  # the same cancellations, at float64's rounding
    else:
        budgets = [max(4 * max_rel_error(r, e), 2e-3) for r, e in zip(ref, exact)]
        if p["dtype"] == "bfloat16":
            budgets[1] = max(budgets[1], 2**-7)
            budgets[3] = max(budgets[3], 2**-7)
    for name, a, r, e, budget in zip(NAMES, got, ref, exact, budgets):
        assert a.shape == r.shape and a.dtype == r.dtype, f"{name}: {a.shape}/{a.dtype} vs {r.shape}/{r.dtype}"
        assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN pattern differs ({p})"
        a, e = a.detach().double().nan_to_num(), e.detach().double().nan_to_num()
        err = float((a - e).abs().max()) if e.numel() else 0.0
        scale = float(e.abs().max()) if e.numel() else 0.0
        # plus an absolute floor: an output that is itself at rounding level (a loss of 1e-12
        # whose terms cancel) has no relative accuracy to check.
        assert err <= budget * scale + atol, f"{name}: error {err:.3g} > {budget:.3g} x {scale:.3g} + {atol:g} ({p})"
