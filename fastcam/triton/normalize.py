"""Triton kernels of the per-map part of the head, registered with ``torch.library.triton_op``.

``fastcam_triton::head_maps(scores, bias, normalize, temperature, eps)`` turns the raw score
maps ``S [B, C, N]`` (fp32, fp64 for fp64) into the logits (mean over the positions + bias)
and the normalized maps of SPEC §2.1, one program per map; its backward,
``fastcam_triton::head_maps_backward``, gives ``dL/dS`` from the maps' and the logits'
gradients in one pass (the ``G`` of SPEC §2.4 that ``fastcam_triton::scores_backward`` then
multiplies). The math is csrc/common/map_math.h's: NaN propagates as in PyTorch (relu and max
keep it), the max's gradient is shared among tied maxima, the norm's gradient at 0 is 0.

One program holds a whole map (``N`` up to a few thousand positions).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastcam.triton.common import no_double_backward, rejoin, split_float

MODES = {"none": 0, "max": 1, "sum": 2, "l2": 3, "softmax": 4}


@triton.jit
def _nan_max(x, valid):
    """max over the valid lanes, NaN if one of them is NaN (tl.max need not propagate it)."""
    mx = tl.max(tl.where(valid, x, float("-inf")), axis=0)
    nans = tl.sum((valid & (x != x)).to(tl.int32), axis=0)
    return tl.where(nans > 0, float("nan"), mx)


@triton.jit
def _head_maps_kernel(s_ptr, bias_ptr, cams_ptr, logits_ptr, C, N, temp_hi, temp_lo, eps_hi, eps_lo,
                      HAS_BIAS: tl.constexpr, MODE: tl.constexpr, ACC_F64: tl.constexpr,
                      BLOCK_N: tl.constexpr):  # fmt: skip
    """temperature and eps come as split_float's halves (a kernel's float argument is a float32)."""
    temperature = rejoin(temp_hi, temp_lo, ACC_F64)
    eps = rejoin(eps_hi, eps_lo, ACC_F64)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    s = tl.load(s_ptr + row * N + offs, mask=valid, other=0.0)
    logit = tl.sum(s, axis=0) / N
    if HAS_BIAS:
        logit += tl.load(bias_ptr + row % C)
    tl.store(logits_ptr + row, logit)
    if MODE == 4:  # softmax
        x = tl.where(valid, s / temperature, float("-inf"))
        e = tl.where(valid, tl.exp(x - _nan_max(x, valid)), 0.0)
        cam = e / tl.sum(e, axis=0)
    else:
        r = tl.where(s <= 0, 0.0, s)  # NaN <= 0 is false: NaN stays
        if MODE == 0:
            cam = r
        else:
            if MODE == 1:
                den = _nan_max(r, valid) + eps
            elif MODE == 2:
                den = tl.sum(r, axis=0) + eps
            else:
                den = tl.sqrt(tl.sum(r * r, axis=0)) + eps
            cam = r / den
    tl.store(cams_ptr + row * N + offs, cam, mask=valid)


@triton.jit
def _head_maps_backward_kernel(gl_ptr, gc_ptr, s_ptr, cams_ptr, gs_ptr, N, temp_hi, temp_lo, eps_hi, eps_lo,
                               HAS_GL: tl.constexpr, HAS_GC: tl.constexpr, MODE: tl.constexpr,
                               ACC_F64: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    temperature = rejoin(temp_hi, temp_lo, ACC_F64)
    eps = rejoin(eps_hi, eps_lo, ACC_F64)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    valid = offs < N
    s = tl.load(s_ptr + row * N + offs, mask=valid, other=0.0)
    gs = tl.zeros_like(s)
    if HAS_GC:
        gc = tl.load(gc_ptr + row * N + offs, mask=valid, other=0.0)
        cam = tl.load(cams_ptr + row * N + offs, mask=valid, other=0.0)
        dot = tl.sum(gc * cam, axis=0)
        if MODE == 4:
            gs = cam * (gc - dot) / temperature
        else:
            r = tl.where(s <= 0, 0.0, s)
            if MODE == 0:
                g = gc
            elif MODE == 1:
                mx = _nan_max(r, valid)
                ties = tl.sum((valid & (r == mx)).to(s.dtype), axis=0)
                den = mx + eps
                through_max = tl.where(ties > 0, dot / den / tl.maximum(ties, 1.0), 0.0)
                g = gc / den - tl.where(r == mx, through_max, 0.0)
            elif MODE == 2:
                g = (gc - dot) / (tl.sum(r, axis=0) + eps)
            else:
                norm = tl.sqrt(tl.sum(r * r, axis=0))
                along = tl.where(norm > 0, dot / tl.where(norm > 0, norm, 1.0), 0.0)
                g = gc / (norm + eps) - along * cam
            gs = tl.where(s <= 0, 0.0, g)  # relu's gradient; NaN passes
    if HAS_GL:
        gs += tl.load(gl_ptr + row) / N
    tl.store(gs_ptr + row * N + offs, gs, mask=valid)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def head_maps_impl(scores: torch.Tensor, bias: torch.Tensor | None, normalize: str, temperature: float,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logits [B, C], cams [B, C, N]) from the score maps S [B, C, N] (fp32 or fp64): the body
    of ``fastcam_triton::head_maps`` (fastcam/triton/attention_loss.py calls it directly)."""
    B, C, N = scores.shape
    s = scores.contiguous()
    logits = s.new_empty((B, C))
    cams = torch.empty_like(s)
    b = bias.to(s.dtype).contiguous() if bias is not None else s.new_empty(0)
    if B * C > 0:
        wrap_triton(_head_maps_kernel)[(B * C,)](s, b, cams, logits, C, N, *split_float(temperature),
                                                 *split_float(eps), HAS_BIAS=bias is not None,
                                                 MODE=MODES[normalize], ACC_F64=s.dtype == torch.float64,
                                                 BLOCK_N=_block(N))  # fmt: skip
    return logits, cams


