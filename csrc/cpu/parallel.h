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

}  // namespace fastcam::cpu
