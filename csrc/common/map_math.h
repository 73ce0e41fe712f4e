// Per-map and per-pair math of SPEC §2, shared by the CPU and CUDA kernels.
//
// Everything here works on one map (N contiguous values) or one pair of maps, in the
// accumulation type T (float or double), and is written so that NaN propagates as in
// PyTorch: relu(NaN) = NaN, min/max with NaN = NaN. Gradients follow PyTorch's
// conventions: relu passes the gradient where its input is not <= 0 (NaN passes); min/max split it equally
// on ties; amax splits it equally among the tied maxima; the norm's gradient at 0 is 0.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FC_HD __host__ __device__ __forceinline__
#else
#define FC_HD inline
#endif

namespace fastcam {

// sum_{i < n} f(i). On the host with eight partial sums, so that the adds do not wait on
// each other's latency and the compiler can put them in vector lanes (a reduction with one
// accumulator runs at one add per ~4 cycles); in order on the device, where each thread
// sums its own map.
template <typename T, typename F>
FC_HD T sum_over(int64_t n, F f) {
#if defined(__CUDA_ARCH__)
  T total = 0;
  for (int64_t i = 0; i < n; ++i) total += f(i);
  return total;
#else
  T part[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += f(i + j);
  T total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) total += f(i);
  return total;
#endif
}

enum class Normalize : int { None = 0, Max = 1, Sum = 2, L2 = 3, Softmax = 4 };
enum class Measure : int { Cosine = 0, Dot = 1, SoftIoU = 2, Dice = 3, Intersection = 4 };

template <typename T>
FC_HD T relu(T x) {
  return x <= T(0) ? T(0) : x;  // NaN <= 0 is false: NaN stays NaN
}
template <typename T>
FC_HD T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}
template <typename T>
FC_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
// d min(a, b) / da and d max(a, b) / da, as torch.minimum / torch.maximum's backward.
template <typename T>
FC_HD T dmin_da(T a, T b) {
  return a == b ? T(0.5) : (a > b ? T(0) : T(1));
}
template <typename T>
FC_HD T dmax_da(T a, T b) {
  return a == b ? T(0.5) : (a < b ? T(0) : T(1));
}

// ------------------------------------------------------------------- normalization

// cam = normalize(s) over one map of n positions.
template <typename T>
FC_HD void normalize_forward(const T* s, T* cam, int64_t n, Normalize mode, T temperature, T eps) {
  if (mode == Normalize::Softmax) {
    T mx = s[0] / temperature;
    for (int64_t i = 1; i < n; ++i) mx = nan_max(mx, s[i] / temperature);
    T total = 0;
    for (int64_t i = 0; i < n; ++i) {
      cam[i] = std::exp(s[i] / temperature - mx);
      total += cam[i];
    }
    for (int64_t i = 0; i < n; ++i) cam[i] /= total;
    return;
  }
  T den = 1;
  if (mode == Normalize::Max) {
    T mx = relu(s[0]);
    for (int64_t i = 1; i < n; ++i) mx = nan_max(mx, relu(s[i]));
    den = mx + eps;
  } else if (mode == Normalize::Sum) {
    den = sum_over<T>(n, [&](int64_t i) { return relu(s[i]); }) + eps;
  } else if (mode == Normalize::L2) {
    den = std::sqrt(sum_over<T>(n, [&](int64_t i) {
      const T r = relu(s[i]);
      return r * r;
    })) + eps;
  }
  if (mode == Normalize::None) {
    for (int64_t i = 0; i < n; ++i) cam[i] = relu(s[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) cam[i] = relu(s[i]) / den;
  }
}

// gs = dL/ds of one map from gc = dL/dcam (s: the scores, cam: the forward's output).
template <typename T>
FC_HD void normalize_backward(const T* gc, const T* s, const T* cam, T* gs, int64_t n, Normalize mode,
                              T temperature, T eps) {
  const T dot = sum_over<T>(n, [&](int64_t i) { return gc[i] * cam[i]; });
  if (mode == Normalize::Softmax) {
    for (int64_t i = 0; i < n; ++i) gs[i] = cam[i] * (gc[i] - dot) / temperature;
    return;
  }
  if (mode == Normalize::None) {
    for (int64_t i = 0; i < n; ++i) gs[i] = s[i] <= T(0) ? T(0) : gc[i];
    return;
  }
  if (mode == Normalize::Sum) {
    const T den = sum_over<T>(n, [&](int64_t i) { return relu(s[i]); }) + eps;
    for (int64_t i = 0; i < n; ++i) gs[i] = s[i] <= T(0) ? T(0) : (gc[i] - dot) / den;
    return;
  }
  if (mode == Normalize::L2) {
    const T norm = std::sqrt(sum_over<T>(n, [&](int64_t i) {
      const T r = relu(s[i]);
      return r * r;
    }));
    const T den = norm + eps;
    const T along = norm > T(0) ? dot / norm : T(0);
    for (int64_t i = 0; i < n; ++i) gs[i] = s[i] <= T(0) ? T(0) : gc[i] / den - along * cam[i];
    return;
  }
  // Max: the gradient through the max goes to the tied maxima in equal shares.
  T mx = relu(s[0]);
  for (int64_t i = 1; i < n; ++i) mx = nan_max(mx, relu(s[i]));
  T ties = 0;
  for (int64_t i = 0; i < n; ++i) ties += relu(s[i]) == mx ? T(1) : T(0);
  const T den = mx + eps;
  const T through_max = ties > T(0) ? dot / den / ties : T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T g = gc[i] / den - (relu(s[i]) == mx ? through_max : T(0));
    gs[i] = s[i] <= T(0) ? T(0) : g;  // NaN passes, as in relu's backward
  }
}

