// S = W F for bf16 features on the CPU's bf16 matrix units: AMX tiles by this library's own
// kernel (amx.h) where the CPU and OS allow, else ATen's brgemm (oneDNN's ukernel, AMX or
// AVX-512 BF16). No fp32 copy of the features, and the fp32 weight split in three bf16 parts so
// that nothing is lost against an fp32 GEMM.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastcam::cpu {

// Whether scores_bf16 runs here: the AMX kernels can (amx::available()), or torch's ATen has the
// bf16 brgemm (CPUBLAS_BRGEMM_BF16BF16F32) and the CPU the instructions it needs; and
// FASTCAM_CPU_BF16_GEMM is not "0".
bool bf16_gemm_available();

// scores[b] = W features[b] for the images b with todo[b] set, features bf16 [B, K, N] with
// stride 1 along N (NCHW) or along K (channels-last, tokens), W fp32 [C, K] contiguous, scores
// fp32 [B, C, N] contiguous. W = hi + mid + lo with each part bf16 (the residual below 2^-24
// relative), each part's product accumulated in fp32 by the matrix unit and the three added
// in fp32: as accurate as an fp32 GEMM of the same operands.
// Returns, per image, whether it was done here: not when its layout does not fit (an odd K with
// channels last), nor with many classes or channels last with few positions (no faster there
// than the fp32 path, see the .cpp), nor when one of its scores is not finite (an infinite weight or feature: the
// parts' products could then add up to NaN where the fp32 product is infinite); the caller
// computes those in fp32.
std::vector<char> scores_bf16(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores);

// What the head backward does on the AMX tiles (amx.h), for bf16 features NCHW or
// channels-last/tokens with K a multiple of 16, where the CPU has them and W, g0 and the
// weighted rows of Gm are finite (else nothing: the caller's fp32 paths):
//   dense[b]: dF and (channels-last) dW of image b, whose every map is weighted (an unlabeled
//     image) and which has more than `dense_above` maps, dF[b] = W^T Gm[b] + v[b] 1^T;
//   weights (NCHW): dW of every image, dW += sum_b Gm[b] F[b]^T + g0[b] Fsum[b]^T, Fsum[b] from
//     the tiles too (a column of ones), so that the caller reads F for none of this.
struct TilesBackward {
  std::vector<char> dense;
  bool weights = false;
  bool any() const;
};
TilesBackward tiles_backward_plan(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                                  const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0,
                                  const at::Tensor& df, const at::Tensor& dw, int64_t dense_above);

// Does what `plan` says. features [B, K, N] bf16; w [C, K], gm [B, C, N] (written in the rows
// rows[b], the nonzero ones), g0 [B, C] (or undefined) and v [B, K] (or undefined) fp32
// contiguous; df [B, K, N] bf16 (or undefined), dw [C, K] fp32 (or undefined), added to.
// Blocks of dW whose sums are not finite (from non-finite features) are recomputed in fp32.
void head_backward_tiles(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                         const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0, const at::Tensor& v,
                         at::Tensor& df, at::Tensor& dw, const TilesBackward& plan);

}  // namespace fastcam::cpu
