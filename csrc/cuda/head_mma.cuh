// The head's three GEMMs on the tensor cores, for bf16 features on sm_80 and newer (WMMA
// 16x16x16, fp32 accumulation), included by cam_head.cu, which chooses them over its SIMT
// kernels unless FASTCAM_CUDA_MMA=0. On an H200 (2026-11-26) they passed the suite's CUDA
// cases and memcheck, and took a resnet50@1024 B128 step from 5.7 to 4.8 ms, 2.3 with dW by
// whole images: the staging (synchronous 2-byte loads, 64-bit index math), not the MMAs, bounds
// them (benchmarks/NOTES.md).
//
// The fp32 operand of each GEMM (W, or G = dL/dS) is split, as it is staged into shared memory,
// into bf16 parts whose sum is the fp32 value: three parts (to 2^-24, fp32's own precision) for
// S = W F and dW = G F^T, two (to 2^-16) for dF = W^T G, whose output is bf16. The features
// are bf16 already, every product of bf16 parts is exact in fp32, and the MMAs accumulate in
// fp32: the results keep the SIMT kernels' fp32 accuracy. Tiles are staged through shared
// memory (zeros outside the tensor), so every layout (stride 1 along N or along K) and every
// size works the same; each result is written once, and dW's splits are summed in split
// order as in the SIMT path: no atomics, deterministic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace fastcam::cuda {
namespace mma {

constexpr int kWarps = 4;  // warps per block
constexpr int kThreads = kWarps * 32;

using bf16 = __nv_bfloat16;

// x = sum of the parts (up to the last part's rounding). A non-finite x goes whole into the
// first part, so that inf stays inf rather than becoming inf - inf = NaN.
template <int PARTS>
__device__ __forceinline__ void split(float x, bf16* parts, int stride) {
  float rest = x;
  const bool finite = isfinite(x);
#pragma unroll
  for (int p = 0; p < PARTS; ++p) {
    const bf16 h = (p == 0 || finite) ? __float2bfloat16_rn(rest) : __float2bfloat16_rn(0.0f);
    parts[p * stride] = h;
    rest -= __bfloat162float(h);
  }
}

// ------------------------------------------------------------------ S = W F

constexpr int kSTileC = 16, kSTileN = 64, kSTileK = 32;

// S[b, c, n] for 16 classes x 64 positions of image b (blockIdx.x = b * n_tiles + tile,
// blockIdx.y = class tile); warp w computes positions 16 w .. 16 w + 15.
template <bool K_FAST>
__global__ void __launch_bounds__(kThreads)
    scores_kernel(const bf16* __restrict__ f, int64_t K, int64_t N, int64_t sB, int64_t sK, int64_t sN,
                  const float* __restrict__ w, int64_t C, float* __restrict__ s, int64_t n_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) bf16 fs[kSTileK][kSTileN + 8];      // B: k x n
  __shared__ __align__(32) bf16 ws[3][kSTileC][kSTileK + 8];   // A: c x k, three parts
  __shared__ __align__(32) float out[kSTileC][kSTileN + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * kSTileN;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kSTileC;
  const bf16* fb = f + b * sB;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kSTileK) {
    for (int i = tid; i < kSTileK * kSTileN; i += kThreads) {
      const int kk = K_FAST ? i % kSTileK : i / kSTileN;
      const int nn = K_FAST ? i / kSTileK : i % kSTileN;
      const int64_t k = k0 + kk, n = n0 + nn;
      fs[kk][nn] = (k < K && n < N) ? fb[k * sK + n * sN] : __float2bfloat16_rn(0.0f);
    }
    for (int i = tid; i < kSTileC * kSTileK; i += kThreads) {
      const int cc = i / kSTileK, kk = i % kSTileK;
      const int64_t c = c0 + cc, k = k0 + kk;
      split<3>((c < C && k < K) ? w[c * K + k] : 0.0f, &ws[0][cc][kk], kSTileC * (kSTileK + 8));
    }
    __syncthreads();
#pragma unroll
    for (int kk0 = 0; kk0 < kSTileK; kk0 += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb_frag;
      wmma::load_matrix_sync(fb_frag, &fs[kk0][warp * 16], kSTileN + 8);
#pragma unroll
      for (int p = 2; p >= 0; --p) {  // the small parts first
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> w_frag;
        wmma::load_matrix_sync(w_frag, &ws[p][0][kk0], kSTileK + 8);
        wmma::mma_sync(acc, w_frag, fb_frag, acc);
      }
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&out[0][warp * 16], acc, kSTileN + 4, wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < kSTileC * kSTileN; i += kThreads) {
    const int cc = i / kSTileN, nn = i % kSTileN;
    const int64_t c = c0 + cc, n = n0 + nn;
    if (c < C && n < N) s[(b * C + c) * N + n] = out[cc][nn];
  }
#endif
}

// ------------------------------------------------------------------ dF = W^T G

constexpr int kDTileK = 64, kDTileN = 64, kDTileC = 16;

// dF[b, k, n] for 64 channels x 64 positions of image b (blockIdx.x = b * n_tiles + tile,
// blockIdx.y = channel tile); warp w computes channels 16 w .. 16 w + 15, all 64 positions.
// DF_K_FAST: dF has stride 1 along K (its stores run along K).
template <bool DF_K_FAST>
__global__ void __launch_bounds__(kThreads)
    grad_features_kernel(const float* __restrict__ w, const float* __restrict__ g, int64_t C, int64_t K, int64_t N,
                         bf16* __restrict__ df, int64_t dB, int64_t dK, int64_t dN, int64_t n_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(32) bf16 ws[2][kDTileK][kDTileC + 8];  // A: k x c (W transposed), two parts
  __shared__ __align__(32) bf16 gs[2][kDTileC][kDTileN + 8];  // B: c x n, two parts
  __shared__ __align__(32) float out[kDTileK][kDTileN + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t b = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * kDTileN;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kDTileK;
  const float* gb = g + b * C * N;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kDTileN / 16];
#pragma unroll
  for (int j = 0; j < kDTileN / 16; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int64_t c0 = 0; c0 < C; c0 += kDTileC) {
    for (int i = tid; i < kDTileK * kDTileC; i += kThreads) {  // along K: W's rows are contiguous
      const int cc = i / kDTileK, kk = i % kDTileK;
      const int64_t c = c0 + cc, k = k0 + kk;
      split<2>((c < C && k < K) ? w[c * K + k] : 0.0f, &ws[0][kk][cc], kDTileK * (kDTileC + 8));
    }
    for (int i = tid; i < kDTileC * kDTileN; i += kThreads) {
      const int cc = i / kDTileN, nn = i % kDTileN;
      const int64_t c = c0 + cc, n = n0 + nn;
      split<2>((c < C && n < N) ? gb[c * N + n] : 0.0f, &gs[0][cc][nn], kDTileC * (kDTileN + 8));
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> w_hi, w_lo;
    wmma::load_matrix_sync(w_hi, &ws[0][warp * 16][0], kDTileC + 8);
    wmma::load_matrix_sync(w_lo, &ws[1][warp * 16][0], kDTileC + 8);
#pragma unroll
    for (int j = 0; j < kDTileN / 16; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> g_hi, g_lo;
      wmma::load_matrix_sync(g_hi, &gs[0][0][j * 16], kDTileN + 8);
      wmma::load_matrix_sync(g_lo, &gs[1][0][j * 16], kDTileN + 8);
      wmma::mma_sync(acc[j], w_lo, g_hi, acc[j]);
      wmma::mma_sync(acc[j], w_hi, g_lo, acc[j]);
      wmma::mma_sync(acc[j], w_hi, g_hi, acc[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kDTileN / 16; ++j)
    wmma::store_matrix_sync(&out[warp * 16][j * 16], acc[j], kDTileN + 4, wmma::mem_row_major);
  __syncthreads();
  bf16* dfb = df + b * dB;
  for (int i = tid; i < kDTileK * kDTileN; i += kThreads) {
    const int kk = DF_K_FAST ? i % kDTileK : i / kDTileN;
    const int nn = DF_K_FAST ? i / kDTileK : i % kDTileN;
    const int64_t k = k0 + kk, n = n0 + nn;
    if (k < K && n < N) dfb[k * dK + n * dN] = __float2bfloat16_rn(out[kk][nn]);
  }
#endif
}

// ------------------------------------------------------------------ dW = G F^T by whole images

// Each split a range of whole images, so that no row index is divided by N, F staged with
// 16-byte loads where its strides allow (VEC), and in its own memory order (NCHW: [k][n], read
// as a column-major B; channels-last: [n][k]). out[split, c, k] = sum over the images b of this
// split and every position n of G[b, c, n] F[b, k, n]; blockIdx.x = channel tile, y = class
// tile, z = split. (On an H200, 2026-11-26, it replaced a kernel that split the B * N rows
// anywhere and divided each row index by N: a resnet50@1024 B128 step 4.76 -> 2.33 ms.)
constexpr int kWTileC = 16, kWTileK = 64;
constexpr int kIRows = 32;  // positions per stage

template <bool K_FAST, bool VEC>
__global__ void __launch_bounds__(kThreads)
    grad_weight_images_kernel(const bf16* __restrict__ f, int64_t B, int64_t K, int64_t N, int64_t sB, int64_t sK,
                              int64_t sN, const float* __restrict__ g, int64_t C, int64_t images_per_split,
                              float* __restrict__ out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using BLayout = std::conditional_t<K_FAST, wmma::row_major, wmma::col_major>;
  constexpr int kFRows = K_FAST ? kIRows : kWTileK, kFCols = K_FAST ? kWTileK : kIRows;
  __shared__ __align__(32) bf16 fs[kFRows][kFCols + 8];  // channels-last: r x k; NCHW: k x r
  __shared__ __align__(32) bf16 gs[3][kWTileC][kIRows + 8];
  __shared__ __align__(32) float res[kWTileC][kWTileK + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kWTileK;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kWTileC;
  const int64_t split_index = blockIdx.z;
  const int64_t b_begin = split_index * images_per_split;
  const int64_t b_end = b_begin + images_per_split < B ? b_begin + images_per_split : B;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const bf16* fb = f + b * sB;
    const float* gb = g + b * C * N;
    for (int64_t n0 = 0; n0 < N; n0 += kIRows) {
      // F: 8 consecutive elements along the stride-1 dimension per item.
      for (int i = tid; i < kFRows * (kFCols / 8); i += kThreads) {
        const int row = i / (kFCols / 8), col = (i % (kFCols / 8)) * 8;
        const int64_t k = K_FAST ? k0 + col : k0 + row;  // the first element's channel and position
        const int64_t n = K_FAST ? n0 + row : n0 + col;
        bf16* dst = &fs[row][col];
        const bool whole = K_FAST ? (n < N && k + 8 <= K) : (k < K && n + 8 <= N);
        if (VEC && whole) {
          *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(fb + k * sK + n * sN);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int64_t ke = K_FAST ? k + e : k, ne = K_FAST ? n : n + e;
            dst[e] = (ke < K && ne < N) ? fb[ke * sK + ne * sN] : __float2bfloat16_rn(0.0f);
          }
        }
      }
      for (int i = tid; i < kWTileC * kIRows; i += kThreads) {
        const int cc = i / kIRows, rr = i % kIRows;
        const int64_t c = c0 + cc, n = n0 + rr;
        split<3>((c < C && n < N) ? gb[c * N + n] : 0.0f, &gs[0][cc][rr], kWTileC * (kIRows + 8));
      }
      __syncthreads();
#pragma unroll
      for (int rr0 = 0; rr0 < kIRows; rr0 += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, BLayout> f_frag;
        // B (r x k): channels-last rows r at fs[r][k]; NCHW column k at fs[k][r].
        wmma::load_matrix_sync(f_frag, K_FAST ? &fs[rr0][warp * 16] : &fs[warp * 16][rr0], kFCols + 8);
#pragma unroll
        for (int p = 2; p >= 0; --p) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> g_frag;
          wmma::load_matrix_sync(g_frag, &gs[p][0][rr0], kIRows + 8);
          wmma::mma_sync(acc, g_frag, f_frag, acc);
        }
      }
      __syncthreads();
    }
  }
  wmma::store_matrix_sync(&res[0][warp * 16], acc, kWTileK + 4, wmma::mem_row_major);
  __syncthreads();
  float* o = out + split_index * C * K;
  for (int i = tid; i < kWTileC * kWTileK; i += kThreads) {
    const int cc = i / kWTileK, kk = i % kWTileK;
    const int64_t c = c0 + cc, k = k0 + kk;
    if (c < C && k < K) o[c * K + k] = res[cc][kk];
  }
#endif
}

}  // namespace mma
}  // namespace fastcam::cuda
