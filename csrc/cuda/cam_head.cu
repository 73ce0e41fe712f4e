// cam_head on CUDA: scores, logits and maps; the backward's G, dF = W^T G and dW = sum G F^T.
// The mirror of csrc/cpu/cam_head.cpp; the binding is cam_head_binding.cpp.
//
// Kernels (features are a [B, K, N] view with stride 1 along N or along K; 256 threads):
//   scores_kernel          S = W F: a block per (image, 64 positions, 16 or 32 classes), K
//                          walked in chunks of 32 staged in shared memory, loaded along
//                          whichever of K / N is contiguous; 4 or 8 outputs per thread.
//   head_maps_kernel       a warp per map: logit = mean + bias, cam = normalize (map_math.h's math).
//   head_grad_maps_kernel  a warp per map: G = normalize_backward(grad_cams) + grad_logits / N.
//   grad_features_kernel   dF = W^T G: a block per (image, 64 positions, 32 channels), C walked
//                          in chunks of 16 in shared memory; each dF element written once,
//                          stores coalesced along dF's contiguous dimension.
//   grad_weight_kernel     dW partial sums: a block per (64 channels, 16 classes, split of the
//                          B*N rows); each split writes its own [C, K] slice (no atomics).
//   sum_partials_kernel    dW[c, k] = sum of the splits in split order.
//   split_stack_kernel, sum_score_parts_kernel   the bf16 parts of W and G stacked for the cuBLAS
//                          path of S and dF (cam_head_binding.cpp), and S from its three blocks.
// bf16 features take head_mma.cuh's tensor-core versions of the three GEMMs (sm_80+).
// Every sum has a fixed order, so results are bitwise reproducible (deterministic mode or not).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../common/map_math.h"
#include "common.cuh"
#include "head_mma.cuh"
#include "launch.h"

