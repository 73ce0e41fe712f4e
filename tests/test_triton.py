"""backend="triton": its kernels against the reference, on CUDA tensors when a GPU is present
and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)
otherwise — the same tests. The whole suite runs it too with FASTCAM_TEST_BACKENDS=triton."""

import pytest
import torch

import fastcam
from helpers import LAYOUTS, assert_close_rel, assert_compiled_step_matches_eager, make_head_inputs, max_rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fastcam.backends()["triton"].usable,
                                reason=f"triton backend not usable: {fastcam.backends()['triton'].reason}")


def _step(backend, feats, weight, bias, **kw):
    f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
    out = fastcam.attention_loss(f, w, b, torch.ones(f.shape[0], w.shape[0], device=f.device) * 0.5,
                                 backend=backend, **kw)
    grads = torch.autograd.grad(out.loss.double() + out.logits.double().sum() + (out.cams.double() ** 2).sum(),
                                (f, w, b))
    return (out.loss, out.logits, out.cams, *grads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize,measure", [("l2", "cosine"), ("max", "soft_iou"), ("softmax", "dice"),
                                               ("sum", "intersection"), ("none", "dot")])
def test_float64_matches_the_reference(layout, normalize, measure):
    """Odd sizes (C = 3, K = 37, 5 x 7 positions) against every tile edge."""
    feats, weight, bias = make_head_inputs(layout, B=3, C=3, K=37, H=5, W=7, device=DEVICE, seed=51)
    kw = dict(normalize=normalize, measure=measure, lambda_consist=0.5, lambda_coherence=0.5,
              grid=(5, 7) if layout == "tokens" else None)
    for name, got, want in zip(("loss", "logits", "cams", "grad F", "grad W", "grad b"),
                               _step("triton", feats, weight, bias, **kw), _step("torch", feats, weight, bias, **kw)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_against_float64(layout, dtype):
    """fp32 within 1e-5 of float64; bf16/fp16 within 2x the same-dtype reference's error."""
    feats, weight, bias = make_head_inputs(layout, B=2, C=20, K=40, H=4, W=5, dtype=dtype, device=DEVICE, seed=52)
    got = _step("triton", feats, weight, bias)
    exact = _step("torch", feats.double(), weight.double(), bias.double())
    same = _step("torch", feats, weight, bias)
    for name, g, e, r in zip(("loss", "logits", "cams", "grad F", "grad W", "grad b"), got, exact, same):
        budget = 1e-5 if dtype == torch.float32 else 2 * max_rel_error(r, e) + 1e-6
        assert_close_rel(g, e, budget, name)


def test_empty_batch_and_single_position():
    for B, H, W in ((0, 3, 4), (2, 1, 1)):
        feats, weight, bias = make_head_inputs("nchw", B=B, C=4, K=6, H=H, W=W, device=DEVICE, seed=53)
        for got, want in zip(_step("triton", feats, weight, bias), _step("torch", feats, weight, bias)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", ["none", "max", "sum", "l2", "softmax"])
def test_head_maps_with_ties_zero_maps_and_nan(normalize):
    """The per-map kernels against the reference's head_from_scores (values and gradients):
    tied maxima, a map with no positive score, a NaN score, N = 37 (not a power of 2)."""
    from fastcam import reference
    from fastcam.triton.normalize import head_maps

    g = torch.Generator().manual_seed(56)
    s = torch.randn(2, 4, 37, generator=g, dtype=torch.float64)
    s[0, 1, [3, 9, 20]] = 5.0  # three tied maxima
    s[0, 2] = -s[0, 2].abs()  # no positive score
    s[1, 3, 5] = float("nan")
    s = s.to(DEVICE)
    bias = torch.randn(4, generator=g, dtype=torch.float64).to(DEVICE)
    grads = (torch.randn(2, 4, generator=g, dtype=torch.float64).to(DEVICE),
             torch.randn(2, 4, 37, generator=g, dtype=torch.float64).to(DEVICE))

    def run(fn):
        x, b = s.clone().requires_grad_(), bias.clone().requires_grad_()
        logits, cams = fn(x, b, normalize, 0.7, 1e-6)
        return (logits, cams, *torch.autograd.grad((logits, cams), (x, b), grads))

    for name, got, want in zip(("logits", "cams", "grad scores", "grad bias"), run(head_maps),
                               run(reference.head_from_scores)):
        assert torch.equal(got.isnan(), want.isnan()), name
        torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else [])
def test_opcheck_on_cuda(device):
    """opcheck's fake-tensor checks cannot run under the interpreter (it reads data pointers)."""
    from fastcam.triton.cam_head import scores, scores_backward

    feats, weight, _ = make_head_inputs("channels_last", B=2, C=5, K=40, H=4, W=6, dtype=torch.float32,
                                        device=device, seed=54, requires_grad=True)
    torch.library.opcheck(scores, (feats.flatten(2), weight))
    g = torch.randn(2, 5, 24, device=device)
    torch.library.opcheck(scores_backward, (g, feats.detach().flatten(2), weight.detach(), True, True))
    from fastcam.triton.normalize import head_maps, head_maps_backward

    s = torch.randn(2, 5, 24, device=device, requires_grad=True)
    bias = torch.randn(5, device=device, requires_grad=True)
    for normalize in ("max", "l2", "softmax"):
        torch.library.opcheck(head_maps, (s, bias, normalize, 1.0, 1e-6))
        torch.library.opcheck(head_maps, (s, None, normalize, 1.0, 1e-6))
        logits, cams = head_maps(s.detach(), bias.detach(), normalize, 1.0, 1e-6)
        torch.library.opcheck(head_maps_backward, (torch.randn_like(logits), torch.randn_like(cams), s.detach(), cams,
                                                   normalize, 1.0, 1e-6))
        torch.library.opcheck(head_maps_backward, (None, torch.randn_like(cams), s.detach(), cams, normalize, 1.0,
                                                   1e-6))


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else [])
def test_compiled_training_step_on_cuda(device):
    """torch.compile(fullgraph=True) traces through the triton_ops (not under the interpreter)."""
    feats, weight, bias = make_head_inputs("nchw", B=3, C=4, K=40, H=3, W=5, dtype=torch.float32, device=device,
                                           seed=55)
    labels = torch.ones(3, 4, device=device) * 0.5

    def step(f, w, b):
        out = fastcam.attention_loss(f, w, b, labels, lambda_consist=0.5, backend="triton")
        return out.loss, out.cams

    assert_compiled_step_matches_eager(step, (feats, weight, bias))
