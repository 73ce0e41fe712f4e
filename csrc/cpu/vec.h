// Vectorized primitives of the CPU kernels. The float versions are compiled for several
// instruction sets (AVX-512, AVX2+FMA, baseline) and picked at load time; the double
// versions (the gradcheck path) are plain loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

// dst[i] = float(src[i * stride]); src may be the destination type already.
void load(const c10::BFloat16* src, int64_t stride, float* dst, int64_t n);
void load(const c10::Half* src, int64_t stride, float* dst, int64_t n);
void load(const float* src, int64_t stride, float* dst, int64_t n);
inline void load(const double* src, int64_t stride, double* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

// dst[i * stride] = src[i], rounded to nearest even for the 16-bit types.
void store(const float* src, c10::BFloat16* dst, int64_t stride, int64_t n);
void store(const float* src, c10::Half* dst, int64_t stride, int64_t n);
void store(const float* src, float* dst, int64_t stride, int64_t n);
inline void store(const double* src, double* dst, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
}

}  // namespace fastcam::cpu
