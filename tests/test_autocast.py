"""torch.autocast (CPU bf16; CUDA fp16 and bf16): fastcam computes at the accumulation precision
of its inputs' dtypes whatever autocast says, on every backend, so that a training step under
autocast gives the same loss, maps and gradients as without it (README, API)."""

import pytest
import torch
from torch import nn

import fastcam
from conftest import BACKEND_DEVICES

AUTOCASTS = [(b, d, dt) for b, d in BACKEND_DEVICES
             for dt in ((torch.bfloat16,) if d == "cpu" else (torch.float16, torch.bfloat16))]  # fmt: skip


def _inputs(device, features_dtype):
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(4, 16, 5, 6, generator=g).to(device, features_dtype)
    weight = (torch.randn(6, 16, generator=g) / 4).to(device)  # the fp32 nn.Linear of a model
    bias = torch.randn(6, generator=g).to(device)
    labels = (torch.rand(4, 6, generator=g) < 0.4).float().to(device)
    mask = torch.ones(4, 6, dtype=torch.bool, device=device)
    mask[-1] = False
    return feats, weight, bias, labels, mask


def _step(inputs, backend, autocast=None):
    """Forward under ``autocast`` (a dtype, or None for none), backward outside it, as PyTorch
    recommends (a backward run inside autocast would recast the reference's backward matmuls)."""
    f, w, b, labels, mask = inputs
    f, w, b = (t.clone().requires_grad_() for t in (f, w, b))
    with torch.autocast(f.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = fastcam.attention_loss(f, w, b, labels, mask, lambda_consist=0.5, lambda_coherence=0.25,
                                     backend=backend)  # fmt: skip
    return (out.loss, out.logits, out.cams, *torch.autograd.grad(out.loss, (f, w, b)))


@pytest.mark.parametrize("backend,device,dtype", AUTOCASTS, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in AUTOCASTS])
@pytest.mark.parametrize("features_dtype", [torch.float32, torch.bfloat16])
def test_autocast_changes_nothing(backend, device, dtype, features_dtype):
    inputs = _inputs(device, features_dtype)
    plain = _step(inputs, backend)
    cast = _step(inputs, backend, autocast=dtype)
    names = ("loss", "logits", "cams", "grad features", "grad weight", "grad bias")
    for name, a, b in zip(names, cast, plain):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} under autocast, {b.dtype} without"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert cast[0].dtype == torch.float32 and cast[2].dtype == torch.float32  # loss and maps: fp32
    assert cast[1].dtype == features_dtype and cast[3].dtype == features_dtype  # logits, dF: the features'


@pytest.mark.parametrize("backend,device,dtype", AUTOCASTS, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in AUTOCASTS])
def test_a_model_under_autocast_feeds_its_low_precision_features(backend, device, dtype):
    # The usual step: the body runs in the autocast dtype, the head is the fp32 nn.Linear.
    torch.manual_seed(13)
    body, head = nn.Conv2d(3, 8, 3, padding=1).to(device), nn.Linear(8, 5).to(device)
    images = torch.randn(3, 3, 6, 6, device=device)
    labels = (torch.rand(3, 5) < 0.5).float().to(device)
    criterion = fastcam.AttentionMapLoss(lambda_distinct=0.5, backend=backend)
    with torch.autocast(device, dtype=dtype):
        features = body(images)
        out = criterion(features, head, labels, return_output=True)
    out.loss.backward()
    assert features.dtype == dtype and out.logits.dtype == dtype and out.cams.dtype == torch.float32
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(body.weight.grad).all()
    # the same loss as the reference computes from the same features without autocast
    want = fastcam.attention_loss(features.detach(), head.weight.detach(), head.bias.detach(), labels,
                                  lambda_distinct=0.5, backend="torch")  # fmt: skip
    torch.testing.assert_close(out.loss.detach(), want.loss, rtol=1e-5, atol=1e-6)
