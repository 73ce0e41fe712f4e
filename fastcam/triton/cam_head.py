"""Triton kernels of the head's GEMMs, registered with ``torch.library.triton_op``.

``fastcam_triton::scores(features, weight)`` computes the raw class score maps
``S[b, c, n] = sum_k W[c, k] F[b, k, n]`` (fp32, fp64 for fp64) in one pass over the features; its
backward, ``fastcam_triton::scores_backward``, computes ``dF = W^T G`` (written once, in
the features' dtype and strides) and ``dW = sum_b G[b] F[b]^T`` from ``G = dL/dS``. Autograd
adds the logits' and the maps' gradients into G before this backward runs, so dF is written
once. ``features`` is a ``[B, K, N]`` view of any strides (NCHW: ``flatten(2)``; channels-last
and tokens: stride 1 along K).

bf16 features run on the tensor cores with fp32 accuracy: the fp32 operand (W, or G) is split
into bf16 parts whose sum is its value — three parts (2^-24) for S and dW, two (2^-16) for
dF, whose output is bf16 — every product of bf16 values is exact in fp32 and the dots
accumulate in fp32 (the CUDA backend's head_mma.cuh does the same). Other dtypes take
``input_precision="ieee"`` dots in the accumulation dtype.

dW is summed by splits of the batch (a program per class tile x channel tile x split, each
over its images and positions in order), then the splits in order: deterministic, no atomics.
On a GPU the block shapes that do not change an order of summation (S: positions; dF: channels
and positions; dW: channels) and the warps / pipeline stages are autotuned per shape from a
few configurations (``FASTCAM_TRITON_AUTOTUNE=0``: the first one); the summed dimensions'
blocks are fixed, so results do not depend on the configuration chosen.

Run on the CPU with ``TRITON_INTERPRET=1`` (set before this module is imported): one
configuration, and the bf16 dots on fp32 upcasts of their (bf16) operands — the interpreter's
bf16 ``tl.dot`` returns garbage (Triton 3.8) — which gives the same products.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from fastcam.triton.common import no_double_backward

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = not _INTERPRET and os.environ.get("FASTCAM_TRITON_AUTOTUNE", "1") != "0"
# Autotuning key. K_FAST (the features' layout) and MODE are constexprs of all three kernels so
# that the key separates them; the dF and dW kernels do not branch on K_FAST.
_KEY = ["C", "K", "N", "K_FAST", "MODE"]


# The configuration lists below: per kernel, the three that were fastest or within ~5% of the
# fastest at the six SPEC section 5 shapes out of six tried on an H200 (2026-11-26,
# benchmarks/triton_tune.py, benchmarks/NOTES.md); the first is the one used untuned.


def _configs(space: list[tuple[dict, int, int]]) -> list[triton.Config]:
    """triton.Config per (block sizes, warps, stages); the first alone without autotuning."""
    configs = [triton.Config(blocks, num_warps=warps, num_stages=stages) for blocks, warps, stages in space]
    return configs if _AUTOTUNE else configs[:1]


def _tuned(space: list[tuple[dict, int, int]]):
    """The kernel autotuned over ``space`` on a GPU; under the interpreter (where Triton's
    autotuner finds no driver) the plain kernel, its first configuration passed by the caller."""

    def wrap(kernel):
        if _INTERPRET:
            kernel.fastcam_default = space[0][0]
            return kernel
        tuned = triton.autotune(configs=_configs(space), key=_KEY)(kernel)
        tuned.fastcam_default = {}
        return tuned

    return wrap


@triton.jit
def _round_bf16(x):
    """fp32 -> bf16, round to nearest even, NaN kept: what the GPU does by default, spelled
    out because the Triton interpreter truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where(x != x, (bits >> 16) | 0x0040, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rest(x, part):
    """x - part in fp32; 0 for a non-finite x (which stays whole in the first part, so that inf
    does not become inf - inf = NaN)."""
    return tl.where(tl.abs(x) < float("inf"), x - part.to(tl.float32), 0.0)


@triton.jit
def _split2(x):
    hi = x.to(tl.bfloat16)
    return hi, _rest(x, hi).to(tl.bfloat16)


@triton.jit
def _split3(x):
    hi = x.to(tl.bfloat16)
    r = _rest(x, hi)
    mid = r.to(tl.bfloat16)
    return hi, mid, (r - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a b for bf16 a, b in fp32 (exact products; fp32 upcasts under the interpreter)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dot3(a, b, acc, UPCAST: tl.constexpr):
    """acc + a b with a fp32 split in three bf16 parts (the small ones first), b bf16."""
    hi, mid, lo = _split3(a)
    acc = _dot(lo, b, acc, UPCAST)
    acc = _dot(mid, b, acc, UPCAST)
    return _dot(hi, b, acc, UPCAST)


@triton.jit
def _dot3_right(b, a, acc, UPCAST: tl.constexpr):
    """acc + b a, _dot3 with the split operand on the right."""
    hi, mid, lo = _split3(a)
    acc = _dot(b, lo, acc, UPCAST)
    acc = _dot(b, mid, acc, UPCAST)
    return _dot(b, hi, acc, UPCAST)


@_tuned([({"BLOCK_N": 64}, 4, 4), ({"BLOCK_N": 128}, 4, 3), ({"BLOCK_N": 256}, 8, 3)])
@triton.jit
def _scores_kernel(f_ptr, w_ptr, s_ptr, K, N, C, s_fb, s_fk, s_fn, K_FAST: tl.constexpr, MODE: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr):  # fmt: skip
    """MODE 0: ieee dots in fp32, 1: in fp64, 2: bf16 features with W in three parts. K_FAST
    (channels-last, tokens): S^T = F^T W^T, F's tile [positions, channels] as it lies (as
    [channels, positions] it ran at a seventh of the NCHW kernel's bandwidth on an H200)."""
    acc_ty = tl.float64 if MODE == 1 else tl.float32
    b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    f_base = f_ptr + b.to(tl.int64) * s_fb
    out = s_ptr + b.to(tl.int64) * C * N
    if K_FAST:
        acc_t = tl.zeros((BLOCK_N, BLOCK_C), dtype=acc_ty)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            wt = tl.load(w_ptr + offs_c[None, :] * K + offs_k[:, None],
                         mask=(offs_c[None, :] < C) & (offs_k[:, None] < K), other=0.0)  # fmt: skip
            ft = tl.load(f_base + offs_n[:, None] * s_fn + offs_k[None, :] * s_fk,
                         mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
            if MODE == 2:
                acc_t = _dot3_right(ft, wt, acc_t, UPCAST)
            else:
                acc_t += tl.dot(ft.to(acc_ty), wt, input_precision="ieee", out_dtype=acc_ty)
        tl.store(out + offs_c[None, :] * N + offs_n[:, None], acc_t, mask=(offs_c[None, :] < C) & (offs_n[:, None] < N))
    else:
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=acc_ty)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + offs_c[:, None] * K + offs_k[None, :],
                        mask=(offs_c[:, None] < C) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
            f = tl.load(f_base + offs_k[:, None] * s_fk + offs_n[None, :] * s_fn,
                        mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
            if MODE == 2:
                acc = _dot3(w, f, acc, UPCAST)
            else:
                acc += tl.dot(w, f.to(acc_ty), input_precision="ieee", out_dtype=acc_ty)
        tl.store(out + offs_c[:, None] * N + offs_n[None, :], acc, mask=(offs_c[:, None] < C) & (offs_n[None, :] < N))


@_tuned([({"BLOCK_K": 128, "BLOCK_N": 64}, 4, 2), ({"BLOCK_K": 256, "BLOCK_N": 64}, 8, 2),
         ({"BLOCK_K": 64, "BLOCK_N": 128}, 4, 2)])  # fmt: skip
@triton.jit
def _grad_features_kernel(g_ptr, w_ptr, df_ptr, K, N, C, s_db, s_dk, s_dn, K_FAST: tl.constexpr, MODE: tl.constexpr,
                          OUT_BF16: tl.constexpr, UPCAST: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """MODE 0: ieee dots in fp32, 1: in fp64, 2: W and G in two bf16 parts each (bf16 dF)."""
    acc_ty = tl.float64 if MODE == 1 else tl.float32
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
        if MODE == 2:
            w_hi, w_lo = _split2(wt)
            g_hi, g_lo = _split2(g)
            acc = _dot(w_lo, g_hi, acc, UPCAST)
            acc = _dot(w_hi, g_lo, acc, UPCAST)
            acc = _dot(w_hi, g_hi, acc, UPCAST)
        else:
            acc += tl.dot(wt, g, input_precision="ieee", out_dtype=acc_ty)
    out = df_ptr + b.to(tl.int64) * s_db + offs_k[:, None] * s_dk + offs_n[None, :] * s_dn
    value = _round_bf16(acc.to(tl.float32)) if OUT_BF16 else acc.to(df_ptr.dtype.element_ty)
    tl.store(out, value, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))


@_tuned([({"BLOCK_K": 64}, 4, 3), ({"BLOCK_K": 64}, 4, 4), ({"BLOCK_K": 128}, 8, 4)])
@triton.jit
def _grad_weight_kernel(g_ptr, f_ptr, dw_ptr, B, K, N, C, s_fb, s_fk, s_fn, images_per_split,
                        K_FAST: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """dw[split, c, k] = sum over this split's images b and positions n of G[b, c, n] F[b, k, n].
    MODE 0: ieee dots in fp32, 1: in fp64, 2: bf16 features with G in three parts."""
    acc_ty = tl.float64 if MODE == 1 else tl.float32
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    b_begin = split.to(tl.int64) * images_per_split  # int64 image offsets below
    b_end = tl.minimum(b_begin + images_per_split, B)
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=acc_ty)
    for b in range(b_begin, b_end):
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            g = tl.load(g_ptr + b * C * N + offs_c[:, None] * N + offs_n[None, :],
                        mask=(offs_c[:, None] < C) & (offs_n[None, :] < N), other=0.0)  # fmt: skip
            ft = tl.load(f_ptr + b * s_fb + offs_n[:, None] * s_fn + offs_k[None, :] * s_fk,
                         mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)  # fmt: skip
            if MODE == 2:
                acc = _dot3(g, ft, acc, UPCAST)
            else:
                acc += tl.dot(g, ft.to(acc_ty), input_precision="ieee", out_dtype=acc_ty)
    out = dw_ptr + split.to(tl.int64) * C * K + offs_c[:, None] * K + offs_k[None, :]
    tl.store(out, acc, mask=(offs_c[:, None] < C) & (offs_k[None, :] < K))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mode(features: torch.Tensor) -> int:
    if features.dtype == torch.float64:
        return 1
    return 2 if features.dtype == torch.bfloat16 else 0


def _block_c(C: int, cap: int) -> int:
    """Classes per program: all of them up to ``cap`` (a power of two, >= 16 for tl.dot)."""
    return min(max(16, triton.next_power_of_2(C)), cap)


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device twice (the CPU: a few, so that the interpreter tests split)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _meta(kernel, **fixed) -> dict:
    """The launch's constexprs: the fixed ones, and the interpreter's default blocks."""
    return {**fixed, **getattr(kernel, "fastcam_default", {})}


def scores_impl(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S [B, C, N] (fp32; fp64 for fp64) from features [B, K, N] (any strides) and weight [C, K]:
    the body of ``fastcam_triton::scores`` (fastcam/triton/attention_loss.py calls it directly)."""
    B, K, N = features.shape
    C, acc = weight.shape[0], _acc(features.dtype)
    w = weight.to(acc).contiguous()
    out = features.new_empty((B, C, N), dtype=acc)
    if B > 0:
        mode = _mode(features)
        meta = _meta(_scores_kernel, BLOCK_C=_block_c(C, 128), BLOCK_K=32 if mode == 1 else 64)
        c_tiles = triton.cdiv(C, meta["BLOCK_C"])

        def grid(m):
            return (B, triton.cdiv(N, m["BLOCK_N"]), c_tiles)

        wrap_triton(_scores_kernel)[grid](features, w, out, K, N, C, *features.stride(),
                                          K_FAST=features.stride(1) == 1, MODE=mode, UPCAST=_INTERPRET,
                                          **meta)  # fmt: skip
    return out


@triton_op("fastcam_triton::scores", mutates_args=())
def scores(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """S [B, C, N] (fp32; fp64 for fp64) from features [B, K, N] (any strides) and weight [C, K]."""
    return scores_impl(features, weight)


def scores_backward_impl(grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, need_features: bool,
                         need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dF in the features' dtype and strides, dW [C, K] in the accumulation dtype); empty where
    not needed: the body of ``fastcam_triton::scores_backward``."""
    B, K, N = features.shape
    C, acc = weight.shape[0], _acc(features.dtype)
    mode = _mode(features)
    g = grad.to(acc).contiguous()  # autograd may hand over an expanded gradient
    w = weight.to(acc).contiguous()
    df = torch.empty_like(features) if need_features else features.new_empty(0)
    dw = features.new_empty(0, dtype=acc)  # [C, K] below when asked for
    k_fast = features.stride(1) == 1
    if need_features and B > 0:
        meta = _meta(_grad_features_kernel, BLOCK_C=_block_c(C, 32 if mode == 1 else 64))

        def grid_df(m):
            return (B, triton.cdiv(K, m["BLOCK_K"]), triton.cdiv(N, m["BLOCK_N"]))

        wrap_triton(_grad_features_kernel)[grid_df](g, w, df, K, N, C, *df.stride(), K_FAST=k_fast, MODE=mode,
                                                    OUT_BF16=df.dtype == torch.bfloat16, UPCAST=_INTERPRET,
                                                    **meta)  # fmt: skip
    if need_weight:
        if B > 0:
            meta = _meta(_grad_weight_kernel, BLOCK_C=_block_c(C, 32 if mode == 1 else 64),
                         BLOCK_N=32 if N <= 32 or mode == 1 else 64)  # fmt: skip
            c_tiles = triton.cdiv(C, meta["BLOCK_C"])
            # Splits of the batch so that the programs fill the device (64 channels a program
            # counted; the tuned block may differ, the splits do not: they fix the order of sums).
            per_split = triton.cdiv(B, max(1, min(B, _programs_wanted(features.device)
                                                  // (c_tiles * triton.cdiv(K, 64)))))  # fmt: skip
            splits = triton.cdiv(B, per_split)
            partial = features.new_empty((C, K) if splits == 1 else (splits, C, K), dtype=acc)

            def grid_dw(m):
                return (c_tiles, triton.cdiv(K, m["BLOCK_K"]), splits)

            wrap_triton(_grad_weight_kernel)[grid_dw](g, features, partial, B, K, N, C, *features.stride(), per_split,
                                                      K_FAST=k_fast, MODE=mode, UPCAST=_INTERPRET,
                                                      **meta)  # fmt: skip
            dw = partial if splits == 1 else partial.sum(0)
        else:
            dw = features.new_zeros((C, K), dtype=acc)
    return df, dw


@triton_op("fastcam_triton::scores_backward", mutates_args=())
def scores_backward(grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, need_features: bool,
                    need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dF in the features' dtype and strides, dW [C, K] in the accumulation dtype); empty where
    not needed."""
    return scores_backward_impl(grad, features, weight, need_features, need_weight)


def _setup_context(ctx, inputs, output):
    features, weight = inputs
    ctx.save_for_backward(features, weight)


def _backward(ctx, grad):
    features, weight = ctx.saved_tensors
    need_f, need_w = ctx.needs_input_grad
    df, dw = scores_backward(grad, features, weight, need_f, need_w)
    return (df if need_f else None), (dw.to(weight.dtype) if need_w else None)


scores.register_autograd(_backward, setup_context=_setup_context)
scores_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
