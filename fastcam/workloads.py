"""The SPEC §5 workloads: shapes of real backbones and labels drawn at real rates.

Shared by ``benchmarks/`` and ``fastcam bench`` so both measure the same thing.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    C: int
    K: int
    H: int
    W: int
    tokens: bool = False

    @property
    def N(self) -> int:
        return self.H * self.W

    def scaled(self, batch: int) -> Shape:
        return dataclasses.replace(self, B=batch)


SPEC_SHAPES = (
    Shape("densenet121@512", 64, 14, 1024, 16, 16),
    Shape("resnet50@1024", 32, 14, 2048, 32, 32),
    Shape("resnet50@224", 256, 14, 2048, 7, 7),
    Shape("densenet121@512-174", 64, 174, 1024, 16, 16),
    Shape("vit-b16@224-tokens", 128, 14, 768, 14, 14, tokens=True),
    Shape("resnet50@1024-B128", 128, 14, 2048, 32, 32),
)

# Mean positive findings per image: NIH ChestX-ray14 (14 classes), PadChest (174).
POSITIVES_PER_IMAGE = {14: 0.72, 174: 1.74}
UNLABELED_FRACTION = 0.25


def make_inputs(shape: Shape, *, dtype=torch.bfloat16, device="cpu", seed=0, requires_grad=True):
    """Features (NCHW, or tokens ``[B, N, K]``), an fp32 head, labels and label mask.

    Positives are drawn at the real per-image rate for the class count, and the last
    quarter of the batch is unlabeled (mask False), so its pair weights are predicted.
    """
    g = torch.Generator().manual_seed(seed)
    size = (shape.B, shape.N, shape.K) if shape.tokens else (shape.B, shape.K, shape.H, shape.W)
    features = torch.randn(size, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(shape.C, shape.K, generator=g) / shape.K**0.5).to(device)
    bias = torch.zeros(shape.C).to(device)
    rate = POSITIVES_PER_IMAGE.get(shape.C, 0.72) / shape.C
    labels = (torch.rand(shape.B, shape.C, generator=g) < rate).float().to(device)
    mask = torch.ones(shape.B, shape.C, dtype=torch.bool)
    mask[shape.B - int(shape.B * UNLABELED_FRACTION) :] = False
    for t in (features, weight, bias):
        t.requires_grad_(requires_grad)
    return features, weight, bias, labels, mask.to(device)


def gradcam_attention_loss(features, weight, bias, labels, label_mask, *, normalize="l2", measure="cosine",
                           eps=1e-6):
    """The same loss the way it is computed without fastcam (the SPEC §5 "hand-written Grad-CAM"
    baseline): a pooled linear head, then each class's Grad-CAM by autograd with
    ``create_graph=True`` (alpha = the gradient of the class's logit averaged over the
    positions, map = ReLU(sum_k alpha_k F_k)), then the reference's loss terms on those maps.
    Its backward runs through C gradient graphs (double backward). For this head the maps are
    the CAMs up to the positive factor 1/N, so after the normalization the loss equals the
    reference's (tests/test_bench.py checks it)."""
    from fastcam.reference import accumulation_dtype, features_as_bkn, loss_terms, normalize_maps

    dt = accumulation_dtype(features.dtype)
    f = features_as_bkn(features).to(dt)  # [B, K, N]
    logits = f.mean(-1) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    maps = []
    for c in range(weight.shape[0]):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), features, create_graph=True)
        alpha = features_as_bkn(grad).to(dt).mean(-1, keepdim=True)  # [B, K, 1]
        maps.append(torch.relu((alpha * f).sum(1)))  # [B, N]
    cams = normalize_maps(torch.stack(maps, 1), normalize, eps=eps)
    out = loss_terms(logits, cams, labels, label_mask, measure=measure, lambda_distinct=1.0, lambda_consist=0.0,
                     lambda_coherence=0.0, grid=None, unlabeled="predicted", classification=True, eps=eps)
    return out["loss"]
