"""fastcam.models: split real classifiers into body + linear head, and CAMHead.

The central check is the identity of SPEC §2.1 on real models: for a classifier whose head
is global average pooling followed by one linear layer, Grad-CAM computed with autograd
(one backward pass per class) equals fastcam's ``normalize="none"`` maps divided by N.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastcam
from fastcam.models import CAMHead, split_model
from helpers import LAYOUTS, make_head_inputs

TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: the identities are exact


def spatial_mean(features):
    return features.mean((2, 3)) if features.dim() == 4 else features.mean(1)


def assert_nontrivial(gradcam):
    """The comparison means something: some positions are positive, some clipped by the ReLU."""
    assert bool((gradcam > 0).any()), "every Grad-CAM map is zero: the test would prove nothing"
    assert bool((gradcam == 0).any()), "no Grad-CAM value is clipped: the ReLU is not exercised"


def assert_max_and_l2_match(gradcam, features, head, backend, n):
    """Scaled maps are Grad-CAM rescaled; fastcam's eps acts on relu(S) = N * Grad-CAM, i.e.
    eps / N on the Grad-CAM scale."""
    eps = 1e-6
    spatial = tuple(range(2, gradcam.dim()))
    _, cams_max = fastcam.cam_head(features, head.weight, head.bias, normalize="max", eps=eps, backend=backend)
    want_max = gradcam / (gradcam.amax(spatial, keepdim=True) + eps / n)
    torch.testing.assert_close(cams_max, want_max, **TIGHT)
    # (gradcam / (gradcam.amax + eps) would only agree to about (N - 1) * eps / max relu(S).)
    _, cams_l2 = fastcam.cam_head(features, head.weight, head.bias, normalize="l2", eps=eps, backend=backend)
    norm = gradcam.pow(2).sum(spatial, keepdim=True).sqrt()
    torch.testing.assert_close(cams_l2, gradcam / (norm + eps / n), **TIGHT)


# ----------------------------------------------------------------- 1. ResNet-18 (torchvision)


def test_resnet18_gradcam_identity(backend, device):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval().double().to(device)
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64, device=device)  # features 3 x 2: H != W

    body, head = split_model(model)
    assert head is model.fc

    # Grad-CAM the standard way, on the unmodified model: hook the last block's output.
    captured = {}
    handle = model.layer4.register_forward_hook(lambda mod, inp, out: captured.__setitem__("features", out))
    try:
        model_logits = model(x)
    finally:
        handle.remove()
    hooked = captured["features"]
    B, K, H, W = hooked.shape
    assert (B, K, H, W) == (2, 512, 3, 2)
    n = H * W
    gradcam = []
    for c in range(5):
        (grads,) = torch.autograd.grad(model_logits[:, c].sum(), hooked, retain_graph=True)
        alpha = grads.mean((2, 3), keepdim=True)  # [B, K, 1, 1]
        gradcam.append(torch.relu((alpha * hooked).sum(1)))
    gradcam = torch.stack(gradcam, 1).detach()  # [B, C, H, W]
    assert_nontrivial(gradcam)

    with torch.no_grad():
        features = body(x)
        model_out = model(x)
        torch.testing.assert_close(features, hooked.detach(), rtol=0, atol=0)
        torch.testing.assert_close(head(features.mean((2, 3))), model_out, **TIGHT)

        logits, cams = fastcam.cam_head(features, head.weight, head.bias, normalize="none", backend=backend)
        assert cams.shape == (2, 5, 3, 2) and cams.dtype == torch.float64
        assert logits.dtype == torch.float64
        torch.testing.assert_close(logits, model_out, **TIGHT)
        torch.testing.assert_close(cams / n, gradcam, **TIGHT)
        assert_max_and_l2_match(gradcam, features, head, backend, n)


def test_resnet_split_shares_parameters():
    model = torchvision.models.resnet18(num_classes=5)
    body, head = split_model(model)
    assert head is model.fc
    assert isinstance(head, nn.Linear)
    body_params = {id(p) for p in body.parameters()}
    model_params = {id(p) for p in model.parameters()}
    head_params = {id(p) for p in head.parameters()}
    assert body_params | head_params == model_params
    assert not body_params & head_params
    # The same tensors: an update through the model is seen by body and head.
    with torch.no_grad():
        model.conv1.weight.zero_()
    assert float(body[0].weight.detach().abs().sum()) == 0.0


# ---------------------------------------------------------------------- 2. a ViT (tokens)


class TinyViT(nn.Module):
    """A timm-style ViT: CLS prefix token, mean pooling over the patch tokens, linear head."""

    def __init__(self, img=16, patch=4, dim=16, heads=2, depth=2, num_classes=4):
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.5 * torch.randn(1, 1 + n, dim))
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.num_prefix_tokens = 1
        self.global_pool = "avg"
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, K]
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1) + self.pos_embed
        return self.norm(self.blocks(tokens))  # [B, 1 + N, K]

    def forward_head(self, tokens):
        return self.head(self.fc_norm(tokens[:, self.num_prefix_tokens :].mean(1)))

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_vit_tokens_gradcam_identity(backend, device):
    torch.manual_seed(0)
    model = TinyViT().eval().double().to(device)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, device=device)

    body, head = split_model(model)
    assert head is model.head

    all_tokens = model.forward_features(x)  # [B, 1 + N, K], graph kept
    logits_graph = model.forward_head(all_tokens)
    B, N1, K = all_tokens.shape
    n = N1 - 1
    assert (B, n, K) == (3, 16, 16)
    gradcam = []
    for c in range(4):
        (grads,) = torch.autograd.grad(logits_graph[:, c].sum(), all_tokens, retain_graph=True)
        assert float(grads[:, 0].abs().max()) == 0.0  # the CLS token does not reach the head
        alpha = grads[:, 1:].mean(1, keepdim=True)  # [B, 1, K]: mean over the tokens
        gradcam.append(torch.relu((alpha * all_tokens[:, 1:]).sum(-1)))
    gradcam = torch.stack(gradcam, 1).detach()  # [B, C, N]
    assert_nontrivial(gradcam)

    with torch.no_grad():
        tokens = body(x)
        model_out = model(x)
        assert tokens.shape == (3, 16, 16)
        torch.testing.assert_close(tokens, all_tokens[:, 1:].detach(), **TIGHT)
        torch.testing.assert_close(head(tokens.mean(1)), model_out, **TIGHT)

        logits, cams = fastcam.cam_head(tokens, head.weight, head.bias, normalize="none", backend=backend)
        assert cams.shape == (3, 4, 16) and cams.dtype == torch.float64
        torch.testing.assert_close(logits, model_out, **TIGHT)
        torch.testing.assert_close(logits, logits_graph.detach(), **TIGHT)
        torch.testing.assert_close(cams / n, gradcam, **TIGHT)
        assert_max_and_l2_match(gradcam, tokens, head, backend, n)


def test_vit_split_shares_parameters():
    model = TinyViT()
    body, head = split_model(model)
    assert head is model.head
    assert {id(p) for p in model.parameters()} <= {id(p) for p in body.parameters()} | {id(head.weight), id(head.bias)}


# --------------------------------------------------------------------------- 3. DenseNet


@pytest.fixture(scope="module")
def densenet121():
    torch.manual_seed(0)
    return torchvision.models.densenet121(num_classes=3).eval().double()


def test_densenet121_split(densenet121):
    model = densenet121
    body, head = split_model(model)
    assert head is model.classifier
    assert isinstance(head, nn.Linear) and head.weight.shape == (3, 1024)
    assert any(m is model.features for m in body.modules())
    body_params = {id(p) for p in body.parameters()}
    assert body_params | {id(head.weight), id(head.bias)} == {id(p) for p in model.parameters()}

    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        features = body(x)
        assert features.shape == (1, 1024, 2, 2)
        assert float(features.min()) >= 0.0  # DenseNet.forward's ReLU is part of the body
        out = model(x)
        torch.testing.assert_close(head(features.mean((2, 3))), out, **TIGHT)
        logits, _ = fastcam.cam_head(features, head.weight, head.bias, normalize="none", backend="torch")
        torch.testing.assert_close(logits, out, **TIGHT)


# ------------------------------------------------------------------ more split_model cases


class TimmLike(nn.Module):
    """A small timm-style CNN: forward_features -> pool -> fc_norm -> classifier."""

    def __init__(self, global_pool="avg", fc_norm=None, classifier=None, prefix=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.global_pool = global_pool
        self.fc_norm = nn.Identity() if fc_norm is None else fc_norm
        self.fc = nn.Linear(6, 4) if classifier is None else classifier
        if prefix is not None:
            self.num_prefix_tokens = prefix

    def forward_features(self, x):
        return torch.relu(self.stem(x))

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.fc_norm(self.forward_features(x).mean((2, 3))))


class AvgPool(nn.Module):
    """Stands for timm's SelectAdaptivePool2d: a module with a ``pool_type``."""

    def __init__(self, pool_type):
        super().__init__()
        self.pool_type = pool_type

    def forward(self, x):
        return x.mean((2, 3))


