"""A synthetic multi-label chest "radiograph" dataset, generated on the fly from a seed.

Nothing is downloaded or shipped: :func:`make_synthetic` draws every image from a seed
with a private :class:`torch.Generator` (the global RNG is neither read nor changed), fully
vectorized (the background at half resolution, each lesion in a window around it), so
2,000 images of 96×96 take about half a second on one CPU core.

An image is one channel of float32 in [0, 1]: dark air at the sides, a brighter body
silhouette, two dark lung fields (rounded apices, sharp lower corners) with rib shadows
and vessel-like texture, a bright spine and mediastinum, and the heart, which hides the
lower medial part of the lungs (more of the right one), under a smooth intensity
gradient, per-image contrast and brightness, and pixel noise. Every shape's place and
size vary per image. "Left"/"right" below are image sides.

The five findings (:data:`CLASSES`), each distinct in appearance and place:

``Nodule``
    a small bright round blob (radius 2–3.5 px at 96×96) in the upper half of either lung;
    30% of the images with nodules have a second one.
``Mass``
    a larger bright lobulated blob (radius 5–8 px, irregular outline) in the middle zone
    of either lung.
``Effusion``
    brightness filling the lower corner of one lung up to a meniscus that rises laterally,
    brighter towards the bottom.
``Cardiomegaly``
    the heart (lower centre, towards the right) enlarged 1.4–1.65× in width and
    1.15–1.3× in height: it hides much more of both lungs.
``Pneumothorax``
    a dark crescent without lung markings along the apex/upper lateral edge of one lung,
    bounded by a thin bright line (the pleura).

Labels: 35% of the images have no finding; the others have 1 to 4 (1.87 on average,
about 1.2 per image overall), drawn one after another with class affinities, so that
Effusion goes with Cardiomegaly, Nodule with Mass, and Pneumothorax mostly alone. Every
lesion instance has a bounding box ``(class index, x, y, w, h)`` in pixels: the box is
the pixels ``x <= col < x + w``, ``y <= row < y + h`` (whole numbers, inside the image),
the smallest that holds every pixel the lesion changes by more than 10% of its peak
change. A share of the images (``unlabeled_fraction``, drawn per
image) is unlabeled: its mask is all False and its ``labels`` are 0, while
``true_labels`` and the boxes keep the truth for evaluation.

Images are generated in chunks of 256 seeded from ``(seed, chunk)``: image ``i`` is the
same whatever ``n`` is, so ``make_synthetic(100)`` is a prefix of ``make_synthetic(1000)``,
and a different seed gives different images. Use distinct seeds for training and test
sets.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["CLASSES", "SyntheticBatch", "SyntheticChestXray", "make_synthetic"]

#: The synthetic findings, in label order (the names of the matching NIH findings).
CLASSES: tuple[str, ...] = ("Nodule", "Mass", "Effusion", "Cardiomegaly", "Pneumothorax")

_CHUNK = 256
_P_NO_FINDING = 0.35
# P(1, 2, 3, 4 findings | some finding) = 0.42, 0.35, 0.17, 0.06: the thresholds of a uniform draw.
_COUNT_THRESHOLDS = (0.42, 0.77, 0.94)
_BASE_WEIGHT = torch.tensor([1.0, 0.7, 1.2, 0.9, 0.55])


def _affinity() -> torch.Tensor:
    """How much a finding already drawn multiplies the weight of each other one (symmetric)."""
    out = torch.ones(5, 5)
    pairs = {(0, 1): 2.5, (2, 3): 3.0, (1, 2): 1.5, (0, 4): 0.5, (1, 4): 0.6, (2, 4): 0.8, (3, 4): 0.3}
    for (i, j), w in pairs.items():
        out[i, j] = out[j, i] = w
    return out


_AFFINITY = _affinity()
_BOX_THRESHOLD = 0.1

Box = tuple[int, float, float, float, float]


class SyntheticBatch(NamedTuple):
    """What :func:`make_synthetic` returns.

    Attributes:
        images: float32 ``[n, 1, size, size]`` in [0, 1].
        labels: float32 ``[n, 5]``, 0/1, 0 where unknown (unlabeled images).
        mask: bool ``[n, 5]``, True where the label is known (all False for unlabeled images).
        boxes: per image, a list of ``(class index, x, y, w, h)`` in pixels, one per lesion
            instance (kept for unlabeled images too).
        true_labels: float32 ``[n, 5]``, the labels of every image, unlabeled ones included.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    boxes: list[list[Box]]
    true_labels: torch.Tensor


