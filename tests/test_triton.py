"""backend="triton": its kernels against the reference, on CUDA tensors when a GPU is present
and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)
otherwise — the same tests. The whole suite runs it too with FASTCAM_TEST_BACKENDS=triton."""

import pytest
import torch

import fastcam
from fastcam import reference
from helpers import (
    LAYOUTS,
    MEASURES,
    NORMALIZES,
    assert_close_rel,
    assert_compiled_step_matches_eager,
    make_head_inputs,
    max_rel_error,
    to_nkn,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fastcam.backends()["triton"].usable,
                                reason=f"triton backend not usable: {fastcam.backends()['triton'].reason}")


def _step(backend, feats, weight, bias, **kw):
    f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
    if "labels" not in kw:
        kw["labels"] = torch.ones(f.shape[0], w.shape[0], device=f.device) * 0.5
    out = fastcam.attention_loss(f, w, b, backend=backend, **kw)
    grads = torch.autograd.grad(out.loss.double() + out.logits.double().sum() + (out.cams.double() ** 2).sum(),
                                (f, w, b))
    return (out.loss, out.logits, out.cams, *grads)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize,measure", [("l2", "cosine"), ("max", "soft_iou")])
def test_float64_matches_the_reference(layout, normalize, measure):
    """Odd sizes (C = 3, K = 37, 5 x 7 positions) against every tile edge of the head; every
    normalize x measure is in test_every_layout_normalize_and_measure."""
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
    kw = dict(lambda_consist=0.5, lambda_coherence=0.5, grid=(4, 5) if layout == "tokens" else None)
    got = _step("triton", feats, weight, bias, **kw)
    exact = _step("torch", feats.double(), weight.double(), bias.double(), **kw)
    same = _step("torch", feats, weight, bias, **kw)
    for name, g, e, r in zip(("loss", "logits", "cams", "grad F", "grad W", "grad b"), got, exact, same):
        budget = 1e-5 if dtype == torch.float32 else 2 * max_rel_error(r, e) + 1e-6
        assert_close_rel(g, e, budget, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,C,K,H,W", [(5, 70, 130, 7, 11), (3, 14, 96, 1, 49)])
def test_gemm_kernels_against_float64(layout, dtype, B, C, K, H, W):
    """The head's GEMM ops with fp32 W and G (for bf16 features: their bf16 parts on the tensor
    cores) against float64: S and dW to fp32 accuracy, dF to its dtype's rounding, in the
    features' strides. Two class tiles, channel and position edges, batch splits of dW."""
    from fastcam.triton.cam_head import scores, scores_backward

    feats, _, _ = make_head_inputs(layout, B=B, C=C, K=K, H=H, W=W, dtype=dtype, device=DEVICE, seed=56)
    f = to_nkn(feats)
    gen = torch.Generator().manual_seed(57)
    w = torch.randn(C, K, generator=gen).to(DEVICE)  # fp32 values that bf16 does not hold
    g = torch.randn(B, C, H * W, generator=gen).to(DEVICE)
    s = scores(f, w)
    df, dw = scores_backward(g, f, w, True, True)
    f64, w64, g64 = f.double(), w.double(), g.double()
    assert_close_rel(s, torch.einsum("ck,bkn->bcn", w64, f64), 1e-6, "S")
    assert_close_rel(dw, torch.einsum("bcn,bkn->ck", g64, f64), 1e-6, "dW")
    rounding = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10, torch.float32: 1e-5}[dtype]
    assert_close_rel(df, torch.einsum("ck,bcn->bkn", w64, g64), rounding, "dF")
    assert df.dtype == dtype and df.stride() == f.stride()


