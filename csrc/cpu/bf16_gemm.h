// S = W F for bf16 features on the CPU's bf16 matrix units (AMX, or AVX-512 BF16), through
// ATen's brgemm (oneDNN's ukernel): no fp32 copy of the features, and the fp32 weight split in
// three bf16 parts so that nothing is lost against an fp32 GEMM.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastcam::cpu {

// Whether scores_bf16 runs here: torch's ATen has the bf16 brgemm (CPUBLAS_BRGEMM_BF16BF16F32),
// the CPU has the instructions it needs, and FASTCAM_CPU_BF16_GEMM is not "0".
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

}  // namespace fastcam::cpu
