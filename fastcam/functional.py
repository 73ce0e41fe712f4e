"""The functional API of SPEC §3: validate the inputs, pick a backend, call it.

Every backend module (``fastcam.reference``, ``fastcam._ops`` for the compiled extension,
``fastcam.triton.backend``) provides ``cam_head``, ``pairwise_overlap`` and ``attention_loss`` taking the
validated arguments; this module owns the checks and error messages, so that every
backend fails the same way on bad input.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import sys
from typing import NamedTuple

import torch

from fastcam import reference
from fastcam._backends import resolve_backend, shape_class
from fastcam.reference import MEASURES, NORMALIZE_MODES, UNLABELED_MODES

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _implementation(backend: str):
    """The module that runs a resolved backend: the reference, or the compiled ops."""
    if backend == "torch":
        return reference
    if backend == "triton":
        from fastcam.triton import backend as triton_backend  # loaded by resolve_backend

        return triton_backend
    return sys.modules.get("fastcam._ops") or importlib.import_module("fastcam._ops")  # loaded by resolve_backend


class AttentionLossOutput(NamedTuple):
    """What :func:`attention_loss` returns.

    ``loss`` is the total (0-dim, float32, or float64 for float64 features); ``logits``
    ``[B, C]`` in the features' dtype; ``cams`` the normalized maps, ``[B, C, H, W]`` or
    ``[B, C, N]``. ``bce``, ``distinct``, ``consist`` and ``coherence`` are the unweighted
    terms, or None for a term that was not computed (its lambda is 0, or
    ``classification=False`` for the BCE).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    cams: torch.Tensor
    bce: torch.Tensor | None
    distinct: torch.Tensor | None
    consist: torch.Tensor | None
    coherence: torch.Tensor | None


# ------------------------------------------------------------------------ validation


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_tensor(name: str, value, dtypes=_FLOAT_DTYPES) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported dtypes: {allowed}")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


def _check_number(name: str, value, *, positive: bool = False) -> float:
    # float and int first: isinstance against the numbers ABC costs a microsecond a call, and a
    # training step makes five of these calls.
    if type(value) is not float and type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "a finite number > 0" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {need}, got {value}")
    return value


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_same_device(**tensors) -> torch.device:
    """The one device of the given tensors (a torch.device stands for itself)."""
    devices = [getattr(t, "device", t) for t in tensors.values() if t is not None]
    if all(d == devices[0] for d in devices[1:]):
        return devices[0]
    present = {name: getattr(t, "device", t) for name, t in tensors.items() if t is not None}
    if len(set(present.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    return next(iter(present.values()))


def _check_head(features, weight, bias) -> tuple[int, int]:
    """Validate the head's inputs; returns ``(B, C)``."""
    _check_tensor("features", features)
    if features.dim() not in (3, 4):
        raise ValueError(
            "features must be [B, K, H, W] (NCHW or channels_last) or tokens [B, N, K], "
            f"got shape {_shape(features)}"
        )
    _check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [C, K] (an nn.Linear(K, C).weight), got shape {_shape(weight)}")
    if features.dim() == 4:
        k, n, where = features.shape[1], features.shape[2] * features.shape[3], "dim 1 of [B, K, H, W]"
    else:
        k, n, where = features.shape[2], features.shape[1], "dim 2 of tokens [B, N, K]"
    if weight.shape[1] != k:
        raise ValueError(
            f"weight has K={weight.shape[1]} but features have K={k} ({where}): "
            f"features {_shape(features)}, weight {_shape(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight has no classes (C=0): weight {_shape(weight)}")
    if n == 0:
        raise ValueError(f"features have no positions (N=0): features {_shape(features)}")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must be [C] = [{weight.shape[0]}], got shape {_shape(bias)} (weight {_shape(weight)})"
            )
    return features.shape[0], weight.shape[0]


def _check_labels(labels, label_mask, batch: int, classes: int, device: torch.device, values: bool = True) -> None:
    """Types, shapes and devices; with ``values``, also that known labels lie in [0, 1] (the cpu
    backend's kernel checks that itself, with the same error, saving a dozen tensor ops a step)."""
    if labels is None:
        if label_mask is not None:
            raise ValueError("label_mask was given without labels; pass labels too (or neither)")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"labels have dtype {labels.dtype}; expected a real (float, int or bool) dtype")
    if tuple(labels.shape) != (batch, classes):
        raise ValueError(f"labels must be [B, C] = [{batch}, {classes}], got shape {_shape(labels)}")
    if label_mask is not None:
        _check_tensor("label_mask", label_mask, dtypes=(torch.bool,))
        if tuple(label_mask.shape) != (batch, classes):
            raise ValueError(f"label_mask must be [B, C] = [{batch}, {classes}], got shape {_shape(label_mask)}")
    if labels.device != device or (label_mask is not None and label_mask.device != device):
        _check_same_device(features=device, labels=labels, label_mask=label_mask)
    if not values or labels.dtype == torch.bool or labels.device.type == "meta":  # no values to check
        return
    outside = ~((labels >= 0) & (labels <= 1))  # NaN is outside too
    if label_mask is not None:
        outside &= label_mask
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph: a runtime assert
        torch._assert_async(~outside.any(), "labels must lie in [0, 1] where known (label_mask True)")
        return
    if bool(outside.any()):
        b, c = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"labels must lie in [0, 1] where known (label_mask True); "
            f"{int(outside.sum())} known entries do not, e.g. labels[{b}, {c}] = {labels[b, c].item()}"
        )