def test_bf16_scores_keep_an_infinite_weight_infinite():
    """An infinite weight stays whole in the first bf16 part (inf - inf would make every part
    NaN): its class's scores are +-inf by the features' signs, the other classes' finite."""
    from fastcam.triton.cam_head import scores

    feats, _, _ = make_head_inputs("nchw", B=2, C=5, K=40, H=3, W=5, dtype=torch.bfloat16, device=DEVICE, seed=58)
    f = feats.flatten(2)
    w = torch.randn(5, 40, generator=torch.Generator().manual_seed(59)).to(DEVICE)
    w[1, 3] = float("inf")
    s = scores(f, w)
    assert torch.equal(s[:, 1] > 0, f[:, 3] > 0) and bool(torch.isinf(s[:, 1]).all())
    others = [0, 2, 3, 4]
    assert_close_rel(s[:, others], torch.einsum("ck,bkn->bcn", w[others].double(), f.double()), 1e-5, "S")


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
def test_opcheck_pairwise_overlap_and_attention_terms_on_cuda(device):
    """opcheck of the overlap and loss-term ops (CUDA only, for the reason above)."""
    from fastcam.triton.attention_terms import attention_terms, attention_terms_backward
    from fastcam.triton.pairwise_overlap import pairwise_overlap, pairwise_overlap_backward

    cams = _maps((3, 5, 12), seed=78, dtype=torch.float32).to(device)
    for measure in MEASURES:
        torch.library.opcheck(pairwise_overlap, (cams.clone().requires_grad_(), measure, 1e-6))
        torch.library.opcheck(pairwise_overlap_backward, (torch.randn(3, 5, 5, device=device), cams, measure, 1e-6))
    logits = torch.randn(3, 5, device=device)
    labels, mask = _labels(3, 5, "masked", seed=79)
    labels, mask = labels.to(device=device, dtype=torch.float32), mask.to(device)
    known = torch.where(mask, labels, 0.25)  # without a mask every label counts: no garbage in them
    for measure, y, m in (("cosine", labels, mask), ("soft_iou", None, None), ("dice", known, None)):
        options = (measure, 1e-6, True, 3, 4, [1.0, 0.5, 0.5, 0.5])
        torch.library.opcheck(attention_terms, (logits.clone().requires_grad_(), cams.clone().requires_grad_(), y, m,
                                                *options))  # fmt: skip
        torch.library.opcheck(attention_terms_backward, (torch.randn(5, device=device), logits, cams, y, m, *options))


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else [])
@pytest.mark.parametrize("measure", ["cosine", "soft_iou"])
def test_compiled_training_step_on_cuda(device, measure):
    """torch.compile(fullgraph=True) traces through the triton_ops, every term on. Not under the
    interpreter: there torch.library.wrap_triton hands back the plain InterpretedFunction, which
    the triton_op's decomposition under FunctionalTensorMode then runs on fake tensors (it reads
    their data pointers), a limit of torch, not of these kernels (opcheck fails the same way)."""
    feats, weight, bias = make_head_inputs("nchw", B=3, C=4, K=40, H=3, W=5, dtype=torch.float32, device=device,
                                           seed=55)
    labels, mask = _labels(3, 4, "masked", seed=80)
    labels, mask = labels.to(device), mask.to(device)

    def step(f, w, b):
        out = fastcam.attention_loss(f, w, b, labels, mask, measure=measure, lambda_consist=0.5, lambda_coherence=0.5,
                                     backend="triton")  # fmt: skip
        return out.loss, out.cams

    assert_compiled_step_matches_eager(step, (feats, weight, bias))

    def overlap(cams):
        o = fastcam.pairwise_overlap(cams, measure=measure, backend="triton")
        return (o * o).sum(), o

    assert_compiled_step_matches_eager(overlap, (_maps((2, 5, 3, 4), seed=81, dtype=torch.float32),))


# --------------------------------------------------- pairwise overlaps and loss terms


