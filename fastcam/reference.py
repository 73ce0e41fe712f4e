"""SPEC §2 in plain PyTorch: the ground truth every other backend is tested against.

These functions assume validated inputs (see :mod:`fastcam.functional`, which checks
shapes, dtypes and devices before it calls them). They favour being obviously right over
being fast: every formula below reads like the SPEC's.

Conventions shared by every backend:

* Work happens in the *accumulation dtype*: float64 for float64 features, float32 for
  everything else (fp32, bf16, fp16). Weight and bias are used at that precision.
* Positions are flattened row-major: ``n = i * W + j`` for row ``i`` and column ``j``
  (what ``features.flatten(2)`` does for ``[B, K, H, W]``, and the patch order of ViTs).
* ``logits`` are returned in the features' dtype; the BCE and the predicted pair weights
  use the logits at the accumulation precision (before that rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

NORMALIZE_MODES = ("none", "max", "sum", "l2", "softmax")
MEASURES = ("cosine", "dot", "soft_iou", "dice", "intersection")
UNLABELED_MODES = ("predicted", "ignore")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for fp32, bf16 and fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- cam_head


def features_as_bkn(features: torch.Tensor) -> torch.Tensor:
    """Features as a ``[B, K, N]`` view (NCHW: ``flatten(2)``; channels-last and tokens: stride 1
    along K), copied only when neither N nor K has stride 1: how the kernels take them."""
    f = features.flatten(2) if features.dim() == 4 else features.transpose(1, 2)
    if 1 not in (f.stride(2), f.stride(1)) and 1 not in (f.shape[2], f.shape[1]):
        f = f.contiguous()
    return f


def head_outputs(features: torch.Tensor, logits: torch.Tensor, cams_flat: torch.Tensor):
    """The user-facing ``(logits, cams)``: logits in the features' dtype, maps ``[B, C, H, W]``
    for 4-D features and ``[B, C, N]`` for tokens."""
    cams = cams_flat.unflatten(-1, features.shape[2:]) if features.dim() == 4 else cams_flat
    return logits.to(features.dtype), cams


def score_maps(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Raw class score maps ``S[b, c, n] = sum_k W[c, k] F[b, k, n]``, shape ``[B, C, N]``.

    ``features`` is ``[B, K, H, W]`` (any memory format) or tokens ``[B, N, K]``.
    """
    dt = accumulation_dtype(features.dtype)
    w = weight.to(dt)
    if features.dim() == 4:
        return torch.matmul(w, features.flatten(2).to(dt))  # [C,K] @ [B,K,N]
    return torch.matmul(features.to(dt), w.t()).transpose(1, 2)  # ([B,N,K] @ [K,C])^T


def normalize_maps(
    scores: torch.Tensor, normalize: str, temperature: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Normalize each map over its last dimension (the positions), SPEC §2.1."""
    if normalize == "softmax":
        return torch.softmax(scores / temperature, dim=-1)
    r = torch.relu(scores)
    if normalize == "none":
        return r
    if normalize == "max":
        return r / (r.amax(dim=-1, keepdim=True) + eps)
    if normalize == "sum":
        return r / (r.sum(dim=-1, keepdim=True) + eps)
    if normalize == "l2":
        # vector_norm's backward is 0 (not NaN) at the zero vector.
        return r / (torch.linalg.vector_norm(r, dim=-1, keepdim=True) + eps)
    raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZE_MODES}")


def cam_head_flat(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    normalize: str = "l2",
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, C]`` at the accumulation precision and maps ``[B, C, N]``."""
    return head_from_scores(score_maps(features, weight), bias, normalize, temperature, eps)


def head_from_scores(scores, bias, normalize="l2", temperature=1.0, eps=1e-6):
    """Logits (mean over positions + bias) and normalized maps from the score maps ``S``."""
    logits = scores.mean(dim=-1)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits, normalize_maps(scores, normalize, temperature, eps)


def cam_head(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    normalize: str = "l2",
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, cams)``: logits in the features' dtype, cams ``[B,C,H,W]`` or ``[B,C,N]``."""
    return head_outputs(features, *cam_head_flat(features, weight, bias, normalize, temperature, eps))


# ------------------------------------------------------------------- pairwise_overlap


def overlap(a: torch.Tensor, b: torch.Tensor, measure: str = "cosine", eps: float = 1e-6) -> torch.Tensor:
    """Overlap of every map of ``a [..., P, N]`` with every map of ``b [..., Q, N]``: ``[..., P, Q]``."""
    if measure == "dot":
        return a @ b.transpose(-1, -2)
    if measure == "cosine":
        na = torch.linalg.vector_norm(a, dim=-1)
        nb = torch.linalg.vector_norm(b, dim=-1)
        return (a @ b.transpose(-1, -2)) / (na[..., :, None] * nb[..., None, :] + eps)
    aa, bb = a[..., :, None, :], b[..., None, :, :]
    inter = torch.minimum(aa, bb).sum(dim=-1)
    if measure == "intersection":
        return inter
    if measure == "soft_iou":
        return inter / (torch.maximum(aa, bb).sum(dim=-1) + eps)
    if measure == "dice":
        return 2 * inter / (a.sum(dim=-1)[..., :, None] + b.sum(dim=-1)[..., None, :] + eps)
    raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}")


