"""``backend="triton"``: the head in Triton — its GEMMs (fastcam/triton/cam_head.py) and the
per-map logits and normalization (fastcam/triton/normalize.py) — and the loss terms as in
:mod:`fastcam.reference` on top of them (their own Triton kernels are the next step of this
backend). Same validated arguments as the reference's functions.
"""

from __future__ import annotations

from fastcam import reference
from fastcam.triton.cam_head import scores
from fastcam.triton.normalize import head_maps


def cam_head_flat(features, weight, bias, normalize="l2", temperature=1.0, eps=1e-6):
    s = scores(reference.features_as_bkn(features), weight)
    return head_maps(s, bias, normalize, float(temperature), float(eps))


def cam_head(features, weight, bias=None, normalize="l2", temperature=1.0, eps=1e-6):
    return reference.head_outputs(features, *cam_head_flat(features, weight, bias, normalize, temperature, eps))


def pairwise_overlap(cams, measure="cosine", eps=1e-6):
    return reference.pairwise_overlap(cams, measure, eps)


def attention_loss(features, weight, bias, labels=None, label_mask=None, *, normalize="l2", measure="cosine",
                   lambda_distinct=1.0, lambda_consist=0.0, lambda_coherence=0.0, grid=None, unlabeled="predicted",
                   classification=True, temperature=1.0, eps=1e-6):  # fmt: skip
    logits, cams = cam_head_flat(features, weight, bias, normalize, temperature, eps)
    out = reference.loss_terms(logits, cams, labels, label_mask, measure=measure, lambda_distinct=lambda_distinct,
                               lambda_consist=lambda_consist, lambda_coherence=lambda_coherence,
                               grid=grid, unlabeled=unlabeled,
                               classification=classification, eps=eps)  # fmt: skip
    logits, cams = reference.head_outputs(features, logits, cams)
    return dict(logits=logits, cams=cams, **out)
