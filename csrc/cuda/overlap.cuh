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
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// The coefficients of the pair (a, b) for a's gradient, from the pair's sums (s1, s2; unused by
// dot and intersection) and the maps' statistics; zero for a zero weight between finite maps.
template <typename T>
__device__ __forceinline__ PairCoef<T> pair_coef(Measure m, T w, T s1, T s2, T eps, MapStats<T> sa, MapStats<T> sb) {
  PairCoef<T> c{T(0), T(0)};
  if (w == T(0) && finite_map(sa) && finite_map(sb)) return c;
  if (m == Measure::Dot || m == Measure::Intersection) {
    c.a = w;
  } else if (m == Measure::Cosine) {
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
  return c;
}

__host__ __device__ constexpr bool coef_needs_sums(Measure m) {
  return m != Measure::Dot && m != Measure::Intersection;
}

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
  T s1 = 0, s2 = 0;
  if (coef_needs_sums(m) && !(w == T(0) && finite_map(sa) && finite_map(sb)))
    warp_pair_sums(cams + g * sG + p * sP, cams + g * sG + q * sP, N, m, lane, s1, s2);
  const PairCoef<T> c = pair_coef(m, w, s1, s2, eps, sa, sb);
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

// ------------------------------------------------------------------------ tiled kernels
//
// The warp-per-pair kernels above read both maps of every pair from L2: G P^2 N values twice,
// 2 GB at 174 classes × 64 images × 256 positions, most of a 174-class step on an H200
// (overlaps 0.44 ms, coefficients 0.64, gradients 0.35). The tiled kernels below read a tile of
// kTile maps once for kTile other maps, as a GEMM does; they serve groups of 32 maps and more
// (FASTCAM_CUDA_OVERLAP: "tiles" or "warps" forces either). Same per-pair math, every sum in a
// fixed order (each thread adds its pair's chunks of kTileN positions in order; the gradients
// add the pairs in q order, as the warp kernels do), no atomics.

constexpr int kTile = 64;          // maps on each side of a pair tile
constexpr int kTileN = 16;         // positions per chunk
constexpr int kTileThreads = 256;  // 16 x 16 threads, each 4 x 4 pairs

// The tile pair (tp, tq), tp <= tq, of index t in the upper triangle of nt x nt tiles, row by row.
__device__ __forceinline__ void tile_pair(int64_t t, int64_t nt, int64_t& tp, int64_t& tq) {
  tp = 0;
  while (t >= nt - tp) {
    t -= nt - tp;
    ++tp;
  }
  tq = tp + t;
}

// The forward's weight: none.
template <typename T>
struct NoWeight {
  __device__ __forceinline__ bool skip() const { return false; }
  __device__ __forceinline__ T operator()(int64_t, int64_t, int64_t) const { return T(0); }
};

// Forward: out[g, p, q] = out[g, q, p] = overlap(p, q). Backward: coef[g, p, q] and coef[g, q, p],
// the pair's coefficients for either map's gradient (weight(g, p, q) and weight(g, q, p)). A block
// per tile pair (tp <= tq) of one group: blockIdx.x = g * tiles_tri + t.
template <typename T, Measure M, bool kBackward, typename Weight>
__global__ void __launch_bounds__(kTileThreads)
    overlap_tile_kernel(Weight weight, const T* __restrict__ cams, int64_t P, int64_t N, int64_t sG, int64_t sP,
                        T eps, const MapStats<T>* __restrict__ stats, int64_t nt, int64_t tiles_tri,
                        T* __restrict__ out, PairCoef<T>* __restrict__ coef) {
  if (weight.skip()) return;
  constexpr bool kSums = !kBackward || coef_needs_sums(M);
  constexpr bool kMax = M == Measure::SoftIoU;
  __shared__ T as[kTileN][kTile + 1];
  __shared__ T bs[kTileN][kTile + 1];
  const int64_t g = blockIdx.x / tiles_tri;
  int64_t tp, tq;
  tile_pair(blockIdx.x % tiles_tri, nt, tp, tq);
  const int64_t p0 = tp * kTile, q0 = tq * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const T* base = cams + g * sG;
  T s1[4][4], s2[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s1[i][j] = s2[i][j] = T(0);
  if constexpr (kSums) {
    const int nl = threadIdx.x % kTileN, ml = threadIdx.x / kTileN;  // 16 maps per pass
    for (int64_t n0 = 0; n0 < N; n0 += kTileN) {
      const int64_t n = n0 + nl;
#pragma unroll
      for (int k = 0; k < kTile / 16; ++k) {
        const int m = ml + 16 * k;
        as[nl][m] = (p0 + m < P && n < N) ? base[(p0 + m) * sP + n] : T(0);
        bs[nl][m] = (q0 + m < P && n < N) ? base[(q0 + m) * sP + n] : T(0);
      }
      __syncthreads();
      T c1[4][4], c2[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c1[i][j] = c2[i][j] = T(0);
#pragma unroll 4
      for (int nn = 0; nn < kTileN; ++nn) {
        T a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = as[nn][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = bs[nn][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (M == Measure::Dot || M == Measure::Cosine) {
              c1[i][j] += a[i] * b[j];
            } else {
              c1[i][j] += nan_min(a[i], b[j]);
              if (kMax) c2[i][j] += nan_max(a[i], b[j]);
            }
          }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s1[i][j] += c1[i][j];
          if (kMax) s2[i][j] += c2[i][j];
        }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t p = p0 + ty + 16 * i;
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t q = q0 + tx + 16 * j;
      if (q >= P || (tp == tq && q < p)) continue;
      const MapStats<T> sp = stats[g * P + p], sq = stats[g * P + q];
      if constexpr (kBackward) {
        coef[(g * P + p) * P + q] = pair_coef(M, weight(g, p, q), s1[i][j], s2[i][j], eps, sp, sq);
        if (q != p) coef[(g * P + q) * P + p] = pair_coef(M, weight(g, q, p), s1[i][j], s2[i][j], eps, sq, sp);
      } else {
        const T v = overlap_from_sums(M, s1[i][j], s2[i][j], eps, sp, sq);
        out[(g * P + p) * P + q] = v;
        out[(g * P + q) * P + p] = v;
      }
    }
  }
}

constexpr int kGradMaps = 32;   // maps p of a gradient tile
constexpr int kGradPos = 128;   // positions of a gradient tile
constexpr int kGradQ = 16;      // maps q per chunk
constexpr int kGradThreads = 256;  // 8 warps x 32 lanes, each thread 4 maps x 4 positions

// overlap_grad_kernel by tiles of kGradMaps maps x kGradPos positions: the maps q at the tile's
// positions and the tile's coefficients go through shared memory kGradQ maps at a time.
// blockIdx.x = (g * p_tiles + pt) * n_tiles + nt.
template <typename T, Measure M, typename Weight>
__global__ void __launch_bounds__(kGradThreads)
    overlap_grad_tile_kernel(Weight weight, const T* __restrict__ cams, int64_t P, int64_t N, int64_t sG, int64_t sP,
                             const PairCoef<T>* __restrict__ coef, int64_t p_tiles, int64_t n_tiles,
                             T* __restrict__ grad) {
  if (weight.skip()) return;
  __shared__ T bs[kGradQ][kGradPos];
  __shared__ PairCoef<T> cs[kGradMaps][kGradQ + 1];
  int64_t idx = blockIdx.x;
  const int64_t nt = idx % n_tiles;
  idx /= n_tiles;
  const int64_t pt = idx % p_tiles, g = idx / p_tiles;
  const int64_t p0 = pt * kGradMaps, n0 = nt * kGradPos;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const T* base = cams + g * sG;
  T a[4][4], acc[4][4], along[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t p = p0 + ty + 8 * i;
    along[i] = T(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 32 * j;
      a[i][j] = (p < P && n < N) ? base[p * sP + n] : T(0);
      acc[i][j] = T(0);
    }
  }
  for (int64_t q0 = 0; q0 < P; q0 += kGradQ) {
#pragma unroll
    for (int k = 0; k < kGradQ * kGradPos / kGradThreads; ++k) {
      const int r = threadIdx.x + kGradThreads * k;
      const int ql = r / kGradPos, nl = r % kGradPos;
      bs[ql][nl] = (q0 + ql < P && n0 + nl < N) ? base[(q0 + ql) * sP + n0 + nl] : T(0);
    }
#pragma unroll
    for (int k = 0; k < kGradMaps * kGradQ / kGradThreads; ++k) {
      const int r = threadIdx.x + kGradThreads * k;
      const int pl = r / kGradQ, ql = r % kGradQ;
      cs[pl][ql] = (p0 + pl < P && q0 + ql < P) ? coef[(g * P + p0 + pl) * P + q0 + ql] : PairCoef<T>{T(0), T(0)};
    }
    __syncthreads();
    const int qn = static_cast<int>(P - q0 < kGradQ ? P - q0 : kGradQ);
    for (int ql = 0; ql < qn; ++ql) {
      T b[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = bs[ql][tx + 32 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const PairCoef<T> c = cs[ty + 8 * i][ql];
        if (M == Measure::Cosine || M == Measure::Dice) along[i] += c.b;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (M == Measure::Dot || M == Measure::Cosine) {
            acc[i][j] += c.a * b[j];
          } else if (M == Measure::SoftIoU) {
            acc[i][j] += c.a * dmin_da(a[i][j], b[j]) + c.b * dmax_da(a[i][j], b[j]);
          } else {  // Intersection, Dice
            acc[i][j] += c.a * dmin_da(a[i][j], b[j]);
          }
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t p = p0 + ty + 8 * i;
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 32 * j;
      if (n >= N) continue;
      T r = acc[i][j];
      if (M == Measure::Cosine) r -= along[i] * a[i][j];
      if (M == Measure::Dice) r += along[i];
      grad[g * sG + p * sP + n] += r;
    }
  }
}

// FASTCAM_CUDA_OVERLAP (read once): unset or "auto", the tiled kernels for groups of 32 maps
// and more; "tiles" or "warps" forces either (the tests run both).
inline bool overlap_tiles(int64_t P) {
  static const int mode = [] {
    const char* v = std::getenv("FASTCAM_CUDA_OVERLAP");
    if (v != nullptr && std::strcmp(v, "tiles") == 0) return 1;
    if (v != nullptr && std::strcmp(v, "warps") == 0) return 2;
    return 0;
  }();
  return mode == 1 || (mode == 0 && P >= 32);
}

template <typename T, Measure M, bool kBackward, typename Weight>
cudaError_t launch_overlap_tiles(Weight weight, const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                                 T eps, const MapStats<T>* stats, T* out, PairCoef<T>* coef, cudaStream_t stream) {
  const int64_t nt = ceil_div(P, kTile), tri = nt * (nt + 1) / 2;
  if (G * tri > 0x7fffffff) return cudaErrorInvalidConfiguration;
  overlap_tile_kernel<T, M, kBackward, Weight><<<static_cast<unsigned>(G * tri), kTileThreads, 0, stream>>>(
      weight, cams, P, N, sG, sP, eps, stats, nt, tri, out, coef);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

template <typename T, Measure M, typename Weight>
cudaError_t launch_overlap_grad_tiles(Weight weight, const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG,
                                      int64_t sP, const PairCoef<T>* coef, T* grad, cudaStream_t stream) {
  const int64_t p_tiles = ceil_div(P, kGradMaps), n_tiles = ceil_div(N, kGradPos);
  if (G * p_tiles * n_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  overlap_grad_tile_kernel<T, M, Weight><<<static_cast<unsigned>(G * p_tiles * n_tiles), kGradThreads, 0, stream>>>(
      weight, cams, P, N, sG, sP, coef, p_tiles, n_tiles, grad);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

// f(std::integral_constant<Measure, m>{}): the measure as a compile-time constant.
template <typename F>
cudaError_t dispatch_measure(Measure m, F&& f) {
  switch (m) {
    case Measure::Cosine:
      return f(std::integral_constant<Measure, Measure::Cosine>{});
    case Measure::Dot:
      return f(std::integral_constant<Measure, Measure::Dot>{});
    case Measure::SoftIoU:
      return f(std::integral_constant<Measure, Measure::SoftIoU>{});
    case Measure::Dice:
      return f(std::integral_constant<Measure, Measure::Dice>{});
    case Measure::Intersection:
      return f(std::integral_constant<Measure, Measure::Intersection>{});
  }
  return cudaErrorInvalidValue;
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
  if (overlap_tiles(P)) {
    return dispatch_measure(m, [&](auto mc) {
      return launch_overlap_tiles<T, decltype(mc)::value, false>(NoWeight<T>{}, cams, G, P, N, sG, sP, eps, stats, out,
                                                                 nullptr, stream);
    });
  }
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
  if (overlap_tiles(P)) {
    return dispatch_measure(m, [&](auto mc) -> cudaError_t {
      constexpr Measure M = decltype(mc)::value;
      const cudaError_t err =
          launch_overlap_tiles<T, M, true>(weight, cams, G, P, N, sG, sP, eps, stats, nullptr, coef, stream);
      if (err != cudaSuccess) return err;
      return launch_overlap_grad_tiles<T, M>(weight, cams, G, P, N, sG, sP, coef, grad, stream);
    });
  }
  overlap_coef_kernel<T, Weight><<<static_cast<unsigned>(ceil_div(G * P * P, kPairWarps)), kPairWarps * 32, 0,
                                   stream>>>(weight, cams, G, P, N, sG, sP, m, eps, stats, coef);
  FC_RETURN_IF_LAUNCH_ERROR();
  const int64_t n_tiles = ceil_div(N, kMapThreads);
  const int64_t blocks = G * P * n_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  return dispatch_measure(m, [&](auto mc) -> cudaError_t {
    overlap_grad_kernel<T, decltype(mc)::value, Weight>
        <<<grid, kMapThreads, 0, stream>>>(weight, cams, P, N, sG, sP, coef, n_tiles, grad);
    FC_RETURN_IF_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

}  // namespace fastcam::cuda
