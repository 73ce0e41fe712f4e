"""Triton kernels of the loss terms of SPEC §2.3, registered with ``torch.library.triton_op``.

``fastcam_triton::attention_terms(logits, cams, labels, label_mask, measure, eps, predicted,
grid_h, grid_w, weights)`` gives ``[loss, bce, distinct, consist, coherence]`` from the logits
``[B, C]`` and the normalized maps ``[B, C, N]`` (fp32, or fp64), with ``weights =
[classification (0 or 1), lambda_distinct, lambda_consist, lambda_coherence]``; a term of weight
0 is not computed (0). Its backward, ``fastcam_triton::attention_terms_backward``, gives
``(dL/dlogits, dL/dcams)`` from the gradient of the five values; the pair weights q are
constants (detached), so dL/dlogits comes from the BCE alone. Same signature and semantics as
the C++ op ``fastcam::attention_terms`` (csrc/cpu/attention_terms.cpp).

The kernels, in the order they run:

* ``_class_weights_kernel`` — q[b, c] (the label where known, else sigmoid(logit) or 0);
* ``_variance_kernel`` (coherence) — each map's spatial variance; a program holds whole maps
  (``N`` up to a few thousand positions), as many as fit in ``MAP_BLOCK`` values;
* the pairwise terms with the overlap kernel of fastcam/triton/pairwise_overlap.py in its
  weighted mode: the classes of each image (distinctiveness), the images of each class
  (consistency, a strided view of the same maps); each tile of pairs writes its sums of the
  pair weights w and of w O (w (1 - O)), the overlaps themselves are never stored;
* ``_terms_kernel`` — one program: the masked BCE, the tiles' partial sums, the coherence
  sums, and the weighted total.

Backward: ``_class_weights_kernel``; the overlap backward's per-pair coefficients for the pair
weights ``2 q[p] q[q]``, with each tile's sum of the pair weights; ``_terms_backward_kernel``
(one program: the BCE's gradient to the logits, and the device scalars that scale each term's
map gradient, from those sums: the total pair weight is summed pair by pair, as the reference
does, never as (sum q)^2 - sum q^2, which cancels); then the overlap gradient times its scale
and the variance gradient, accumulated into dL/dcams in that order. Nothing reads a device
value on the host; every sum has a fixed order (no atomics).

Pairs are summed densely, as in the reference: a pair of zero weight still multiplies its
overlap, so a NaN map makes the term NaN, as it does there.

Run on the CPU with ``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastcam.triton.common import no_double_backward, rejoin, split_float
from fastcam.triton.pairwise_overlap import launch_coefficients, launch_grad, launch_overlap, tiles

BLOCK = 1024  # entries or pairs per step of the one-program reductions
BLOCK_Q = 256  # entries per program of _class_weights_kernel
MAP_BLOCK = 2048  # values per program of the variance kernels


@triton.jit
def _known(y_ptr, m_ptr, offs, valid, HAS_Y: tl.constexpr, HAS_M: tl.constexpr):
    """Whether each label is known: labels given and (no mask or the mask is set)."""
    if HAS_Y:
        if HAS_M:
            known = valid & (tl.load(m_ptr + offs, mask=valid, other=0) != 0)
        else:
            known = valid
    else:
        known = offs < 0
    return known


@triton.jit
def _logits_and_labels(x_ptr, y_ptr, m_ptr, offs, valid, HAS_Y: tl.constexpr, HAS_M: tl.constexpr):
    """(logits, labels with 0 where unknown, known) at offs."""
    known = _known(y_ptr, m_ptr, offs, valid, HAS_Y, HAS_M)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    if HAS_Y:
        y = tl.load(y_ptr + offs, mask=known, other=0.0)  # an unknown label is never read
    else:
        y = tl.zeros_like(x)
    return x, y, known


@triton.jit
def _class_weights_kernel(x_ptr, y_ptr, m_ptr, q_ptr, n, HAS_Y: tl.constexpr, HAS_M: tl.constexpr,
                          PREDICTED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    x, y, known = _logits_and_labels(x_ptr, y_ptr, m_ptr, offs, valid, HAS_Y, HAS_M)
    fallback = tl.sigmoid(x) if PREDICTED else tl.zeros_like(x)
    tl.store(q_ptr + offs, tl.where(known, y, fallback), mask=valid)


@triton.jit
def _maps_on_the_grid(cams_ptr, M, N, grid_h, grid_w, eps_hi, eps_lo, ACC_F64: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's maps as distributions: (rows, mask, den, p [ROWS, BLOCK_N], the positions'
    row and column coordinates [1, BLOCK_N], the means mu_r, mu_c [ROWS, 1]) with
    p = map / den, den = sum map + eps; position n is ((n // W + 0.5) / H, (n % W + 0.5) / W)."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (offs[None, :] < N)
    a = tl.load(cams_ptr + rows[:, None] * N + offs[None, :], mask=mask, other=0.0)
    den = tl.sum(a, axis=1)[:, None] + rejoin(eps_hi, eps_lo, ACC_F64)
    p = a / den
    r = ((offs // grid_w).to(acc_ty)[None, :] + 0.5) / grid_h
    c = ((offs % grid_w).to(acc_ty)[None, :] + 0.5) / grid_w
    return rows, mask, den, p, r, c, tl.sum(p * r, axis=1)[:, None], tl.sum(p * c, axis=1)[:, None]


@triton.jit
def _variance_kernel(cams_ptr, var_ptr, M, N, grid_h, grid_w, eps_hi, eps_lo, ACC_F64: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """var[map] = sum_n p_n |pos_n - mu|^2, mu = sum_n p_n pos_n, for ROWS of the M maps."""
    rows, _, _, p, r, c, mr, mc = _maps_on_the_grid(cams_ptr, M, N, grid_h, grid_w, eps_hi, eps_lo, ACC_F64, ROWS,
                                                    BLOCK_N)  # fmt: skip
    tl.store(var_ptr + rows, tl.sum(p * ((r - mr) * (r - mr) + (c - mc) * (c - mc)), axis=1), mask=rows < M)


@triton.jit
def _variance_grad_kernel(cams_ptr, q_ptr, scale_ptr, grad_ptr, M, N, grid_h, grid_w, eps_hi, eps_lo,
                          ACCUMULATE: tl.constexpr, ACC_F64: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_N: tl.constexpr):  # fmt: skip
    """grad[map] (+)= scale q[map] d var / d map (csrc/common/map_math.h's map_variance_grad):
    d var / d p_n = |pos_n - mu|^2 - 2 (1 - sum p) pos_n . mu, then through p = a / (sum a + eps)."""
    rows, mask, den, p, r, c, mr, mc = _maps_on_the_grid(cams_ptr, M, N, grid_h, grid_w, eps_hi, eps_lo, ACC_F64,
                                                         ROWS, BLOCK_N)  # fmt: skip
    mass = tl.sum(p, axis=1)[:, None]
    gp = (r - mr) * (r - mr) + (c - mc) * (c - mc) - 2 * (1 - mass) * (r * mr + c * mc)
    dot = tl.sum(gp * p, axis=1)[:, None]
    g = tl.load(scale_ptr) * tl.load(q_ptr + rows, mask=rows < M, other=0.0)[:, None]
    out = grad_ptr + rows[:, None] * N + tl.arange(0, BLOCK_N)[None, :]
    if ACCUMULATE:
        tl.store(out, tl.load(out, mask=mask, other=0.0) + g * (gp - dot) / den, mask=mask)
    else:
        tl.store(out, g * (gp - dot) / den, mask=mask)


@triton.jit
def _bce(x, y):
    """Binary cross-entropy with logits, max(x, 0) - x y + log(1 + exp(-|x|))."""
    return tl.maximum(x, 0.0) - x * y + tl.log(1 + tl.exp(-tl.abs(x)))


@triton.jit
def _sum_of(ptr, n, stride, ACC_F64: tl.constexpr, BLOCK: tl.constexpr):
    """sum of ptr[i * stride] for i < n, in a fixed order."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    total = tl.zeros((BLOCK,), dtype=acc_ty)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        total += tl.load(ptr + offs * stride, mask=offs < n, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _terms_kernel(x_ptr, y_ptr, m_ptr, q_ptr, var_ptr, pd_ptr, n_d, pc_ptr, n_c, res_ptr, B, C, eps_hi, eps_lo,
                  w0_hi, w0_lo, w1_hi, w1_lo, w2_hi, w2_lo, w3_hi, w3_lo, HAS_Y: tl.constexpr, HAS_M: tl.constexpr,
                  DO_BCE: tl.constexpr, DO_DISTINCT: tl.constexpr, DO_CONSIST: tl.constexpr,
                  DO_COHERENCE: tl.constexpr, ACC_F64: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """res = [loss, bce, distinct, consist, coherence] (0 for a term not computed) from the
    n_d (n_c) tiles' (sum w, sum w O) of the distinctiveness (consistency) term at pd (pc), and
    the variances; the weights w0..w3 (classification and the lambdas) and eps in split_float's
    halves."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    eps = rejoin(eps_hi, eps_lo, ACC_F64)
    bce = tl.zeros((BLOCK,), dtype=acc_ty)
    count = tl.zeros((BLOCK,), dtype=acc_ty)
    q_var = tl.zeros((BLOCK,), dtype=acc_ty)
    q_sum = tl.zeros((BLOCK,), dtype=acc_ty)
    for i0 in range(0, B * C, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        valid = offs < B * C
        if DO_BCE:
            x, y, known = _logits_and_labels(x_ptr, y_ptr, m_ptr, offs, valid, HAS_Y, HAS_M)
            bce += tl.where(known, _bce(x, y), 0.0)
            count += known.to(acc_ty)
        if DO_COHERENCE:
            q = tl.load(q_ptr + offs, mask=valid, other=0.0)
            q_var += q * tl.load(var_ptr + offs, mask=valid, other=0.0)
            q_sum += q
    loss = tl.zeros((), dtype=acc_ty)
    if DO_BCE:
        value = tl.sum(bce, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0)
        tl.store(res_ptr + 1, value)
        loss += rejoin(w0_hi, w0_lo, ACC_F64) * value
    else:
        tl.store(res_ptr + 1, tl.zeros((), dtype=acc_ty))
    if DO_DISTINCT:
        value = _sum_of(pd_ptr + 1, n_d, 2, ACC_F64, BLOCK) / (_sum_of(pd_ptr, n_d, 2, ACC_F64, BLOCK) + eps)
        tl.store(res_ptr + 2, value)
        loss += rejoin(w1_hi, w1_lo, ACC_F64) * value
    else:
        tl.store(res_ptr + 2, tl.zeros((), dtype=acc_ty))
    if DO_CONSIST:
        value = _sum_of(pc_ptr + 1, n_c, 2, ACC_F64, BLOCK) / (_sum_of(pc_ptr, n_c, 2, ACC_F64, BLOCK) + eps)
        tl.store(res_ptr + 3, value)
        loss += rejoin(w2_hi, w2_lo, ACC_F64) * value
    else:
        tl.store(res_ptr + 3, tl.zeros((), dtype=acc_ty))
    if DO_COHERENCE:
        value = tl.sum(q_var, axis=0) / (tl.sum(q_sum, axis=0) + eps)
        tl.store(res_ptr + 4, value)
        loss += rejoin(w3_hi, w3_lo, ACC_F64) * value
    else:
        tl.store(res_ptr + 4, tl.zeros((), dtype=acc_ty))
    tl.store(res_ptr, loss)


@triton.jit
def _terms_backward_kernel(x_ptr, y_ptr, m_ptr, q_ptr, gt_ptr, pd_ptr, n_d, pc_ptr, n_c, gl_ptr, sd_ptr, sc_ptr,
                           sh_ptr, B, C, eps_hi, eps_lo, w0_hi, w0_lo, w1_hi, w1_lo, w2_hi, w2_lo, w3_hi, w3_lo,
                           HAS_Y: tl.constexpr, HAS_M: tl.constexpr, DO_BCE: tl.constexpr, DO_DISTINCT: tl.constexpr,
                           DO_CONSIST: tl.constexpr, DO_COHERENCE: tl.constexpr, ACC_F64: tl.constexpr,
                           BLOCK: tl.constexpr):  # fmt: skip
    """gl = dL/dlogits (the BCE's; zero-filled without it); sd, sc: the distinctiveness and
    consistency terms' dL/dO per unit pair weight (the n_d, n_c tiles' sums of the pair weights
    at pd, pc give their totals), sh: dL/dvar per unit q. Each term's gradient comes directly
    (gt[i]) and through the total (gt[0] times its weight)."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    eps = rejoin(eps_hi, eps_lo, ACC_F64)
    g_total = tl.load(gt_ptr)
    if DO_BCE:
        g_bce = tl.load(gt_ptr + 1) + g_total * rejoin(w0_hi, w0_lo, ACC_F64)
        count = tl.zeros((BLOCK,), dtype=acc_ty)
        for i0 in range(0, B * C, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            count += _known(y_ptr, m_ptr, offs, offs < B * C, HAS_Y, HAS_M).to(acc_ty)
        scale = g_bce / tl.maximum(tl.sum(count, axis=0), 1.0)
        for i0 in range(0, B * C, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            valid = offs < B * C
            x, y, known = _logits_and_labels(x_ptr, y_ptr, m_ptr, offs, valid, HAS_Y, HAS_M)
            # 0 where the label is unknown, whatever the logit (NaN included), as the reference
            tl.store(gl_ptr + offs, tl.where(known, scale * (tl.sigmoid(x) - y), 0.0), mask=valid)
    if DO_DISTINCT:
        g_distinct = tl.load(gt_ptr + 2) + g_total * rejoin(w1_hi, w1_lo, ACC_F64)
        tl.store(sd_ptr, g_distinct / (_sum_of(pd_ptr, n_d, 1, ACC_F64, BLOCK) + eps))
    if DO_CONSIST:
        g_consist = tl.load(gt_ptr + 3) + g_total * rejoin(w2_hi, w2_lo, ACC_F64)
        tl.store(sc_ptr, -g_consist / (_sum_of(pc_ptr, n_c, 1, ACC_F64, BLOCK) + eps))  # the term has 1 - O
    if DO_COHERENCE:
        g_coherence = tl.load(gt_ptr + 4) + g_total * rejoin(w3_hi, w3_lo, ACC_F64)
        tl.store(sh_ptr, g_coherence / (_sum_of(q_ptr, B * C, 1, ACC_F64, BLOCK) + eps))


def _map_blocks(maps: int, n: int) -> tuple[int, int]:
    """(maps per program, positions per program) of the variance kernels: whole maps, and as
    many of them as fill MAP_BLOCK values (one for a map longer than that)."""
    block_n = max(16, triton.next_power_of_2(n))
    return max(1, min(triton.next_power_of_2(maps), MAP_BLOCK // block_n)), block_n


def _prepare(logits, cams, labels, label_mask, weights, kept=None):
    """The inputs as the kernels take them, and the constexpr switches they share; the labels
    and mask as a forward kept them (``kept``), if given."""
    if cams.dim() != 3 or cams.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"fastcam_triton::attention_terms: cams must be a float32 or float64 [B, C, N] tensor, "
                         f"got {cams.dtype} {list(cams.shape)}")  # fmt: skip
    if tuple(logits.shape) != tuple(cams.shape[:2]):
        raise ValueError(f"fastcam_triton::attention_terms: logits must be [B, C] = {list(cams.shape[:2])}, got "
                         f"{list(logits.shape)}")  # fmt: skip
    if len(weights) != 4:
        raise ValueError("fastcam_triton::attention_terms: weights must be [classification, lambda_distinct, "
                         f"lambda_consist, lambda_coherence], got {len(weights)} values")  # fmt: skip
    c = cams.contiguous()
    x = logits.to(c.dtype).contiguous()
    has_mask = labels is not None and label_mask is not None
    if kept is not None:
        y, m = kept["y"], kept["m"]
    else:
        y = labels.to(c.dtype).contiguous() if labels is not None else c.new_empty(0)
        m = label_mask.to(torch.uint8).contiguous() if has_mask else c.new_empty(0, dtype=torch.uint8)
    flags = dict(HAS_Y=labels is not None, HAS_M=has_mask, DO_BCE=weights[0] != 0, DO_DISTINCT=weights[1] != 0,
                 DO_CONSIST=weights[2] != 0, DO_COHERENCE=weights[3] != 0,
                 ACC_F64=c.dtype == torch.float64)  # fmt: skip
    return c, x, y, m, flags


def _scalars(eps, weights):
    """eps and the four weights as the kernels take them: split_float's halves, in order."""
    return [half for value in (eps, *weights) for half in split_float(float(value))]


def _class_weights(x, y, m, flags, predicted):
    q = torch.empty_like(x)
    if x.numel():
        wrap_triton(_class_weights_kernel)[(triton.cdiv(x.numel(), BLOCK_Q),)](
            x, y, m, q, x.numel(), HAS_Y=flags["HAS_Y"], HAS_M=flags["HAS_M"], PREDICTED=predicted, BLOCK=BLOCK_Q
        )
    return q


def attention_terms_impl(logits: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor | None,
                         label_mask: torch.Tensor | None, measure: str, eps: float, predicted: bool, grid_h: int,
                         grid_w: int, weights: list[float], keep: dict | None = None) -> torch.Tensor:  # fmt: skip
    """[loss, bce, distinct, consist, coherence] in the maps' dtype (float32 or float64): the body
    of ``fastcam_triton::attention_terms`` (fastcam/triton/attention_loss.py calls it directly,
    with a ``keep`` dict that gets the converted labels and mask and the pair weights q, which
    its backward then takes instead of making them again)."""
    c, x, y, m, flags = _prepare(logits, cams, labels, label_mask, weights)
    B, C, N = c.shape
    q = _class_weights(x, y, m, flags, predicted)
    if keep is not None:
        keep.update(y=y, m=m, q=q)
    var = c.new_empty(B * C if flags["DO_COHERENCE"] else 0)
    if flags["DO_COHERENCE"] and B * C > 0:
        rows, block_n = _map_blocks(B * C, N)
        wrap_triton(_variance_kernel)[(triton.cdiv(B * C, rows),)](c, var, B * C, N, grid_h, grid_w, *split_float(eps),
                                                                   ACC_F64=flags["ACC_F64"], ROWS=rows,
                                                                   BLOCK_N=block_n)  # fmt: skip
    # The pairs of classes of each image (distinctiveness), of images of each class (consistency).
    part_d = c.new_empty((B, tiles(C), tiles(C), 2) if flags["DO_DISTINCT"] else (0,))
    if flags["DO_DISTINCT"]:
        launch_overlap(c, part_d, B, C, N, C * N, N, measure, eps, q=q, q_strides=(C, 1))
    part_c = c.new_empty((C, tiles(B), tiles(B), 2) if flags["DO_CONSIST"] else (0,))
    if flags["DO_CONSIST"]:
        launch_overlap(c, part_c, C, B, N, N, C * N, measure, eps, q=q, q_strides=(1, C), consist=True)
    res = c.new_empty(5)  # every entry written by _terms_kernel (0 for a term not computed)
    wrap_triton(_terms_kernel)[(1,)](x, y, m, q, var, part_d, part_d.numel() // 2, part_c, part_c.numel() // 2, res, B,
                                     C, *_scalars(eps, weights), **flags, BLOCK=BLOCK)  # fmt: skip
    return res


@triton_op("fastcam_triton::attention_terms", mutates_args=())
def attention_terms(logits: torch.Tensor, cams: torch.Tensor, labels: torch.Tensor | None,
                    label_mask: torch.Tensor | None, measure: str, eps: float, predicted: bool, grid_h: int,
                    grid_w: int, weights: list[float]) -> torch.Tensor:  # fmt: skip
    """[loss, bce, distinct, consist, coherence] in the maps' dtype (float32 or float64)."""
    return attention_terms_impl(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w, weights)


def attention_terms_backward_impl(grad_terms: torch.Tensor, logits: torch.Tensor, cams: torch.Tensor,
                                  labels: torch.Tensor | None, label_mask: torch.Tensor | None, measure: str,
                                  eps: float, predicted: bool, grid_h: int, grid_w: int, weights: list[float],
                                  kept: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dL/dlogits [B, C], dL/dcams [B, C, N]), contiguous, in the maps' dtype: the body of
    ``fastcam_triton::attention_terms_backward``; ``kept``: what the forward's ``keep`` got."""
    c, x, y, m, flags = _prepare(logits, cams, labels, label_mask, weights, kept)
    B, C, N = c.shape
    # The kernels below write every entry of what they produce; zeros only where nothing will.
    maps_terms = flags["DO_DISTINCT"] or flags["DO_CONSIST"] or flags["DO_COHERENCE"]
    grad_logits = torch.empty_like(x) if flags["DO_BCE"] and B * C > 0 else torch.zeros_like(x)
    grad_cams = torch.empty_like(c) if maps_terms and B * C > 0 else torch.zeros_like(c)
    if B * C == 0:
        return grad_logits, grad_cams
    gt = grad_terms.to(c.dtype).contiguous()
    q = kept["q"] if kept is not None else _class_weights(x, y, m, flags, predicted)
    groups = dict(distinct=(B, C, C * N, N, (C, 1)), consist=(C, B, N, C * N, (1, C)))  # G, P, s_g, s_p, q strides
    coefficients = {name: launch_coefficients(c, G, P, N, s_g, s_p, measure, eps, q=q, q_strides=q_strides)
                    if flags[f"DO_{name.upper()}"] else (None, None, c.new_empty(0))
                    for name, (G, P, s_g, s_p, q_strides) in groups.items()}  # fmt: skip
    part_d, part_c = coefficients["distinct"][2], coefficients["consist"][2]
    # distinct, consist, coherence (no views: compile-friendly); each written where its term is on
    scales = [c.new_empty(1) for _ in range(3)]
    wrap_triton(_terms_backward_kernel)[(1,)](x, y, m, q, gt, part_d, part_d.numel(), part_c, part_c.numel(),
                                              grad_logits, *scales, B, C, *_scalars(eps, weights), **flags,
                                              BLOCK=BLOCK)  # fmt: skip
    written = False  # grad_cams: the first term writes it, the next ones add to it
    for scale, (name, (G, P, s_g, s_p, _)) in zip(scales, groups.items()):  # distinctiveness, then consistency
        if flags[f"DO_{name.upper()}"]:
            launch_grad(c, grad_cams, coefficients[name], G, P, N, s_g, s_p, measure, scale=scale,
                        accumulate=written)  # fmt: skip
            written = True
    if flags["DO_COHERENCE"]:
        rows, block_n = _map_blocks(B * C, N)
        wrap_triton(_variance_grad_kernel)[(triton.cdiv(B * C, rows),)](c, q, scales[2], grad_cams, B * C, N, grid_h,
                                                                        grid_w, *split_float(eps),
                                                                        ACCUMULATE=written, ACC_F64=flags["ACC_F64"],
                                                                        ROWS=rows, BLOCK_N=block_n)  # fmt: skip
    return grad_logits, grad_cams


@triton_op("fastcam_triton::attention_terms_backward", mutates_args=())
def attention_terms_backward(grad_terms: torch.Tensor, logits: torch.Tensor, cams: torch.Tensor,
                             labels: torch.Tensor | None, label_mask: torch.Tensor | None, measure: str, eps: float,
                             predicted: bool, grid_h: int, grid_w: int,
                             weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dL/dlogits [B, C], dL/dcams [B, C, N]), contiguous, in the maps' dtype."""
    return attention_terms_backward_impl(grad_terms, logits, cams, labels, label_mask, measure, eps, predicted,
                                         grid_h, grid_w, weights)  # fmt: skip


def _setup_context(ctx, inputs, output):
    logits, cams, labels, label_mask, *options = inputs
    ctx.save_for_backward(logits, cams, labels, label_mask)
    ctx.options = options


def _backward(ctx, grad_terms):
    logits, cams, labels, label_mask = ctx.saved_tensors
    need_logits, need_cams = ctx.needs_input_grad[:2]
    grad_logits, grad_cams = attention_terms_backward(grad_terms, logits, cams, labels, label_mask, *ctx.options)
    return ((grad_logits.to(logits.dtype) if need_logits else None), (grad_cams if need_cams else None),
            None, None, None, None, None, None, None, None)  # fmt: skip


attention_terms.register_autograd(_backward, setup_context=_setup_context)
attention_terms_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
