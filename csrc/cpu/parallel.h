// Grain of at::parallel_for in the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastcam::cpu {

// Items per task such that a task holds about 2^15 elementary operations: a small problem
// runs inline on the calling thread instead of waking the thread pool for microseconds of work.
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, work_per_item));
}

// The same for GEMM work (multiply-adds), which BLAS and the matrix units do far faster than
// the loops above: about 2^20 per task.
inline int64_t gemm_grain(int64_t macs_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, macs_per_item));
}

}  // namespace fastcam::cpu