namespace fastcam::cuda {
namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------ forward

constexpr int kFwdTileN = 64;  // positions per block
constexpr int kFwdTileK = 32;  // channels per shared-memory stage

// S[b, c, n] = sum_k W[c, k] F[b, k, n]. Thread t owns position n0 + t % 64 and classes
// c0 + t / 64 + 4 j, j < CPT; the block covers 4 * CPT classes.
template <typename scalar_t, typename acc_t, int CPT>
__global__ void __launch_bounds__(kThreads)
    scores_kernel(const scalar_t* __restrict__ f, int64_t K, int64_t N, int64_t sB, int64_t sK, int64_t sN,
                  bool k_fast, const acc_t* __restrict__ w, int64_t C, acc_t* __restrict__ s, int64_t n_tiles) {
  constexpr int TC = 4 * CPT;
  __shared__ acc_t fs[kFwdTileK][kFwdTileN + 1];
  __shared__ acc_t ws[TC][kFwdTileK + 1];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * kFwdTileN;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * TC;
  const int tn = tid % kFwdTileN, tc = tid / kFwdTileN;
  const scalar_t* fb = f + b * sB;
  acc_t acc[CPT];
#pragma unroll
  for (int j = 0; j < CPT; ++j) acc[j] = acc_t(0);

  for (int64_t k0 = 0; k0 < K; k0 += kFwdTileK) {
    // Stage F[b, k0 : k0 + 32, n0 : n0 + 64], zeros outside; consecutive threads read
    // consecutive addresses (along K for channels-last, along N otherwise).
    for (int i = tid; i < kFwdTileK * kFwdTileN; i += kThreads) {
      const int kk = k_fast ? i % kFwdTileK : i / kFwdTileN;
      const int nn = k_fast ? i / kFwdTileK : i % kFwdTileN;
      const int64_t k = k0 + kk, n = n0 + nn;
      fs[kk][nn] = (k < K && n < N) ? to_acc(fb[k * sK + n * sN]) : acc_t(0);
    }
    for (int i = tid; i < TC * kFwdTileK; i += kThreads) {
      const int kk = i % kFwdTileK, cc = i / kFwdTileK;
      const int64_t k = k0 + kk, c = c0 + cc;
      ws[cc][kk] = (k < K && c < C) ? w[c * K + k] : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kFwdTileK; ++kk) {
      const acc_t x = fs[kk][tn];
#pragma unroll
      for (int j = 0; j < CPT; ++j) acc[j] += ws[tc + 4 * j][kk] * x;
    }
    __syncthreads();
  }
  const int64_t n = n0 + tn;
  if (n >= N) return;
#pragma unroll
  for (int j = 0; j < CPT; ++j) {
    const int64_t c = c0 + tc + 4 * j;
    if (c < C) s[(b * C + c) * N + n] = acc[j];
  }
}

// The per-map kernels: a warp per map, its lanes on consecutive positions (coalesced), sums
// and maxima by warp shuffles (common.cuh's warp_sum, warp_nan_max). (A thread per map walking
// its positions, uncoalesced, took 1.3 ms of a resnet50@1024 B32 step on an H200.) The math is
// map_math.h's normalize_forward/backward.
constexpr int kMapWarps = 4;  // warps (maps) per block

// logit = mean(S) + bias, cam = normalize(S), a warp per map.
template <typename acc_t>
__global__ void __launch_bounds__(kMapWarps * 32)
    head_maps_kernel(const acc_t* __restrict__ s, const acc_t* __restrict__ bias, int64_t maps, int64_t C, int64_t N,
                     Normalize mode, acc_t temperature, acc_t eps, acc_t* __restrict__ logits,
                     acc_t* __restrict__ cams) {
  const int64_t map = static_cast<int64_t>(blockIdx.x) * kMapWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (map >= maps) return;  // the whole warp
  const acc_t* sm = s + map * N;
  acc_t* cm = cams + map * N;
  acc_t total = 0;
  for (int64_t n = lane; n < N; n += 32) total += sm[n];
  total = warp_sum(total);
  if (lane == 0) logits[map] = total / acc_t(N) + (bias ? bias[map % C] : acc_t(0));
  if (mode == Normalize::Softmax) {
    acc_t mx = -INFINITY;
    for (int64_t n = lane; n < N; n += 32) mx = nan_max(mx, sm[n] / temperature);
    mx = warp_nan_max(mx);
    acc_t sum_e = 0;
    for (int64_t n = lane; n < N; n += 32) {
      const acc_t e = exp(sm[n] / temperature - mx);
      cm[n] = e;
      sum_e += e;
    }
    sum_e = warp_sum(sum_e);
    for (int64_t n = lane; n < N; n += 32) cm[n] /= sum_e;
    return;
  }
  if (mode == Normalize::None) {
    for (int64_t n = lane; n < N; n += 32) cm[n] = relu(sm[n]);
    return;
  }
  acc_t den = 0;
  if (mode == Normalize::Max) {
    acc_t mx = 0;  // relu >= 0 (or NaN)
    for (int64_t n = lane; n < N; n += 32) mx = nan_max(mx, relu(sm[n]));
    den = warp_nan_max(mx) + eps;
  } else if (mode == Normalize::Sum) {
    acc_t sum = 0;
    for (int64_t n = lane; n < N; n += 32) sum += relu(sm[n]);
    den = warp_sum(sum) + eps;
  } else {  // L2
    acc_t sq = 0;
    for (int64_t n = lane; n < N; n += 32) {
      const acc_t r = relu(sm[n]);
      sq += r * r;
    }
    den = sqrt(warp_sum(sq)) + eps;
  }
  for (int64_t n = lane; n < N; n += 32) cm[n] = relu(sm[n]) / den;
}

// ----------------------------------------------------------------------- backward

// Per map: G = dL/dS through the normalization (0 without grad_cams) + dL/dlogit / N; a warp per map.
template <typename acc_t>
__global__ void __launch_bounds__(kMapWarps * 32)
    head_grad_maps_kernel(const acc_t* __restrict__ gl, const acc_t* __restrict__ gc, const acc_t* __restrict__ s,
                          const acc_t* __restrict__ cams, int64_t maps, int64_t N, Normalize mode, acc_t temperature,
                          acc_t eps, acc_t* __restrict__ g) {
  const int64_t map = static_cast<int64_t>(blockIdx.x) * kMapWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (map >= maps) return;  // the whole warp
  const acc_t from_logit = gl ? gl[map] / acc_t(N) : acc_t(0);
  acc_t* out = g + map * N;
  if (!gc) {
    for (int64_t n = lane; n < N; n += 32) out[n] = from_logit;
    return;
  }
  const acc_t* gm = gc + map * N;
  const acc_t* sm = s + map * N;
  const acc_t* cm = cams + map * N;
  acc_t dot = 0;
  for (int64_t n = lane; n < N; n += 32) dot += gm[n] * cm[n];
  dot = warp_sum(dot);
  if (mode == Normalize::Softmax) {
    for (int64_t n = lane; n < N; n += 32) out[n] = cm[n] * (gm[n] - dot) / temperature + from_logit;
    return;
  }
  if (mode == Normalize::None) {
    for (int64_t n = lane; n < N; n += 32) out[n] = (sm[n] <= acc_t(0) ? acc_t(0) : gm[n]) + from_logit;
    return;
  }
  if (mode == Normalize::Sum) {
    acc_t sum = 0;
    for (int64_t n = lane; n < N; n += 32) sum += relu(sm[n]);
    const acc_t den = warp_sum(sum) + eps;
    for (int64_t n = lane; n < N; n += 32)
      out[n] = (sm[n] <= acc_t(0) ? acc_t(0) : (gm[n] - dot) / den) + from_logit;
    return;
  }
  if (mode == Normalize::L2) {
    acc_t sq = 0;
    for (int64_t n = lane; n < N; n += 32) {
      const acc_t r = relu(sm[n]);
      sq += r * r;
    }
    const acc_t norm = sqrt(warp_sum(sq));
    const acc_t den = norm + eps;
    const acc_t along = norm > acc_t(0) ? dot / norm : acc_t(0);
    for (int64_t n = lane; n < N; n += 32)
      out[n] = (sm[n] <= acc_t(0) ? acc_t(0) : gm[n] / den - along * cm[n]) + from_logit;
    return;
  }
  // Max: the gradient through the max goes to the tied maxima in equal shares.
  acc_t mx = 0;
  for (int64_t n = lane; n < N; n += 32) mx = nan_max(mx, relu(sm[n]));
  mx = warp_nan_max(mx);
  acc_t ties = 0;
  for (int64_t n = lane; n < N; n += 32) ties += relu(sm[n]) == mx ? acc_t(1) : acc_t(0);
  ties = warp_sum(ties);
  const acc_t den = mx + eps;
  const acc_t through_max = ties > acc_t(0) ? dot / den / ties : acc_t(0);
  for (int64_t n = lane; n < N; n += 32) {
    const acc_t gv = gm[n] / den - (relu(sm[n]) == mx ? through_max : acc_t(0));
    out[n] = (sm[n] <= acc_t(0) ? acc_t(0) : gv) + from_logit;  // NaN passes, as in relu's backward
  }
}

constexpr int kDfTileN = 64;  // positions per block
constexpr int kDfTileK = 32;  // channels per block
constexpr int kDfTileC = 16;  // classes per shared-memory stage

// dF[b, k, n] = sum_c W[c, k] G[b, c, n]; 8 outputs per thread. With k_fast (dF has stride 1
// along K) thread t owns channel k0 + t % 32 and positions n0 + t / 32 + 8 j, else position
// n0 + t % 64 and channels k0 + t / 64 + 4 j, so that the stores are coalesced.
template <typename scalar_t, typename acc_t, bool k_fast>
__global__ void __launch_bounds__(kThreads)
    grad_features_kernel(const acc_t* __restrict__ w, const acc_t* __restrict__ g, int64_t C, int64_t K, int64_t N,
                         scalar_t* __restrict__ df, int64_t dB, int64_t dK, int64_t dN, int64_t n_tiles) {
  __shared__ acc_t gs[kDfTileC][kDfTileN];
  __shared__ acc_t ws[kDfTileC][kDfTileK];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * kDfTileN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDfTileK;
  const int tk = k_fast ? tid % kDfTileK : tid / kDfTileN;  // first channel of the thread
  const int tn = k_fast ? tid / kDfTileK : tid % kDfTileN;  // first position of the thread
  acc_t acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = acc_t(0);

  for (int64_t c0 = 0; c0 < C; c0 += kDfTileC) {
    for (int i = tid; i < kDfTileC * kDfTileN; i += kThreads) {
      const int cc = i / kDfTileN, nn = i % kDfTileN;
      const int64_t c = c0 + cc, n = n0 + nn;
      gs[cc][nn] = (c < C && n < N) ? g[(b * C + c) * N + n] : acc_t(0);
    }
    for (int i = tid; i < kDfTileC * kDfTileK; i += kThreads) {
      const int cc = i / kDfTileK, kk = i % kDfTileK;
      const int64_t c = c0 + cc, k = k0 + kk;
      ws[cc][kk] = (c < C && k < K) ? w[c * K + k] : acc_t(0);
    }
    __syncthreads();
    if constexpr (k_fast) {
#pragma unroll 4
      for (int cc = 0; cc < kDfTileC; ++cc) {
        const acc_t wv = ws[cc][tk];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += wv * gs[cc][tn + 8 * j];
      }
    } else {
#pragma unroll 4
      for (int cc = 0; cc < kDfTileC; ++cc) {
        const acc_t gv = gs[cc][tn];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += ws[cc][tk + 4 * j] * gv;
      }
    }
    __syncthreads();
  }
  scalar_t* dfb = df + b * dB;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t k = k0 + (k_fast ? tk : tk + 4 * j);
    const int64_t n = n0 + (k_fast ? tn + 8 * j : tn);
    if (k < K && n < N) store_as(acc[j], dfb + k * dK + n * dN);
  }
}

