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


def make_labels(batch: int, classes: int, *, device="cpu", generator=None):
    """Labels drawn at the real per-image rate of positives for the class count, and the label
    mask with the last quarter of the batch unlabeled (False), so its pair weights are predicted."""
    rate = POSITIVES_PER_IMAGE.get(classes, 0.72) / classes
    labels = (torch.rand(batch, classes, generator=generator) < rate).float().to(device)
    mask = torch.ones(batch, classes, dtype=torch.bool)
    mask[batch - int(batch * UNLABELED_FRACTION) :] = False
    return labels, mask.to(device)


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
    labels, mask = make_labels(shape.B, shape.C, device=device, generator=g)
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


# SPEC §5 item 6: whole ResNet-50 training steps, (batch, image side).
E2E_CONFIGS = ((256, 224), (32, 1024), (16, 224))


class _Bottleneck(torch.nn.Module):
    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        nn = torch.nn
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(torch.nn.Module):
    """ResNet-50 (v1.5: the stride in the 3x3 convolutions), torchvision's layer names, kept here
    so that ``fastcam bench --e2e`` needs no torchvision (the GPU images have none).
    ``body(x)`` gives the features before the pooling [B, 2048, H/32, W/32]; ``fc`` the head."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        cin, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers.append(nn.Sequential(*(_Bottleneck(cin if i == 0 else 4 * width, width, stride if i == 0 else 1)
                                          for i in range(blocks))))  # fmt: skip
            cin = 4 * width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(2048, num_classes)

    def body(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


def resnet50_steps(batch: int, side: int, *, classes: int = 14, device="cpu", backends=("torch",),
                   gradcam: bool = True, seed: int = 0) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """One whole ResNet-50 training step per contender (SPEC §5 item 6): the body under bf16
    autocast in channels_last, the loss, backward and an SGD step, on random images with labels
    drawn at the real rates (a quarter of the batch unlabeled). Contenders, each a callable:

    - ``"plain"``: the model's own pooled head and the masked BCE only (no attention loss);
    - each name of ``backends``: ``fastcam.attention_loss`` on the body's features with that
      backend (``"torch"`` is the eager reference);
    - ``"gradcam"`` (unless ``gradcam=False``): the hand-written Grad-CAM way,
      :func:`gradcam_attention_loss` (``create_graph=True`` per class).

    They share one model (:class:`ResNet50`) and optimizer (the weights' values do not change
    the cost of a step), returned with them: ``(model, {name: step})``; after a step, the
    parameters' ``.grad`` hold its gradients.
    """
    import torch.nn.functional as F

    import fastcam

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet50(num_classes=classes).to(device=device, memory_format=torch.channels_last)
    head = model.fc
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, side, side, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels, mask = make_labels(batch, classes, device=device, generator=g)

    def step(loss_of_features):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            features = model.body(images)
        loss_of_features(features).backward()
        optimizer.step()

    def plain(features):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            logits = head(features.mean((2, 3)))
        return F.binary_cross_entropy_with_logits(logits.float()[mask], labels[mask])

    steps = {"plain": lambda: step(plain)}
    for name in backends:
        steps[name] = lambda name=name: step(
            lambda f: fastcam.attention_loss(f, head.weight, head.bias, labels, mask, backend=name).loss)
    if gradcam:
        steps["gradcam"] = lambda: step(lambda f: gradcam_attention_loss(f, head.weight, head.bias, labels, mask))
    return model, steps
