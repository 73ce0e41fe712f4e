#include "vec.h"


namespace fastcam::cpu {

FC_MULTIVERSION void axpy(float* __restrict y, const float* __restrict x, float a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

FC_MULTIVERSION float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace fastcam::cpu
