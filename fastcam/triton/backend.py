"""``backend="triton"``: every op in Triton kernels registered with ``torch.library.triton_op`` —
the head's GEMMs (fastcam/triton/cam_head.py), the per-map logits and normalization
(fastcam/triton/normalize.py), the pairwise overlaps (fastcam/triton/pairwise_overlap.py) and
the loss terms with their gradients (fastcam/triton/attention_terms.py). What is left in PyTorch
here is glue: views, casts and the conversion of the terms' ``[5]`` tensor to the output dict.
An eager ``attention_loss`` runs the three ops' bodies as two autograd nodes
(fastcam/triton/attention_loss.py); traced calls (``torch.compile``) go through the ops.
Same validated arguments as the reference's functions.
"""

from __future__ import annotations

import torch

from fastcam import reference
from fastcam.triton.attention_loss import attention_loss_eager, eager_path_usable
from fastcam.triton.attention_terms import attention_terms
from fastcam.triton.cam_head import scores
from fastcam.triton.normalize import head_maps
from fastcam.triton.pairwise_overlap import pairwise_overlap as _pairwise_overlap

TERM_NAMES = ("loss", "bce", "distinct", "consist", "coherence")


def cam_head_flat(features, weight, bias, normalize="l2", temperature=1.0, eps=1e-6):
    s = scores(reference.features_as_bkn(features), weight)
    return head_maps(s, bias, normalize, float(temperature), float(eps))


def cam_head(features, weight, bias=None, normalize="l2", temperature=1.0, eps=1e-6):
    return reference.head_outputs(features, *cam_head_flat(features, weight, bias, normalize, temperature, eps))


def pairwise_overlap(cams, measure="cosine", eps=1e-6):
    return _pairwise_overlap(cams.flatten(2).to(reference.accumulation_dtype(cams.dtype)), measure, float(eps))


def attention_loss(features, weight, bias, labels=None, label_mask=None, *, normalize="l2", measure="cosine",
                   lambda_distinct=1.0, lambda_consist=0.0, lambda_coherence=0.0, grid=None, unlabeled="predicted",
                   classification=True, temperature=1.0, eps=1e-6):  # fmt: skip
    weights = [1.0 if classification else 0.0, float(lambda_distinct), float(lambda_consist), float(lambda_coherence)]
    grid_h, grid_w = grid if grid is not None else (0, 0)
    predicted = unlabeled == "predicted"
    if eager_path_usable(features, weight, bias, labels, label_mask):
        terms, logits, cams = attention_loss_eager(reference.features_as_bkn(features), weight, bias, labels,
                                                   label_mask, normalize, measure, float(temperature), float(eps),
                                                   predicted, grid_h, grid_w, weights)  # fmt: skip
    else:
        logits, cams = cam_head_flat(features, weight, bias, normalize, temperature, eps)
        terms = attention_terms(logits, cams, labels, label_mask, measure, float(eps), predicted, grid_h, grid_w,
                                weights)  # fmt: skip
    values = dict(zip(TERM_NAMES, terms.unbind()))
    for name, weight_of_term in zip(TERM_NAMES[1:], weights):
        if not weight_of_term:
            values[name] = None
    logits, cams = reference.head_outputs(features, logits, cams)
    if features.dim() == 4 and torch.compiler.is_compiling():
        # Returned as a view of the head_maps output, the [B, C, H, W] maps got a [B, C, N]
        # gradient in the compiled backward (AOTAutograd, torch 2.11 on an H200: "wrong number of
        # dimensions"); a copy of these small maps is no alias.
        cams = cams.clone()
    return dict(logits=logits, cams=cams, **values)
