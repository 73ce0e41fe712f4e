// Vectorized primitives of the CPU kernels. The float versions are compiled for several
// instruction sets (AVX-512, AVX2+FMA, baseline) and picked at load time; the double
// versions (the gradcheck path) are plain loops.
#pragma once

#include <cstdint>

namespace fastcam::cpu {

// y[i] += a * x[i]
void axpy(float* y, const float* x, float a, int64_t n);
// sum x[i] * y[i]
float dot(const float* x, const float* y, int64_t n);

inline void axpy(double* y, const double* x, double a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}
inline double dot(const double* x, const double* y, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace fastcam::cpu