// ------------------------------------------------------------------------ overlaps

// Per-map sums that the measures need: the L2 norm and the plain sum.
template <typename T>
struct MapStats {
  T norm;
  T sum;
};

template <typename T>
FC_HD MapStats<T> map_stats(const T* a, int64_t n) {
  const T sq = sum_over<T>(n, [&](int64_t i) { return a[i] * a[i]; });
  return {std::sqrt(sq), sum_over<T>(n, [&](int64_t i) { return a[i]; })};
}

template <typename T>
FC_HD T overlap_pair(const T* a, const T* b, int64_t n, Measure m, T eps, MapStats<T> sa, MapStats<T> sb) {
  if (m == Measure::Dot || m == Measure::Cosine) {
    const T dot = sum_over<T>(n, [&](int64_t i) { return a[i] * b[i]; });
    return m == Measure::Dot ? dot : dot / (sa.norm * sb.norm + eps);
  }
  const T inter = sum_over<T>(n, [&](int64_t i) { return nan_min(a[i], b[i]); });
  if (m == Measure::Intersection) return inter;
  if (m == Measure::SoftIoU) return inter / (sum_over<T>(n, [&](int64_t i) { return nan_max(a[i], b[i]); }) + eps);
  return T(2) * inter / (sa.sum + sb.sum + eps);  // Dice
}

// ga += g * d overlap(a, b) / da.
template <typename T>
FC_HD void overlap_pair_grad_a(const T* a, const T* b, T* ga, int64_t n, Measure m, T eps, T g, MapStats<T> sa,
                               MapStats<T> sb) {
  if (m == Measure::Dot) {
    for (int64_t i = 0; i < n; ++i) ga[i] += g * b[i];
    return;
  }
  if (m == Measure::Cosine) {
    const T dot = sum_over<T>(n, [&](int64_t i) { return a[i] * b[i]; });
    const T den = sa.norm * sb.norm + eps;
    const T along_a = sa.norm > T(0) ? g * dot * sb.norm / (den * den * sa.norm) : T(0);
    for (int64_t i = 0; i < n; ++i) ga[i] += g * b[i] / den - along_a * a[i];
    return;
  }
  if (m == Measure::Intersection) {
    for (int64_t i = 0; i < n; ++i) ga[i] += g * dmin_da(a[i], b[i]);
    return;
  }
  const T inter = sum_over<T>(n, [&](int64_t i) { return nan_min(a[i], b[i]); });
  if (m == Measure::SoftIoU) {
    const T uni = sum_over<T>(n, [&](int64_t i) { return nan_max(a[i], b[i]); });
    const T den = uni + eps;
    const T gi = g / den, gu = -g * inter / (den * den);
    for (int64_t i = 0; i < n; ++i) ga[i] += gi * dmin_da(a[i], b[i]) + gu * dmax_da(a[i], b[i]);
    return;
  }
  const T den = sa.sum + sb.sum + eps;  // Dice
  const T gi = T(2) * g / den, gs = -T(2) * g * inter / (den * den);
  for (int64_t i = 0; i < n; ++i) ga[i] += gi * dmin_da(a[i], b[i]) + gs;
}