def _check_grid(features: torch.Tensor, grid):
    """The ``(H, W)`` grid of the positions, or None for tokens without one."""
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0 for g in grid)
        ):
            raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    if features.dim() == 4:
        spatial = tuple(features.shape[2:])
        if grid is not None and grid != spatial:
            raise ValueError(f"grid={grid} does not match the features' (H, W) = {spatial}")
        return spatial
    if grid is not None and grid[0] * grid[1] != features.shape[1]:
        raise ValueError(
            f"grid={grid} has {grid[0] * grid[1]} positions but the token features "
            f"{_shape(features)} have N={features.shape[1]}"
        )
    return grid


def _without_autocast(device: torch.device):
    """The ops compute at the accumulation precision of the inputs' dtypes (fp32, fp64 for fp64)
    whatever autocast says: the compiled kernels ignore it, and it is turned off around the
    reference's and Triton's torch ops, which it would otherwise run in bf16/fp16 (so that every
    backend gives the same numbers under autocast as without it)."""
    kind = device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherMaps(torch.autograd.Function):
    """All-gather of every rank's maps along the batch, autograd-aware: the backward sums the
    gradient that every rank's loss sends to each slice (one all-reduce of the small gathered
    gradient, made contiguous first: a transposed gradient sent as raw memory would be wrong)
    and returns this rank's slice."""

    @staticmethod
    def forward(ctx, maps):
        dist = torch.distributed
        parts = [torch.empty_like(maps) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, maps.contiguous())
        ctx.rank, ctx.batch = dist.get_rank(), maps.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def _gathered_consist(cams, logits, labels, label_mask, unlabeled, measure, eps):
    """The consistency term over the maps of every rank (``gather=True``, SPEC §2.3).

    The maps go through an autograd-aware all-gather, the pair weights q (no gradient)
    through a plain one; every rank gets the same global value. Gradient convention: the
    gather's backward sums what every rank's loss sends to a rank's own maps, so each rank's
    maps receive world_size times the gradient of the global term, and DDP's averaging of
    parameter gradients over the ranks leaves exactly the gradient of the global term (the
    local terms are averaged, as DDP does for any per-rank loss). Every rank must pass the same
    batch size. q comes from the returned logits (in the features' dtype).
    """
    from fastcam.reference import class_weights, consist_loss

    maps = cams.flatten(2) if cams.dim() == 4 else cams
    q = class_weights(logits.to(maps.dtype), labels, label_mask, unlabeled).contiguous()
    every_q = [torch.empty_like(q) for _ in range(_world_size())]
    torch.distributed.all_gather(every_q, q)
    return consist_loss(_GatherMaps.apply(maps), torch.cat(every_q, 0), measure, eps)


# ------------------------------------------------------------------------ public API


