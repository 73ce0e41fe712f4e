// The host launchers of the CUDA kernels (csrc/cuda/<op>.cu), called by the ATen bindings
// (csrc/cuda/<op>_binding.cpp). Light on purpose: the .cu files include this header and no
// torch/ATen/c10 header, so that they compile quickly. (The bindings are <op>_binding.cpp,
// not <op>.cpp: setuptools names objects by stem, and <op>.cu and <op>.cpp would collide.)
//
// Conventions of every launcher:
//   * raw pointers, sizes and element strides; the accumulation type acc is double for
//     float64 features and float otherwise, and every pointer documented as "acc" points to
//     that type;
//   * work runs on `stream`, nothing waits for the device, and no launch has zero blocks;
//   * the result is the first launch error (cudaGetLastError after each launch) or
//     cudaSuccess; the binding turns it into an exception (C10_CUDA_CHECK);
//   * scratch memory comes from the caller: `*_workspace_bytes` says how much, and the
//     launcher is given a device buffer of at least that size (256-byte aligned);
//   * nothing reduces with atomics: every sum has a fixed order, so results are
//     deterministic (torch.use_deterministic_algorithms needs no second path).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/map_math.h"

namespace fastcam::cuda {

// The element type of the features (and of grad_features).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// A [B, K, N] view of the features (or of grad_features) with element strides.
struct FeatureView {
  int64_t B, K, N;
  int64_t sB, sK, sN;
  DType dtype;
};

// ---------------------------------------------------------------------------- cam_head

// scores S = W F [B, C, N], logits = mean_n S + bias [B, C], cams = normalize(S) [B, C, N];
// weight [C, K] and bias [C] (or null) are acc, contiguous; the outputs acc, contiguous.
// scores_given: S is in `scores` already (the binding's cuBLAS path), only the maps are made.
cudaError_t cam_head_forward(const FeatureView& fv, const void* features, const void* weight, const void* bias,
                             int64_t C, Normalize mode, double temperature, double eps, void* logits, void* scores,
                             void* cams, bool scores_given, cudaStream_t stream);

// The cuBLAS path's operands (float32 in, bf16 out, all contiguous): out [batches, 3 rows,
// cols] holds, in its three row blocks j, part pattern[j] of x [batches, rows, cols] split in
// `parts` (2 or 3) bf16 values that sum to it; and S [B, C, N] = the sum of the three row blocks
// of S3 [B, 3 C, N], the last (smallest) first.
cudaError_t split_stack_bf16(const float* x, int64_t batches, int64_t rows, int64_t cols, int parts,
                             const int pattern[3], void* out, cudaStream_t stream);
cudaError_t sum_score_parts(const float* s3, int64_t B, int64_t C, int64_t N, float* s, cudaStream_t stream);

// How many partial sums over (b, n) the deterministic dW reduction uses; the caller gives
// cam_head_backward a buffer of cam_head_dw_partials(...) acc values when it is > 1
// (with 1 split the result is written to grad_weight directly).
int64_t cam_head_dw_splits(int64_t B, int64_t N, int64_t C, int64_t K);
inline int64_t cam_head_dw_partials(int64_t B, int64_t N, int64_t C, int64_t K) {
  const int64_t s = cam_head_dw_splits(B, N, C, K);
  return s > 1 ? s * C * K : 0;
}

// G = dL/dS through the normalization + dL/dlogits / N into grad_scores [B, C, N] (acc,
// scratch owned by the caller), then dF = W^T G into grad_features (features' dtype, any
// strides given by dfv; null when not asked for) and dW = sum_b G F^T into grad_weight [C, K]
// (acc, null when not asked for; must hold zeros when B = 0). grad_logits [B, C] and
// grad_cams [B, C, N] (acc, contiguous) may be null. scores and cams: acc, contiguous.
cudaError_t cam_head_backward(const FeatureView& fv, const void* features, const void* weight, int64_t C,
                              const void* grad_logits, const void* grad_cams, const void* scores, const void* cams,
                              Normalize mode, double temperature, double eps, void* grad_scores,
                              const FeatureView& dfv, void* grad_features, void* grad_weight, void* dw_partials,
                              cudaStream_t stream);

// -------------------------------------------------------------------- pairwise_overlap

// cams [G, P, N] contiguous, float32 (dbl false) or float64 (dbl true).
size_t pairwise_overlap_workspace_bytes(int64_t G, int64_t P, bool dbl, bool backward);
// out [G, P, P] = overlap of every pair of maps within a group.
cudaError_t pairwise_overlap_forward(const void* cams, bool dbl, int64_t G, int64_t P, int64_t N, Measure m,
                                     double eps, void* out, void* workspace, cudaStream_t stream);
// grad_cams [G, P, N] (zero-filled by the caller) += d sum(grad * O) / d cams; grad [G, P, P].
cudaError_t pairwise_overlap_backward(const void* grad, const void* cams, bool dbl, int64_t G, int64_t P, int64_t N,
                                      Measure m, double eps, void* grad_cams, void* workspace, cudaStream_t stream);

// --------------------------------------------------------------------- attention_terms

struct TermsArgs {
  const void* logits;  // [B, C] acc, contiguous
  const void* cams;    // [B, C, N] acc, contiguous
  const void* labels;  // [B, C] acc, contiguous, or null (nothing known)
  const bool* mask;    // [B, C] bool, contiguous, or null (all known); ignored without labels
  bool dbl;            // acc is double
  int64_t B, C, N;
  Measure measure;
  double eps;
  bool predicted;
  int64_t grid_h, grid_w;
  double w_bce, w_distinct, w_consist, w_coherence;  // a term of weight 0 is not computed
};

// Scratch of the forward (backward false) or of the backward (backward true).
size_t attention_terms_workspace_bytes(const TermsArgs& a, bool backward);
// terms [5] (zero-filled by the caller) = [loss, bce, distinct, consist, coherence].
cudaError_t attention_terms_forward(const TermsArgs& a, void* terms, void* workspace, cudaStream_t stream);
// grad_terms [5] (acc, on the device) -> grad_logits [B, C] and grad_cams [B, C, N] (acc,
// zero-filled by the caller).
cudaError_t attention_terms_backward(const TermsArgs& a, const void* grad_terms, void* grad_logits, void* grad_cams,
                                     void* workspace, cudaStream_t stream);

}  // namespace fastcam::cuda
