// Helpers of the ATen bindings of the CUDA kernels (csrc/cuda/<op>_binding.cpp; host code only).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/checks.h"
#include "launch.h"

namespace fastcam::cuda {

// The launchers' tag of a features dtype; other dtypes are refused with a message naming `op`.
inline DType dtype_tag(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return DType::Float32;
    case at::kDouble:
      return DType::Float64;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    default:
      TORCH_CHECK(false, op, ": features must be float32, float64, float16 or bfloat16, got ", t);
  }
}

inline FeatureView feature_view(const at::Tensor& t, DType dtype) {
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2), dtype};
}

// A scratch buffer of `bytes` bytes on the device of `like` (stream-ordered caching allocator).
inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace fastcam::cuda
