"""Evaluation metrics for class activation maps: classification AUC, localization against
ground-truth boxes, and how much the maps of co-present classes overlap.

The localization and overlap measures are computed batched on tensors, on the device of the
maps, without gradients; the ROC AUC is ``sklearn.metrics.roc_auc_score``'s, on the CPU.

Conventions shared by the localization functions
------------------------------------------------
* **Image frame.** ``image_size = (H, W)`` is the size, in pixels, of the image the boxes
  are written in (for ``BBox_List_2017.csv`` the original 1024 x 1024 radiograph). Pixel
  ``(i, j)`` (row ``i``, column ``j``) is the unit square ``[j, j + 1) x [i, i + 1)``; its
  centre is ``(j + 0.5, i + 0.5)`` in ``(x, y)``.
* **Boxes.** ``boxes`` is ``[M, 4]`` of ``(x, y, w, h)``: the top-left corner and the width
  and height in image pixels, floats allowed -- the format of ``BBox_List_2017.csv`` and of
  :func:`fastcam.data.read_boxes` (SPEC §6.1). A box covers the pixels whose **centre** lies
  in the half-open rectangle ``[x, x + w) x [y, y + h)``: an integer box covers exactly
  ``w * h`` pixels and boxes that tile the image cover each pixel once. Only pixels of the
  image count (a box reaching past the border is clipped by it). Areas are pixel counts.
* **Which map a box is scored against.** ``box_index`` is an integer ``[M, 2]`` of
  ``(b, c)``: box ``m`` is compared with ``maps[b, c]``, the map of class ``c`` in image
  ``b``. Several boxes may share a map; each box gets its own value.
* **Resizing.** ``maps`` is ``[B, C, h, w]`` (the CAM grid, e.g. the ``cams`` of
  :func:`fastcam.cam_head`). Each map is stretched over the whole image by bilinear
  interpolation to ``(H, W)`` (``torch.nn.functional.interpolate``, ``mode="bilinear"``,
  ``align_corners=False``, no antialiasing): grid cell ``(u, v)`` covers the image area
  ``[v W/w, (v+1) W/w) x [u H/h, (u+1) H/h)``. The network input must therefore be the whole
  image, resized (not a crop). When ``(h, w) == (H, W)`` the maps are used as they are.
  Maps are resized in float32 (float64 for float64 maps) and must be finite.
* **Memory.** Boxes are processed in chunks so that about ``2**25`` upsampled pixels are
  held at once (32 boxes of a 1024 x 1024 image); the result does not depend on the chunking.

Localization measures (one value per box)
-----------------------------------------
* :func:`pointing_game`: hit when the arg-max pixel of the resized map lies in the box.
* :func:`energy_pointing_game`: share of the map's positive mass inside the box.
* :func:`iou` / :func:`iobb`: overlap of the binarized map with the box (ChestX-ray8).
* :func:`localization`: all four in one pass over the maps (what an evaluation loop calls).
* :func:`hit_rates`: the share of values ``>= t`` for the ChestX-ray8 thresholds.

Invalid arguments raise ``ValueError`` naming the argument and its shape or value (a
``TypeError`` where an argument is not a tensor or has an unsupported dtype).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as Fn

__all__ = [
    "CHESTXRAY8_THRESHOLDS",
    "boxes_to_masks",
    "copresent_overlap",
    "copresent_pair_overlaps",
    "energy_pointing_game",
    "hit_rates",
    "iobb",
    "iou",
    "localization",
    "macro_auc",
    "per_class_auc",
    "pointing_game",
    "upsample_maps",
]

#: T(IoU) and T(IoBB) of Wang et al. 2017 (ChestX-ray8, Table 3).
CHESTXRAY8_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
REGIONS = ("mask", "box")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_CHUNK_PIXELS = 1 << 25


# ------------------------------------------------------------------------ validation


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_tensor(name: str, value, dtypes) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; supported dtypes: {allowed}")
    return value


def _check_real(name: str, value, *, low: float | None = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value}")
    return value


def _check_size(name: str, size) -> tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{name} must be (height, width), two positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_maps(maps) -> torch.Tensor:
    _check_tensor("maps", maps, _FLOAT_DTYPES)
    if maps.dim() != 4 or maps.shape[2] == 0 or maps.shape[3] == 0:
        raise ValueError(f"maps must be [B, C, h, w] with h, w >= 1, got shape {_shape(maps)}")
    return maps


def _check_boxes(boxes, device: torch.device | None = None) -> torch.Tensor:
    _check_tensor("boxes", boxes, _FLOAT_DTYPES + _INT_DTYPES)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [M, 4] of (x, y, w, h), got shape {_shape(boxes)}")
    boxes = boxes.to(device=device, dtype=torch.float64)
    if not torch.isfinite(boxes).all():
        raise ValueError(f"boxes {_shape(boxes)} hold a non-finite coordinate")
    if (boxes[:, 2:] < 0).any():
        raise ValueError(f"boxes {_shape(boxes)} hold a negative width or height")
    return boxes


def _check_localization_args(maps, boxes, box_index, image_size):
    maps = _check_maps(maps)
    boxes = _check_boxes(boxes, maps.device)
    _check_tensor("box_index", box_index, _INT_DTYPES)
    if box_index.dim() != 2 or box_index.shape[1] != 2:
        raise ValueError(f"box_index must be [M, 2] of (image, class), got shape {_shape(box_index)}")
    if box_index.shape[0] != boxes.shape[0]:
        raise ValueError(f"box_index {_shape(box_index)} and boxes {_shape(boxes)} differ in M")
    box_index = box_index.to(device=maps.device, dtype=torch.int64)
    batch, classes = maps.shape[:2]
    if box_index.numel() and ((box_index < 0).any() or (box_index[:, 0] >= batch).any()
                              or (box_index[:, 1] >= classes).any()):
        raise ValueError(f"box_index must hold (b, c) with 0 <= b < {batch} and 0 <= c < {classes} "
                         f"(maps {_shape(maps)})")
    size = _check_size("image_size", image_size)
    if box_index.numel():
        used = maps[box_index[:, 0], box_index[:, 1]]
        if not torch.isfinite(used).all():
            raise ValueError(f"maps {_shape(maps)} hold a non-finite value in a map that a box is scored against")
    return maps, boxes, box_index, size


# ------------------------------------------------------------------------ geometry


def upsample_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """Resize maps ``[..., h, w]`` to ``size = (H, W)``: bilinear, ``align_corners=False``.

    The map is stretched over the whole image (see the module's conventions). The result is
    ``[..., H, W]`` in float32 (float64 for float64 maps); a map already of size ``(H, W)`` is
    returned unchanged (converted to that dtype), and a constant map stays constant.
    """
    _check_tensor("maps", maps, _FLOAT_DTYPES)
    if maps.dim() < 2 or maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(f"maps must be [..., h, w] with h, w >= 1, got shape {_shape(maps)}")
    size = _check_size("size", size)
    with torch.no_grad():
        return _resize(maps.reshape(-1, *maps.shape[-2:]), size).reshape(*maps.shape[:-2], *size)


def _resize(maps3: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = maps3.detach().to(_acc_dtype(maps3.dtype))
    if tuple(x.shape[-2:]) == size or x.shape[0] == 0:
        return x if tuple(x.shape[-2:]) == size else x.new_zeros(0, *size)
    return Fn.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int, *, tolerance: float = 0.0) -> torch.Tensor:
    """Bool masks ``[M, height, width]`` of the pixels each ``(x, y, w, h)`` box covers.

    Pixel ``(i, j)`` is in box ``(x, y, w, h)`` when its centre ``(j + 0.5, i + 0.5)`` lies in
    ``[x - t, x + w + t) x [y - t, y + h + t)``, ``t = tolerance`` (pixels, >= 0). The masks are
    on the boxes' device.
    """
    boxes = _check_boxes(boxes)
    height, width = _check_size("(height, width)", (height, width))
    t = _check_real("tolerance", tolerance)
    return _box_masks(boxes, height, width, t)


def _box_intervals(boxes: torch.Tensor, height: int, width: int, t: float = 0.0):
    """``(in_y [M, H], in_x [M, W])``: the rows and the columns whose pixel centres lie in each box."""
    x, y, w, h = boxes[:, :, None].unbind(1)  # each [M, 1]
    cols = torch.arange(width, device=boxes.device, dtype=torch.float64) + 0.5
    rows = torch.arange(height, device=boxes.device, dtype=torch.float64) + 0.5
    return (rows >= y - t) & (rows < y + h + t), (cols >= x - t) & (cols < x + w + t)


def _box_masks(boxes: torch.Tensor, height: int, width: int, t: float = 0.0) -> torch.Tensor:
    in_y, in_x = _box_intervals(boxes, height, width, t)
    return in_y[:, :, None] & in_x[:, None, :]


def _span(v: torch.Tensor) -> torch.Tensor:
    """``[M, L]`` bool: True from the first True to the last True of each row, inclusive."""
    return (v.cumsum(1) > 0) & (v.flip(1).cumsum(1).flip(1) > 0)


def _inside_sum(values: torch.Tensor, in_y: torch.Tensor, in_x: torch.Tensor, *, binary: bool = False) -> torch.Tensor:
    """``sum(values[m, i, j] for the pixels (i, j) of box m)``, float64 ``[M]``, without building the
    box masks: row sums over the box's columns, then float64 over its rows. 0/1 values go through a
    batched matrix product, exact even under TF32 (counts below 2**24); other values are multiplied
    and summed element-wise, so that TF32 never rounds them."""
    weights = in_x.to(values.dtype)
    if binary:
        rows = torch.bmm(values, weights[:, :, None])[:, :, 0]  # [M, H]
    else:
        rows = (values * weights[:, None, :]).sum(2)
    return (rows.to(torch.float64) * in_y).sum(1)


def _total(values: torch.Tensor) -> torch.Tensor:
    return values.sum(2).to(torch.float64).sum(1)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


# ------------------------------------------------------------------------ localization

_MEASURES = ("pointing", "energy", "iou", "iobb")


def _localize(maps, boxes, box_index, image_size, want, *, tolerance=0.0, threshold=0.5, region="mask"):
    maps, boxes, box_index, (height, width) = _check_localization_args(maps, boxes, box_index, image_size)
    tolerance = _check_real("tolerance", tolerance)
    threshold = _check_real("threshold", threshold, high=1.0)
    if not isinstance(region, str) or region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {', '.join(REGIONS)}")
    m = boxes.shape[0]
    out = {"pointing": torch.zeros(m, dtype=torch.bool, device=maps.device)}
    out.update({k: torch.zeros(m, dtype=torch.float64, device=maps.device) for k in _MEASURES[1:]})
    step = max(1, _CHUNK_PIXELS // (height * width))
    with torch.no_grad():
        for start in range(0, m, step):
            sl = slice(start, start + step)
            idx, bx = box_index[sl], boxes[sl]
            up = _resize(maps[idx[:, 0], idx[:, 1]], (height, width))  # [m, H, W]
            flat = up.flatten(1)
            if "pointing" in want:
                arg = flat.argmax(dim=1)  # the first maximum in row-major order
                cx = (arg % width).to(torch.float64) + 0.5
                cy = torch.div(arg, width, rounding_mode="floor").to(torch.float64) + 0.5
                x, y, w, h = bx.unbind(1)
                t = tolerance
                out["pointing"][sl] = (cx >= x - t) & (cx < x + w + t) & (cy >= y - t) & (cy < y + h + t)
            if not want & {"energy", "iou", "iobb"}:
                continue
            in_y, in_x = _box_intervals(bx, height, width)  # [m, H], [m, W]
            if "energy" in want:
                energy = up.clamp_min(0)
                out["energy"][sl] = _safe_ratio(_inside_sum(energy, in_y, in_x), _total(energy))
            if want & {"iou", "iobb"}:
                peak = flat.amax(dim=1)[:, None, None]
                cut = torch.where(peak > 0, threshold * peak, torch.full_like(peak, math.inf))  # max <= 0: empty
                pred = up >= cut
                if region == "box":  # the bounding box of the mask: rows x columns, as the boxes
                    rows, cols = _span(pred.any(2)), _span(pred.any(1))
                    inter = (rows & in_y).sum(1) * (cols & in_x).sum(1)
                    pred_area = rows.sum(1) * cols.sum(1)
                else:
                    pred = pred.to(up.dtype)
                    inter, pred_area = _inside_sum(pred, in_y, in_x, binary=True), _total(pred)
                inter, pred_area = inter.to(torch.float64), pred_area.to(torch.float64)
                gt_area = (in_y.sum(1) * in_x.sum(1)).to(torch.float64)
                out["iobb"][sl] = _safe_ratio(inter, pred_area)
                out["iou"][sl] = _safe_ratio(inter, pred_area + gt_area - inter)
    return {k: out[k] for k in _MEASURES if k in want}


def pointing_game(maps: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor, image_size,
                  *, tolerance: float = 0.0) -> torch.Tensor:
    """Pointing game (Zhang et al. 2018): bool ``[M]``, True where box ``m`` holds the map's peak.

    The peak is the arg-max pixel of ``maps[b, c]`` resized to ``image_size``; among equal
    maxima the first in row-major order wins (so a constant map points at pixel ``(0, 0)``).
    It is a hit when the peak pixel's centre lies in the box grown by ``tolerance`` pixels on
    every side (Zhang et al. used 15 px at their image size; default 0). The hit rate is
    ``hits.float().mean()``.
    """
    return _localize(maps, boxes, box_index, image_size, {"pointing"}, tolerance=tolerance)["pointing"]


def energy_pointing_game(maps: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor,
                         image_size) -> torch.Tensor:
    """Energy-based pointing game (Wang et al. 2020, Score-CAM): float64 ``[M]`` in [0, 1].

    ``sum(relu(map) over the box's pixels) / sum(relu(map) over the image)`` for the map
    resized to ``image_size`` (negative values are clamped to 0). A map with no positive
    value gives 0. Row sums are taken at the maps' precision (float32, or float64 for float64
    maps), the rest in float64.
    """
    return _localize(maps, boxes, box_index, image_size, {"energy"})["energy"]


_BINARIZE_DOC = """
    The map ``maps[b, c]`` resized to ``image_size`` is binarized: the predicted region is the
    pixels with ``value >= threshold * max`` (``max`` of that resized map, ``threshold`` in
    [0, 1], default 0.5). A map whose maximum is <= 0 predicts nothing. With
    ``region="box"`` the predicted region is instead the bounding box of all those pixels
    (one box per map; ChestX-ray8 drew a box around each connected component, which is not
    done here). The ground-truth region is the pixels the box covers (pixel centres, see the
    module). Areas are pixel counts; the result is float64 ``[M]`` in [0, 1]."""


def iou(maps: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor, image_size, *,
        threshold: float = 0.5, region: str = "mask") -> torch.Tensor:
    return _localize(maps, boxes, box_index, image_size, {"iou"}, threshold=threshold, region=region)["iou"]


iou.__doc__ = ("Intersection over union of the predicted region and the box:"
               " ``|pred & box| / |pred | box|``, 0 when both are empty.\n" + _BINARIZE_DOC + "\n")


def iobb(maps: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor, image_size, *,
         threshold: float = 0.5, region: str = "mask") -> torch.Tensor:
    return _localize(maps, boxes, box_index, image_size, {"iobb"}, threshold=threshold, region=region)["iobb"]


iobb.__doc__ = ("IoBB (Wang et al. 2017, ChestX-ray8): ``|pred & box| / |pred|``, the intersection over"
                " the area of the *predicted* (detected) region, not of the ground-truth box; 0 when"
                " the predicted region is empty.\n" + _BINARIZE_DOC + "\n")


def localization(maps: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor, image_size, *,
                 tolerance: float = 0.0, threshold: float = 0.5, region: str = "mask") -> dict[str, torch.Tensor]:
    """All localization measures in one pass over the resized maps.

    Returns ``{"pointing": bool [M], "energy": float64 [M], "iou": float64 [M],
    "iobb": float64 [M]}``, each exactly what :func:`pointing_game` (with ``tolerance``),
    :func:`energy_pointing_game`, :func:`iou` and :func:`iobb` (with ``threshold`` and
    ``region``) return.
    """
    return _localize(maps, boxes, box_index, image_size, set(_MEASURES), tolerance=tolerance,
                     threshold=threshold, region=region)


def hit_rates(values, thresholds: Sequence[float] = CHESTXRAY8_THRESHOLDS) -> dict[float, float]:
    """``{t: share of values >= t}`` for each threshold (ChestX-ray8: a localization is correct
    when its IoU or IoBB is ``>= T``).

    ``values`` is a tensor of any shape (or a sequence of numbers); bool values count as 0/1,
    NaN values as misses. With no values every rate is NaN.
    """
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"values must be a tensor or a sequence of numbers: {err}") from None
    if values.is_complex():
        raise TypeError(f"values has dtype {values.dtype}; expected real or bool values")
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence):
        raise TypeError(f"thresholds must be a sequence of numbers, got {type(thresholds).__name__}")
    thresholds = [_check_real("thresholds", t, low=None) for t in thresholds]
    v = values.detach().flatten().to(torch.float64)
    if v.numel() == 0:
        return {t: math.nan for t in thresholds}
    return {t: (v >= t).to(torch.float64).mean().item() for t in thresholds}


# ------------------------------------------------------------------------ co-present classes


def copresent_pair_overlaps(cams: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None = None, *,
                            measure: str = "cosine", backend: str = "torch") -> torch.Tensor:
    """The overlap of every pair of co-present classes: float ``[P]``.

    ``cams`` is ``[B, C, H, W]`` or ``[B, C, N]``; ``labels`` ``[B, C]``. Class ``c`` is
    *present* in image ``b`` when ``labels[b, c] > 0.5`` and (if given) ``label_mask[b, c]``
    is True. Every unordered pair ``c < d`` present in the same image contributes
    ``fastcam.pairwise_overlap(cams, measure=measure)[b, c, d]`` once, in the order
    ``(b, c, d)`` row-major. Concatenate the results of several batches before averaging.
    """
    from fastcam import pairwise_overlap

    _check_tensor("cams", cams, _FLOAT_DTYPES)
    if cams.dim() not in (3, 4):
        raise ValueError(f"cams must be [B, C, H, W] or [B, C, N], got shape {_shape(cams)}")
    present = _present(labels, label_mask, cams.shape[:2], "cams", cams)
    with torch.no_grad():
        overlaps = pairwise_overlap(cams.detach(), measure=measure, backend=backend)
        upper = torch.ones(cams.shape[1], cams.shape[1], dtype=torch.bool, device=cams.device).triu(1)
        pairs = present[:, :, None] & present[:, None, :] & upper
        return overlaps[pairs]


def copresent_overlap(cams: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor | None = None, *,
                      measure: str = "cosine", backend: str = "torch") -> float:
    """Mean overlap of the maps of co-present classes, a Python float.

    The mean of :func:`copresent_pair_overlaps` over every pair of every image (each pair
    weighs the same, whatever its image). ``math.nan`` when no image has two present classes.
    """
    values = copresent_pair_overlaps(cams, labels, label_mask, measure=measure, backend=backend)
    return values.to(torch.float64).mean().item() if values.numel() else math.nan


def _present(labels, label_mask, expected, ref_name, ref) -> torch.Tensor:
    _check_tensor("labels", labels, _FLOAT_DTYPES + _INT_DTYPES + (torch.bool,))
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"labels must be [B, C] = {list(expected)} to match {ref_name} {_shape(ref)}, "
                         f"got shape {_shape(labels)}")
    present = labels.to(ref.device) > 0.5 if labels.dtype != torch.bool else labels.to(ref.device)
    if label_mask is not None:
        _check_tensor("label_mask", label_mask, (torch.bool,))
        if label_mask.shape != labels.shape:
            raise ValueError(f"label_mask {_shape(label_mask)} must have the shape of labels {_shape(labels)}")
        present = present & label_mask.to(ref.device)
    return present


# ------------------------------------------------------------------------ classification


def per_class_auc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ROC AUC of each class over its known entries: float64 ``[C]`` on the CPU, NaN where skipped.

    ``scores`` ``[N, C]`` (logits or probabilities: the AUC depends on the order only),
    ``labels`` ``[N, C]`` holding 0 or 1 where known, ``mask`` bool ``[N, C]``, True where the
    label is known (None: all known; unknown entries are never read). Each class's AUC is
    ``sklearn.metrics.roc_auc_score`` of its known entries (tied scores count one half). A
    class whose known labels are all 0 or all 1 (or that has none) has no AUC and is NaN.
    """
    from sklearn.metrics import roc_auc_score  # imported here: ``import fastcam`` stays light

    _check_tensor("scores", scores, _FLOAT_DTYPES)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, C], got shape {_shape(scores)}")
    _check_tensor("labels", labels, _FLOAT_DTYPES + _INT_DTYPES + (torch.bool,))
    if labels.shape != scores.shape:
        raise ValueError(f"labels {_shape(labels)} must have the shape of scores {_shape(scores)}")
    if mask is None:
        mask = torch.ones(scores.shape, dtype=torch.bool)
    else:
        _check_tensor("mask", mask, (torch.bool,))
        if mask.shape != scores.shape:
            raise ValueError(f"mask {_shape(mask)} must have the shape of scores {_shape(scores)}")
    s = scores.detach().cpu().to(torch.float64)
    y = labels.detach().cpu().to(torch.float64)
    mask = mask.detach().cpu()
    if not ((y[mask] == 0) | (y[mask] == 1)).all():
        raise ValueError(f"labels {_shape(labels)} must be 0 or 1 where known (mask True)")
    if not torch.isfinite(s[mask]).all():
        raise ValueError(f"scores {_shape(scores)} hold a non-finite value where the label is known")
    aucs = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    for c in range(scores.shape[1]):
        known = mask[:, c]
        yc = y[known, c]
        if yc.numel() == 0 or bool((yc == yc[0]).all()):
            continue  # one label value: no AUC
        aucs[c] = float(roc_auc_score(yc.numpy(), s[known, c].numpy()))
    return aucs


def macro_auc(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Macro ROC AUC: the mean of :func:`per_class_auc` over the classes that have one.

    Classes whose known labels hold a single value are skipped (not counted as 0.5); a Python
    float, ``math.nan`` when every class is skipped.
    """
    aucs = per_class_auc(scores, labels, mask)
    kept = aucs[~torch.isnan(aucs)]
    return kept.mean().item() if kept.numel() else math.nan