@triton_op("fastcam_triton::head_maps", mutates_args=())
def head_maps(scores: torch.Tensor, bias: torch.Tensor | None, normalize: str, temperature: float,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(logits [B, C], cams [B, C, N]) from the score maps S [B, C, N] (fp32 or fp64)."""
    return head_maps_impl(scores, bias, normalize, temperature, eps)


def head_maps_backward_impl(grad_logits: torch.Tensor | None, grad_cams: torch.Tensor | None, scores: torch.Tensor,
                            cams: torch.Tensor, normalize: str, temperature: float, eps: float) -> torch.Tensor:
    """dL/dS [B, C, N] = the maps' gradient through the normalization + dL/dlogits / N: the body
    of ``fastcam_triton::head_maps_backward``."""
    B, C, N = scores.shape
    s = scores.contiguous()
    gs = torch.empty_like(s)
    gl = grad_logits.to(s.dtype).contiguous() if grad_logits is not None else s.new_empty(0)
    gc = grad_cams.to(s.dtype).contiguous() if grad_cams is not None else s.new_empty(0)
    if B * C > 0:
        wrap_triton(_head_maps_backward_kernel)[(B * C,)](gl, gc, s, cams.contiguous(), gs, N,
                                                          *split_float(temperature), *split_float(eps),
                                                          HAS_GL=grad_logits is not None,
                                                          HAS_GC=grad_cams is not None, MODE=MODES[normalize],
                                                          ACC_F64=s.dtype == torch.float64,
                                                          BLOCK_N=_block(N))  # fmt: skip
    return gs


@triton_op("fastcam_triton::head_maps_backward", mutates_args=())
def head_maps_backward(grad_logits: torch.Tensor | None, grad_cams: torch.Tensor | None, scores: torch.Tensor,
                       cams: torch.Tensor, normalize: str, temperature: float, eps: float) -> torch.Tensor:
    """dL/dS [B, C, N] = the maps' gradient through the normalization + dL/dlogits / N."""
    return head_maps_backward_impl(grad_logits, grad_cams, scores, cams, normalize, temperature, eps)


def _setup_context(ctx, inputs, output):
    scores, bias, normalize, temperature, eps = inputs
    _, cams = output
    ctx.save_for_backward(scores, cams)
    ctx.options = (normalize, temperature, eps)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_logits, grad_cams):
    scores, cams = ctx.saved_tensors
    need_scores, need_bias = ctx.needs_input_grad[:2]
    grad_scores = grad_bias = None
    if need_scores and (grad_logits is not None or grad_cams is not None):
        grad_scores = head_maps_backward(grad_logits, grad_cams, scores, cams, *ctx.options)
    if need_bias and grad_logits is not None:
        grad_bias = grad_logits.sum(0).to(ctx.bias_dtype)
    return grad_scores, grad_bias, None, None, None


head_maps.register_autograd(_backward, setup_context=_setup_context)


head_maps_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
