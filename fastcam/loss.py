"""``AttentionMapLoss``: the whole criterion for partially labeled multi-label data."""

from __future__ import annotations

import torch
from torch import nn

from fastcam.functional import AttentionLossOutput, attention_loss


class AttentionMapLoss(nn.Module):
    """Masked BCE plus the attention-map terms of SPEC §2.3, as one ``nn.Module``.

    Example::

        criterion = fastcam.AttentionMapLoss(lambda_distinct=0.5)
        features = body(images)                       # [B, K, H, W]
        loss = criterion(features, head, labels, label_mask)  # head: the nn.Linear
        loss.backward()

    ``forward`` returns the scalar loss; with ``return_output=True`` it returns the whole
    :class:`~fastcam.functional.AttentionLossOutput` (logits, cams and each term).
    The arguments are those of :func:`fastcam.attention_loss`, checked when the loss is
    computed.
    """

    def __init__(
        self,
        lambda_distinct: float = 1.0,
        lambda_consist: float = 0.0,
        lambda_coherence: float = 0.0,
        normalize: str = "l2",
        measure: str = "cosine",
        unlabeled: str = "predicted",
        classification: bool = True,
        *,
        grid: tuple[int, int] | None = None,
        gather: bool = False,
        temperature: float = 1.0,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            lambda_distinct=lambda_distinct,
            lambda_consist=lambda_consist,
            lambda_coherence=lambda_coherence,
            normalize=normalize,
            measure=measure,
            unlabeled=unlabeled,
            classification=classification,
            grid=grid,
            gather=gather,
            temperature=temperature,
            eps=eps,
            backend=backend,
        )

    def forward(
        self,
        features: torch.Tensor,
        head: nn.Module,
        labels: torch.Tensor | None = None,
        label_mask: torch.Tensor | None = None,
        *,
        return_output: bool = False,
    ) -> torch.Tensor | AttentionLossOutput:
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                "head must be the linear classifier after global average pooling "
                f"(an nn.Linear or fastcam.models.CAMHead), got {type(head).__name__}"
            )
        out = attention_loss(features, weight, getattr(head, "bias", None), labels, label_mask, **self.options)
        return out if return_output else out.loss

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