constexpr int kDwTileK = 64;  // channels per block
constexpr int kDwTileC = 16;  // classes per block
constexpr int kDwRows = 32;   // (b, n) rows per shared-memory stage
constexpr int kDwMaxSplits = 256;
constexpr int64_t kDwTargetBlocks = 1024;

// out[split, c, k] = sum over the rows r = b N + n of this split of G[b, c, n] F[b, k, n].
// Thread t owns channel k0 + t % 64 and classes c0 + t / 64 + 4 j, j < 4. The rows of a split
// are a fixed range, walked in a fixed order: the partial sums do not depend on timing.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_weight_kernel(const scalar_t* __restrict__ f, int64_t K, int64_t N, int64_t sB, int64_t sK, int64_t sN,
                       bool k_fast, const acc_t* __restrict__ g, int64_t C, int64_t rows, int64_t rows_per_split,
                       acc_t* __restrict__ out) {
  __shared__ acc_t fs[kDwTileK][kDwRows + 1];
  __shared__ acc_t gs[kDwTileC][kDwRows + 1];
  const int tid = threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kDwTileK;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kDwTileC;
  const int64_t split = blockIdx.z;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
  const int tk = tid % kDwTileK, tc = tid / kDwTileK;
  acc_t acc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j] = acc_t(0);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kDwRows) {
    for (int i = tid; i < kDwTileK * kDwRows; i += kThreads) {
      const int kk = k_fast ? i % kDwTileK : i / kDwRows;
      const int rr = k_fast ? i / kDwTileK : i % kDwRows;
      const int64_t k = k0 + kk, r = r0 + rr;
      acc_t v = acc_t(0);
      if (k < K && r < r_end) {
        const int64_t b = r / N, n = r - b * N;
        v = to_acc(f[b * sB + k * sK + n * sN]);
      }
      fs[kk][rr] = v;
    }
    for (int i = tid; i < kDwTileC * kDwRows; i += kThreads) {
      const int cc = i / kDwRows, rr = i % kDwRows;
      const int64_t c = c0 + cc, r = r0 + rr;
      acc_t v = acc_t(0);
      if (c < C && r < r_end) {
        const int64_t b = r / N, n = r - b * N;
        v = g[(b * C + c) * N + n];
      }
      gs[cc][rr] = v;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kDwRows; ++rr) {
      const acc_t x = fs[tk][rr];
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] += gs[tc + 4 * j][rr] * x;
    }
    __syncthreads();
  }
  const int64_t k = k0 + tk;
  if (k >= K) return;
  acc_t* o = out + split * C * K;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + tc + 4 * j;
    if (c < C) o[c * K + k] = acc[j];
  }
}

