"""Inputs and independent, loop-by-loop formulas that the tests compare fastcam against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LAYOUTS = ("nchw", "channels_last", "tokens")
NORMALIZES = ("none", "max", "sum", "l2", "softmax")
MEASURES = ("cosine", "dot", "soft_iou", "dice", "intersection")


def make_head_inputs(layout, B=2, C=3, K=5, H=3, W=4, *, dtype=torch.float64, device="cpu", seed=0,
                     requires_grad=False):
    """Random (never zero) features in ``layout``, weight ``[C, K]`` and bias ``[C]``."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, K, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(C, K, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    if layout == "tokens":
        feats = feats.flatten(2).transpose(1, 2).contiguous()  # [B, N, K], n = i * W + j
    feats = feats.to(device=device, dtype=dtype)
    if layout == "channels_last":
        feats = feats.contiguous(memory_format=torch.channels_last)
    weight, bias = weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)
    for t in (feats, weight, bias):
        t.requires_grad_(requires_grad)
    return feats, weight, bias


def to_nkn(features):
    """Features as ``[B, K, N]`` whatever the layout."""
    return features.flatten(2) if features.dim() == 4 else features.transpose(1, 2)


# -------------------------------------------------------- naive formulas (SPEC §2, by loops)


def naive_cam_head(features, weight, bias, normalize, temperature=1.0, eps=1e-6):
    """Logits ``[B, C]`` and maps ``[B, C, N]`` in float64, one map at a time."""
    f = to_nkn(features).double()
    w, b = weight.double(), None if bias is None else bias.double()
    B, K, N = f.shape
    C = w.shape[0]
    logits = torch.empty(B, C, dtype=torch.float64)
    cams = torch.empty(B, C, N, dtype=torch.float64)
    for bi in range(B):
        for c in range(C):
            s = torch.tensor([sum(float(w[c, k]) * float(f[bi, k, n]) for k in range(K)) for n in range(N)],
                             dtype=torch.float64)
            logits[bi, c] = s.sum() / N + (0.0 if b is None else float(b[c]))
            r = s.clamp_min(0)
            if normalize == "none":
                m = r
            elif normalize == "max":
                m = r / (r.max() + eps)
            elif normalize == "sum":
                m = r / (r.sum() + eps)
            elif normalize == "l2":
                m = r / (math.sqrt(float((r * r).sum())) + eps)
            elif normalize == "softmax":
                e = torch.exp(s / temperature - (s / temperature).max())
                m = e / e.sum()
            cams[bi, c] = m
    return logits, cams


def naive_overlap(a, b, measure, eps=1e-6):
    """Overlap of two 1-D maps."""
    a, b = a.double(), b.double()
    if measure == "dot":
        return float((a * b).sum())
    if measure == "cosine":
        return float((a * b).sum()) / (math.sqrt(float((a * a).sum())) * math.sqrt(float((b * b).sum())) + eps)
    inter = float(torch.minimum(a, b).sum())
    if measure == "intersection":
        return inter
    if measure == "soft_iou":
        return inter / (float(torch.maximum(a, b).sum()) + eps)
    if measure == "dice":
        return 2 * inter / (float(a.sum()) + float(b.sum()) + eps)
    raise AssertionError(measure)


def naive_pairwise(cams, measure, eps=1e-6):
    flat = cams.flatten(2)
    B, C, _ = flat.shape
    return torch.tensor([[[naive_overlap(flat[b, c], flat[b, d], measure, eps) for d in range(C)]
                          for c in range(C)] for b in range(B)], dtype=torch.float64).reshape(B, C, C)


# ------------------------------------------------------------------------ comparisons


def assert_compiled_step_matches_eager(step, tensors, compile_backend="inductor"):
    """``torch.compile(step, fullgraph=True)`` gives eager's loss, maps and gradients;
    ``step(*tensors)`` returns ``(loss, cams)``."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        loss, cams = fn(*leaves)
        loss.backward()
        results.append((loss, cams, *(t.grad for t in leaves)))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


def max_rel_error(actual, expected):
    """max |actual - expected| / max |expected| (both as float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12) if expected.numel() else 1.0
    return float((actual - expected).abs().max() / scale) if expected.numel() else 0.0


