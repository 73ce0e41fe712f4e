// Pairwise overlaps of groups of maps on CUDA, shared by pairwise_overlap (groups = images)
// and attention_terms (groups = images for distinctiveness, classes for consistency); the
// mirror of csrc/cpu/overlap.h. Map p of group g starts at cams + g * sG + p * sP and has N
// contiguous values.
//
// A warp per map (statistics) or per pair (overlaps, the backward's coefficients), its lanes on
// consecutive positions, with the per-map and per-pair math of map_math.h, so that values and
// NaN behaviour are those of the CPU kernels; the backward's gradients a thread per map
// position. No atomics, a fixed summation order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/map_math.h"
#include "common.cuh"

namespace fastcam::cuda {

constexpr int kStatsWarps = 4;  // maps per block of map_stats_kernel

// stats[map] = (L2 norm, sum) of each map: a warp per map, lanes on consecutive positions.
template <typename T>
__global__ void __launch_bounds__(kStatsWarps * 32)
    map_stats_kernel(const T* __restrict__ cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                     MapStats<T>* __restrict__ stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kStatsWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= G * P) return;  // the whole warp
  const T* a = cams + (i / P) * sG + (i % P) * sP;
  T sq = 0, sum = 0;
  for (int64_t n = lane; n < N; n += 32) {
    sq += a[n] * a[n];
    sum += a[n];
  }
  sq = warp_sum(sq);
  sum = warp_sum(sum);
  if (lane == 0) stats[i] = {sqrt(sq), sum};
}