def cam_head(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    normalize: str = "l2",
    temperature: float = 1.0,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the class attention maps of every class, in one pass (SPEC §2.1).

    Args:
        features: ``[B, K, H, W]`` (NCHW or channels_last) or tokens ``[B, N, K]``.
        weight, bias: the linear classifier after global average pooling,
            ``[C, K]`` and ``[C]`` (or None).
        normalize: ``"none"``, ``"max"``, ``"sum"``, ``"l2"`` or ``"softmax"``.
        temperature: of the ``"softmax"`` normalization.
        eps: added to every normalizing denominator; > 0, so that an all-zero map
            normalizes and overlaps to 0 instead of 0/0.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``logits [B, C]`` in the features' dtype (equal to
        ``F.linear(features.mean(spatial), weight, bias)``) and ``cams``, ``[B, C, H, W]``
        for 4-D features, ``[B, C, N]`` for tokens, in float32 (float64 for float64).
        For ``normalize="none"`` the maps are exactly N times Grad-CAM.
    """
    _check_head(features, weight, bias)
    _check_choice("normalize", normalize, NORMALIZE_MODES)
    temperature = _check_number("temperature", temperature, positive=True)
    eps = _check_number("eps", eps, positive=True)
    device = _check_same_device(features=features, weight=weight, bias=bias)
    impl = _implementation(resolve_backend(backend, device, shape_class(weight.shape[0])))
    with _without_autocast(device):
        return impl.cam_head(features, weight, bias, normalize, temperature, eps)


def pairwise_overlap(
    cams: torch.Tensor, *, measure: str = "cosine", eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """``O[b, c, d] = overlap(cams[b, c], cams[b, d])``, ``[B, C, C]`` (SPEC §2.2).

    ``cams`` is ``[B, C, H, W]`` or ``[B, C, N]``; ``measure`` one of ``"cosine"``,
    ``"dot"``, ``"soft_iou"``, ``"dice"``, ``"intersection"``. The result is float32
    (float64 for float64 maps). An all-zero map overlaps nothing (0, no NaN).
    """
    _check_tensor("cams", cams)
    if cams.dim() not in (3, 4):
        raise ValueError(f"cams must be [B, C, H, W] or [B, C, N], got shape {_shape(cams)}")
    if math.prod(cams.shape[2:]) == 0:
        raise ValueError(f"cams have no positions (N=0): cams {_shape(cams)}")
    _check_choice("measure", measure, MEASURES)
    eps = _check_number("eps", eps, positive=True)
    impl = _implementation(resolve_backend(backend, cams.device, shape_class(cams.shape[1])))
    with _without_autocast(cams.device):
        return impl.pairwise_overlap(cams, measure, eps)


def attention_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    label_mask: torch.Tensor | None = None,
    *,
    normalize: str = "l2",
    measure: str = "cosine",
    lambda_distinct: float = 1.0,
    lambda_consist: float = 0.0,
    lambda_coherence: float = 0.0,
    grid: tuple[int, int] | None = None,
    unlabeled: str = "predicted",
    classification: bool = True,
    gather: bool = False,
    backend: str = "auto",
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> AttentionLossOutput:
    """The attention-map loss of SPEC §2.3, with the head's logits and maps.

    ``loss = bce (if classification) + lambda_distinct * distinct
    + lambda_consist * consist + lambda_coherence * coherence``.

    Args:
        features, weight, bias: as in :func:`cam_head`.
        labels: multi-hot ``[B, C]`` in [0, 1] (soft labels allowed), or None when no
            label is known.
        label_mask: bool ``[B, C]``, True where the label is known; None means every label
            is known. Where it is False the label's value is never read (NaN, -1 are fine).
        unlabeled: pair weight of an unknown label: ``"predicted"`` (sigmoid of the
            logit, detached) or ``"ignore"`` (0).
        grid: ``(H, W)`` of token features, needed for the coherence term only.
        classification: add the BCE on the logits, averaged over the known entries.
        gather: compute the consistency term over the maps of every rank under
            ``torch.distributed`` (autograd-aware all-gather; every rank gets the global
            term, and after DDP averages the gradients they are the global term's; every
            rank must pass the same batch size). With one process it changes nothing.
    """
    batch, classes = _check_head(features, weight, bias)
    device = features.device
    if weight.device != device or (bias is not None and bias.device != device):  # a few µs less a step
        device = _check_same_device(features=features, weight=weight, bias=bias)
    resolved = resolve_backend(backend, device, shape_class(classes))
    _check_labels(labels, label_mask, batch, classes, device, values=resolved != "cpu")
    _check_choice("normalize", normalize, NORMALIZE_MODES)
    _check_choice("measure", measure, MEASURES)
    _check_choice("unlabeled", unlabeled, UNLABELED_MODES)
    lambda_distinct = _check_number("lambda_distinct", lambda_distinct)
    lambda_consist = _check_number("lambda_consist", lambda_consist)
    lambda_coherence = _check_number("lambda_coherence", lambda_coherence)
    temperature = _check_number("temperature", temperature, positive=True)
    eps = _check_number("eps", eps, positive=True)
    classification = _check_flag("classification", classification)
    gather = _check_flag("gather", gather)
    grid = _check_grid(features, grid)
    if lambda_coherence and grid is None:
        raise ValueError(
            f"the coherence term of token features {_shape(features)} needs grid=(H, W) "
            "with H * W = N"
        )
    gathered = gather and lambda_consist != 0 and _world_size() > 1
    impl = _implementation(resolved)
    with _without_autocast(device):
        out = impl.attention_loss(
            features,
            weight,
            bias,
            labels,
            label_mask,
            normalize=normalize,
            measure=measure,
            lambda_distinct=lambda_distinct,
            lambda_consist=0.0 if gathered else lambda_consist,
            lambda_coherence=lambda_coherence,
            grid=grid,
            unlabeled=unlabeled,
            classification=classification,
            temperature=temperature,
            eps=eps,
        )
        if gathered:
            out["consist"] = _gathered_consist(out["cams"], out["logits"], labels, label_mask, unlabeled, measure,
                                               eps)  # fmt: skip
            out["loss"] = out["loss"] + lambda_consist * out["consist"]
    return AttentionLossOutput(**out)