@pytest.mark.parametrize("pool", ["avg", AvgPool("avg")], ids=["str", "module"])
def test_timm_style_cnn_split(pool):
    torch.manual_seed(0)
    model = TimmLike(global_pool=pool, prefix=1).double()  # prefix tokens do not touch 4-D features
    body, head = split_model(model)
    assert head is model.fc
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        features = body(x)
        assert features.shape == (2, 6, 5, 4)
        torch.testing.assert_close(head(features.mean((2, 3))), model(x), **TIGHT)


class ConvNeXtLike(nn.Module):
    """The layout of timm's ConvNeXt (default ``head_norm_first=False``): no ``global_pool``
    or ``fc_norm`` attribute on the model; ``head`` pools, then applies a LayerNorm, then
    ``head.fc``; ``get_classifier()`` returns ``head.fc``, an ``nn.Linear``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Module()
        self.head.norm = nn.LayerNorm(6)
        self.head.fc = nn.Linear(6, 4)

    def forward_features(self, x):
        return self.stem(x)

    def get_classifier(self):
        return self.head.fc

    def forward(self, x):
        return self.head.fc(self.head.norm(self.forward_features(x).mean((2, 3))))


def test_split_refuses_a_head_with_a_norm_after_the_pooling():
    """A model whose pooled features pass through a norm before the classifier (timm
    ConvNeXt) is not GAP + linear: split_model must not hand back a (body, head) pair for
    which head(body(x).mean) differs from model(x)."""
    torch.manual_seed(0)
    model = ConvNeXtLike().double()
    with pytest.raises(ValueError, match="ConvNeXtLike"):
        body, head = split_model(model)
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
        with torch.no_grad():  # what the wrong split gives, for the failure message
            diff = float((head(body(x).mean((2, 3))) - model(x)).abs().max())
        pytest.fail(f"split_model accepted ConvNeXtLike; head(body(x).mean) differs from model(x) by {diff:.3g}")


# ----------------------------------------------------------------- 4. split_model errors


def test_split_rejects_token_pooling():
    with pytest.raises(ValueError, match=r"TimmLike pools its features with 'token', not global average pooling"):
        split_model(TimmLike(global_pool="token"))


def test_split_rejects_max_pooling_module():
    with pytest.raises(ValueError, match=r"TimmLike pools its features with 'max', not global average pooling"):
        split_model(TimmLike(global_pool=AvgPool("max")))


def test_split_rejects_fc_norm():
    with pytest.raises(ValueError, match=r"TimmLike normalizes the pooled features \(LayerNorm\)"):
        split_model(TimmLike(fc_norm=nn.LayerNorm(6)))


def test_split_rejects_a_non_linear_classifier():
    mlp = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"TimmLike\.get_classifier\(\) is Sequential, not an nn\.Linear"):
        split_model(TimmLike(classifier=mlp))


def test_split_rejects_torchvision_models_with_a_replaced_head():
    resnet = torchvision.models.resnet18(num_classes=4)
    resnet.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 4))
    with pytest.raises(ValueError, match=r"ResNet\.fc is Sequential, not an nn\.Linear"):
        split_model(resnet)
    densenet = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3)
    densenet.classifier = nn.Sequential(nn.Linear(densenet.classifier.in_features, 3))
    with pytest.raises(ValueError, match=r"DenseNet\.classifier is Sequential, not an nn\.Linear"):
        split_model(densenet)


def test_split_rejects_an_unknown_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"don't know how to split Sequential"):
        split_model(model)


@pytest.mark.parametrize("thing", ["resnet18", None, nn.Linear], ids=["str", "none", "class"])
def test_split_rejects_a_non_module(thing):
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got " + type(thing).__name__):
        split_model(thing)


# ------------------------------------------------------------------------- 5. CAMHead


@pytest.mark.parametrize("bias", [True, False])
def test_camhead_state_dict_interchangeable_with_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 3, bias=bias)
    cam = CAMHead(7, 3, bias=bias)
    assert list(cam.state_dict()) == list(lin.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    for key, value in lin.state_dict().items():
        assert cam.state_dict()[key].shape == value.shape and cam.state_dict()[key].dtype == value.dtype

    assert not torch.equal(cam.weight, lin.weight)
    cam.load_state_dict(lin.state_dict())  # strict
    torch.testing.assert_close(cam.weight, lin.weight, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(cam.bias, lin.bias, rtol=0, atol=0)
    assert cam.weight is not lin.weight  # loaded, not shared

    other = CAMHead(7, 3, bias=bias)
    lin2 = nn.Linear(7, 3, bias=bias)
    lin2.load_state_dict(other.state_dict())
    torch.testing.assert_close(lin2.weight, other.weight, rtol=0, atol=0)
    if bias:
        torch.testing.assert_close(lin2.bias, other.bias, rtol=0, atol=0)
    else:
        assert cam.bias is None and lin2.bias is None


def test_camhead_state_dict_bias_mismatch_is_refused():
    with pytest.raises(RuntimeError, match="bias"):
        CAMHead(7, 3, bias=False).load_state_dict(nn.Linear(7, 3).state_dict())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_camhead_init_matches_linear(bias, dtype):
    for seed in (0, 1):
        torch.manual_seed(seed)
        cam = CAMHead(13, 6, bias=bias, dtype=dtype)
        torch.manual_seed(seed)
        lin = nn.Linear(13, 6, bias=bias, dtype=dtype)
        assert cam.weight.dtype == lin.weight.dtype == (dtype or torch.float32)
        torch.testing.assert_close(cam.weight, lin.weight, rtol=0, atol=0)
        if bias:
            torch.testing.assert_close(cam.bias, lin.bias, rtol=0, atol=0)
        else:
            assert cam.bias is None
    bound = 1 / math.sqrt(13)
    assert float(cam.weight.detach().abs().max()) <= bound
    assert float(cam.weight.detach().abs().max()) > 0.5 * bound  # uniform over the bound, not a tiny init
    assert isinstance(cam.weight, nn.Parameter) and cam.weight.requires_grad
    assert [name for name, _ in cam.named_parameters()] == [name for name, _ in lin.named_parameters()]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_camhead_from_linear(backend, device, layout, bias):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=bias).double().to(device)
    head = CAMHead.from_linear(lin, normalize="max", backend=backend)
    assert head.weight is lin.weight and head.bias is lin.bias
    assert (head.in_features, head.out_features, head.normalize) == (5, 3, "max")
    assert len(list(head.parameters())) == (2 if bias else 1)
    assert not any(p.is_meta for p in head.parameters())

    feats, _, _ = make_head_inputs(layout, B=2, K=5, H=3, W=4, device=device, seed=3)
    with torch.no_grad():
        logits, cams = head(feats)
        torch.testing.assert_close(logits, lin(spatial_mean(feats)), **TIGHT)
        want_logits, want_cams = fastcam.cam_head(feats, lin.weight, lin.bias, normalize="max", backend=backend)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
        torch.testing.assert_close(cams, want_cams, rtol=0, atol=0)
        assert cams.shape == ((2, 3, 3, 4) if layout != "tokens" else (2, 3, 12))

        lin.weight.mul_(-2.0)  # shared, not copied: the head sees the change
        logits2, _ = head(feats)
        torch.testing.assert_close(logits2, lin(spatial_mean(feats)), **TIGHT)


def test_camhead_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match=r"linear must be an nn\.Linear, got Conv2d"):
        CAMHead.from_linear(nn.Conv2d(5, 3, 1))


@pytest.mark.parametrize("bias", [True, False])
def test_camhead_to_linear_round_trip(bias):
    torch.manual_seed(0)
    head = CAMHead(5, 3, bias=bias, dtype=torch.float64)
    lin = head.to_linear()
    assert type(lin) is nn.Linear
    assert (lin.in_features, lin.out_features) == (5, 3)
    assert lin.weight is head.weight and lin.bias is head.bias
    assert not any(p.is_meta for p in lin.parameters())
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), F.linear(x, head.weight, head.bias), rtol=0, atol=0)

    back = CAMHead.from_linear(lin)
    assert back.weight is head.weight and back.bias is head.bias
    feats = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        (a_logits, a_cams), (b_logits, b_cams) = head(feats), back(feats)
        torch.testing.assert_close(a_logits, b_logits, rtol=0, atol=0)
        torch.testing.assert_close(a_cams, b_cams, rtol=0, atol=0)
        torch.testing.assert_close(head(feats)[0], lin(feats.mean((2, 3))), **TIGHT)


def _plain_l2_head(features, weight, bias, eps=1e-6):
    """Logits and l2-normalized maps ``[B, C, N]`` written out in plain PyTorch."""
    f = features.flatten(2) if features.dim() == 4 else features.transpose(1, 2)  # [B, K, N]
    scores = torch.einsum("ck,bkn->bcn", weight, f)
    logits = F.linear(f.mean(-1), weight, bias)
    r = torch.relu(scores)
    return logits, r / (r.pow(2).sum(-1, keepdim=True).sqrt() + eps)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_camhead_forward_and_gradients(backend, device, layout, bias):
    torch.manual_seed(0)
    head = CAMHead(5, 3, bias=bias, backend=backend, dtype=torch.float64, device=device)
    feats, _, _ = make_head_inputs(layout, B=2, K=5, H=3, W=4, device=device, seed=4, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    r_logits = torch.randn(2, 3, generator=g, dtype=torch.float64).to(device)
    r_cams = torch.randn(2, 3, 12, generator=g, dtype=torch.float64).to(device)

    logits, cams = head(feats)  # default normalize="l2"
    assert cams.shape == ((2, 3, 3, 4) if layout != "tokens" else (2, 3, 12))
    want_logits, want_cams = _plain_l2_head(feats, head.weight, head.bias)
    torch.testing.assert_close(logits, want_logits, **TIGHT)
    torch.testing.assert_close(cams.flatten(2), want_cams, **TIGHT)

    params = [head.weight] + ([head.bias] if bias else [])
    got = torch.autograd.grad((logits * r_logits).sum() + (cams.flatten(2) * r_cams).sum(), [feats, *params])
    want = torch.autograd.grad((want_logits * r_logits).sum() + (want_cams * r_cams).sum(), [feats, *params])
    for name, a, b in zip(["features", "weight", "bias"], got, want):
        assert float(a.abs().max()) > 0, f"no gradient reached {name}"
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, name=name: f"grad of {name}: {m}")
    if bias:
        torch.testing.assert_close(got[2], r_logits.sum(0), **TIGHT)  # d logits / d bias = 1

    # .backward() fills .grad of the module's own parameters.
    logits, cams = head(feats)
    (logits.sum() + cams.sum()).backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().max()) > 0
    if bias:
        torch.testing.assert_close(head.bias.grad, torch.full_like(head.bias, 2.0), **TIGHT)