template <typename T>
cudaError_t launch_map_stats(const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                             MapStats<T>* stats, cudaStream_t stream) {
  map_stats_kernel<T><<<static_cast<unsigned>(ceil_div(G * P, kStatsWarps)), kStatsWarps * 32, 0, stream>>>(
      cams, G, P, N, sG, sP, stats);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// The sums over the positions that the overlap of maps a and b needs, a warp per pair (lanes
// on consecutive positions, warp_sum: every lane gets them): s1 = sum a b (dot, cosine) or
// sum min(a, b) (the others), s2 = sum max(a, b) (soft IoU only).
template <typename T>
__device__ __forceinline__ void warp_pair_sums(const T* a, const T* b, int64_t N, Measure m, int lane, T& s1, T& s2) {
  s1 = 0;
  s2 = 0;
  if (m == Measure::Dot || m == Measure::Cosine) {
    for (int64_t n = lane; n < N; n += 32) s1 += a[n] * b[n];
  } else if (m == Measure::SoftIoU) {
    for (int64_t n = lane; n < N; n += 32) {
      s1 += nan_min(a[n], b[n]);
      s2 += nan_max(a[n], b[n]);
    }
    s2 = warp_sum(s2);
  } else {
    for (int64_t n = lane; n < N; n += 32) s1 += nan_min(a[n], b[n]);
  }
  s1 = warp_sum(s1);
}

// The overlap from the pair's sums and the maps' statistics (map_math.h's overlap_pair).
template <typename T>
__device__ __forceinline__ T overlap_from_sums(Measure m, T s1, T s2, T eps, MapStats<T> sa, MapStats<T> sb) {
  switch (m) {
    case Measure::Dot:
    case Measure::Intersection:
      return s1;
    case Measure::Cosine:
      return s1 / (sa.norm * sb.norm + eps);
    case Measure::SoftIoU:
      return s1 / (s2 + eps);
    case Measure::Dice:
      return T(2) * s1 / (sa.sum + sb.sum + eps);
  }
  return s1;
}

constexpr int kPairWarps = 4;  // pairs per block of the warp-per-pair kernels

// out[g, p, q] = overlap(map p, map q), out contiguous [G, P, P]. A warp per (g, p, q); the
// measures are symmetric, so only q >= p computes and writes both entries, as on the CPU.
template <typename T>
__global__ void __launch_bounds__(kPairWarps * 32)
    overlap_forward_kernel(const T* __restrict__ cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                           Measure m, T eps, const MapStats<T>* __restrict__ stats, T* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= G * P * P) return;  // the whole warp
  const int64_t g = i / (P * P), p = (i / P) % P, q = i % P;
  if (q < p) return;
  T s1, s2;
  warp_pair_sums(cams + g * sG + p * sP, cams + g * sG + q * sP, N, m, lane, s1, s2);
  if (lane == 0) {
    const T v = overlap_from_sums(m, s1, s2, eps, stats[g * P + p], stats[g * P + q]);
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

// The backward, position-parallel, in two kernels. d overlap(a, b) / da at position i is
//   dot: w b_i; cosine: (w / den) b_i - c a_i; intersection: w dmin(a_i, b_i);
//   soft IoU: (w / den) dmin + (-w inter / den^2) dmax; dice: (2 w / den) dmin - 2 w inter / den^2
// (map_math.h's overlap_pair_grad_a), so per pair (g, p, q) two coefficients (ca, cb) carry
// everything that sums over the positions: overlap_coef_kernel, a thread per pair. Then
// overlap_grad_kernel, a thread per (map p, position i), sums the pairs' terms over q in
// order, reading map q at position i: consecutive threads, consecutive positions. (A thread per
// map walking its positions and every other map, uncoalesced, took 60% of a resnet50@1024
// step on an H200.) A pair of zero weight has coefficients 0 when both maps are finite, as
// the CPU kernel skips it; a non-finite map's NaN reaches the gradient, as in the reference.
template <typename T>
struct PairCoef {
  T a, b;
};

template <typename T, typename Weight>
__global__ void __launch_bounds__(kPairWarps * 32)
    overlap_coef_kernel(Weight weight, const T* __restrict__ cams, int64_t G, int64_t P, int64_t N, int64_t sG,
                        int64_t sP, Measure m, T eps, const MapStats<T>* __restrict__ stats,
                        PairCoef<T>* __restrict__ coef) {
  if (weight.skip()) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= G * P * P) return;  // the whole warp
  const int64_t g = i / (P * P), p = (i / P) % P, q = i % P;
  const T w = weight(g, p, q);
  const MapStats<T> sa = stats[g * P + p], sb = stats[g * P + q];
  PairCoef<T> c{T(0), T(0)};
  if (!(w == T(0) && finite_map(sa) && finite_map(sb))) {
    if (m == Measure::Dot || m == Measure::Intersection) {
      c.a = w;
    } else {
      T s1, s2;
      warp_pair_sums(cams + g * sG + p * sP, cams + g * sG + q * sP, N, m, lane, s1, s2);
      if (m == Measure::Cosine) {
        const T den = sa.norm * sb.norm + eps;
        c.a = w / den;
        c.b = sa.norm > T(0) ? w * s1 * sb.norm / (den * den * sa.norm) : T(0);
      } else if (m == Measure::SoftIoU) {
        const T den = s2 + eps;
        c.a = w / den;
        c.b = -w * s1 / (den * den);
      } else {  // Dice
        const T den = sa.sum + sb.sum + eps;
        c.a = T(2) * w / den;
        c.b = -T(2) * w * s1 / (den * den);
      }
    }
  }
  if (lane == 0) coef[i] = c;
}

// grad[g, p, n] += sum_q the pair (p, q)'s term at position n. Blocks of kMapThreads positions of
// one map: blockIdx.x = map * n_tiles + tile.
template <typename T, Measure M, typename Weight>
__global__ void __launch_bounds__(kMapThreads)
    overlap_grad_kernel(Weight weight, const T* __restrict__ cams, int64_t P, int64_t N, int64_t sG, int64_t sP,
                        const PairCoef<T>* __restrict__ coef, int64_t n_tiles, T* __restrict__ grad) {
  if (weight.skip()) return;
  const int64_t map = blockIdx.x / n_tiles;
  const int64_t n = (blockIdx.x % n_tiles) * kMapThreads + threadIdx.x;
  if (n >= N) return;
  const int64_t g = map / P, p = map % P;
  const T* base = cams + g * sG + n;
  const T a = base[p * sP];
  const PairCoef<T>* cp = coef + map * P;
  T acc = 0, along = 0;
  for (int64_t q = 0; q < P; ++q) {
    const PairCoef<T> c = cp[q];
    const T b = base[q * sP];
    if (M == Measure::Dot) {
      acc += c.a * b;
    } else if (M == Measure::Cosine) {
      acc += c.a * b;
      along += c.b;
    } else if (M == Measure::Intersection) {
      acc += c.a * dmin_da(a, b);
    } else if (M == Measure::SoftIoU) {
      acc += c.a * dmin_da(a, b) + c.b * dmax_da(a, b);
    } else {  // Dice: the second coefficient is the same at every position
      acc += c.a * dmin_da(a, b);
      along += c.b;
    }
  }
  if (M == Measure::Cosine) acc -= along * a;
  if (M == Measure::Dice) acc += along;
  grad[g * sG + p * sP + n] += acc;
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
  if (const cudaError_t err = launch_map_stats<T>(cams, G, P, N, sG, sP, stats, stream); err != cudaSuccess) return err;
  overlap_forward_kernel<T><<<static_cast<unsigned>(ceil_div(G * P * P, kPairWarps)), kPairWarps * 32, 0, stream>>>(
      cams, G, P, N, sG, sP, m, eps, stats, out);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// Statistics, then grad += the weighted overlap gradients. stats: G * P entries of scratch,
// coef: G * P * P.
template <typename T, typename Weight>
cudaError_t launch_overlap_backward(Weight weight, const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG,
                                    int64_t sP, Measure m, T eps, MapStats<T>* stats, PairCoef<T>* coef, T* grad,
                                    cudaStream_t stream) {
  if (G * P == 0 || N == 0) return cudaSuccess;
  if (const cudaError_t err = launch_map_stats<T>(cams, G, P, N, sG, sP, stats, stream); err != cudaSuccess) return err;
  overlap_coef_kernel<T, Weight><<<static_cast<unsigned>(ceil_div(G * P * P, kPairWarps)), kPairWarps * 32, 0,
                                   stream>>>(weight, cams, G, P, N, sG, sP, m, eps, stats, coef);
  FC_RETURN_IF_LAUNCH_ERROR();
  const int64_t n_tiles = ceil_div(N, kMapThreads);
  const int64_t blocks = G * P * n_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (m) {
    case Measure::Cosine:
      overlap_grad_kernel<T, Measure::Cosine, Weight>
          <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
      break;
    case Measure::Dot:
      overlap_grad_kernel<T, Measure::Dot, Weight>
          <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
      break;
    case Measure::SoftIoU:
      overlap_grad_kernel<T, Measure::SoftIoU, Weight>
          <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
      break;
    case Measure::Dice:
      overlap_grad_kernel<T, Measure::Dice, Weight>
          <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
      break;
    case Measure::Intersection:
      overlap_grad_kernel<T, Measure::Intersection, Weight>
          <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
      break;
  }
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace fastcam::cuda
