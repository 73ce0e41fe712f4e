#include "vec.h"

#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FC_MULTIVERSION __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define FC_MULTIVERSION
#endif

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

FC_MULTIVERSION void load(const c10::BFloat16* src, int64_t stride, float* __restrict dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t w = uint32_t(bits[i]) << 16;
      float f;
      std::memcpy(&f, &w, sizeof f);
      dst[i] = f;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i * stride]);
}

FC_MULTIVERSION void load(const c10::Half* src, int64_t stride, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float(src[i * stride]);
}

FC_MULTIVERSION void load(const float* src, int64_t stride, float* __restrict dst, int64_t n) {
  if (stride == 1) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}

FC_MULTIVERSION void store(const float* __restrict src, c10::BFloat16* dst, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = c10::BFloat16(src[i]);
}

FC_MULTIVERSION void store(const float* __restrict src, c10::Half* dst, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = c10::Half(src[i]);
}

FC_MULTIVERSION void store(const float* __restrict src, float* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    std::memcpy(dst, src, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
}

}  // namespace fastcam::cpu
