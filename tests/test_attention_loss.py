"""attention_loss and AttentionMapLoss: the losses of SPEC §2.3 with their gradients."""


import pytest
import torch
import torch.nn.functional as F

import fastcam
from helpers import (
    LAYOUTS,
    MEASURES,
    NORMALIZES,
    assert_close_rel,
    check_loss_against_hand,
    make_head_inputs,
    max_rel_error,
)


def partial_labels(B, C, *, seed=0, device="cpu"):
    """Soft-ish labels with a third of the entries unknown, holding garbage (NaN, -1)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(B, C, generator=g) < 0.4).double()
    labels[0, 0] = 0.7  # a soft label
    mask = torch.rand(B, C, generator=g) < 0.67
    mask[0, 0] = True
    labels = torch.where(mask, labels, torch.tensor(float("nan")))
    labels[~mask & (torch.rand(B, C, generator=g) < 0.5)] = -1.0
    return labels.to(device), mask.to(device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "normalize,measure",
    [(n, "cosine") for n in NORMALIZES] + [("l2", m) for m in MEASURES if m != "cosine"] + [("sum", "soft_iou")],
)
@pytest.mark.parametrize("unlabeled", ["predicted", "ignore"])
def test_every_term_matches_the_formulas(backend, device, layout, normalize, measure, unlabeled):
    B, C, H, W = 3, 4, 2, 3
    feats, weight, bias = make_head_inputs(layout, B=B, C=C, K=5, H=H, W=W, device=device, seed=11)
    labels, mask = partial_labels(B, C, seed=12, device=device)
    out = fastcam.attention_loss(
        feats, weight, bias, labels, mask, normalize=normalize, measure=measure, lambda_distinct=0.3,
        lambda_consist=0.2, lambda_coherence=0.7, grid=(H, W) if layout == "tokens" else None,
        unlabeled=unlabeled, backend=backend,
    )
    check_loss_against_hand(out, feats, weight, bias, labels, mask, normalize=normalize, measure=measure,
                            grid=(H, W), unlabeled=unlabeled,
                            lambdas=dict(lambda_distinct=0.3, lambda_consist=0.2, lambda_coherence=0.7))


def test_terms_not_asked_for_are_none(backend, device):
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=13)
    out = fastcam.attention_loss(feats, weight, bias, classification=False, backend=backend)
    assert out.bce is None and out.consist is None and out.coherence is None
    torch.testing.assert_close(out.loss, out.distinct)
    out = fastcam.attention_loss(feats, weight, bias, lambda_distinct=0, backend=backend)
    assert out.distinct is None and out.bce is not None


TERMS = {
    "bce": dict(lambda_distinct=0.0),
    "distinct": dict(classification=False, lambda_distinct=1.0),
    "consist": dict(classification=False, lambda_distinct=0.0, lambda_consist=1.0),
    "coherence": dict(classification=False, lambda_distinct=0.0, lambda_coherence=1.0),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("normalize,measure", [("l2", "cosine"), ("max", "soft_iou"), ("softmax", "dice"),
                                               ("sum", "intersection"), ("none", "dot")])
def test_gradcheck_every_term(backend, device, layout, term, normalize, measure):
    feats, weight, bias = make_head_inputs(layout, B=3, C=3, K=4, H=2, W=2, device=device, seed=14, requires_grad=True)
    labels, mask = partial_labels(3, 3, seed=15, device=device)

    # unlabeled="ignore": the predicted weights are detached on purpose, which a finite
    # difference cannot know; their value is checked in test_every_term_matches_the_formulas.
    def fn(f, w, b):
        return fastcam.attention_loss(f, w, b, labels, mask, normalize=normalize, measure=measure,
                                      grid=(2, 2), unlabeled="ignore", backend=backend, **TERMS[term]).loss

    assert torch.autograd.gradcheck(fn, (feats, weight, bias))


def test_predicted_weights_are_detached(backend, device):
    """With every label unknown, q = sigmoid(logits) carries no gradient: the maps do
    not depend on the bias, so the distinct term's bias gradient is exactly zero."""
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=16, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool, device=device)
    labels = torch.full((2, 3), float("nan"), dtype=torch.float64, device=device)
    out = fastcam.attention_loss(feats, weight, bias, labels, mask, classification=False, backend=backend)
    out.loss.backward()
    assert out.distinct.item() > 0
    assert bias.grad is None or torch.equal(bias.grad, torch.zeros_like(bias))
    assert weight.grad.abs().sum() > 0