def _maps(shape, *, seed, dtype=torch.float64, zero=None, tie=None, nan=None):
    """Maps as the head makes them: non-negative, exact zeros, never all zero unless ``zero``
    (a (b, c) index) asks for one; ``tie`` copies map (b, c) onto (b, c + 1) at even positions;
    ``nan`` puts a NaN in map (b, c) at position 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g, dtype=torch.float64)) + 0.01 * torch.rand(shape, generator=g,
                                                                                            dtype=torch.float64)
    x = x.flatten(2)
    x[..., ::3] = torch.relu(x[..., ::3] - 0.5)  # exact zeros here and there
    if zero is not None:
        x[zero] = 0.0
    if tie is not None:
        b, c = tie
        x[b, c + 1, ::2] = x[b, c, ::2]
    if nan is not None:
        x[nan + (0,)] = float("nan")
    return x.reshape(shape).to(device=DEVICE, dtype=dtype)


def _overlap_and_grad(fn, cams, grad_out):
    c = cams.detach().clone().requires_grad_()
    o = fn(c)
    (g,) = torch.autograd.grad(o, c, grad_out)
    return o, g


def _assert_same(got, want, what, rtol=1e-10, atol=1e-12):
    """Equal up to rounding, with NaN exactly where the reference has it."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at other places than the reference's"
    torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 1, 9), (2, 17, 70), (2, 4, 1), (0, 3, 6)],
                         ids=["4d", "C1", "C17", "N1", "B0"])  # fmt: skip
def test_pairwise_overlap_float64_values_and_gradients(measure, shape):
    """fastcam.pairwise_overlap(backend="triton") against the reference: C = 17 crosses a tile of
    pairs, N = 70 a tile of positions (64 for dot and cosine, 16 for the others); a map with no
    positive value, tied values."""
    zero = (1, 2) if shape[0] > 1 and shape[1] > 2 else None
    tie = (0, 1) if shape[0] > 0 and shape[1] > 2 else None
    cams = _maps(shape, seed=60, zero=zero, tie=tie)
    grad_out = torch.randn(shape[0], shape[1], shape[1], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(61)).to(DEVICE)  # fmt: skip
    got = _overlap_and_grad(lambda c: fastcam.pairwise_overlap(c, measure=measure, backend="triton"), cams, grad_out)
    want = _overlap_and_grad(lambda c: reference.pairwise_overlap(c, measure), cams, grad_out)
    assert got[0].shape == (shape[0], shape[1], shape[1]) and got[0].dtype == torch.float64
    for what, g, w in zip(("overlap", "grad cams"), got, want):
        _assert_same(g, w, what)
    if zero is not None:
        assert (got[0][zero[0], zero[1]] == 0).all() and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pairwise_overlap_low_precision(measure, dtype):
    """Maps of any float dtype give float32 overlaps within 1e-5 of float64; their gradient, in
    the maps' dtype, within 1e-5 (fp32) or 2x the same-dtype reference's error."""
    cams = _maps((2, 18, 4, 5), seed=62, dtype=dtype)
    grad_out = torch.randn(2, 18, 18, generator=torch.Generator().manual_seed(63)).to(DEVICE)
    got = _overlap_and_grad(lambda c: fastcam.pairwise_overlap(c, measure=measure, backend="triton"), cams, grad_out)
    exact = _overlap_and_grad(lambda c: reference.pairwise_overlap(c, measure), cams.double(), grad_out.double())
    same = _overlap_and_grad(lambda c: reference.pairwise_overlap(c, measure), cams, grad_out)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert_close_rel(got[0], exact[0], 1e-5, f"{measure} overlap")
    budget = 1e-5 if dtype == torch.float32 else 2 * max_rel_error(same[1], exact[1]) + 1e-6
    assert_close_rel(got[1], exact[1], budget, f"{measure} grad cams")


@pytest.mark.parametrize("measure", MEASURES)
def test_pairwise_overlap_nan_as_in_the_reference(measure):
    cams = _maps((2, 3, 6), seed=64, nan=(1, 2))
    grad_out = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(65)).to(DEVICE)
    got = _overlap_and_grad(lambda c: fastcam.pairwise_overlap(c, measure=measure, backend="triton"), cams, grad_out)
    want = _overlap_and_grad(lambda c: reference.pairwise_overlap(c, measure), cams, grad_out)
    assert want[0].isnan().any() and not want[0][0].isnan().any()  # the test means something
    for what, g, w in zip(("overlap", "grad cams"), got, want):
        _assert_same(g, w, what)