// ----------------------------------------------------------------------- coherence

// Centre of position i on the unit square: ((row + 0.5) / H, (col + 0.5) / W), row-major.
template <typename T>
FC_HD void grid_position(int64_t i, int64_t grid_w, int64_t grid_h, T& r, T& c) {
  r = (T(i / grid_w) + T(0.5)) / T(grid_h);
  c = (T(i % grid_w) + T(0.5)) / T(grid_w);
}

// Spatial variance of the distribution p = a / (sum a + eps).
template <typename T>
FC_HD T map_variance(const T* a, int64_t n, int64_t grid_h, int64_t grid_w, T eps) {
  T total = 0;
  for (int64_t i = 0; i < n; ++i) total += a[i];
  const T den = total + eps;
  T mr = 0, mc = 0;
  for (int64_t i = 0; i < n; ++i) {
    T r, c;
    grid_position(i, grid_w, grid_h, r, c);
    mr += a[i] / den * r;
    mc += a[i] / den * c;
  }
  T var = 0;
  for (int64_t i = 0; i < n; ++i) {
    T r, c;
    grid_position(i, grid_w, grid_h, r, c);
    var += a[i] / den * ((r - mr) * (r - mr) + (c - mc) * (c - mc));
  }
  return var;
}

// ga += g * d map_variance(a) / da.
template <typename T>
FC_HD void map_variance_grad(const T* a, T* ga, int64_t n, int64_t grid_h, int64_t grid_w, T eps, T g) {
  T total = 0;
  for (int64_t i = 0; i < n; ++i) total += a[i];
  const T den = total + eps;
  T mr = 0, mc = 0, mass = 0;
  for (int64_t i = 0; i < n; ++i) {
    T r, c;
    grid_position(i, grid_w, grid_h, r, c);
    const T p = a[i] / den;
    mr += p * r;
    mc += p * c;
    mass += p;
  }
  // d var / d p_i = |pos_i - mu|^2 - 2 (1 - sum p) pos_i . mu, then through p = a / den.
  T dot = 0;  // sum_i (d var / d p_i) p_i
  for (int64_t i = 0; i < n; ++i) {
    T r, c;
    grid_position(i, grid_w, grid_h, r, c);
    const T gp = (r - mr) * (r - mr) + (c - mc) * (c - mc) - T(2) * (T(1) - mass) * (r * mr + c * mc);
    dot += gp * a[i] / den;
  }
  for (int64_t i = 0; i < n; ++i) {
    T r, c;
    grid_position(i, grid_w, grid_h, r, c);
    const T gp = (r - mr) * (r - mr) + (c - mc) * (c - mc) - T(2) * (T(1) - mass) * (r * mr + c * mc);
    ga[i] += g * (gp - dot) / den;
  }
}

// ---------------------------------------------------------------------- BCE and q

// Binary cross-entropy with logits, in the stable form max(x, 0) - x y + log1p(exp(-|x|)).
template <typename T>
FC_HD T bce_with_logits(T x, T y) {
  return (x > T(0) ? x : T(0)) - x * y + std::log1p(std::exp(-std::fabs(x)));
}
template <typename T>
FC_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

}  // namespace fastcam