def test_uniform_maps_have_the_variance_of_the_grid(backend, device):
    """Features constant over positions give uniform maps; the variance of the uniform
    distribution on an H x W grid of cell centres is (1 - 1/H^2)/12 + (1 - 1/W^2)/12."""
    H, W = 3, 5
    g = torch.Generator().manual_seed(17)
    feats = torch.randn(2, 4, 1, 1, generator=g, dtype=torch.float64).expand(2, 4, H, W).to(device)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64).to(device)
    labels = torch.ones(2, 3, dtype=torch.float64, device=device)
    out = fastcam.attention_loss(feats, weight, None, labels, normalize="softmax", lambda_distinct=0,
                                 lambda_coherence=1, classification=False, backend=backend)
    var = (1 - 1 / H**2) / 12 + (1 - 1 / W**2) / 12
    torch.testing.assert_close(out.coherence.item(), var, rtol=1e-5, atol=0)  # eps moves it by ~1e-6


def test_a_single_hot_spot_is_perfectly_coherent(backend, device):
    """A map with one positive position has zero spatial variance."""
    feats = torch.zeros(1, 1, 3, 3, dtype=torch.float64, device=device) - 1
    feats[0, 0, 1, 2] = 2.0
    weight = torch.ones(1, 1, dtype=torch.float64, device=device)
    out = fastcam.attention_loss(feats, weight, None, torch.ones(1, 1, dtype=torch.float64, device=device),
                                 lambda_distinct=0, lambda_coherence=1, backend=backend)
    assert out.coherence.item() == pytest.approx(0.0, abs=1e-12)


def test_identical_maps_are_consistent(backend, device):
    """Every image with the same features: 1 - cosine(a, a) is ~0 for every class."""
    feats, weight, bias = make_head_inputs("nchw", B=1, C=3, K=4, H=3, W=3, device=device, seed=18)
    feats = feats.expand(4, -1, -1, -1)
    out = fastcam.attention_loss(feats, weight, bias, torch.ones(4, 3, dtype=torch.float64, device=device),
                                 lambda_consist=1, backend=backend)
    assert 0 <= out.consist.item() < 1e-5


def test_masked_bce_averages_over_known_entries(backend, device):
    feats, weight, bias = make_head_inputs("tokens", B=4, C=3, device=device, seed=19)
    labels, mask = partial_labels(4, 3, seed=20, device=device)
    out = fastcam.attention_loss(feats, weight, bias, labels, mask, lambda_distinct=0, backend=backend)
    want = F.binary_cross_entropy_with_logits(out.logits[mask], labels[mask])
    torch.testing.assert_close(out.bce, want)
    torch.testing.assert_close(out.loss, want)


def test_all_labels_known_by_default(backend, device):
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=21)
    labels = (torch.rand(2, 3, generator=torch.Generator().manual_seed(22)) < 0.5).double().to(device)
    a = fastcam.attention_loss(feats, weight, bias, labels, lambda_consist=0.5, backend=backend)
    b = fastcam.attention_loss(feats, weight, bias, labels, torch.ones_like(labels, dtype=torch.bool),
                               lambda_consist=0.5, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_bool_and_integer_labels(backend, device):
    feats, weight, bias = make_head_inputs("nchw", device=device, seed=23)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1]], device=device)
    want = fastcam.attention_loss(feats, weight, bias, labels.double(), backend=backend)
    for as_type in (labels, labels.bool()):
        got = fastcam.attention_loss(feats, weight, bias, as_type, backend=backend)
        torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,B,C", [("channels_last", 4, 5), ("nchw", 6, 12), ("tokens", 6, 12)])