// dw[i] = sum_s partials[s, i], s in order.
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int64_t splits, int64_t count,
                                    acc_t* __restrict__ dw) {
  for (int64_t i = global_index(); i < count; i += global_stride()) {
    acc_t total = 0;
    for (int64_t s = 0; s < splits; ++s) total += partials[s * count + i];
    dw[i] = total;
  }
}

// ------------------------------------------------- operands of the cuBLAS path (cam_head_binding.cpp)

// out[b, j * rows + r, col] = part pattern[j] of x[b, r, col] (j < 3): the 2 or 3 bf16 parts of
// an fp32 value (head_mma.cuh's split: their sum is x; a non-finite x whole in part 0), stacked
// so that one bf16 GEMM with fp32 accumulation sums the products of the parts.
__global__ void split_stack_kernel(const float* __restrict__ x, int64_t batches, int64_t rows, int64_t cols, int parts,
                                   int p0, int p1, int p2, __nv_bfloat16* __restrict__ out) {
  const int64_t per_batch = rows * cols, count = batches * per_batch;
  for (int64_t i = global_index(); i < count; i += global_stride()) {
    __nv_bfloat16 part[3];
    if (parts == 3) {
      mma::split<3>(x[i], part, 1);
    } else {
      mma::split<2>(x[i], part, 1);
      part[2] = part[1];
    }
    const int64_t b = i / per_batch, within = i - b * per_batch;
    __nv_bfloat16* o = out + b * 3 * per_batch + within;
    o[0] = part[p0];
    o[per_batch] = part[p1];
    o[2 * per_batch] = part[p2];
  }
}

