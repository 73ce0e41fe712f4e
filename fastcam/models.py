"""Drop-in helpers for real models: split a classifier into feature body and linear head,
and ``CAMHead``, an ``nn.Linear`` replacement that returns the logits and every class map.

fastcam's maps are Grad-CAM maps for any classifier whose head is global average pooling
followed by one linear layer (SPEC §2.1). :func:`split_model` finds that pair::

    body, head = fastcam.models.split_model(torchvision.models.resnet50(num_classes=14))
    features = body(images)                            # [B, 2048, H/32, W/32]
    out = fastcam.attention_loss(features, head.weight, head.bias, labels, label_mask)

``body`` and ``head`` share their parameters with the model: keep building the optimizer
from ``model.parameters()``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastcam.functional import cam_head


class _ForwardFeatures(nn.Module):
    """The body of a timm-style model: ``forward_features``, minus any prefix tokens."""

    def __init__(self, model: nn.Module, prefix_tokens: int):
        super().__init__()
        self.model = model
        self.prefix_tokens = prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.dim() == 3 and self.prefix_tokens:
            features = features[:, self.prefix_tokens :]
        return features


def _require_linear(head, where: str) -> nn.Linear:
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{where} is {type(head).__name__}, not an nn.Linear: fastcam needs global "
            "average pooling followed by one linear layer"
        )
    return head


def _split_timm_style(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    name = type(model).__name__
    if not hasattr(model, "global_pool"):
        raise ValueError(
            f"{name} has no global_pool attribute, so fastcam cannot tell how it pools its "
            "features (timm's ConvNeXt, for one, pools inside a head with a LayerNorm); "
            "pass the pre-pool features and the final nn.Linear yourself"
        )
    pool = model.global_pool
    pool_type = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    if pool_type != "avg":
        raise ValueError(
            f"{name} pools its features with {pool_type!r}, not global average pooling: "
            "its class maps are not Grad-CAM maps of a linear head"
        )
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        raise ValueError(
            f"{name} normalizes the pooled features ({type(fc_norm).__name__}) before its "
            "classifier: the head is not linear in the features"
        )
    head = _require_linear(model.get_classifier(), f"{name}.get_classifier()")
    return _ForwardFeatures(model, int(getattr(model, "num_prefix_tokens", 0))), head


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(body, head)`` of a classifier whose head is global average pooling + ``nn.Linear``.

    Supported: torchvision ResNet (and ResNeXt/Wide ResNet) and DenseNet, and any model
    exposing ``forward_features`` and ``get_classifier`` as timm models do (CNNs with
    average pooling; ViTs with ``global_pool="avg"``, whose prefix tokens are dropped so
    that the body returns patch tokens ``[B, N, K]``).

    ``body(x)`` returns the features right before the pooling, ``[B, K, H, W]`` or
    ``[B, N, K]``; ``head`` is the model's own ``nn.Linear`` (not a copy), so that
    ``head(features.mean(spatial))`` is the model's output. Anything else raises
    ``ValueError`` saying why the model does not fit.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        from torchvision.models import DenseNet, ResNet
    except ImportError:  # torchvision is optional
        DenseNet = ResNet = ()
    if isinstance(model, ResNet):
        body = nn.Sequential(
            model.conv1, model.bn1, model.relu, model.maxpool,
            model.layer1, model.layer2, model.layer3, model.layer4,
        )  # fmt: skip
        return body, _require_linear(model.fc, "ResNet.fc")
    if isinstance(model, DenseNet):
        # DenseNet.forward applies a ReLU to the features before pooling.
        return nn.Sequential(model.features, nn.ReLU()), _require_linear(model.classifier, "DenseNet.classifier")
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "get_classifier", None)):
        return _split_timm_style(model)
    raise ValueError(
        f"don't know how to split {type(model).__name__}: supported are torchvision ResNet "
        "and DenseNet and models with forward_features() and get_classifier() (timm); "
        "otherwise pass the pre-pool features and the final nn.Linear yourself"
    )


class CAMHead(nn.Module):
    """Global average pooling + linear classifier that also returns every class map.

    A drop-in for the ``nn.Linear(in_features, out_features)`` after the pooling: it has
    the same parameters (``weight [C, K]``, ``bias [C]``), initialization and
    ``state_dict`` keys, so checkpoints load either way. ``forward(features)`` takes the
    pre-pool features (``[B, K, H, W]`` or tokens ``[B, N, K]``) and returns
    ``(logits, cams)`` as :func:`fastcam.cam_head` does.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        normalize: str = "l2",
        temperature: float = 1.0,
        eps: float = 1e-6,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.normalize = normalize
        self.temperature = temperature
        self.eps = eps
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialization of ``nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> CAMHead:
        """A CAMHead that shares ``linear``'s parameters (the same tensors, not copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        head = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   device="meta", **options)  # fmt: skip
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` sharing this head's parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cam_head(
            features, self.weight, self.bias,
            normalize=self.normalize, temperature=self.temperature, eps=self.eps, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, normalize={self.normalize!r}"
        )