def _labels(B, C, kind, *, seed):
    """(labels, label_mask): None; all known; or a third unknown holding NaN and -1, a fully
    unlabeled image, a soft label."""
    if kind == "none":
        return None, None
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(B, C, generator=g) < 0.5).double()
    labels[0, 0] = 0.3
    if kind == "all":
        return labels.to(DEVICE), None
    mask = torch.rand(B, C, generator=g) < 0.67
    mask[-1] = False
    labels = torch.where(mask, labels, torch.where(torch.rand(B, C, generator=g) < 0.5, float("nan"), -1.0))
    return labels.to(DEVICE), mask.to(DEVICE)


def _terms(fn, logits, cams, grad_terms):
    """(the five terms, dL/dlogits, dL/dcams) of fn(logits, cams) -> [5] for grad_terms."""
    x, c = logits.detach().clone().requires_grad_(), cams.detach().clone().requires_grad_()
    terms = fn(x, c)
    if not terms.requires_grad:  # the reference with every weight 0: a constant 0
        return terms, torch.zeros_like(x), torch.zeros_like(c)
    return (terms, *torch.autograd.grad(terms, (x, c), grad_terms, allow_unused=True, materialize_grads=True))


def _reference_terms(labels, mask, *, measure, weights, grid, unlabeled, eps=1e-6):
    def fn(logits, cams):
        out = reference.loss_terms(logits, cams, labels, mask, measure=measure, lambda_distinct=weights[1],
                                   lambda_consist=weights[2], lambda_coherence=weights[3], grid=grid,
                                   unlabeled=unlabeled, classification=bool(weights[0]), eps=eps)  # fmt: skip
        zero = logits.new_zeros(())
        return torch.stack([out[k] if out[k] is not None else zero for k in ("loss", "bce", "distinct", "consist",
                                                                              "coherence")])  # fmt: skip

    return fn


def _triton_terms(labels, mask, *, measure, weights, grid, unlabeled, eps=1e-6):
    from fastcam.triton.attention_terms import attention_terms

    return lambda logits, cams: attention_terms(logits, cams, labels, mask, measure, eps, unlabeled == "predicted",
                                                *grid, weights)  # fmt: skip


def _check_terms(B, C, grid, *, measure, labels_kind="masked", unlabeled="predicted", weights=(1.0, 0.7, 0.3, 0.1),
                 seed=66):  # fmt: skip
    """fastcam_triton::attention_terms and its backward against reference.loss_terms: the five
    values and a random gradient of them to the logits and the maps (one with no positive value)."""
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, C, generator=g, dtype=torch.float64)).to(DEVICE)
    cams = _maps((B, C, grid[0] * grid[1]), seed=seed + 1, zero=(1, 2) if B > 1 and C > 2 else None)
    grad_terms = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE)
    labels, mask = _labels(B, C, labels_kind, seed=seed + 2) if B > 0 else (None, None)
    kw = dict(measure=measure, weights=list(weights), grid=grid, unlabeled=unlabeled)
    got = _terms(_triton_terms(labels, mask, **kw), logits, cams, grad_terms)
    want = _terms(_reference_terms(labels, mask, **kw), logits, cams, grad_terms)
    for what, gv, wv in zip(("terms", "grad logits", "grad cams"), got, want):
        _assert_same(gv, wv, f"B={B} C={C} {weights} {what}")


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("labels_kind", ["none", "all", "masked"])
@pytest.mark.parametrize("unlabeled", ["predicted", "ignore"])
def test_attention_terms_float64_values_and_gradients(measure, labels_kind, unlabeled):
    """Every term at once, for labels None, all known, or partly known."""
    _check_terms(3, 4, (2, 3), measure=measure, labels_kind=labels_kind, unlabeled=unlabeled)


@pytest.mark.parametrize("measure", MEASURES)
def test_attention_terms_across_tiles(measure):
    """B = 17 images cross a tile of the consistency term's pairs, C = 18 classes one of the
    distinctiveness term's, N = 20 positions one of the min/max measures' positions."""
    _check_terms(17, 3, (3, 5), measure=measure)
    _check_terms(3, 18, (4, 5), measure=measure)


@pytest.mark.parametrize("weights", [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 2.0],
                                     [0.0, 0.0, 0.0, 0.0]])  # fmt: skip