// S[b, c, n] = (S3[b, 2C + c, n] + S3[b, C + c, n]) + S3[b, c, n]: the small parts first.
__global__ void sum_score_parts_kernel(const float* __restrict__ s3, int64_t B, int64_t C, int64_t N,
                                       float* __restrict__ s) {
  const int64_t per_part = C * N, count = B * per_part;
  for (int64_t i = global_index(); i < count; i += global_stride()) {
    const int64_t b = i / per_part, within = i - b * per_part;
    const float* p = s3 + b * 3 * per_part + within;
    s[i] = (p[2 * per_part] + p[per_part]) + p[0];
  }
}

bool positions_contiguous(const FeatureView& v) { return v.sN == 1 || v.N == 1; }

// FASTCAM_CUDA_MMA (read once): unset or 1, the GEMMs of bf16 features on the tensor cores
// (head_mma.cuh) on sm_80 and newer; 0, the SIMT kernels above.
bool use_mma() {
  static const bool turned_off = [] {
    const char* v = std::getenv("FASTCAM_CUDA_MMA");
    return v != nullptr && std::strcmp(v, "0") == 0;
  }();
  if (turned_off) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

bool fits_grid_x(int64_t blocks) { return blocks <= 0x7fffffff; }
bool fits_grid_yz(int64_t blocks) { return blocks <= 65535; }

}  // namespace

int64_t cam_head_dw_splits(int64_t B, int64_t N, int64_t C, int64_t K) {
  const int64_t rows = B * N;
  if (rows <= 0 || C <= 0 || K <= 0) return 0;
  const int64_t tiles = ceil_div(K, kDwTileK) * ceil_div(C, kDwTileC);
  int64_t splits = ceil_div(kDwTargetBlocks, tiles);
  const int64_t stages = ceil_div(rows, kDwRows);
  if (splits > stages) splits = stages;
  if (splits > kDwMaxSplits) splits = kDwMaxSplits;
  return splits < 1 ? 1 : splits;
}

