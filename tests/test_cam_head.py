"""cam_head: logits and every class map in one pass (SPEC §2.1), on every usable backend."""

import pytest
import torch
import torch.nn.functional as F

import fastcam
from helpers import LAYOUTS, NORMALIZES, assert_close_rel, make_head_inputs, max_rel_error, naive_cam_head

LOW_PRECISION = (torch.bfloat16, torch.float16)


def spatial_mean(features):
    return features.mean((2, 3)) if features.dim() == 4 else features.mean(1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_values_match_the_formulas(backend, device, layout, normalize):
    feats, weight, bias = make_head_inputs(layout, B=2, C=3, K=5, H=3, W=4, device=device, seed=1)
    logits, cams = fastcam.cam_head(feats, weight, bias, normalize=normalize, temperature=0.7, backend=backend)
    want_logits, want_cams = naive_cam_head(feats.cpu(), weight.cpu(), bias.cpu(), normalize, temperature=0.7)
    expected_shape = (2, 3, 3, 4) if layout != "tokens" else (2, 3, 12)
    assert cams.shape == expected_shape and logits.shape == (2, 3)
    assert cams.dtype == logits.dtype == torch.float64
    torch.testing.assert_close(logits.cpu(), want_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cams.cpu().flatten(2), want_cams, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, F.linear(spatial_mean(feats), weight, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_bias(backend, device, layout):
    feats, weight, _ = make_head_inputs(layout, device=device, seed=2)
    logits, cams = fastcam.cam_head(feats, weight, None, backend=backend)
    torch.testing.assert_close(logits, F.linear(spatial_mean(feats), weight), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cams.cpu().flatten(2), naive_cam_head(feats.cpu(), weight.cpu(), None, "l2")[1])


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_eps_enters_the_denominator(backend, device, eps):
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=3)
    _, cams = fastcam.cam_head(feats, weight, bias, normalize="sum", eps=eps, backend=backend)
    _, want = naive_cam_head(feats.cpu(), weight.cpu(), bias.cpu(), "sum", eps=eps)
    torch.testing.assert_close(cams.cpu().flatten(2), want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_gradcheck(backend, device, layout, normalize):
    feats, weight, bias = make_head_inputs(layout, B=2, C=3, K=4, H=2, W=3, device=device, seed=4, requires_grad=True)

    def fn(f, w, b):
        return fastcam.cam_head(f, w, b, normalize=normalize, temperature=0.8, backend=backend)

    assert torch.autograd.gradcheck(fn, (feats, weight, bias))


def _forward_backward(feats, weight, bias, normalize, backend, grad_logits, grad_cams):
    feats, weight, bias = (t.detach().requires_grad_() for t in (feats, weight, bias))
    logits, cams = fastcam.cam_head(feats, weight, bias, normalize=normalize, backend=backend)
    (logits.double() * grad_logits).sum().add((cams.double() * grad_cams).sum()).backward()
    return logits, cams, feats.grad, weight.grad, bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["l2", "max", "softmax"])
def test_dtypes_against_float64(backend, device, dtype, layout, normalize):
    """fp32 within 1e-5 of the float64 reference; bf16/fp16 within 2x the error of the
    reference run at that dtype (SPEC §4). The inputs are the same rounded values."""
    feats, weight, bias = make_head_inputs(layout, B=3, C=5, K=24, H=5, W=7, dtype=dtype, device=device, seed=5)
    g = torch.Generator().manual_seed(6)
    grad_logits = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device)
    grad_cams = torch.randn(3, 5, 5, 7, generator=g, dtype=torch.float64).to(device)
    if layout == "tokens":
        grad_cams = grad_cams.flatten(2)
    got = _forward_backward(feats, weight, bias, normalize, backend, grad_logits, grad_cams)
    exact = _forward_backward(feats.double(), weight.double(), bias.double(), normalize, "torch",
                              grad_logits, grad_cams)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    names = ("logits", "cams", "grad features", "grad weight", "grad bias")
    if dtype == torch.float32:
        for name, a, e in zip(names, got, exact):
            assert_close_rel(a, e, 1e-5, name)
        return
    same_dtype_reference = _forward_backward(feats, weight, bias, normalize, "torch", grad_logits, grad_cams)
    for name, a, r, e in zip(names, got, same_dtype_reference, exact):
        budget = 2 * max_rel_error(r, e) + 1e-6
        assert_close_rel(a, e, budget, name)


def test_float_features_with_float32_head(backend, device):
    """Under autocast a bf16 body feeds the fp32 nn.Linear: the head is used at fp32."""
    feats, weight, bias = make_head_inputs("channels_last", dtype=torch.bfloat16, device=device, seed=7)
    w32, b32 = weight.float(), bias.float()
    logits, cams = fastcam.cam_head(feats, w32, b32, backend=backend)
    want_logits, want_cams = fastcam.cam_head(feats.double(), w32.double(), b32.double(), backend="torch")
    assert logits.dtype == torch.bfloat16
    assert_close_rel(cams, want_cams, 1e-5, "cams")
    assert_close_rel(logits, want_logits, 2 ** -8, "logits")


def test_channels_last_equals_contiguous(backend, device):
    feats, weight, bias = make_head_inputs("channels_last", B=2, C=4, K=6, H=5, W=3, device=device, seed=8)
    a = fastcam.cam_head(feats, weight, bias, backend=backend)
    b = fastcam.cam_head(feats.contiguous(), weight, bias, backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tokens_equal_flattened_maps(backend, device):
    """Token features [B, N, K] laid out from NCHW give the flattened NCHW maps."""
    feats, weight, bias = make_head_inputs("nchw", B=2, C=3, K=5, H=4, W=2, device=device, seed=9)
    tokens = feats.flatten(2).transpose(1, 2)
    logits_t, cams_t = fastcam.cam_head(tokens, weight, bias, backend=backend)
    logits_n, cams_n = fastcam.cam_head(feats, weight, bias, backend=backend)
    torch.testing.assert_close(logits_t, logits_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cams_t, cams_n.flatten(2), rtol=1e-12, atol=1e-12)
