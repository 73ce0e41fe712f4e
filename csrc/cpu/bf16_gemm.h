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

// The head backward's GEMMs for the images `images` whose every map is weighted (the unlabeled
// ones), on the AMX tiles (amx.h), for bf16 features NCHW or channels-last/tokens with K a
// multiple of 16: dW += sum_b G[b] F[b]^T (fp32 [C, K], if defined), and dF[b] = W^T G[b] + v[b] 1^T
// written in bf16 (if df is defined; v [B, K] may be undefined). gm [B, C, N], w [C, K] and v
// fp32 contiguous. Returns false, with nothing written, where it cannot run (no tiles, another
// layout or type) or W or a G is not finite: the caller then computes them on its fp32 path.
// (A block of dW whose sums are not finite, from infinite features, is recomputed here in fp32.)
bool grad_images_bf16(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                      const std::vector<int64_t>& images, const at::Tensor& v, at::Tensor& df, at::Tensor& dw);

}  // namespace fastcam::cpu
