// Device-side helpers shared by the CUDA kernels: element conversions, launch sizes,
// dtype dispatch, a deterministic block reduction and workspace carving. Light headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/map_math.h"
#include "launch.h"

namespace fastcam::cuda {

// ------------------------------------------------------------------ element conversions

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// *p = v, rounded to nearest even for the 16-bit types.
__device__ __forceinline__ void store_as(float v, float* p) { *p = v; }
__device__ __forceinline__ void store_as(double v, double* p) { *p = v; }
__device__ __forceinline__ void store_as(float v, __half* p) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_as(float v, __nv_bfloat16* p) { *p = __float2bfloat16_rn(v); }

// ------------------------------------------------------------------------ launch sizes

constexpr int kMapThreads = 128;         // block size of the one-thread-per-item kernels
constexpr int64_t kMaxGrid = 1 << 20;    // grid-stride loops cover the rest
constexpr int kReduceThreads = 512;      // block size of the single-block reductions

// Blocks for `items` items at `threads` per block, capped (the kernels loop grid-stride).
inline unsigned grid_for(int64_t items, int threads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Index of the first item of this thread and the grid-stride step.
__device__ __forceinline__ int64_t global_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

#define FC_RETURN_IF_LAUNCH_ERROR()              \
  do {                                           \
    const cudaError_t fc_err = cudaGetLastError(); \
    if (fc_err != cudaSuccess) return fc_err;    \
  } while (0)

// ------------------------------------------------------------------------ dispatch

// f(tag) with tag a value of the features' element type.
template <typename F>
cudaError_t dispatch_features(DType t, F&& f) {
  switch (t) {
    case DType::Float32:
      return f(float{});
    case DType::Float64:
      return f(double{});
    case DType::Float16:
      return f(__half{});
    case DType::BFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// f(tag) with tag a value of the accumulation type.
template <typename F>
cudaError_t dispatch_acc(bool dbl, F&& f) {
  return dbl ? f(double{}) : f(float{});
}

// ---------------------------------------------------------------- block reduction

// The sum of v over a block of exactly kThreads threads, in a fixed tree order (so the
// result does not depend on timing); every thread gets the result. Every thread of the
// block must call it.
template <int kThreads, typename T>
__device__ T block_sum(T v) {
  static_assert((kThreads & (kThreads - 1)) == 0, "block_sum needs a power-of-two block");
  __shared__ T buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) buf[threadIdx.x] = buf[threadIdx.x] + buf[threadIdx.x + s];
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads();  // buf may be reused by the next call
  return r;
}

// ------------------------------------------------------------------ warp reductions

// The sum (the NaN-propagating max) of v over the 32 lanes of a full warp, in a fixed order,
// then lane 0's result broadcast, so that every lane uses the same value.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);
}

template <typename T>
__device__ __forceinline__ T warp_nan_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, o));
  return __shfl_sync(0xffffffffu, v, 0);
}

// -------------------------------------------------------------------- workspace

// Hands out consecutive 256-byte aligned pieces of one buffer; with base null it only
// counts (the size pass of *_workspace_bytes).
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(int64_t count) {
    const size_t at = used_;
    used_ += (static_cast<size_t>(count > 0 ? count : 0) * sizeof(T) + 255) / 256 * 256;
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

}  // namespace fastcam::cuda
