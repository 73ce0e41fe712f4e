// Pairwise overlaps of groups of maps on CUDA, shared by pairwise_overlap (groups = images)
// and attention_terms (groups = images for distinctiveness, classes for consistency); the
// mirror of csrc/cpu/overlap.h. Map p of group g starts at cams + g * sG + p * sP and has N
// contiguous values.
//
// One thread per map (statistics, gradients) or per pair (overlaps), with the per-map and
// per-pair math of map_math.h, so that values and NaN behaviour are those of the CPU kernels.
// Each gradient thread owns one map's gradient: no atomics, a fixed summation order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/map_math.h"
#include "common.cuh"

namespace fastcam::cuda {

template <typename T>
__global__ void map_stats_kernel(const T* __restrict__ cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                                 MapStats<T>* __restrict__ stats) {
  for (int64_t i = global_index(); i < G * P; i += global_stride())
    stats[i] = map_stats(cams + (i / P) * sG + (i % P) * sP, N);
}

// out[g, p, q] = overlap(map p, map q), out contiguous [G, P, P]. A thread per (g, p, q);
// the measures are symmetric, so only q >= p computes and writes both entries, as on the CPU.
template <typename T>
__global__ void overlap_forward_kernel(const T* __restrict__ cams, int64_t G, int64_t P, int64_t N, int64_t sG,
                                       int64_t sP, Measure m, T eps, const MapStats<T>* __restrict__ stats,
                                       T* __restrict__ out) {
  for (int64_t i = global_index(); i < G * P * P; i += global_stride()) {
    const int64_t g = i / (P * P), p = (i / P) % P, q = i % P;
    if (q < p) continue;
    const T v = overlap_pair(cams + g * sG + p * sP, cams + g * sG + q * sP, N, m, eps, stats[g * P + p],
                             stats[g * P + q]);
    out[(g * P + p) * P + q] = v;
    out[(g * P + q) * P + p] = v;
  }
}

// A map whose sums are not finite (NaN or Inf inside): its pairs are never skipped for a
// zero weight, since 0 * NaN is NaN in the reference too (csrc/cpu/overlap.h's finite_map).
template <typename T>
__device__ __forceinline__ bool finite_map(const MapStats<T>& s) {
  return isfinite(s.sum) && isfinite(s.norm);
}

// grad[map p] += sum_q weight(g, p, q) * d overlap(map p, map q) / d map p, skipping a zero
// weight only when both maps are finite (as the CPU kernel does: a non-finite map's NaN must
// reach the gradient, as in the reference), and everything when weight.skip() (the CPU does
// not run the term at all). A thread per map.
template <typename T, typename Weight>
__global__ void overlap_backward_kernel(Weight weight, const T* __restrict__ cams, int64_t G, int64_t P, int64_t N,
                                        int64_t sG, int64_t sP, Measure m, T eps,
                                        const MapStats<T>* __restrict__ stats, T* __restrict__ grad) {
  if (weight.skip()) return;
  for (int64_t i = global_index(); i < G * P; i += global_stride()) {
    const int64_t g = i / P, p = i % P;
    const T* a = cams + g * sG + p * sP;
    T* ga = grad + g * sG + p * sP;
    for (int64_t q = 0; q < P; ++q) {
      const T w = weight(g, p, q);
      if (w == T(0) && finite_map(stats[i]) && finite_map(stats[g * P + q])) continue;
      overlap_pair_grad_a(a, cams + g * sG + q * sP, ga, N, m, eps, w, stats[i], stats[g * P + q]);
    }
  }
}

// The weight of pairwise_overlap_backward: gout[g, p, q] + gout[g, q, p].
template <typename T>
struct GradOutWeight {
  const T* gout;  // [G, P, P] contiguous
  int64_t P;
  __device__ __forceinline__ bool skip() const { return false; }
  __device__ __forceinline__ T operator()(int64_t g, int64_t p, int64_t q) const {
    return gout[(g * P + p) * P + q] + gout[(g * P + q) * P + p];
  }
};

// Statistics, then the overlaps. stats: G * P entries of scratch.
template <typename T>
cudaError_t launch_overlap_forward(const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP, Measure m,
                                   T eps, MapStats<T>* stats, T* out, cudaStream_t stream) {
  if (G * P == 0) return cudaSuccess;
  map_stats_kernel<T><<<grid_for(G * P, kMapThreads), kMapThreads, 0, stream>>>(cams, G, P, N, sG, sP, stats);
  FC_RETURN_IF_LAUNCH_ERROR();
  overlap_forward_kernel<T><<<grid_for(G * P * P, kMapThreads), kMapThreads, 0, stream>>>(cams, G, P, N, sG, sP, m,
                                                                                         eps, stats, out);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// Statistics, then grad += the weighted overlap gradients. stats: G * P entries of scratch.
template <typename T, typename Weight>
cudaError_t launch_overlap_backward(Weight weight, const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG,
                                    int64_t sP, Measure m, T eps, MapStats<T>* stats, T* grad, cudaStream_t stream) {
  if (G * P == 0) return cudaSuccess;
  map_stats_kernel<T><<<grid_for(G * P, kMapThreads), kMapThreads, 0, stream>>>(cams, G, P, N, sG, sP, stats);
  FC_RETURN_IF_LAUNCH_ERROR();
  overlap_backward_kernel<T, Weight><<<grid_for(G * P, kMapThreads), kMapThreads, 0, stream>>>(
      weight, cams, G, P, N, sG, sP, m, eps, stats, grad);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace fastcam::cuda