def assert_close_rel(actual, expected, rtol, what=""):
    err = max_rel_error(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


# ------------------------------------------------- naive loss terms (SPEC §2.3, by loops)

EPS = 1e-6
TIGHT = dict(rtol=1e-10, atol=1e-12)
ALL_LAMBDAS = dict(lambda_distinct=1.0, lambda_consist=0.5, lambda_coherence=2.0)


def linear_logits(features, weight, bias):
    """``F.linear(features.mean(spatial), W, b)`` for [B,K,H,W] and tokens [B,N,K]."""
    pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features.mean(dim=1)
    return F.linear(pooled, weight, bias)


def grid_of(features):
    return tuple(features.shape[2:]) if features.dim() == 4 else None


def hand_q(logits, labels, label_mask, unlabeled="predicted"):
    """q of SPEC §2.3 as python floats, entry by entry."""
    Bn, Cn = logits.shape
    q = torch.zeros(Bn, Cn, dtype=torch.float64)
    for b in range(Bn):
        for c in range(Cn):
            known = labels is not None and (label_mask is None or bool(label_mask[b, c]))
            if known:
                q[b, c] = float(labels[b, c])
            elif unlabeled == "predicted":
                q[b, c] = 1.0 / (1.0 + math.exp(-float(logits[b, c])))
    return q


def hand_bce(logits, labels, label_mask):
    """Masked BCE with logits, averaged over the known entries (0 with none)."""
    total, count = 0.0, 0
    if labels is None:
        return 0.0
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            if label_mask is None or bool(label_mask[b, c]):
                x, y = float(logits[b, c]), float(labels[b, c])
                total += max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))
                count += 1
    return total / max(count, 1)


def hand_distinct(cams_flat, q, measure, eps=EPS):
    num = den = 0.0
    Bn, Cn, _ = cams_flat.shape
    for b in range(Bn):
        for c in range(Cn):
            for d in range(Cn):
                if c != d:
                    w = float(q[b, c]) * float(q[b, d])
                    num += w * naive_overlap(cams_flat[b, c], cams_flat[b, d], measure, eps)
                    den += w
    return num / (den + eps)


def hand_consist(cams_flat, q, measure, eps=EPS):
    num = den = 0.0
    Bn, Cn, _ = cams_flat.shape
    for c in range(Cn):
        for b in range(Bn):
            for b2 in range(Bn):
                if b != b2:
                    v = float(q[b, c]) * float(q[b2, c])
                    num += v * (1.0 - naive_overlap(cams_flat[b, c], cams_flat[b2, c], measure, eps))
                    den += v
    return num / (den + eps)


def hand_coherence(cams_flat, q, grid, eps=EPS):
    hh, ww = grid
    pos = [((i + 0.5) / hh, (j + 0.5) / ww) for i in range(hh) for j in range(ww)]
    num = den = 0.0
    Bn, Cn, Nn = cams_flat.shape
    assert Nn == hh * ww
    for b in range(Bn):
        for c in range(Cn):
            a = [float(x) for x in cams_flat[b, c]]
            total = sum(a)
            p = [x / (total + eps) for x in a]
            mu_r = sum(pn * r for pn, (r, _) in zip(p, pos, strict=True))
            mu_s = sum(pn * s for pn, (_, s) in zip(p, pos, strict=True))
            mu = (mu_r, mu_s)
            var = sum(pn * ((r - mu[0]) ** 2 + (s - mu[1]) ** 2) for pn, (r, s) in zip(p, pos, strict=True))
            num += float(q[b, c]) * var
            den += float(q[b, c])
    return num / (den + eps)


def check_loss_against_hand(out, features, weight, bias, labels, label_mask, *, normalize="l2", measure="cosine",
                            grid=None, unlabeled="predicted", classification=True, lambdas=ALL_LAMBDAS):
    """Every field of an attention_loss output against the loop formulas."""
    logits, cams = naive_cam_head(features.detach().cpu(), weight.detach().cpu(),
                                  None if bias is None else bias.detach().cpu(), normalize)
    labels = None if labels is None else labels.cpu()
    label_mask = None if label_mask is None else label_mask.cpu()
    torch.testing.assert_close(out.logits.detach().cpu(), logits, **TIGHT)
    torch.testing.assert_close(out.cams.detach().cpu().reshape(cams.shape), cams, **TIGHT)
    q = hand_q(logits, labels, label_mask, unlabeled)
    expected = {"bce": hand_bce(logits, labels, label_mask) if classification else None}
    expected["distinct"] = hand_distinct(cams, q, measure) if lambdas.get("lambda_distinct") else None
    expected["consist"] = hand_consist(cams, q, measure) if lambdas.get("lambda_consist") else None
    grid = grid or grid_of(features)
    expected["coherence"] = hand_coherence(cams, q, grid) if lambdas.get("lambda_coherence") else None
    total = 0.0
    for name, value in expected.items():
        got = getattr(out, name)
        if value is None:
            assert got is None, name
            continue
        assert got is not None, name
        torch.testing.assert_close(got.detach().cpu(), torch.tensor(value, dtype=torch.float64), **TIGHT,
                                   msg=lambda m, name=name: f"{name}: {m}")
        total += value * (1.0 if name == "bce" else lambdas[f"lambda_{name}"])
    torch.testing.assert_close(out.loss.detach().cpu(), torch.tensor(total, dtype=torch.float64), **TIGHT)