cudaError_t split_stack_bf16(const float* x, int64_t batches, int64_t rows, int64_t cols, int parts,
                             const int pattern[3], void* out, cudaStream_t stream) {
  const int64_t count = batches * rows * cols;
  if (count == 0) return cudaSuccess;
  split_stack_kernel<<<grid_for(count, kMapThreads), kMapThreads, 0, stream>>>(
      x, batches, rows, cols, parts, pattern[0], pattern[1], pattern[2], static_cast<__nv_bfloat16*>(out));
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t sum_score_parts(const float* s3, int64_t B, int64_t C, int64_t N, float* s, cudaStream_t stream) {
  if (B * C * N == 0) return cudaSuccess;
  sum_score_parts_kernel<<<grid_for(B * C * N, kMapThreads), kMapThreads, 0, stream>>>(s3, B, C, N, s);
  FC_RETURN_IF_LAUNCH_ERROR();
  return cudaSuccess;
}

cudaError_t cam_head_forward(const FeatureView& fv, const void* features, const void* weight, const void* bias,
                             int64_t C, Normalize mode, double temperature, double eps, void* logits, void* scores,
                             void* cams, bool scores_given, cudaStream_t stream) {
  const int64_t B = fv.B, K = fv.K, N = fv.N;
  const int64_t maps = B * C;
  if (maps == 0 || N == 0) return cudaSuccess;
  return dispatch_features(fv.dtype, [&](auto tag) -> cudaError_t {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    const auto* f = static_cast<const scalar_t*>(features);
    const auto* w = static_cast<const acc_t*>(weight);
    auto* s = static_cast<acc_t*>(scores);
    const bool k_fast = !positions_contiguous(fv);
    const int64_t n_tiles = ceil_div(N, kFwdTileN);
    if (!fits_grid_x(B * n_tiles)) return cudaErrorInvalidConfiguration;
    bool done = scores_given;
    if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
      if (!done && use_mma()) {
        const int64_t tiles = ceil_div(N, mma::kSTileN), c_tiles = ceil_div(C, mma::kSTileC);
        if (!fits_grid_x(B * tiles) || !fits_grid_yz(c_tiles)) return cudaErrorInvalidConfiguration;
        const dim3 grid(static_cast<unsigned>(B * tiles), static_cast<unsigned>(c_tiles));
        if (k_fast) {
          mma::scores_kernel<true><<<grid, mma::kThreads, 0, stream>>>(f, K, N, fv.sB, fv.sK, fv.sN, w, C, s, tiles);
        } else {
          mma::scores_kernel<false><<<grid, mma::kThreads, 0, stream>>>(f, K, N, fv.sB, fv.sK, fv.sN, w, C, s, tiles);
        }
        done = true;
      }
    }
    if (!done && C <= 16) {
      const dim3 grid(static_cast<unsigned>(B * n_tiles), static_cast<unsigned>(ceil_div(C, 16)));
      scores_kernel<scalar_t, acc_t, 4><<<grid, kThreads, 0, stream>>>(f, K, N, fv.sB, fv.sK, fv.sN, k_fast, w, C, s,
                                                                        n_tiles);
    } else if (!done) {
      if (!fits_grid_yz(ceil_div(C, 32))) return cudaErrorInvalidConfiguration;
      const dim3 grid(static_cast<unsigned>(B * n_tiles), static_cast<unsigned>(ceil_div(C, 32)));
      scores_kernel<scalar_t, acc_t, 8><<<grid, kThreads, 0, stream>>>(f, K, N, fv.sB, fv.sK, fv.sN, k_fast, w, C, s,
                                                                        n_tiles);
    }
    FC_RETURN_IF_LAUNCH_ERROR();
    head_maps_kernel<acc_t><<<static_cast<unsigned>(ceil_div(maps, kMapWarps)), kMapWarps * 32, 0, stream>>>(
        s, static_cast<const acc_t*>(bias), maps, C, N, mode, acc_t(temperature), acc_t(eps),
        static_cast<acc_t*>(logits), static_cast<acc_t*>(cams));
    FC_RETURN_IF_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

cudaError_t cam_head_backward(const FeatureView& fv, const void* features, const void* weight, int64_t C,
                              const void* grad_logits, const void* grad_cams, const void* scores, const void* cams,
                              Normalize mode, double temperature, double eps, void* grad_scores,
                              const FeatureView& dfv, void* grad_features, void* grad_weight, void* dw_partials,
                              cudaStream_t stream) {
  const int64_t B = fv.B, K = fv.K, N = fv.N;
  const int64_t maps = B * C;
  if (B == 0 || N == 0) return cudaSuccess;  // nothing to write: dF is empty, dW holds zeros
  return dispatch_features(fv.dtype, [&](auto tag) -> cudaError_t {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    const auto* w = static_cast<const acc_t*>(weight);
    auto* g = static_cast<acc_t*>(grad_scores);
    if (maps > 0) {
      head_grad_maps_kernel<acc_t><<<static_cast<unsigned>(ceil_div(maps, kMapWarps)), kMapWarps * 32, 0, stream>>>(
          static_cast<const acc_t*>(grad_logits), static_cast<const acc_t*>(grad_cams),
          static_cast<const acc_t*>(scores), static_cast<const acc_t*>(cams), maps, N, mode, acc_t(temperature),
          acc_t(eps), g);
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    bool mma_path = false;
    if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) mma_path = use_mma();
    if (grad_features && K > 0 && mma_path) {
      if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
        const int64_t n_tiles = ceil_div(N, mma::kDTileN), k_tiles = ceil_div(K, mma::kDTileK);
        if (!fits_grid_x(B * n_tiles) || !fits_grid_yz(k_tiles)) return cudaErrorInvalidConfiguration;
        const dim3 grid(static_cast<unsigned>(B * n_tiles), static_cast<unsigned>(k_tiles));
        auto* df = static_cast<scalar_t*>(grad_features);
        if (positions_contiguous(dfv)) {
          mma::grad_features_kernel<false>
              <<<grid, mma::kThreads, 0, stream>>>(w, g, C, K, N, df, dfv.sB, dfv.sK, dfv.sN, n_tiles);
        } else {
          mma::grad_features_kernel<true>
              <<<grid, mma::kThreads, 0, stream>>>(w, g, C, K, N, df, dfv.sB, dfv.sK, dfv.sN, n_tiles);
        }
        FC_RETURN_IF_LAUNCH_ERROR();
      }
    } else if (grad_features && K > 0) {
      // With C = 0 the loop over classes is empty and dF is written as zeros.
      const int64_t n_tiles = ceil_div(N, kDfTileN);
      const int64_t k_tiles = ceil_div(K, kDfTileK);
      if (!fits_grid_x(B * n_tiles) || !fits_grid_yz(k_tiles)) return cudaErrorInvalidConfiguration;
      const dim3 grid(static_cast<unsigned>(B * n_tiles), static_cast<unsigned>(k_tiles));
      auto* df = static_cast<scalar_t*>(grad_features);
      if (positions_contiguous(dfv)) {
        grad_features_kernel<scalar_t, acc_t, false>
            <<<grid, kThreads, 0, stream>>>(w, g, C, K, N, df, dfv.sB, dfv.sK, dfv.sN, n_tiles);
      } else {
        grad_features_kernel<scalar_t, acc_t, true>
            <<<grid, kThreads, 0, stream>>>(w, g, C, K, N, df, dfv.sB, dfv.sK, dfv.sN, n_tiles);
      }
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    const int64_t splits = cam_head_dw_splits(B, N, C, K);
    if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
      if (grad_weight && splits > 0 && mma_path) {
        // Splits of whole images, no more than the partials' workspace holds (cam_head_dw_splits).
        const int64_t k_tiles = ceil_div(K, mma::kWTileK), c_tiles = ceil_div(C, mma::kWTileC);
        const int64_t want = std::max<int64_t>(1, ceil_div(kDwTargetBlocks, k_tiles * c_tiles));
        const int64_t per_split = ceil_div(B, std::min(std::min(want, B), splits));
        const int64_t used = ceil_div(B, per_split);
        if (!fits_grid_x(k_tiles) || !fits_grid_yz(c_tiles) || !fits_grid_yz(used))
          return cudaErrorInvalidConfiguration;
        acc_t* out = used > 1 ? static_cast<acc_t*>(dw_partials) : static_cast<acc_t*>(grad_weight);
        const dim3 grid(static_cast<unsigned>(k_tiles), static_cast<unsigned>(c_tiles), static_cast<unsigned>(used));
        const auto* f = static_cast<const scalar_t*>(features);
        const bool aligned = reinterpret_cast<uintptr_t>(f) % 16 == 0 && fv.sB % 8 == 0;
        if (positions_contiguous(fv)) {
          if (aligned && fv.sK % 8 == 0) {
            mma::grad_weight_images_kernel<false, true>
                <<<grid, mma::kThreads, 0, stream>>>(f, B, K, N, fv.sB, fv.sK, fv.sN, g, C, per_split, out);
          } else {
            mma::grad_weight_images_kernel<false, false>
                <<<grid, mma::kThreads, 0, stream>>>(f, B, K, N, fv.sB, fv.sK, fv.sN, g, C, per_split, out);
          }
        } else if (aligned && fv.sK == 1 && fv.sN % 8 == 0) {
          mma::grad_weight_images_kernel<true, true>
              <<<grid, mma::kThreads, 0, stream>>>(f, B, K, N, fv.sB, fv.sK, fv.sN, g, C, per_split, out);
        } else {
          mma::grad_weight_images_kernel<true, false>
              <<<grid, mma::kThreads, 0, stream>>>(f, B, K, N, fv.sB, fv.sK, fv.sN, g, C, per_split, out);
        }
        FC_RETURN_IF_LAUNCH_ERROR();
        if (used > 1) {
          sum_partials_kernel<acc_t><<<grid_for(C * K, kMapThreads), kMapThreads, 0, stream>>>(
              out, used, C * K, static_cast<acc_t*>(grad_weight));
          FC_RETURN_IF_LAUNCH_ERROR();
        }
        return cudaSuccess;
      }
    }
    if (grad_weight && splits > 0) {
      const int64_t rows = B * N;
      // Rows per split: a multiple of the stage, so that only the last split has a ragged end.
      const int64_t rows_per_split = ceil_div(ceil_div(rows, splits), kDwRows) * kDwRows;
      const int64_t used_splits = ceil_div(rows, rows_per_split);
      const int64_t k_tiles = ceil_div(K, kDwTileK), c_tiles = ceil_div(C, kDwTileC);
      if (!fits_grid_x(k_tiles) || !fits_grid_yz(c_tiles) || !fits_grid_yz(used_splits))
        return cudaErrorInvalidConfiguration;
      acc_t* out = splits > 1 ? static_cast<acc_t*>(dw_partials) : static_cast<acc_t*>(grad_weight);
      const dim3 grid(static_cast<unsigned>(k_tiles), static_cast<unsigned>(c_tiles),
                      static_cast<unsigned>(used_splits));
      grad_weight_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(features), K, N, fv.sB, fv.sK, fv.sN, !positions_contiguous(fv), g, C, rows,
          rows_per_split, out);
      FC_RETURN_IF_LAUNCH_ERROR();
      if (splits > 1) {
        sum_partials_kernel<acc_t><<<grid_for(C * K, kMapThreads), kMapThreads, 0, stream>>>(
            out, used_splits, C * K, static_cast<acc_t*>(grad_weight));
        FC_RETURN_IF_LAUNCH_ERROR();
      }
    }
    return cudaSuccess;
  });
}

}  // namespace fastcam::cuda