def test_attention_terms_single_terms_and_edge_shapes(weights):
    """A term of weight 0 is not computed (0, no gradient from it); one image (no consistency
    pair), one class (no distinctiveness pair), no images, one position."""
    for B, C, grid in ((1, 4, (2, 3)), (3, 1, (2, 3)), (0, 3, (2, 3)), (2, 3, (1, 1))):
        _check_terms(B, C, grid, measure="cosine", weights=weights, seed=69)


@pytest.mark.parametrize("measure", MEASURES)
def test_attention_terms_nan_as_in_the_reference(measure):
    """A NaN in one map, and a NaN logit (so a NaN predicted weight): the terms and the
    gradients are NaN exactly where the reference's are (0 * NaN included)."""
    B, C, grid = 3, 4, (2, 3)
    g = torch.Generator().manual_seed(72)
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    logits[2, 3] = float("nan")
    cams = _maps((B, C, 6), seed=73, nan=(1, 2))
    labels, mask = _labels(B, C, "masked", seed=74)
    mask[2, 3] = False
    grad_terms = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE)
    for weights in ([1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]):
        kw = dict(measure=measure, weights=weights, grid=grid, unlabeled="predicted")
        got = _terms(_triton_terms(labels, mask, **kw), logits.to(DEVICE), cams, grad_terms)
        want = _terms(_reference_terms(labels, mask, **kw), logits.to(DEVICE), cams, grad_terms)
        assert want[0].isnan().any()
        for what, gv, wv in zip(("terms", "grad logits", "grad cams"), got, want):
            _assert_same(gv, wv, f"{weights} {what}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("measure", MEASURES)
def test_every_layout_normalize_and_measure(layout, normalize, measure):
    """The whole attention_loss (head, overlaps, every term) in float64 against the reference,
    values and the gradients of F, W and b, with partial labels."""
    feats, weight, bias = make_head_inputs(layout, B=3, C=3, K=16, H=2, W=3, device=DEVICE, seed=75)
    labels, mask = _labels(3, 3, "masked", seed=76)
    kw = dict(labels=labels, label_mask=mask, normalize=normalize, measure=measure, lambda_distinct=0.6,
              lambda_consist=0.5, lambda_coherence=0.4, grid=(2, 3) if layout == "tokens" else None)
    got, want = _step("triton", feats, weight, bias, **kw), _step("torch", feats, weight, bias, **kw)
    for name, g, w in zip(("loss", "logits", "cams", "grad F", "grad W", "grad b"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_split_float_halves_rejoin_exactly():
    """Python floats reach a compiled Triton kernel as float32: eps and the weights go as two
    float32 halves whose float64 sum is the value."""
    import struct

    from fastcam.triton.common import split_float

    for value in (1e-6, 0.1, 1.0, 0.0, 3.7e-9, 123.456, 1e300):
        hi, lo = split_float(value)
        for half in (hi, lo) if value < 3e38 else (lo,):
            assert struct.unpack("f", struct.pack("f", half))[0] == half  # each a float32
        assert abs((hi + lo) - value) <= 2.0**-46 * abs(value), value
    assert abs(split_float(0.1)[0] - 0.1) > 1e-10  # float32 alone is not exact enough for float64


def test_bad_maps_are_refused_naming_them():
    from fastcam.triton.attention_terms import attention_terms
    from fastcam.triton.pairwise_overlap import pairwise_overlap

    with pytest.raises(ValueError, match="cams must be a float32 or float64"):
        pairwise_overlap(torch.ones(2, 3, 4, dtype=torch.bfloat16, device=DEVICE), "cosine", 1e-6)
    with pytest.raises(ValueError, match=r"cams must be a float32 or float64 \[G, P, N\]"):
        pairwise_overlap(torch.ones(2, 3, dtype=torch.float32, device=DEVICE), "cosine", 1e-6)
    with pytest.raises(ValueError, match=r"logits must be \[B, C\] = \[2, 3\]"):
        attention_terms(torch.ones(2, 4, device=DEVICE), torch.ones(2, 3, 5, device=DEVICE), None, None, "cosine",
                        1e-6, True, 0, 0, [1.0, 1.0, 0.0, 0.0])  # fmt: skip
    with pytest.raises(RuntimeError, match="double backward"):
        cams = _maps((1, 2, 3), seed=77).requires_grad_()
        o = fastcam.pairwise_overlap(cams, measure="dot", backend="triton")
        (g,) = torch.autograd.grad(o.sum(), cams, create_graph=True)
        g.sum().backward()


def _ops_path(monkeypatch):
    """backend="triton" through its three ops, as under torch.compile, instead of the eager path."""
    import fastcam.triton.backend as triton_backend

    monkeypatch.setattr(triton_backend, "eager_path_usable", lambda *tensors: False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("uses", ["loss", "loss+outputs", "outputs"])
def test_eager_path_matches_the_ops_bit_for_bit(monkeypatch, layout, dtype, uses):
    """Eager calls run the ops' bodies as two autograd nodes (fastcam/triton/attention_loss.py):
    the same kernels in the same order, so the same bits as the three ops' path, with the
    caller's own gradients of the logits and maps added in or alone."""
    feats, weight, bias = make_head_inputs(layout, B=3, C=4, K=24, H=3, W=5, dtype=dtype, device=DEVICE, seed=81)
    weight, bias = weight.float(), bias.float()
    labels, mask = _labels(3, 4, "masked", seed=82)
    kw = dict(labels=labels.to(DEVICE), label_mask=mask.to(DEVICE), lambda_distinct=0.7, lambda_consist=0.3,
              lambda_coherence=0.2, grid=(3, 5) if layout == "tokens" else None)

    def run():
        f, w, b = (t.detach().clone().requires_grad_() for t in (feats, weight, bias))
        out = fastcam.attention_loss(f, w, b, backend="triton", **kw)
        total = {"loss": out.loss, "outputs": out.logits.sum() * 0.3 + (out.cams ** 2).sum(),
                 "loss+outputs": out.loss + out.logits.sum() * 0.3 + (out.cams ** 2).sum()}[uses]
        node = type(out.loss.grad_fn.next_functions[0][0]).__name__  # the terms' producer
        return node, (out.loss, out.distinct, out.logits, out.cams, *torch.autograd.grad(total, (f, w, b)))

    node, got = run()
    with monkeypatch.context() as m:
        _ops_path(m)
        ops_node, want = run()
    assert node == "_MapsAndTermsBackward" and ops_node != node, (node, ops_node)
    for name, g, w in zip(("loss", "distinct", "logits", "cams", "grad F", "grad W", "grad b"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride(), name
        assert torch.equal(g, w), name


def test_eager_path_partial_gradients_and_double_backward():
    """Only some inputs needing a gradient, the maps unused, and a double backward refused as on
    the ops' path."""
    feats, weight, bias = make_head_inputs("nchw", B=2, C=3, K=8, H=2, W=3, device=DEVICE, seed=83)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64, device=DEVICE)
    want = _step("torch", feats, weight, bias, labels=labels)
    for need in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        f, w, b = (t.detach().clone().requires_grad_(n) for t, n in zip((feats, weight, bias), need))
        out = fastcam.attention_loss(f, w, b, labels, backend="triton")
        wanted = [t for t, n in zip((f, w, b), need) if n]
        grads = torch.autograd.grad(out.loss.double() + out.logits.double().sum() + (out.cams.double() ** 2).sum(),
                                    wanted)  # fmt: skip
        for g, ref in zip(grads, [r for r, n in zip(want[3:], need) if n]):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    f = feats.detach().clone().requires_grad_()
    out = fastcam.attention_loss(f, weight, bias, labels, backend="triton")
    (g,) = torch.autograd.grad(out.loss, f, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_eager_path_only_for_plain_eager_calls():
    """The eager path's kernels read data pointers: plain tensors and parameters take it; a dispatch
    mode (fake tensors among them), a torch.func transform or a tensor subclass keep the ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastcam.triton.attention_loss import eager_path_usable

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        pass

    t, p = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    assert eager_path_usable(t, p, None)
    assert not eager_path_usable(t, t.as_subclass(Subclass))
    with Passthrough():
        assert not eager_path_usable(t)
    seen = []
    torch.func.vmap(lambda x: seen.append(eager_path_usable(x)) or x)(torch.ones(3, 2))
    assert seen == [False]