def pairwise_overlap(cams: torch.Tensor, measure: str = "cosine", eps: float = 1e-6) -> torch.Tensor:
    """``O[b, c, d] = overlap(cams[b, c], cams[b, d])`` for cams ``[B,C,H,W]`` or ``[B,C,N]``."""
    flat = cams.flatten(2).to(accumulation_dtype(cams.dtype))
    return overlap(flat, flat, measure, eps)


# ----------------------------------------------------------------------------- losses


def class_weights(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    label_mask: torch.Tensor | None,
    unlabeled: str = "predicted",
) -> torch.Tensor:
    """Per-entry weights ``q [B, C]`` of SPEC §2.3 (no gradient flows through them).

    ``label_mask`` True: the label; False: ``sigmoid(logits)`` (detached) for
    ``unlabeled="predicted"``, 0 for ``"ignore"``. The value of an unknown label is never
    read, whatever it holds (NaN included).
    """
    logits = logits.detach()
    if unlabeled == "predicted":
        fallback = torch.sigmoid(logits)
    elif unlabeled == "ignore":
        fallback = torch.zeros_like(logits)
    else:
        raise ValueError(f"unknown unlabeled {unlabeled!r}; expected one of {UNLABELED_MODES}")
    if labels is None:
        return fallback
    if label_mask is None:
        return labels.to(logits.dtype)
    known = torch.where(label_mask, labels.to(logits.dtype), 0.0)
    return torch.where(label_mask, known, fallback)


def off_diagonal_pair_weights(q: torch.Tensor) -> torch.Tensor:
    """``w[..., c, d] = q[..., c] * q[..., d]`` for ``c != d``, else 0."""
    w = q[..., :, None] * q[..., None, :]
    eye = torch.eye(q.shape[-1], dtype=torch.bool, device=q.device)
    return w.masked_fill(eye, 0.0)


def distinct_loss(cams_flat, q, measure="cosine", eps=1e-6):
    """Class distinctiveness: ``sum w * O / (sum w + eps)`` over images and class pairs."""
    w = off_diagonal_pair_weights(q)
    return (w * overlap(cams_flat, cams_flat, measure, eps)).sum() / (w.sum() + eps)


def consist_loss(cams_flat, q, measure="cosine", eps=1e-6):
    """Spatial consistency: a class's maps agree across the images of the batch."""
    per_class = cams_flat.transpose(0, 1)  # [C, B, N]
    v = off_diagonal_pair_weights(q.t())  # [C, B, B]
    return (v * (1 - overlap(per_class, per_class, measure, eps))).sum() / (v.sum() + eps)


