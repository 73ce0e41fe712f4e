// Vectorized primitives of the CPU kernels. The float versions are compiled for several
// instruction sets (AVX-512, AVX2+FMA, baseline) and picked at load time; the double
// versions (the gradcheck path) are plain loops.
#pragma once

#include <cstdint>

// Compiles a function for AVX-512, AVX2+FMA and the baseline, picked at load time (GCC, x86-64)
// by the CPU's features: a clone for a named CPU model ("arch=haswell") is never picked on a
// virtual machine that reports a generic model, as cloud machines do.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define FC_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FC_MULTIVERSION
#endif
// On a multiversioned function: inline everything it calls, so that each clone's loops are
// compiled for its instruction set.
#if defined(__GNUC__)
#define FC_FLATTEN __attribute__((flatten))
#else
#define FC_FLATTEN
#endif

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
