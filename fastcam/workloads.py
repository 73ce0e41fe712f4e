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
