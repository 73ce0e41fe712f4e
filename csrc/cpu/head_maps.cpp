#include "head_maps.h"

#include <algorithm>
#include <cstring>

#include "vec.h"

namespace fastcam::cpu {
namespace {

template <typename T>
void forward_impl(const T* s, T* cams, T* logits, const T* bias, int64_t first, int64_t count, int64_t C, int64_t N,
                  Normalize mode, T temperature, T eps) {
  for (int64_t i = 0; i < count; ++i) {
    const T* row = s + i * N;
    logits[i] = sum_over<T>(N, [&](int64_t n) { return row[n]; }) / T(N) + (bias ? bias[(first + i) % C] : T(0));
    normalize_forward<T>(row, cams + i * N, N, mode, temperature, eps);
  }
}

template <typename T>
void backward_impl(const T* gc, const T* s, const T* cams, T* gs, char* nonzero, int64_t count, int64_t N,
                   Normalize mode, T temperature, T eps) {
  for (int64_t i = 0; i < count; ++i) {
    const T *g_row = gc + i * N, *s_row = s + i * N;
    bool zero = true;
    for (int64_t n = 0; n < N && zero; ++n) zero = g_row[n] == T(0);
    // s * 0 is 0 for every finite score and NaN otherwise.
    if (zero && sum_over<T>(N, [&](int64_t n) { return s_row[n] * T(0); }) == T(0)) {
      nonzero[i] = 0;
      continue;
    }
    T* out = gs + i * N;
    normalize_backward<T>(g_row, s_row, cams + i * N, out, N, mode, temperature, eps);
    bool any = false;
    for (int64_t n = 0; n < N && !any; ++n) any = out[n] != T(0);  // NaN counts
    nonzero[i] = any;
  }
}

// A bf16 value (its 16 bits) as float: the upper half of the float's bits.
inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace

FC_MULTIVERSION FC_FLATTEN void head_maps_forward(const float* s, float* cams, float* logits, const float* bias, int64_t first,
                                       int64_t count, int64_t C, int64_t N, Normalize mode, float temperature,
                                       float eps) {
  forward_impl(s, cams, logits, bias, first, count, C, N, mode, temperature, eps);
}
void head_maps_forward(const double* s, double* cams, double* logits, const double* bias, int64_t first,
                       int64_t count, int64_t C, int64_t N, Normalize mode, double temperature, double eps) {
  forward_impl(s, cams, logits, bias, first, count, C, N, mode, temperature, eps);
}

FC_MULTIVERSION FC_FLATTEN void head_maps_backward(const float* gc, const float* s, const float* cams, float* gs, char* nonzero,
                                        int64_t count, int64_t N, Normalize mode, float temperature, float eps) {
  backward_impl(gc, s, cams, gs, nonzero, count, N, mode, temperature, eps);
}
void head_maps_backward(const double* gc, const double* s, const double* cams, double* gs, char* nonzero,
                        int64_t count, int64_t N, Normalize mode, double temperature, double eps) {
  backward_impl(gc, s, cams, gs, nonzero, count, N, mode, temperature, eps);
}

FC_MULTIVERSION FC_FLATTEN void bf16_feature_sums(const uint16_t* f, float* out, int64_t B, int64_t K, int64_t N,
                                                  int64_t sb, int64_t sk, int64_t sn) {
  for (int64_t b = 0; b < B; ++b) {
    float* ob = out + b * K;
    if (sn == 1) {
      for (int64_t k = 0; k < K; ++k) {
        const uint16_t* row = f + b * sb + k * sk;
        ob[k] = sum_over<float>(N, [&](int64_t n) { return bf16_to_float(row[n]); });
      }
    } else {
      std::fill(ob, ob + K, 0.f);
      for (int64_t n = 0; n < N; ++n) {
        const uint16_t* col = f + b * sb + n * sn;
        for (int64_t k = 0; k < K; ++k) ob[k] += bf16_to_float(col[k * sk]);
      }
    }
  }
}

}  // namespace fastcam::cpu