def test_low_precision_features(backend, device, dtype, layout, B, C):
    """With C = 12 the last two images are unlabeled: every one of their maps is weighed
    (compiled backends may use GEMMs there, direct loops for the sparse images)."""
    feats, weight, bias = make_head_inputs(layout, B=B, C=C, K=32, H=4, W=4, dtype=dtype,
                                           device=device, seed=24, requires_grad=True)
    labels, mask = partial_labels(B, C, seed=25, device=device)
    if C > 5:
        mask[-2:] = False
    kw = dict(lambda_consist=0.5, lambda_coherence=0.5, grid=(4, 4))

    def run(f, w, b, be):
        f, w, b = (t.detach().requires_grad_() for t in (f, w, b))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, **kw)
        out.loss.backward()
        return out.loss, f.grad, w.grad, b.grad

    got = run(feats, weight, bias, backend)
    exact = run(feats.double(), weight.double(), bias.double(), "torch")
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    if dtype == torch.float32:
        budgets = [1e-5] * 4
    else:
        ref = run(feats, weight, bias, "torch")
        budgets = [2 * max_rel_error(r, e) + 1e-7 for r, e in zip(ref, exact)]
    for name, a, e, budget in zip(("loss", "grad features", "grad weight", "grad bias"), got, exact, budgets):
        assert_close_rel(a, e, budget, name)


