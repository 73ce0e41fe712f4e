"""fastcam: fused class attention maps and the attention-map loss for multi-label classifiers.

The public API (SPEC §3): :func:`cam_head`, :func:`pairwise_overlap`,
:func:`attention_loss`, :class:`AttentionMapLoss` and :func:`backends`. Helpers for real
models live in :mod:`fastcam.models`.
"""

from fastcam._backends import backends
from fastcam.functional import attention_loss, cam_head, pairwise_overlap
from fastcam.loss import AttentionMapLoss

__version__ = "0.1.0"

__all__ = ["AttentionMapLoss", "attention_loss", "backends", "cam_head", "pairwise_overlap"]
