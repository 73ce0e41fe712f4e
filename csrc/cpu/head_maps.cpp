#include "head_maps.h"

#include <algorithm>
#include <cstring>
#include <vector>

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
    int nonzero_g = 0;  // an OR over the row, which vectorizes (an early exit does not)
#pragma omp simd reduction(| : nonzero_g)
    for (int64_t n = 0; n < N; ++n) nonzero_g |= g_row[n] != T(0);  // NaN counts
    const bool zero = nonzero_g == 0;
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

// The features' storage types, read and written in the accumulation type. bf16 by its bits
// (rounded to nearest even, NaN kept a NaN, as c10::BFloat16 does): a form the compiler
// vectorizes.
inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(c10::BFloat16 x) { return bf16_to_float(x.x); }
inline float load(c10::Half x) { return float(x); }

inline void store(float* p, float x) { *p = x; }
inline void store(double* p, double x) { *p = x; }
inline void store(c10::BFloat16* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  p->x = bits;
}
inline void store(c10::Half* p, float x) { *p = c10::Half(x); }

// direct_image_backward (head_maps.h). kUnitN: positions contiguous (sn == dsn == 1, NCHW),
// the loops run along n; else along k (channels-last and tokens, sk == dsk == 1) or strided.
template <bool kUnitN, typename T, typename A>
void direct_rows(const T* f, int64_t sk, int64_t sn, T* df, int64_t dsk, int64_t dsn, int64_t K, int64_t N,
                 const A* w, const A* const* g, const int64_t* rows, int64_t nr, const A* v, A* dw, A* fsum,
                 int64_t k0, int64_t k1) {
  std::vector<A> tmp(N);
  const int64_t fn = kUnitN ? 1 : sn, dn = kUnitN ? 1 : dsn;
  for (int64_t k = k0; k < k1; ++k) {
    const T* fk = f + k * sk;
    if (fsum) {
      A total = 0;
#pragma omp simd reduction(+ : total)
      for (int64_t n = 0; n < N; ++n) total += load(fk[n * fn]);
      fsum[k] = total;
    }
    if (dw) {
      for (int64_t r = 0; r < nr; ++r) {
        const A* gr = g[r];
        A total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t n = 0; n < N; ++n) total += gr[n] * load(fk[n * fn]);
        dw[rows[r] * K + k] += total;
      }
    }
    if (df && nr == 0) {  // a constant row: converted once, then filled
      T value;
      store(&value, v ? v[k] : A(0));
      T* __restrict dk = df + k * dsk;
      for (int64_t n = 0; n < N; ++n) dk[n * dn] = value;
    } else if (df) {
      const A base = v ? v[k] : A(0);
      A* __restrict t = tmp.data();
      for (int64_t n = 0; n < N; ++n) t[n] = base;
      for (int64_t r = 0; r < nr; ++r) {
        const A a = w[rows[r] * K + k];
        const A* __restrict gr = g[r];
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) t[n] += a * gr[n];
      }
      T* dk = df + k * dsk;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) store(dk + n * dn, t[n]);
    }
  }
}

template <typename T, typename A>
void direct_columns(const T* f, int64_t sn, T* df, int64_t dsn, int64_t K, int64_t N, const A* w,
                    const A* const* g, const int64_t* rows, int64_t nr, const A* v, A* dw, A* fsum, int64_t k0,
                    int64_t k1) {
  const int64_t len = k1 - k0;
  std::vector<A> tmp(len);
  if (fsum) std::fill(fsum + k0, fsum + k1, A(0));
  // No weighted map: every position's dF is the same row v, converted once and copied.
  std::vector<T> constant(df && nr == 0 ? len : 0);
  for (int64_t k = 0; k < int64_t(constant.size()); ++k) store(&constant[k], v ? v[k0 + k] : A(0));
  for (int64_t n = 0; n < N; ++n) {
    const T* __restrict fn = f + n * sn + k0;
    if (fsum) {
      A* __restrict out = fsum + k0;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) out[k] += load(fn[k]);
    }
    for (int64_t r = 0; dw && r < nr; ++r) {
      const A gv = g[r][n];
      A* __restrict out = dw + rows[r] * K + k0;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) out[k] += gv * load(fn[k]);
    }
    if (!df) continue;
    if (nr == 0) {
      std::copy(constant.begin(), constant.end(), df + n * dsn + k0);
      continue;
    }
    A* __restrict t = tmp.data();
    for (int64_t k = 0; k < len; ++k) t[k] = v ? v[k0 + k] : A(0);
    for (int64_t r = 0; r < nr; ++r) {
      const A gv = g[r][n];
      const A* __restrict wr = w + rows[r] * K + k0;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) t[k] += gv * wr[k];
    }
    T* __restrict dn = df + n * dsn + k0;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) store(dn + k, t[k]);
  }
}