def test_attention_map_loss_module(backend, device):
    feats, weight, bias = make_head_inputs("nchw", B=3, C=4, K=5, device=device, seed=26)
    head = torch.nn.Linear(5, 4, dtype=torch.float64, device=device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    labels, mask = partial_labels(3, 4, seed=27, device=device)
    options = dict(lambda_distinct=0.4, lambda_consist=0.3, lambda_coherence=0.2, normalize="max",
                   measure="soft_iou", unlabeled="ignore")
    criterion = fastcam.AttentionMapLoss(**options, backend=backend)
    loss = criterion(feats, head, labels, mask)
    want = fastcam.attention_loss(feats, weight, bias, labels, mask, **options, backend=backend)
    torch.testing.assert_close(loss, want.loss)
    full = criterion(feats, head, labels, mask, return_output=True)
    torch.testing.assert_close(full.cams, want.cams)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert "soft_iou" in repr(criterion)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("unlabeled", ["predicted", "ignore"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_classes_and_images_match_the_reference(backend, device, measure, unlabeled, layout):
    """C = 20 classes and B = 17 images, 16 of them unlabeled: groups with many weighted maps
    (which compiled backends may treat as one GEMM), for both pairwise terms, beside a
    sparse labeled image."""
    B, C = 17, 20
    feats, weight, bias = make_head_inputs(layout, B=B, C=C, K=6, H=3, W=4, device=device, seed=31)
    g = torch.Generator().manual_seed(32)
    labels = (torch.rand(B, C, generator=g) < 0.15).double().to(device)
    mask = torch.ones(B, C, dtype=torch.bool, device=device)
    mask[:16] = False
    kw = dict(measure=measure, lambda_distinct=0.7, lambda_consist=0.4, lambda_coherence=0.3, unlabeled=unlabeled,
              grid=(3, 4))

    def run(be):
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, **kw)
        out.loss.backward()
        return out.distinct, out.consist, out.coherence, out.loss, f.grad, w.grad, b.grad

    for name, got, want in zip(("distinct", "consist", "coherence", "loss", "grad features", "grad weight",
                                "grad bias"), run(backend), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("measure", MEASURES)
def test_groups_of_many_maps_match_the_reference(backend, device, measure):
    """C = 70 classes and B = 40 images, a quarter unlabeled: both pairwise terms' groups are
    large enough for the CUDA backend's tiled overlap kernels (32 maps and more; tiles cut in
    the middle), with sparse labeled images and dense predicted ones beside each other."""
    B, C = 40, 70
    feats, weight, bias = make_head_inputs("nchw", B=B, C=C, K=5, H=3, W=5, device=device, seed=51)
    g = torch.Generator().manual_seed(52)
    labels = (torch.rand(B, C, generator=g) < 0.03).double().to(device)
    mask = torch.ones(B, C, dtype=torch.bool, device=device)
    mask[::4] = False
    kw = dict(measure=measure, lambda_distinct=0.7, lambda_consist=0.4, lambda_coherence=0.3, grid=(3, 5))

    def run(be):
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, **kw)
        return (out.distinct, out.consist, out.loss, *torch.autograd.grad(out.loss, (f, w, b)))

    for name, got, want in zip(("distinct", "consist", "loss", "grad features", "grad weight", "grad bias"),
                               run(backend), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("unlabeled", ["ignore", "predicted"])
def test_nan_reaches_values_and_gradients_as_in_the_reference(backend, device, measure, unlabeled):
    """A NaN feature of an image whose pairs all weigh 0 still makes the terms and the
    gradients NaN exactly where the reference's 0 * NaN does (with "predicted", the NaN
    image's unknown labels get NaN weights)."""
    feats, weight, bias = make_head_inputs("nchw", B=3, C=4, K=5, H=2, W=3, device=device, seed=41)
    feats[1, 2, 0, 1] = float("nan")
    labels = torch.zeros(3, 4, dtype=torch.float64, device=device)
    labels[0, :2] = 1.0
    labels[2, 1:] = 1.0
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    if unlabeled == "predicted":
        mask[1, 1:] = False
    kw = dict(measure=measure, lambda_distinct=1.0, lambda_consist=0.5, lambda_coherence=0.5, unlabeled=unlabeled,
              classification=False)

    def run(be):
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, **kw)
        grads = torch.autograd.grad(out.loss, (f, w, b), allow_unused=True, materialize_grads=True)
        return (out.distinct, out.consist, out.coherence, out.loss, *grads)

    for got, want in zip(run(backend), run("torch")):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("classification,unlabeled", [(True, "predicted"), (True, "ignore"), (False, "ignore"),
                                                      (False, "predicted")])
@pytest.mark.parametrize("positives", ["mixed", "none_paired"])
def test_maps_that_no_term_weighs_match_the_reference(backend, device, layout, classification, unlabeled,
                                                      positives):
    """At real label rates most maps get no gradient from any term (a labeled image with
    fewer than two positives has no weighted pair); compiled backends may leave them out of
    the head's backward GEMMs. Images with 0, 1, 2 and 3 positives and an unlabeled one;
    with classification=False the logits get no gradient at all."""
    B, C = 5, 6
    feats, weight, bias = make_head_inputs(layout, B=B, C=C, K=7, H=3, W=5, device=device, seed=51)
    labels = torch.zeros(B, C, dtype=torch.float64)
    labels[1, 2] = 1.0
    if positives == "mixed":
        labels[2, [0, 4]] = 1.0
        labels[3, [1, 3, 5]] = 1.0
    labels = labels.to(device)
    mask = torch.ones(B, C, dtype=torch.bool, device=device)
    mask[4] = positives == "none_paired" and unlabeled == "predicted"  # else the last image is unlabeled
    kw = dict(lambda_distinct=0.8, unlabeled=unlabeled, classification=classification,
              grid=(3, 5) if layout == "tokens" else None)

    def run(be):
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, labels, mask, backend=be, **kw)
        grads = torch.autograd.grad(out.loss, (f, w, b), allow_unused=True, materialize_grads=True)
        return (out.loss, out.logits, out.cams, *grads)

    for name, got, want in zip(("loss", "logits", "cams", "grad features", "grad weight", "grad bias"),
                               run(backend), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