def _chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed for ``(seed, chunk)`` (splitmix64), so that chunks and seeds do not collide."""
    m = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + (chunk + 1) * 0xD1B54A32D192ED03) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class _Uniform:
    """Per-image uniform parameters taken column by column from one pre-drawn ``[n, k]`` matrix."""

    def __init__(self, u: torch.Tensor) -> None:
        self.u, self.next = u, 0

    def __call__(self, lo: float, hi: float) -> torch.Tensor:
        col = self.u[:, self.next]
        self.next += 1
        return (lo + (hi - lo) * col).view(-1, 1, 1)


def _superellipse(X, Y, cx, cy, a, b, p_top: float, p_bottom: float):
    """``rho`` (< 1 inside) of a superellipse with exponent ``p_top`` above the centre, ``p_bottom`` below."""
    dx, dy = ((X - cx) / a).abs(), (Y - cy) / b
    if p_top == p_bottom:
        return (dx.pow(p_top) + dy.abs().pow(p_top)).pow(1.0 / p_top)
    top = (dx.pow(p_top) + dy.abs().pow(p_top)).pow(1.0 / p_top)
    bottom = (dx.pow(p_bottom) + dy.abs().pow(p_bottom)).pow(1.0 / p_bottom)
    return torch.where(dy < 0, top, bottom)


def _sample_labels(u_abnormal, u_count, u_pick) -> torch.Tensor:
    """Multi-hot labels: no finding, or 1–4 findings picked one by one with class affinities."""
    n, c = u_abnormal.shape[0], len(CLASSES)
    count = 1 + sum((u_count > t).long() for t in _COUNT_THRESHOLDS)
    count = torch.where(u_abnormal < _P_NO_FINDING, torch.zeros_like(count), count)
    chosen = torch.zeros(n, c, dtype=torch.bool)
    weight = _BASE_WEIGHT.expand(n, c).clone()
    rows = torch.arange(n)
    for step in range(4):
        w = weight * (~chosen)
        cdf = w.cumsum(1) / w.sum(1, keepdim=True)
        pick = (cdf < u_pick[:, step : step + 1]).sum(1).clamp(max=c - 1)
        take = step < count
        chosen[rows, pick] |= take
        weight = torch.where(take[:, None], weight * _AFFINITY[pick], weight)
    return chosen


def _grid(n: int):
    """Pixel-centre coordinates in [0, 1] of an n×n image: (Y [1, n, 1], X [1, 1, n])."""
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return coords.view(1, n, 1), coords.view(1, 1, n)


def _soft_inside(rho: torch.Tensor, width: float) -> torch.Tensor:
    """sigmoid((1 - rho) / width), in place on ``rho``."""
    return rho.mul_(-1.0 / width).add_(1.0 / width).sigmoid_()


def _sample(low: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``low`` [k, L, L] upsampled bilinearly (as ``F.interpolate`` does) at the pixels of the windows
    ``X`` [k, 1, w], ``Y`` [k, h, 1]."""
    grid = torch.stack(torch.broadcast_tensors(X * 2 - 1, Y * 2 - 1), dim=-1)
    return F.grid_sample(low.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def _render_chunk(seed: int, chunk: int, size: int, unlabeled_fraction: float, lesions: bool):
    """The 256 images of chunk ``chunk`` of ``seed``: (images [256, 1, S, S], true labels [256, 5],
    unlabeled [256], boxes). A chunk is always rendered whole: vectorized math can round the last
    bit differently for other sizes, and image i must not depend on n."""
    g = torch.Generator().manual_seed(_chunk_seed(seed, chunk))
    S, N = size, _CHUNK
    # Every random number of the chunk is drawn up front.
    u_unlabeled = torch.rand(N, generator=g)
    u_labels = torch.rand(N, 6, generator=g)
    params = torch.rand(N, 96, generator=g)
    noise = torch.randn(N, S, S, generator=g)
    texture = torch.randn(N, 1, max(4, S // 8), max(4, S // 8), generator=g)

    m = N
    true = _sample_labels(u_labels[:, 0], u_labels[:, 1], u_labels[:, 2:6])
    unlabeled = u_unlabeled < unlabeled_fraction
    U = _Uniform(params)

    # The background is smooth: it is rendered at half resolution and upsampled.
    L = S // 2
    Y, X = _grid(L)
    bx, by, ba, bb = U(0.485, 0.515), U(0.55, 0.59), U(0.42, 0.47), U(0.55, 0.62)
    body = _soft_inside(_superellipse(X, Y, bx, by, ba, bb, 2.0, 2.0), 0.03)
    lung_y = U(0.44, 0.49)
    lung = []  # per side (0: left, 1: right): (cx, cy, a, b)
    for sign in (-1.0, 1.0):
        lung.append((0.5 + sign * U(0.17, 0.2), lung_y + U(-0.01, 0.01), U(0.12, 0.145), U(0.26, 0.31)))
    lungs = _soft_inside(_superellipse(X, Y, *lung[0], 2.0, 3.5), 0.04)
    lungs += _soft_inside(_superellipse(X, Y, *lung[1], 2.0, 3.5), 0.04)
    hx, hy, ha, hb = U(0.535, 0.565), U(0.65, 0.69), U(0.11, 0.13), U(0.09, 0.11)
    air, body_level, lung_drop = U(0.03, 0.08), U(0.5, 0.6), U(0.28, 0.34)
    heart_level = U(0.75, 0.95) * lung_drop  # the heart hides the lung behind it
    heart = _soft_inside(_superellipse(X, Y, hx, hy, ha, hb, 2.0, 2.0), 0.05)
    rib_phase = 2 * math.pi * (7.0 * Y + 3.0 * (X - 0.5) ** 2)  # [1, L, L]
    phase, rib_amp = U(0, 2 * math.pi), U(0.015, 0.035)
    markings = (rib_amp * phase.cos()) * rib_phase.cos() - (rib_amp * phase.sin()) * rib_phase.sin()
    markings += F.interpolate(texture, size=(L, L), mode="bilinear", align_corners=False)[:, 0] * U(0.025, 0.045)
    markings *= lungs
    spine = 0.12 * torch.exp(-(((X - 0.5) / 0.045) ** 2))
    low = body * (body_level - air + spine) + air
    low -= lungs * (lung_drop + spine * body)
    low += markings + heart_level * heart * lungs + (U(-0.08, 0.08) * (X - 0.5) + U(-0.08, 0.08) * (Y - 0.5))
    image = F.interpolate(low.unsqueeze(1), size=(S, S), mode="bilinear", align_corners=False)[:, 0]

    # Lesions, at full resolution, each rendered in a window around it on the images that have it.
    # (class, image indices [k], window origins x0 [k], y0 [k], deltas [k, wy, wx]).
    slots: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(cls: int, active: torch.Tensor, centre_x, centre_y, half_w: float, half_h: float, render) -> None:
        """Render ``render(idx, X, Y)`` on windows of (2 half_w) x (2 half_h) (normalized) around the centres."""
        idx = active.nonzero().flatten()
        if not idx.numel():
            return
        wx, wy = min(S, 2 * math.ceil(half_w * S) + 2), min(S, 2 * math.ceil(half_h * S) + 2)
        x0 = (centre_x.view(-1)[idx] * S - wx / 2).round().clamp(0, S - wx).long()
        y0 = (centre_y.view(-1)[idx] * S - wy / 2).round().clamp(0, S - wy).long()
        X = (x0.view(-1, 1, 1) + torch.arange(wx).view(1, 1, wx) + 0.5) / S
        Y = (y0.view(-1, 1, 1) + torch.arange(wy).view(1, wy, 1) + 0.5) / S
        slots.append((cls, idx, x0, y0, render(idx, X, Y)))

    def side(right: torch.Tensor):
        """(cx, cy, a, b, lateral sign) [m, 1, 1] of the lung on the chosen side of each image."""
        return (*(torch.where(right, p1, p0) for p0, p1 in zip(lung[0], lung[1])), torch.where(right, 1.0, -1.0))

    for extra in (False, True):  # nodules: a second one in 30% of the images with one
        cx, cy, a, b, _ = side(U(0, 1) < 0.5)
        nx, ny, r, amp = cx + U(-0.55, 0.55) * a, cy + U(-0.75, -0.2) * b, U(0.022, 0.036), U(0.22, 0.35)
        second = U(0, 1).flatten() < 0.3

        def nodule(idx, X, Y, nx=nx, ny=ny, r=r, amp=amp):
            rr = r[idx]
            d = ((X - nx[idx]) ** 2 + (Y - ny[idx]) ** 2).sqrt_()
            return d.sub_(rr).mul_(-4.0 / rr).sigmoid_().mul_(amp[idx])

        add(0, true[:, 0] & second if extra else true[:, 0], nx, ny, 0.08, 0.08, nodule)

    cx, cy, a, b, _ = side(U(0, 1) < 0.5)
    mx, my, r0, amp_m = cx + U(-0.45, 0.45) * a, cy + U(-0.3, 0.4) * b, U(0.055, 0.08), U(0.2, 0.32)
    phases = [U(0, 2 * math.pi) for _ in range(3)]

    def mass(idx, X, Y):
        dx, dy, rr = X - mx[idx], Y - my[idx], r0[idx]
        theta = torch.atan2(dy, dx)
        outline = (3 * theta + phases[0][idx]).cos_().mul_(0.2)
        outline += (5 * theta + phases[1][idx]).cos_().mul_(0.12)
        outline += (2 * theta + phases[2][idx]).cos_().mul_(0.1)
        d = (dx**2 + dy**2).sqrt_()
        return outline.add_(1.0).mul_(rr).sub_(d).mul_(1.0 / (0.12 * rr)).sigmoid_().mul_(amp_m[idx])

    add(1, true[:, 1], mx, my, 0.145, 0.145, mass)

    ecx, ecy, ea, eb, esign = side(U(0, 1) < 0.5)
    height, amp_e = U(0.18, 0.4) * 2 * eb, U(0.28, 0.4)

    def effusion(idx, X, Y):
        cx, cy, a, b, sign, h = ecx[idx], ecy[idx], ea[idx], eb[idx], esign[idx], height[idx]
        inside = _soft_inside(_superellipse(X, Y, cx, cy, a, b, 2.0, 3.5), 0.04)
        lateral = (0.5 + 0.5 * sign * (X - cx) / a).clamp(0, 1)  # [k, 1, wx]
        depth = Y - (cy + b - h * (0.55 + 0.45 * lateral))
        fluid = (depth / (0.6 * h)).clamp_(0.35, 1.0).mul_(inside)
        return depth.mul_(1 / 0.012).sigmoid_().mul_(fluid).mul_(amp_e[idx])

    add(2, true[:, 2], ecx, ecy + eb - 0.12, 0.165, 0.14, effusion)

    a2, b2 = ha * U(1.4, 1.65), hb * U(1.15, 1.3)
    hx2, hy2 = hx + 0.25 * (a2 - ha), hy + 0.5 * (b2 - hb)

    def cardiomegaly(idx, X, Y):
        big = _soft_inside(_superellipse(X, Y, hx2[idx], hy2[idx], a2[idx], b2[idx], 2.0, 2.0), 0.05)
        big -= _soft_inside(_superellipse(X, Y, hx[idx], hy[idx], ha[idx], hb[idx], 2.0, 2.0), 0.05)
        return big.mul_(_sample(lungs[idx], X, Y)).mul_(heart_level[idx])

    add(3, true[:, 3], hx2, hy2, 0.26, 0.175, cardiomegaly)

    pcx, pcy, pa, pb, psign = side(U(0, 1) < 0.5)
    angle, spread, thick = U(0.7, 1.6), U(0.6, 0.9), U(0.2, 0.35)
    dark, line_amp = U(0.1, 0.16), U(0.12, 0.2)

    def pneumothorax(idx, X, Y):
        cx, cy, a, b, sign = pcx[idx], pcy[idx], pa[idx], pb[idx], psign[idx]
        rho = _superellipse(X, Y, cx, cy, a, b, 2.0, 3.5)
        inside = _soft_inside(rho.clone(), 0.04)
        theta = torch.atan2((cy - Y) / b, sign * (X - cx) / a)  # 0 at the lateral edge, pi/2 at the apex
        along = theta.sub_(angle[idx]).mul_(math.pi / 2 / spread[idx]).clamp_(-math.pi / 2, math.pi / 2).cos_()
        off = rho.sub_(1.0).add_(thick[idx] * along)  # rho - edge, edge = 1 - thick * along
        crescent = (off / 0.025).sigmoid_().mul_(inside).mul_(along > 0)
        line = off.div_(0.045).square_().neg_().exp_().mul_(inside).mul_(along > 0.2)
        lost = _sample(markings[idx], X, Y)  # the lung markings the crescent loses
        return line.mul_(line_amp[idx]).sub_(crescent.mul_(lost.add_(dark[idx])))

    add(4, true[:, 4], pcx, pcy - 0.35 * pb, 0.165, 0.23, pneumothorax)

    contrast, brightness, sigma = U(0.8, 1.2), U(-0.07, 0.07), U(0.01, 0.03)
    boxes: list[list[Box]] = [[] for _ in range(m)]
    for cls, idx, x0, y0, delta in slots:
        k, wy, wx = delta.shape
        if lesions:
            rows = (y0.view(-1, 1, 1) + torch.arange(wy).view(1, wy, 1)).expand(k, wy, wx)
            cols = (x0.view(-1, 1, 1) + torch.arange(wx).view(1, 1, wx)).expand(k, wy, wx)
            image.index_put_((idx.view(-1, 1, 1).expand(k, wy, wx), rows, cols), delta, accumulate=True)
        mag = delta.abs_()
        on = (mag > _BOX_THRESHOLD * mag.amax(dim=(1, 2), keepdim=True)) & (mag > 0)
        on_rows, on_cols = on.any(2), on.any(1)
        top, bottom = on_rows.int().argmax(1), wy - on_rows.flip(1).int().argmax(1)
        left, right = on_cols.int().argmax(1), wx - on_cols.flip(1).int().argmax(1)
        has = on_rows.any(1)
        for i, x, y, w, h in zip(idx[has].tolist(), (x0 + left)[has].tolist(), (y0 + top)[has].tolist(),
                                 (right - left)[has].tolist(), (bottom - top)[has].tolist()):
            boxes[i].append((cls, float(x), float(y), float(w), float(h)))
    image.mul_(contrast).add_(0.4 * (1 - contrast) + brightness).add_(noise.mul_(sigma)).clamp_(0.0, 1.0)
    assert U.next <= params.shape[1]
    return image.unsqueeze(1), true.float(), unlabeled, boxes


def _integer(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


@contextlib.contextmanager
def _one_thread():
    """torch's intra-op threads set to 1 for the duration: the tensors here are small, and with several
    threads on a busy machine every op waits for the slowest thread (20x slower, measured on 2 cores)."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def make_synthetic(n: int, size: int = 96, seed: int = 0, unlabeled_fraction: float = 0.25, *,
                   lesions: bool = True) -> SyntheticBatch:
    """Generate ``n`` synthetic chest radiographs with multi-label findings and boxes.

    Args:
        n: the number of images (>= 0).
        size: the side of the square images in pixels (>= 32).
        seed: any integer; the same seed gives identical tensors, the global RNG is untouched.
        unlabeled_fraction: the probability, per image, that its labels are unknown (mask all
            False); the unlabeled images of a smaller fraction are a subset of a larger one's.
        lesions: False renders the same images without their lesions (for tests and
            diagnostics: the difference of the two is each lesion's footprint); labels and
            boxes are unchanged.

    It runs on the CPU with torch's intra-op threads set to 1 for the call (restored after):
    about 0.5 s for 2,000 images of 96×96 on one core.

    Returns:
        a :class:`SyntheticBatch` ``(images [n, 1, size, size], labels [n, 5], mask [n, 5],
        boxes, true_labels [n, 5])``; see the module docstring for the classes.
    """
    n, size, seed = _integer("n", n), _integer("size", size), _integer("seed", seed)
    if n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    if not 0.0 <= float(unlabeled_fraction) <= 1.0:
        raise ValueError(f"unlabeled_fraction must be in [0, 1], got {unlabeled_fraction!r}")
    images, true, unlabeled, boxes = [], [], [], []
    with _one_thread():
        for chunk in range((n + _CHUNK - 1) // _CHUNK):
            count = min(_CHUNK, n - chunk * _CHUNK)
            im, tl, ul, bx = _render_chunk(seed, chunk, size, float(unlabeled_fraction), lesions)
            images.append(im[:count])
            true.append(tl[:count])
            unlabeled.append(ul[:count])
            boxes += bx[:count]
    c = len(CLASSES)
    images_t = torch.cat(images) if images else torch.zeros(0, 1, size, size)
    true_t = torch.cat(true) if true else torch.zeros(0, c)
    unlabeled_t = torch.cat(unlabeled) if unlabeled else torch.zeros(0, dtype=torch.bool)
    mask = (~unlabeled_t).view(-1, 1).expand(-1, c).clone()
    return SyntheticBatch(images=images_t, labels=true_t * mask, mask=mask, boxes=boxes, true_labels=true_t)


class SyntheticChestXray(torch.utils.data.Dataset):
    """A :class:`torch.utils.data.Dataset` of :func:`make_synthetic` images, generated once at construction.

    Item ``i`` is a dict: ``image`` float32 ``[1, size, size]``, ``labels`` float32 ``[5]``
    (0 where unknown), ``mask`` bool ``[5]``, ``true_labels`` float32 ``[5]``, ``boxes`` (a
    list of ``(class index, x, y, w, h)`` in pixels) and ``index``. The boxes vary in number,
    so batch with ``DataLoader(..., collate_fn=SyntheticChestXray.collate)``.

    The images are held in memory: ``n * size * size * 4`` bytes (37 MB for 1,000 images of
    96×96).
    """

    classes = CLASSES

    def __init__(self, n: int, *, size: int = 96, seed: int = 0, unlabeled_fraction: float = 0.0) -> None:
        batch = make_synthetic(n, size=size, seed=seed, unlabeled_fraction=unlabeled_fraction)
        self.images, self.labels, self.mask, self.boxes, self.true_labels = batch
        self.size, self.seed = size, seed

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        i = range(len(self))[index]
        return {"image": self.images[i], "labels": self.labels[i], "mask": self.mask[i],
                "true_labels": self.true_labels[i], "boxes": self.boxes[i], "index": i}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Stack a list of items into a batch; ``boxes`` stays a list (one list per image)."""
        out = {k: torch.stack([item[k] for item in items]) for k in ("image", "labels", "mask", "true_labels")}
        out["boxes"] = [item["boxes"] for item in items]
        out["index"] = torch.tensor([item["index"] for item in items])
        return out

