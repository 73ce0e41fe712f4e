"""Triton kernels of the pairwise overlaps of SPEC §2.2, registered with ``torch.library.triton_op``.

``fastcam_triton::pairwise_overlap(cams, measure, eps)`` takes the maps ``[G, P, N]`` (fp32, or
fp64) and gives ``O [G, P, P]``, ``O[g, p, q] = overlap(cams[g, p], cams[g, q])``, for the five
measures; its backward, ``fastcam_triton::pairwise_overlap_backward(grad, cams, measure, eps)``,
gives ``dL/dcams``. The same kernels serve the loss terms (fastcam/triton/attention_terms.py),
whose groups are the images (class distinctiveness) or the classes (spatial consistency, a
strided view of the same ``[B, C, N]`` maps): map ``p`` of group ``g`` starts at
``g * s_g + p * s_p`` and has ``N`` contiguous values.

The math is csrc/common/map_math.h's and csrc/cpu/overlap.h's, on tiles of ``BLOCK_P x BLOCK_P``
pairs instead of one pair at a time:

* forward: a program per tile of pairs sums over the positions — ``tl.dot`` for the Gram-like
  measures (dot, cosine), a ``[BLOCK_P, BLOCK_P, BLOCK_N]`` broadcast for the min/max ones — and
  only the tiles on and above the diagonal are computed (the measures are symmetric) and written
  to both places; for the loss terms, each tile writes its pair-weighted sum instead;
* backward: with ``W[p, q] = grad[p, q] + grad[q, p]`` (the weight of the pair in a map's
  gradient), every measure's gradient of map ``p`` is
  ``sum_q A[p, q] * x(p, q, n) + sum_q B[p, q] * y(p, q, n)`` with per-pair coefficients ``A``,
  ``B`` (``x`` = the other map for dot and cosine, d min/da for the others; ``y`` = the map itself
  for cosine, d max/da for soft IoU, 1 for dice). A first kernel computes ``A`` and ``B`` from the
  pairs' sums, a second one the gradient: a program per (group, tile of maps, tile of positions)
  loops over the other maps in a fixed order — deterministic, no atomics. The loss terms make
  ``W`` from their pair weights, and scale the gradient by a device scalar.

NaN propagates as in the reference (``torch.minimum``/``maximum`` keep it); ties split the
gradient of min/max equally; the norm's gradient at 0 is 0, so an all-zero map overlaps nothing
and gets a finite gradient. Accumulation in the maps' dtype (fp32, fp64 for fp64).

Run on the CPU with ``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastcam.triton.common import no_double_backward, rejoin, split_float

MEASURES = {"cosine": 0, "dot": 1, "soft_iou": 2, "dice": 3, "intersection": 4}
BLOCK_P = 16  # tl.dot needs every block dimension >= 16
BLOCK_N_GEMM = 64  # positions per step of the dot and cosine tiles
BLOCK_N_MINMAX = 16  # positions per step of the [BLOCK_P, BLOCK_P, BLOCK_N] min/max tiles


@triton.jit
def _nan_min(a, b):
    return tl.where((a < b) | (a != a), a, b)  # NaN if either is NaN, as torch.minimum


@triton.jit
def _nan_max(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _load_maps(base, offs_p, offs_n, P, N, s_p):
    """Maps offs_p, positions offs_n: [len(offs_p), len(offs_n)], 0 outside."""
    return tl.load(base + offs_p[:, None] * s_p + offs_n[None, :],
                   mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)  # fmt: skip


@triton.jit
def _pair_sums(base, offs_p, offs_q, P, N, s_p, MEASURE: tl.constexpr, ACC_F64: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The sums over the positions that the overlap of maps offs_p with maps offs_q needs:
    ``(s1, s2, stat_p, stat_q)`` with s1 = sum a b (dot, cosine) or sum min(a, b) (the others),
    s2 = sum max(a, b) (soft IoU), stat = the maps' sums of squares (cosine) or sums (dice)."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    s1 = tl.zeros((BLOCK_P, BLOCK_P), dtype=acc_ty)
    s2 = tl.zeros((BLOCK_P, BLOCK_P), dtype=acc_ty)
    stat_p = tl.zeros((BLOCK_P,), dtype=acc_ty)
    stat_q = tl.zeros((BLOCK_P,), dtype=acc_ty)
    sum_p = tl.zeros((BLOCK_P, BLOCK_N), dtype=acc_ty)
    sum_q = tl.zeros((BLOCK_P, BLOCK_N), dtype=acc_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        a = _load_maps(base, offs_p, offs_n, P, N, s_p)
        b = _load_maps(base, offs_q, offs_n, P, N, s_p)
        if MEASURE <= 1:  # cosine, dot
            s1 += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=acc_ty)
            if MEASURE == 0:
                stat_p += tl.sum(a * a, axis=1)
                stat_q += tl.sum(b * b, axis=1)
        else:
            x = a[:, None, :]
            y = b[None, :, :]
            s1 += tl.sum(_nan_min(x, y), axis=2)
            if MEASURE == 2:
                s2 += tl.sum(_nan_max(x, y), axis=2)
            if MEASURE == 3:  # the maps' sums, reduced over the positions after the loop
                sum_p += a
                sum_q += b
    if MEASURE == 3:
        stat_p = tl.sum(sum_p, axis=1)
        stat_q = tl.sum(sum_q, axis=1)
    return s1, s2, stat_p, stat_q


@triton.jit
def _pair_weights(q_ptr, offs_p, offs_q, P, q_sp):
    """w[p, q] = q[p] q[q] off the diagonal, 0 on it and outside (the loss terms' pair weights)."""
    qp = tl.load(q_ptr + offs_p * q_sp, mask=offs_p < P, other=0.0)
    qq = tl.load(q_ptr + offs_q * q_sp, mask=offs_q < P, other=0.0)
    return tl.where(offs_p[:, None] != offs_q[None, :], qp[:, None] * qq[None, :], 0.0)


@triton.jit
def _overlap_kernel(cams_ptr, out_ptr, q_ptr, P, N, s_g, s_p, q_sg, q_sp, eps_hi, eps_lo, MEASURE: tl.constexpr,
                    WEIGHTED: tl.constexpr, CONSIST: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_N: tl.constexpr):  # fmt: skip
    """A tile of pairs on or above the diagonal: out[g, p, q] = O, written to both places; or,
    WEIGHTED (the loss terms), out[g, tile_p, tile_q] = (sum w, sum w O) over the tile's pairs
    (sum w (1 - O) for CONSIST), twice for a tile above the diagonal, which stands for its
    mirror too, and 0 below it. w: _pair_weights of q[g, p] at q_ptr + g * q_sg + p * q_sp;
    a pair of weight 0 still multiplies its overlap (0 * NaN is NaN, as in the reference)."""
    g = tl.program_id(0).to(tl.int64)
    tile_p = tl.program_id(1)
    tile_q = tl.program_id(2)
    part = out_ptr + ((g * tl.num_programs(1) + tile_p) * tl.num_programs(2) + tile_q) * 2
    if tile_q < tile_p:
        if WEIGHTED:
            tl.store(part, 0.0)
            tl.store(part + 1, 0.0)
        return
    eps = rejoin(eps_hi, eps_lo, ACC_F64)
    offs_p = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tile_q * BLOCK_P + tl.arange(0, BLOCK_P)
    s1, s2, stat_p, stat_q = _pair_sums(cams_ptr + g * s_g, offs_p, offs_q, P, N, s_p, MEASURE, ACC_F64, BLOCK_P,
                                        BLOCK_N)  # fmt: skip
    if MEASURE == 0:
        value = s1 / (tl.sqrt(stat_p)[:, None] * tl.sqrt(stat_q)[None, :] + eps)
    elif MEASURE == 2:
        value = s1 / (s2 + eps)
    elif MEASURE == 3:
        value = 2 * s1 / (stat_p[:, None] + stat_q[None, :] + eps)
    else:  # dot, intersection
        value = s1
    if WEIGHTED:
        w = _pair_weights(q_ptr + g * q_sg, offs_p, offs_q, P, q_sp)
        term = 1 - value if CONSIST else value
        twice = tl.where(tile_q != tile_p, 2.0, 1.0)
        tl.store(part, twice * tl.sum(tl.sum(w, axis=1), axis=0))
        tl.store(part + 1, twice * tl.sum(tl.sum(w * term, axis=1), axis=0))
    else:
        mask = (offs_p[:, None] < P) & (offs_q[None, :] < P)
        out = out_ptr + g * P * P
        tl.store(out + offs_p[:, None] * P + offs_q[None, :], value, mask=mask)
        tl.store(out + offs_q[None, :] * P + offs_p[:, None], value, mask=mask & (tile_q != tile_p))


@triton.jit
def _coefficients_kernel(cams_ptr, gout_ptr, q_ptr, part_ptr, a_ptr, b_ptr, P, N, s_g, s_p, q_sg, q_sp, eps_hi,
                         eps_lo, MEASURE: tl.constexpr, FROM_Q: tl.constexpr, ACC_F64: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The per-pair coefficients A, B [G, P, P] of the backward (see the module's docstring).

    The pair weights are ``W = gout[p, q] + gout[q, p]``, or with FROM_Q (the loss terms)
    ``W = 2 w`` with w the _pair_weights of q (q[g, p] at ``q_ptr + g * q_sg + p * q_sp``),
    the loss term's scale left to _grad_kernel; then part[g, tile_p, tile_q] = sum w over the
    tile, from which that scale is made.
    """
    g = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (offs_p[:, None] < P) & (offs_q[None, :] < P)
    if FROM_Q:
        w = _pair_weights(q_ptr + g * q_sg, offs_p, offs_q, P, q_sp)
        tl.store(part_ptr + (g * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2),
                 tl.sum(tl.sum(w, axis=1), axis=0))  # fmt: skip
        w = 2 * w
    else:
        gout = gout_ptr + g * P * P
        w = (tl.load(gout + offs_p[:, None] * P + offs_q[None, :], mask=mask, other=0.0)
             + tl.load(gout + offs_q[None, :] * P + offs_p[:, None], mask=mask, other=0.0))  # fmt: skip
    out = g * P * P + offs_p[:, None] * P + offs_q[None, :]
    if MEASURE == 1 or MEASURE == 4:  # dot, intersection: d/da is W b or W dmin/da
        tl.store(a_ptr + out, w, mask=mask)
    else:
        eps = rejoin(eps_hi, eps_lo, ACC_F64)
        s1, s2, stat_p, stat_q = _pair_sums(cams_ptr + g * s_g, offs_p, offs_q, P, N, s_p, MEASURE, ACC_F64, BLOCK_P,
                                            BLOCK_N)  # fmt: skip
        if MEASURE == 0:  # cosine: W b / den - W dot |b| / (den^2 |a|) a, the second 0 where |a| = 0
            norm_p = tl.sqrt(stat_p)[:, None]
            norm_q = tl.sqrt(stat_q)[None, :]
            den = norm_p * norm_q + eps
            coef_a = w / den
            coef_b = tl.where(norm_p > 0, w * s1 * norm_q / (den * den * tl.where(norm_p > 0, norm_p, 1.0)), 0.0)
        elif MEASURE == 2:  # soft IoU: W / den dmin/da - W inter / den^2 dmax/da
            den = s2 + eps
            coef_a = w / den
            coef_b = -w * s1 / (den * den)
        else:  # dice: 2 W / den dmin/da - 2 W inter / den^2 (at every position)
            den = stat_p[:, None] + stat_q[None, :] + eps
            coef_a = 2 * w / den
            coef_b = -2 * w * s1 / (den * den)
        tl.store(a_ptr + out, coef_a, mask=mask)
        tl.store(b_ptr + out, coef_b, mask=mask)


@triton.jit
def _grad_kernel(cams_ptr, a_ptr, b_ptr, scale_ptr, grad_ptr, P, N, s_g, s_p, MEASURE: tl.constexpr,
                 SCALED: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """grad[map p, tile of positions] (+)= sum over the maps q of the pair (p, q)'s terms, times
    the device scalar scale[0] when SCALED."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    g = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = cams_ptr + g * s_g
    mine = _load_maps(base, offs_p, offs_n, P, N, s_p)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=acc_ty)
    per_map = tl.zeros((BLOCK_P,), dtype=acc_ty)  # sum_q B[p, q] (cosine, dice)
    for q0 in range(0, P, BLOCK_P):
        offs_q = q0 + tl.arange(0, BLOCK_P)
        pair = g * P * P + offs_p[:, None] * P + offs_q[None, :]
        pmask = (offs_p[:, None] < P) & (offs_q[None, :] < P)
        coef_a = tl.load(a_ptr + pair, mask=pmask, other=0.0)
        other = _load_maps(base, offs_q, offs_n, P, N, s_p)
        if MEASURE <= 1:
            acc += tl.dot(coef_a, other, input_precision="ieee", out_dtype=acc_ty)
            if MEASURE == 0:
                per_map += tl.sum(tl.load(b_ptr + pair, mask=pmask, other=0.0), axis=1)
        else:
            x = mine[:, None, :]
            y = other[None, :, :]
            dmin = tl.where(x == y, 0.5, tl.where(x > y, 0.0, 1.0))  # as torch.minimum's backward
            acc += tl.sum(coef_a[:, :, None] * dmin, axis=1)
            if MEASURE == 2:
                dmax = tl.where(x == y, 0.5, tl.where(x < y, 0.0, 1.0))
                acc += tl.sum(tl.load(b_ptr + pair, mask=pmask, other=0.0)[:, :, None] * dmax, axis=1)
            if MEASURE == 3:
                per_map += tl.sum(tl.load(b_ptr + pair, mask=pmask, other=0.0), axis=1)
    if MEASURE == 0:
        acc -= per_map[:, None] * mine
    if MEASURE == 3:
        acc += per_map[:, None]
    if SCALED:
        acc *= tl.load(scale_ptr)
    mask = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    out = grad_ptr + g * s_g + offs_p[:, None] * s_p + offs_n[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=mask, other=0.0)
    tl.store(out, acc, mask=mask)


def _block_n(measure: str) -> int:
    return BLOCK_N_GEMM if MEASURES[measure] <= 1 else BLOCK_N_MINMAX


def _check_maps(cams: torch.Tensor, what: str) -> None:
    if cams.dim() != 3 or cams.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{what}: cams must be a float32 or float64 [G, P, N] tensor, got {cams.dtype} "
                         f"{list(cams.shape)}")  # fmt: skip
    if cams.stride(-1) != 1:
        raise ValueError(f"{what}: cams must have stride 1 along the positions, got strides {cams.stride()}")


def tiles(P: int) -> int:
    """Tiles of pairs along each side of a group of P maps."""
    return triton.cdiv(P, BLOCK_P)


def launch_overlap(cams, out, G, P, N, s_g, s_p, measure, eps, *, q=None, q_strides=(0, 0), consist=False) -> None:
    """The overlaps of the maps ``cams + g * s_g + p * s_p``: out [G, P, P] (contiguous) = O; or,
    given the pair weights' q, out [G, tiles(P), tiles(P), 2] = the tiles' (sum w, sum w O)
    (sum w (1 - O) with consist), see _overlap_kernel."""
    if G * P == 0:
        return
    t = tiles(P)
    wrap_triton(_overlap_kernel)[(G, t, t)](cams, out, cams if q is None else q, P, N, s_g, s_p, *q_strides,
                                            *split_float(eps), MEASURE=MEASURES[measure], WEIGHTED=q is not None,
                                            CONSIST=consist, ACC_F64=cams.dtype == torch.float64, BLOCK_P=BLOCK_P,
                                            BLOCK_N=_block_n(measure))  # fmt: skip


def launch_coefficients(cams, G, P, N, s_g, s_p, measure, eps, *, gout=None, q=None, q_strides=(0, 0)):
    """The backward's per-pair coefficients ``(A, B, partials)`` (_coefficients_kernel), W from
    gout [G, P, P] or from q (then partials [G, tiles(P), tiles(P)] hold the tiles' sums of w)."""
    m, t = MEASURES[measure], tiles(P)
    coef_a = cams.new_empty((G, P, P))
    coef_b = cams.new_empty((G, P, P) if m in (0, 2, 3) else (0,))
    part = cams.new_empty((G, t, t) if q is not None else (0,))
    if G * P > 0:
        wrap_triton(_coefficients_kernel)[(G, t, t)](
            cams, cams if gout is None else gout, cams if q is None else q, part, coef_a, coef_b, P, N, s_g, s_p,
            *q_strides, *split_float(eps), MEASURE=m, FROM_Q=q is not None, ACC_F64=cams.dtype == torch.float64,
            BLOCK_P=BLOCK_P, BLOCK_N=_block_n(measure))  # fmt: skip
    return coef_a, coef_b, part


def launch_grad(cams, grad, coefficients, G, P, N, s_g, s_p, measure, *, scale=None, accumulate=False) -> None:
    """grad (+)= [scale *] the gradient that the coefficients (launch_coefficients) make; grad
    has the strides of cams."""
    if G * P == 0:
        return
    coef_a, coef_b, _ = coefficients
    block_n = _block_n(measure)
    wrap_triton(_grad_kernel)[(G, tiles(P), triton.cdiv(N, block_n))](
        cams, coef_a, coef_b, cams if scale is None else scale, grad, P, N, s_g, s_p, MEASURE=MEASURES[measure],
        SCALED=scale is not None, ACCUMULATE=accumulate, ACC_F64=cams.dtype == torch.float64, BLOCK_P=BLOCK_P,
        BLOCK_N=block_n)  # fmt: skip


@triton_op("fastcam_triton::pairwise_overlap", mutates_args=())
def pairwise_overlap(cams: torch.Tensor, measure: str, eps: float) -> torch.Tensor:
    """O [G, P, P] from the maps [G, P, N] (float32 or float64), in their dtype."""
    _check_maps(cams, "fastcam_triton::pairwise_overlap")
    c = cams.contiguous()
    G, P, N = c.shape
    out = c.new_empty((G, P, P))
    launch_overlap(c, out, G, P, N, P * N, N, measure, eps)
    return out


@triton_op("fastcam_triton::pairwise_overlap_backward", mutates_args=())
def pairwise_overlap_backward(grad: torch.Tensor, cams: torch.Tensor, measure: str, eps: float) -> torch.Tensor:
    """dL/dcams [G, P, N] (contiguous) from dL/dO [G, P, P]."""
    _check_maps(cams, "fastcam_triton::pairwise_overlap_backward")
    c = cams.contiguous()
    G, P, N = c.shape
    out = torch.empty_like(c)
    coefficients = launch_coefficients(c, G, P, N, P * N, N, measure, eps, gout=grad.to(c.dtype).contiguous())
    launch_grad(c, out, coefficients, G, P, N, P * N, N, measure)
    return out


def _setup_context(ctx, inputs, output):
    cams, measure, eps = inputs
    ctx.save_for_backward(cams)
    ctx.options = (measure, eps)


def _backward(ctx, grad):
    (cams,) = ctx.saved_tensors
    return pairwise_overlap_backward(grad, cams, *ctx.options), None, None


pairwise_overlap.register_autograd(_backward, setup_context=_setup_context)


pairwise_overlap_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
