"""Triton kernels of the head's GEMMs, registered with ``torch.library.triton_op``.

``fastcam_triton::scores(features, weight)`` computes the raw class score maps
``S[b, c, n] = sum_k W[c, k] F[b, k, n]`` (fp32, fp64 for fp64) in one pass over the features; its
backward, ``fastcam_triton::scores_backward``, computes ``dF = W^T G`` (written once, in
the features' dtype and strides) and ``dW = sum_b G[b] F[b]^T`` (each program owns a tile
of dW and sums over images and positions in a fixed order: deterministic, no atomics)
from ``G = dL/dS``. Autograd adds the logits' and the maps' gradients into G before this
backward runs, so dF is written once. ``features`` is a ``[B, K, N]`` view of any strides
(NCHW: ``flatten(2)``; channels-last and tokens: stride 1 along K).

Run on the CPU with ``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK_C, BLOCK_K, BLOCK_N = 16, 32, 32  # tl.dot needs every block dimension >= 16


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even, NaN kept: what the GPU does by default, spelled
    out because the Triton interpreter truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where(x != x, (bits >> 16) | 0x0040, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _scores_kernel(f_ptr, w_ptr, s_ptr, K, N, C, s_fb, s_fk, s_fn, ACC_F64: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=acc_ty)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_c[:, None] * K + offs_k[None, :],
                    mask=(offs_c[:, None] < C) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
        f = tl.load(f_ptr + b.to(tl.int64) * s_fb + offs_k[:, None] * s_fk + offs_n[None, :] * s_fn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
        acc += tl.dot(w, f.to(acc_ty), input_precision="ieee", out_dtype=acc_ty)
    out = s_ptr + b.to(tl.int64) * C * N + offs_c[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_c[:, None] < C) & (offs_n[None, :] < N))


@triton.jit
def _grad_features_kernel(g_ptr, w_ptr, df_ptr, K, N, C, s_db, s_dk, s_dn, ACC_F64: tl.constexpr,
                          OUT_BF16: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_N: tl.constexpr):  # fmt: skip
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        wt = tl.load(w_ptr + offs_c[None, :] * K + offs_k[:, None],
                     mask=(offs_c[None, :] < C) & (offs_k[:, None] < K), other=0.0)  # fmt: skip
        g = tl.load(g_ptr + b.to(tl.int64) * C * N + offs_c[:, None] * N + offs_n[None, :],
                    mask=(offs_c[:, None] < C) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
        acc += tl.dot(wt, g, input_precision="ieee", out_dtype=acc_ty)
    out = df_ptr + b.to(tl.int64) * s_db + offs_k[:, None] * s_dk + offs_n[None, :] * s_dn
    value = _round_bf16(acc.to(tl.float32)) if OUT_BF16 else acc.to(df_ptr.dtype.element_ty)
    tl.store(out, value, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


@triton.jit
def _grad_weight_kernel(g_ptr, f_ptr, dw_ptr, B, K, N, C, s_fb, s_fk, s_fn, ACC_F64: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=acc_ty)
    for b in range(0, B):
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
                        mask=(offs_c[:, None] < C) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
            ft = tl.load(f_ptr + b * s_fb + offs_n[:, None] * s_fn + offs_k[None, :] * s_fk,
                         mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
            acc += tl.dot(g, ft.to(acc_ty), input_precision="ieee", out_dtype=acc_ty)
    tl.store(dw_ptr + offs_c[:, None] * K + offs_k[None, :], acc, mask=(offs_c[:, None] < C) & (offs_k[None, :] < K))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton_op("fastcam_triton::scores", mutates_args=())
def scores(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S [B, C, N] (fp32; fp64 for fp64) from features [B, K, N] (any strides) and weight [C, K]."""
    B, K, N = features.shape
    C, acc = weight.shape[0], _acc(features.dtype)
    w = weight.to(acc).contiguous()
    out = features.new_empty((B, C, N), dtype=acc)
    if B > 0:
        grid = (B, triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_C))
        wrap_triton(_scores_kernel)[grid](features, w, out, K, N, C, *features.stride(), ACC_F64=acc == torch.float64,
                                          BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)  # fmt: skip
    return out


@triton_op("fastcam_triton::scores_backward", mutates_args=())
def scores_backward(grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, need_features: bool,
                    need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dF in the features' dtype and strides, dW [C, K] in the accumulation dtype); empty where
    not needed."""
    B, K, N = features.shape
    C, acc = weight.shape[0], _acc(features.dtype)
    f64 = acc == torch.float64
    g = grad.to(acc).contiguous()  # autograd may hand over an expanded gradient
    w = weight.to(acc).contiguous()
    df = torch.empty_like(features) if need_features else features.new_empty(0)
    dw = features.new_empty((C, K) if need_weight else (0,), dtype=acc)
    if need_features and B > 0:
        grid = (B, triton.cdiv(K, BLOCK_K), triton.cdiv(N, BLOCK_N))
        wrap_triton(_grad_features_kernel)[grid](g, w, df, K, N, C, *df.stride(), ACC_F64=f64,
                                                 OUT_BF16=df.dtype == torch.bfloat16,
                                                 BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)  # fmt: skip
    if need_weight:
        if B > 0:
            grid = (triton.cdiv(C, BLOCK_C), triton.cdiv(K, BLOCK_K))
            wrap_triton(_grad_weight_kernel)[grid](g, features, dw, B, K, N, C, *features.stride(), ACC_F64=f64,
                                                   BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N)  # fmt: skip
        else:
            dw.zero_()
    return df, dw


def _setup_context(ctx, inputs, output):
    features, weight = inputs
    ctx.save_for_backward(features, weight)


def _backward(ctx, grad):
    features, weight = ctx.saved_tensors
    need_f, need_w = ctx.needs_input_grad
    df, dw = scores_backward(grad, features, weight, need_f, need_w)
    return (df if need_f else None), (dw.to(weight.dtype) if need_w else None)


scores.register_autograd(_backward, setup_context=_setup_context)