def grid_positions(grid: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
    """Centre of every position on the unit square, ``[N, 2]`` as (row, column), row-major."""
    h, w = grid
    rows = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
    cols = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(h * w, 2)


def coherence_loss(cams_flat, q, grid, eps=1e-6):
    """Spatial coherence: the q-weighted mean spatial variance of each map."""
    pos = grid_positions(grid, cams_flat.dtype, cams_flat.device)  # [N, 2]
    p = cams_flat / (cams_flat.sum(dim=-1, keepdim=True) + eps)
    mu = p @ pos  # [B, C, 2]
    sq_dist = ((pos - mu[..., None, :]) ** 2).sum(dim=-1)  # [B, C, N]
    var = (p * sq_dist).sum(dim=-1)
    return (q * var).sum() / (q.sum() + eps)


def masked_bce(logits, labels, label_mask):
    """Binary cross-entropy with logits, averaged over the known entries only.

    With no known entry it is 0, still connected to ``logits`` (with a zero gradient). An
    unknown entry's gradient is 0 whatever its logit (NaN included), as in the compiled kernels.
    """
    if labels is None:
        labels = torch.zeros_like(logits)
        label_mask = torch.zeros_like(logits, dtype=torch.bool)
    elif label_mask is None:
        label_mask = torch.ones_like(logits, dtype=torch.bool)
    target = torch.where(label_mask, labels.to(logits.dtype), 0.0)
    # An unknown entry's logit is not read at all, so that its gradient is 0 even where the
    # logit is NaN or infinite (masking the BCE afterwards would give 0 * NaN = NaN there).
    safe = torch.where(label_mask, logits, 0.0)
    per_entry = Fn.binary_cross_entropy_with_logits(safe, target, reduction="none")
    per_entry = torch.where(label_mask, per_entry, 0.0)
    return per_entry.sum() / label_mask.sum().clamp_min(1)


def attention_loss(
    features,
    weight,
    bias,
    labels=None,
    label_mask=None,
    *,
    normalize="l2",
    measure="cosine",
    lambda_distinct=1.0,
    lambda_consist=0.0,
    lambda_coherence=0.0,
    grid=None,
    unlabeled="predicted",
    classification=True,
    temperature=1.0,
    eps=1e-6,
):
    """Everything of SPEC §2.3: returns a dict with loss, logits, cams, bce, distinct,
    consist, coherence. A term whose lambda is 0 (the BCE when ``classification`` is
    False) is not computed and is None. ``grid`` is ``(H, W)``, required only for the
    coherence term of token features."""
    logits_acc, cams_flat = cam_head_flat(features, weight, bias, normalize, temperature, eps)
    out = loss_terms(logits_acc, cams_flat, labels, label_mask, measure=measure, lambda_distinct=lambda_distinct,
                     lambda_consist=lambda_consist, lambda_coherence=lambda_coherence,
                     grid=grid if grid is not None else tuple(features.shape[2:]), unlabeled=unlabeled,
                     classification=classification, eps=eps)  # fmt: skip
    logits, cams = head_outputs(features, logits_acc, cams_flat)
    return dict(logits=logits, cams=cams, **out)


def loss_terms(logits_acc, cams_flat, labels, label_mask, *, measure, lambda_distinct, lambda_consist,
               lambda_coherence, grid, unlabeled, classification, eps):
    """The terms of SPEC §2.3 and their weighted total from the logits (accumulation
    precision) and the maps ``[B, C, N]``: a dict with loss, bce, distinct, consist, coherence."""
    q = class_weights(logits_acc, labels, label_mask, unlabeled)
    loss = logits_acc.new_zeros(())
    out = dict(bce=None, distinct=None, consist=None, coherence=None)
    if classification:
        out["bce"] = masked_bce(logits_acc, labels, label_mask)
        loss = loss + out["bce"]
    if lambda_distinct:
        out["distinct"] = distinct_loss(cams_flat, q, measure, eps)
        loss = loss + lambda_distinct * out["distinct"]
    if lambda_consist:
        out["consist"] = consist_loss(cams_flat, q, measure, eps)
        loss = loss + lambda_consist * out["consist"]
    if lambda_coherence:
        out["coherence"] = coherence_loss(cams_flat, q, grid, eps)
        loss = loss + lambda_coherence * out["coherence"]
    return dict(loss=loss, **out)
