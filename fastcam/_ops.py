"""The compiled ops of ``fastcam._C`` (csrc/): their fake kernels, and the backend they make
(``backend="cpu"`` and ``backend="cuda"``). Their autograd is in C++ (csrc/autograd.cpp);
the backward ops' own autograd, registered here, raises: no double backward.

Importing this module loads the extension first (fastcam/_ext.py).
The functions at the bottom take the same validated arguments as those of
:mod:`fastcam.reference`.
"""

from __future__ import annotations

import torch

from fastcam._ext import load_extension
from fastcam.reference import accumulation_dtype as _acc
from fastcam.reference import features_as_bkn, head_outputs

if load_extension()[0] is None:
    raise ImportError(f"fastcam._ops needs the compiled extension: {load_extension()[1]}")

ops = torch.ops.fastcam


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"fastcam: double backward through {op} is not supported (its gradient was computed by a "
            "fused kernel that has no derivative); use backend='torch' for higher-order gradients"
        )

    torch.library.register_autograd(f"fastcam::{op}", backward)


# ------------------------------------------------------------------------------ cam_head


@torch.library.register_fake("fastcam::cam_head")
def _(features, weight, bias, normalize, temperature, eps):
    B, _, N = features.shape
    C, acc = weight.shape[0], _acc(features.dtype)
    return (features.new_empty(B, C, dtype=acc), features.new_empty(B, C, N, dtype=acc),
            features.new_empty(B, C, N, dtype=acc))  # fmt: skip


@torch.library.register_fake("fastcam::cam_head_backward")
def _(grad_logits, grad_cams, features, weight, scores, cams, normalize, temperature, eps, output_mask):
    C, K = weight.shape
    acc = _acc(features.dtype)
    return (
        torch.empty_like(features) if output_mask[0] else features.new_empty(0),
        features.new_empty(C, K, dtype=acc) if output_mask[1] else features.new_empty(0, dtype=acc),
        features.new_empty(C, dtype=acc) if output_mask[2] else features.new_empty(0, dtype=acc),
    )


_no_double_backward("cam_head_backward")


# ---------------------------------------------------------------------- pairwise_overlap


@torch.library.register_fake("fastcam::pairwise_overlap")
def _(cams, measure, eps):
    G, P, _ = cams.shape
    return cams.new_empty(G, P, P)


@torch.library.register_fake("fastcam::pairwise_overlap_backward")
def _(grad, cams, measure, eps):
    return torch.empty_like(cams, memory_format=torch.contiguous_format)


_no_double_backward("pairwise_overlap_backward")


# ----------------------------------------------------------------------- attention_terms


@torch.library.register_fake("fastcam::attention_terms")
def _(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w, weights):
    return cams.new_empty(5)


@torch.library.register_fake("fastcam::attention_terms_backward")
def _(grad_terms, logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w, weights):
    return (torch.empty_like(logits, memory_format=torch.contiguous_format, dtype=cams.dtype),
            torch.empty_like(cams, memory_format=torch.contiguous_format))  # fmt: skip


_no_double_backward("attention_terms_backward")


# ------------------------------------------------------------ the backend (cpu and cuda)


def cam_head_flat(features, weight, bias, normalize="l2", temperature=1.0, eps=1e-6):
    logits, _, cams = ops.cam_head(features_as_bkn(features), weight, bias, normalize, temperature, eps)
    return logits, cams


def cam_head(features, weight, bias=None, normalize="l2", temperature=1.0, eps=1e-6):
    return head_outputs(features, *cam_head_flat(features, weight, bias, normalize, temperature, eps))


def pairwise_overlap(cams, measure="cosine", eps=1e-6):
    return ops.pairwise_overlap(cams.flatten(2).to(_acc(cams.dtype)), measure, eps)


def attention_loss(features, weight, bias, labels=None, label_mask=None, *, normalize="l2", measure="cosine",
                   lambda_distinct=1.0, lambda_consist=0.0, lambda_coherence=0.0, grid=None, unlabeled="predicted",
                   classification=True, temperature=1.0, eps=1e-6):  # fmt: skip
    weights = [1.0 if classification else 0.0, lambda_distinct, lambda_consist, lambda_coherence]
    grid_h, grid_w = grid if grid is not None else (0, 0)
    loss, bce, distinct, consist, coherence, logits, cams = ops.attention_loss(
        features, weight, bias, labels, label_mask, normalize, measure, temperature, eps, unlabeled == "predicted",
        grid_h, grid_w, weights)  # fmt: skip
    # a term not asked for is None
    return dict(logits=logits, cams=cams, loss=loss, bce=bce if weights[0] else None,
                distinct=distinct if lambda_distinct else None, consist=consist if lambda_consist else None,
                coherence=coherence if lambda_coherence else None)  # fmt: skip
