"""Edge cases of SPEC §3 on every usable (backend, device): B = 0, N = 1, C = 1, all-zero
maps, NaN in the features, non-contiguous inputs, unlabeled batches and labels=None.

Every value is checked against an independent computation: the loop formulas of
``tests/helpers.py``, ``F.linear(features.mean(spatial), W, b)`` for the logits, and the
loop formulas of the loss terms in ``tests/helpers.py`` (SPEC §2.3 read literally). float64 throughout, so
the comparisons are tight.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastcam
from helpers import (
    ALL_LAMBDAS,
    EPS,
    MEASURES,
    NORMALIZES,
    TIGHT,
    check_loss_against_hand,
    linear_logits,
    make_head_inputs,
    naive_cam_head,
    naive_pairwise,
)


def scalar(t) -> float:
    return t.detach().item()


def grads(loss, tensors):
    """Gradients of ``loss``; an input that the graph does not use gets zeros."""
    return torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


# ------------------------------------------------------------------------------- B = 0


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
def test_empty_batch(backend, device, layout):
    f, w, b = make_head_inputs(layout, B=0, C=3, K=4, H=2, W=3, device=device)
    logits, cams = fastcam.cam_head(f, w, b, backend=backend)
    assert logits.shape == (0, 3) and logits.dtype == torch.float64
    assert cams.shape == ((0, 3, 2, 3) if layout != "tokens" else (0, 3, 6)) and cams.dtype == torch.float64
    for measure in MEASURES:
        overlap = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
        assert overlap.shape == (0, 3, 3)

    for labels, label_mask in [(None, None), (torch.zeros(0, 3, dtype=torch.float64, device=device),
                                              torch.zeros(0, 3, dtype=torch.bool, device=device))]:
        f, w, b = leaves(f, w, b)
        out = fastcam.attention_loss(f, w, b, labels, label_mask, **ALL_LAMBDAS, grid=(2, 3), backend=backend)
        assert out.logits.shape == (0, 3)
        assert out.cams.shape == cams.shape
        for term in (out.loss, out.bce, out.distinct, out.consist, out.coherence):
            assert term.shape == () and torch.isfinite(term)
            assert scalar(term) == 0.0  # every sum of SPEC §2.3 is empty
        out.loss.backward()
        assert f.grad is not None and f.grad.shape == f.shape
        torch.testing.assert_close(w.grad, torch.zeros_like(w), rtol=0, atol=0)
        torch.testing.assert_close(b.grad, torch.zeros_like(b), rtol=0, atol=0)


# ------------------------------------------------------------------------ N = 1, C = 1


N1_SHAPES = [("nchw", dict(H=1, W=1)), ("channels_last", dict(H=1, W=1)), ("tokens", dict(H=1, W=1))]


@pytest.mark.parametrize("layout, hw", N1_SHAPES, ids=[s[0] for s in N1_SHAPES])
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_single_position_cam_head(backend, device, layout, hw, normalize):
    f, w, b = make_head_inputs(layout, B=3, C=4, K=5, **hw, device=device, seed=3)
    logits, cams = fastcam.cam_head(f, w, b, normalize=normalize, backend=backend)
    ref_logits, ref_cams = naive_cam_head(f.cpu(), w.cpu(), b.cpu(), normalize)
    torch.testing.assert_close(logits.cpu(), ref_logits, **TIGHT)
    torch.testing.assert_close(logits.cpu(), linear_logits(f, w, b).cpu(), **TIGHT)
    assert cams.shape == ((3, 4, 1, 1) if layout != "tokens" else (3, 4, 1))
    torch.testing.assert_close(cams.cpu().reshape(3, 4, 1), ref_cams, **TIGHT)
    if normalize == "softmax":
        torch.testing.assert_close(cams.cpu(), torch.ones_like(cams.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("layout, hw", N1_SHAPES, ids=[s[0] for s in N1_SHAPES])
@pytest.mark.parametrize("measure", MEASURES)
def test_single_position_overlap_and_loss(backend, device, layout, hw, measure):
    f, w, b = make_head_inputs(layout, B=3, C=4, K=5, **hw, device=device, seed=4, requires_grad=True)
    _, cams = fastcam.cam_head(f, w, b, backend=backend)
    torch.testing.assert_close(fastcam.pairwise_overlap(cams, measure=measure, backend=backend).cpu(),
                               naive_pairwise(cams.detach().cpu(), measure), **TIGHT)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]],
                          dtype=torch.float64, device=device)
    mask = torch.tensor([[True, True, False, True], [True, False, True, True], [True] * 4], device=device)
    grid = (1, 1) if layout == "tokens" else None
    out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, **ALL_LAMBDAS, grid=grid, backend=backend)
    check_loss_against_hand(out, f, w, b, labels, mask, measure=measure, grid=grid)
    for g in grads(out.loss, [f, w, b]):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
@pytest.mark.parametrize("measure", MEASURES)
def test_single_class(backend, device, layout, measure):
    f, w, b = make_head_inputs(layout, B=3, C=1, K=4, H=2, W=3, device=device, seed=5, requires_grad=True)
    logits, cams = fastcam.cam_head(f, w, b, backend=backend)
    ref_logits, ref_cams = naive_cam_head(f.detach().cpu(), w.detach().cpu(), b.detach().cpu(), "l2")
    torch.testing.assert_close(logits.detach().cpu(), ref_logits, **TIGHT)
    torch.testing.assert_close(cams.detach().cpu().reshape(ref_cams.shape), ref_cams, **TIGHT)
    overlap = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
    assert overlap.shape == (3, 1, 1)
    torch.testing.assert_close(overlap.detach().cpu(), naive_pairwise(cams.detach().cpu(), measure), **TIGHT)

    labels = torch.tensor([[1.0], [0.7], [0.0]], dtype=torch.float64, device=device)
    mask = torch.tensor([[True], [True], [False]], device=device)
    grid = (2, 3) if layout == "tokens" else None
    out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, **ALL_LAMBDAS, grid=grid, backend=backend)
    assert scalar(out.distinct) == 0.0  # no pair of distinct classes
    check_loss_against_hand(out, f, w, b, labels, mask, measure=measure, grid=grid)
    assert scalar(out.consist) != 0.0  # three images weigh in: the term is defined
    gf, gw, gb = grads(out.distinct, [f, w, b])
    for g in (gf, gw, gb):
        assert torch.count_nonzero(g) == 0


# ----------------------------------------------------------------------- all-zero maps


def negative_scores_inputs(layout, device, requires_grad=True):
    """Positive features and a negative weight: every S[b, c, n] < 0, so relu(S) = 0."""
    f, w, b = make_head_inputs(layout, B=3, C=3, K=4, H=2, W=3, device=device, seed=6)
    f, w = f.abs() + 0.1, -(w.abs() + 0.1)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    return [t.detach().requires_grad_(requires_grad) for t in (f, w, b)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("normalize", [n for n in NORMALIZES if n != "softmax"])
@pytest.mark.parametrize("measure", MEASURES)
def test_all_zero_maps(backend, device, layout, normalize, measure):
    f, w, b = negative_scores_inputs(layout, device)
    logits, cams = fastcam.cam_head(f, w, b, normalize=normalize, backend=backend)
    assert torch.equal(cams, torch.zeros_like(cams))
    torch.testing.assert_close(logits, linear_logits(f, w, b), **TIGHT)
    overlap = fastcam.pairwise_overlap(cams, measure=measure, backend=backend)
    assert torch.equal(overlap, torch.zeros_like(overlap))
    # The overlap of zero maps has a finite (zero) gradient too.
    zero_maps = torch.zeros(3, 3, 6, dtype=torch.float64, device=device, requires_grad=True)
    (g_maps,) = grads(fastcam.pairwise_overlap(zero_maps, measure=measure, backend=backend).sum(), [zero_maps])
    assert torch.isfinite(g_maps).all()

    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64, device=device)
    mask = torch.tensor([[True, True, True], [False, True, True], [True, False, False]], device=device)
    grid = (2, 3) if layout == "tokens" else None
    out = fastcam.attention_loss(f, w, b, labels, mask, normalize=normalize, measure=measure, **ALL_LAMBDAS,
                                 grid=grid, backend=backend)
    for term in (out.loss, out.bce, out.distinct, out.consist, out.coherence):
        assert torch.isfinite(term)
    assert scalar(out.distinct) == 0.0 and scalar(out.coherence) == 0.0
    check_loss_against_hand(out, f, w, b, labels, mask, normalize=normalize, measure=measure, grid=grid)
    got = grads(out.loss, [f, w, b])
    # The maps are 0 in a neighbourhood of the inputs: only the BCE moves the loss.
    ref_f, ref_w, ref_b = leaves(f, w, b)
    ref_logits = linear_logits(ref_f, ref_w, ref_b)
    bce = F.binary_cross_entropy_with_logits(ref_logits[mask], labels[mask])
    expected = grads(bce, [ref_f, ref_w, ref_b])
    for name, g, e in zip("fwb", got, expected, strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, **TIGHT, msg=lambda m, name=name: f"grad {name}: {m}")


# ------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "tokens"])
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_nan_feature_propagates_to_its_image_only(backend, device, layout, normalize):
    f, w, b = make_head_inputs(layout, B=3, C=3, K=4, H=2, W=3, device=device, seed=7)
    nan_f = f.clone()
    if layout == "tokens":
        nan_f[1, 4, 2] = math.nan  # image 1, position 4, channel 2
    else:
        nan_f[1, 2, 1, 1] = math.nan  # image 1, channel 2, position 1 * 3 + 1 = 4
    logits, cams = fastcam.cam_head(nan_f, w, b, normalize=normalize, backend=backend)
    clean_logits, clean_cams = fastcam.cam_head(f, w, b, normalize=normalize, backend=backend)
    cams, clean_cams = cams.reshape(3, 3, 6), clean_cams.reshape(3, 3, 6)

    assert torch.isnan(logits[1]).all()
    if normalize == "none":  # relu(S) per position: only the NaN position is NaN
        assert torch.isnan(cams[1, :, 4]).all()
        keep = [n for n in range(6) if n != 4]
        torch.testing.assert_close(cams[1][:, keep], clean_cams[1][:, keep], **TIGHT)
    else:  # the NaN reaches the map's normalizer
        assert torch.isnan(cams[1]).all()
    others = [0, 2]
    assert torch.isfinite(logits[others]).all() and torch.isfinite(cams[others]).all()
    torch.testing.assert_close(logits[others], clean_logits[others], **TIGHT)
    torch.testing.assert_close(cams[others], clean_cams[others], **TIGHT)
    ref_logits, ref_cams = naive_cam_head(f.cpu(), w.cpu(), b.cpu(), normalize)
    torch.testing.assert_close(logits[others].cpu(), ref_logits[others], **TIGHT)
    torch.testing.assert_close(cams[others].cpu(), ref_cams[others], **TIGHT)

    overlap = fastcam.pairwise_overlap(cams, backend=backend)
    assert torch.isnan(overlap[1]).all()
    torch.testing.assert_close(overlap[others].cpu(), naive_pairwise(ref_cams[others], "cosine"), **TIGHT)

    grid = (2, 3) if layout == "tokens" else None
    out = fastcam.attention_loss(nan_f, w, b, normalize=normalize, **ALL_LAMBDAS, grid=grid, backend=backend)
    assert torch.isnan(out.loss)  # never silently zeroed


# ------------------------------------------------------------------- non-contiguous inputs


def noncontiguous_features(kind, device):
    g = torch.Generator().manual_seed(8)
    B, K, H, W = 2, 4, 3, 2
    if kind == "nchw-transposed":  # [B, K, W, H] seen as [B, K, H, W]
        return torch.randn(B, K, W, H, generator=g, dtype=torch.float64).to(device).transpose(2, 3)
    if kind == "nchw-permuted":  # batch not outermost in memory
        return torch.randn(H, K, B, W, generator=g, dtype=torch.float64).to(device).permute(2, 1, 0, 3)
    if kind == "nchw-sliced":
        return torch.randn(B + 1, 2 * K, H + 1, W + 2, generator=g, dtype=torch.float64).to(device)[1:, ::2, 1:, 1:-1]
    if kind == "tokens-transposed":  # [B, K, N] seen as [B, N, K]
        return torch.randn(B, K, H * W, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
    if kind == "tokens-sliced":
        return torch.randn(B, 2 * H * W, 3 * K, generator=g, dtype=torch.float64).to(device)[:, 1::2, 2::3]
    if kind == "tokens-expanded":  # stride 0 over the batch
        return torch.randn(1, H * W, K, generator=g, dtype=torch.float64).to(device).expand(B, -1, -1)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nchw-transposed", "nchw-permuted", "nchw-sliced", "tokens-transposed",
                                  "tokens-sliced", "tokens-expanded"])
@pytest.mark.parametrize("measure", ["cosine", "soft_iou"])
def test_noncontiguous_inputs(backend, device, kind, measure):
    features = noncontiguous_features(kind, device)
    K, C = 4, 3
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(K, C, generator=g, dtype=torch.float64).to(device).t()  # transposed view
    bias = torch.randn(2 * C, generator=g, dtype=torch.float64).to(device)[1::2]  # stride 2
    assert not (features.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.3, 1.0, 1.0]], dtype=torch.float64, device=device)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    grid = (3, 2) if features.dim() == 3 else None

    results = []
    for make in (lambda t: t.detach().requires_grad_(), lambda t: t.detach().contiguous().requires_grad_()):
        f, w, b = make(features), make(weight), make(bias)
        logits, cams = fastcam.cam_head(f, w, b, backend=backend)
        overlap = fastcam.pairwise_overlap(cams.transpose(0, 1).detach().contiguous().transpose(0, 1),
                                           measure=measure, backend=backend)  # non-contiguous maps
        out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, **ALL_LAMBDAS, grid=grid,
                                     backend=backend)
        results.append((logits, cams, overlap, out, grads(out.loss, [f, w, b])))
        check_loss_against_hand(out, f, w, b, labels, mask, measure=measure, grid=grid)

    (lg, cm, ov, out, gr), (lg2, cm2, ov2, out2, gr2) = results
    torch.testing.assert_close(lg, lg2, **TIGHT)
    torch.testing.assert_close(lg, linear_logits(features, weight, bias), **TIGHT)
    torch.testing.assert_close(cm, cm2, **TIGHT)
    torch.testing.assert_close(ov.cpu(), naive_pairwise(cm.detach().cpu(), measure), **TIGHT)
    torch.testing.assert_close(ov, ov2, **TIGHT)
    for name in ("loss", "bce", "distinct", "consist", "coherence"):
        torch.testing.assert_close(getattr(out, name), getattr(out2, name), **TIGHT)
    for name, a, e in zip("fwb", gr, gr2, strict=True):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, **TIGHT, msg=lambda m, name=name: f"grad {name}: {m}")


# ------------------------------------------------------------------- unlabeled batches


def loss_inputs(layout, device, seed=10, B=3, C=4):
    f, w, b = make_head_inputs(layout, B=B, C=C, K=5, H=2, W=3, device=device, seed=seed, requires_grad=True)
    return f, w, b, ((2, 3) if layout == "tokens" else None)


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
@pytest.mark.parametrize("measure", MEASURES)
def test_fully_unlabeled_batch_uses_detached_predictions(backend, device, layout, measure):
    f, w, b, grid = loss_inputs(layout, device)
    labels = torch.full((3, 4), math.nan, dtype=torch.float64, device=device)
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, **ALL_LAMBDAS, grid=grid, backend=backend)
    assert scalar(out.bce) == 0.0
    for term in (out.loss, out.distinct, out.consist, out.coherence):
        assert torch.isfinite(term)

    # distinct by hand from the returned logits and maps: w[b,c,d] = s(l_bc) s(l_bd), c != d.
    logits = out.logits.detach().cpu()
    cams = out.cams.detach().cpu().reshape(3, 4, 6)
    s = torch.sigmoid(logits)
    pair = s[:, :, None] * s[:, None, :] * (1 - torch.eye(4, dtype=torch.float64))
    overlap = naive_pairwise(cams, measure)
    expected = (pair * overlap).sum() / (pair.sum() + EPS)
    torch.testing.assert_close(out.distinct.detach().cpu(), expected, **TIGHT)
    # and every term against the loop formulas, from the features
    check_loss_against_hand(out, f, w, b, labels, mask, measure=measure, grid=grid)

    # distinct only, no BCE: the bias moves the logits only, and q is detached.
    out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, classification=False, backend=backend)
    assert out.bce is None and out.consist is None and out.coherence is None
    gf, gw, gb = grads(out.loss, [f, w, b])
    assert torch.count_nonzero(gb) == 0
    # features/weight gradients equal those with q given as a constant
    rf, rw, rb = leaves(f, w, b)
    q = torch.sigmoid(linear_logits(rf, rw, rb)).detach()
    rcams = fastcam.cam_head(rf, rw, rb, backend=backend)[1].reshape(3, 4, 6)
    rpair = q[:, :, None] * q[:, None, :] * (1 - torch.eye(4, dtype=torch.float64, device=device))
    rdistinct = (rpair * fastcam.pairwise_overlap(rcams, measure=measure, backend=backend)).sum() / (rpair.sum() + EPS)
    ef, ew = grads(rdistinct, [rf, rw])
    torch.testing.assert_close(gf, ef, **TIGHT)
    torch.testing.assert_close(gw, ew, **TIGHT)
    assert torch.count_nonzero(gw) > 0


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
def test_ignore_fully_unlabeled_batch_gives_zero_terms(backend, device, layout):
    f, w, b, grid = loss_inputs(layout, device)
    labels = torch.full((3, 4), -1.0, dtype=torch.float64, device=device)
    labels[0, 0] = math.nan
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    for lab, msk in ((labels, mask), (None, None)):
        out = fastcam.attention_loss(f, w, b, lab, msk, **ALL_LAMBDAS, grid=grid, unlabeled="ignore",
                                     backend=backend)
        for term in (out.bce, out.distinct, out.consist, out.coherence, out.loss):
            assert scalar(term) == 0.0
        for g in grads(out.loss, [f, w, b]):
            assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
@pytest.mark.parametrize("measure", MEASURES)
def test_ignore_partial_labels(backend, device, layout, measure):
    f, w, b, grid = loss_inputs(layout, device, seed=11)
    labels = torch.tensor([[1.0, math.nan, 1.0, 0.0], [0.6, 1.0, -1.0, 1.0], [2.0, 1.0, 1.0, 0.25]],
                          dtype=torch.float64, device=device)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True], [False, True, True, True]],
                        device=device)
    out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, **ALL_LAMBDAS, grid=grid,
                                 unlabeled="ignore", backend=backend)
    check_loss_against_hand(out, f, w, b, labels, mask, measure=measure, grid=grid, unlabeled="ignore")
    # q = labels where known, 0 elsewhere, from the returned maps
    q = torch.where(mask, labels, 0.0).cpu()
    cams = out.cams.detach().cpu().reshape(3, 4, 6)
    pair = q[:, :, None] * q[:, None, :] * (1 - torch.eye(4, dtype=torch.float64))
    expected = (pair * naive_pairwise(cams, measure)).sum() / (pair.sum() + EPS)
    torch.testing.assert_close(out.distinct.detach().cpu(), expected, **TIGHT)


@pytest.mark.parametrize("layout", ["nchw", "tokens"])
@pytest.mark.parametrize("unlabeled", ["predicted", "ignore"])
@pytest.mark.parametrize("classification", [True, False])
def test_labels_none_equals_nothing_known(backend, device, layout, unlabeled, classification):
    f, w, b, grid = loss_inputs(layout, device, seed=12)
    options = dict(**ALL_LAMBDAS, grid=grid, unlabeled=unlabeled, classification=classification, backend=backend)
    # Bit for bit on the CPU. A GPU kernel compiled for "no labels" and one for "labels, all
    # masked" may fuse different multiply-adds (seen with Triton on an H200: 2e-15 relative).
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-13, atol=1e-16)
    none = fastcam.attention_loss(f, w, b, None, None, **options)
    labels = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
    masked = fastcam.attention_loss(f, w, b, labels, torch.zeros(3, 4, dtype=torch.bool, device=device), **options)
    for name in ("loss", "logits", "cams", "bce", "distinct", "consist", "coherence"):
        a, e = getattr(none, name), getattr(masked, name)
        if e is None:
            assert a is None and name == "bce" and not classification
            continue
        torch.testing.assert_close(a, e, **exact, msg=lambda m, name=name: f"{name}: {m}")
    if classification:
        assert scalar(none.bce) == 0.0
    for a, e in zip(grads(none.loss, [f, w, b]), grads(masked.loss, [f, w, b]), strict=True):
        torch.testing.assert_close(a, e, **exact)
    check_loss_against_hand(none, f, w, b, None, None, grid=grid, unlabeled=unlabeled, classification=classification)