template <typename T, typename A>
void direct_impl(const T* f, int64_t sk, int64_t sn, T* df, int64_t dsk, int64_t dsn, int64_t K, int64_t N,
                 const A* w, const A* const* g, const int64_t* rows, int64_t nr, const A* v, A* dw, A* fsum,
                 int64_t k0, int64_t k1) {
  if ((sn == 1 && (!df || dsn == 1)) || N == 1)
    direct_rows<true>(f, sk, 1, df, dsk, 1, K, N, w, g, rows, nr, v, dw, fsum, k0, k1);
  else if (sk == 1 && (!df || dsk == 1))
    direct_columns(f, sn, df, dsn, K, N, w, g, rows, nr, v, dw, fsum, k0, k1);
  else
    direct_rows<false>(f, sk, sn, df, dsk, dsn, K, N, w, g, rows, nr, v, dw, fsum, k0, k1);
}

template <typename T, typename A>
void store_plus_impl(const A* p, int64_t rows, int64_t cols, int64_t ldp, const A* v, bool v_per_row, T* out,
                     int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const A* __restrict src = p + r * ldp;
    T* __restrict dst = out + r * ld;
    if (!v) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) store(dst + c, src[c]);
    } else if (v_per_row) {
      const A add = v[r];
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) store(dst + c, src[c] + add);
    } else {
      const A* __restrict vc = v;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) store(dst + c, src[c] + vc[c]);
    }
  }
}

}  // namespace

#define FC_STORE_PLUS(T, A)                                                                                      \
  FC_MULTIVERSION FC_FLATTEN void store_plus(const A* p, int64_t rows, int64_t cols, int64_t ldp, const A* v, \
                                             bool v_per_row, T* out, int64_t ld) {                             \
    store_plus_impl(p, rows, cols, ldp, v, v_per_row, out, ld);                                                \
  }
FC_FLOAT_ACC_TYPES(FC_STORE_PLUS)
#undef FC_STORE_PLUS
void store_plus(const double* p, int64_t rows, int64_t cols, int64_t ldp, const double* v, bool v_per_row,
                double* out, int64_t ld) {
  store_plus_impl(p, rows, cols, ldp, v, v_per_row, out, ld);
}

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

#define FC_DIRECT_BACKWARD(T, A)                                                                                \
  FC_MULTIVERSION FC_FLATTEN void direct_image_backward(                                                        \
      const T* f, int64_t sk, int64_t sn, T* df, int64_t dsk, int64_t dsn, int64_t K, int64_t N, const A* w,      \
      const A* const* g, const int64_t* rows, int64_t nr, const A* v, A* dw, A* fsum, int64_t k0, int64_t k1) {  \
    direct_impl(f, sk, sn, df, dsk, dsn, K, N, w, g, rows, nr, v, dw, fsum, k0, k1);                            \
  }
FC_FLOAT_ACC_TYPES(FC_DIRECT_BACKWARD)
#undef FC_DIRECT_BACKWARD
void direct_image_backward(const double* f, int64_t sk, int64_t sn, double* df, int64_t dsk, int64_t dsn, int64_t K,
                           int64_t N, const double* w, const double* const* g, const int64_t* rows, int64_t nr,
                           const double* v, double* dw, double* fsum, int64_t k0, int64_t k1) {
  direct_impl(f, sk, sn, df, dsk, dsn, K, N, w, g, rows, nr, v, dw, fsum, k0, k1);
}

}  // namespace fastcam::cpu
