// Pairwise overlaps of groups of maps on the CPU, shared by pairwise_overlap (groups = images)
// and attention_terms (groups = images for distinctiveness, classes for consistency).
// Map p of group g starts at cams + g * sG + p * sP and has N contiguous values.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "../common/map_math.h"
#include "parallel.h"
#include "vec.h"

namespace fastcam::cpu {

// overlap(a, b) with the dot products of cosine and dot vectorized.
template <typename T>
T overlap_value(const T* a, const T* b, int64_t n, Measure m, T eps, MapStats<T> sa, MapStats<T> sb) {
  if (m == Measure::Dot || m == Measure::Cosine) {
    const T d = dot(a, b, n);
    return m == Measure::Dot ? d : d / (sa.norm * sb.norm + eps);
  }
  return overlap_pair(a, b, n, m, eps, sa, sb);
}

// ga += g * d overlap(a, b) / da, with the same vectorized special cases.
template <typename T>
void overlap_grad(const T* a, const T* b, T* ga, int64_t n, Measure m, T eps, T g, MapStats<T> sa, MapStats<T> sb) {
  if (m == Measure::Dot) {
    axpy(ga, b, g, n);
  } else if (m == Measure::Cosine) {
    const T den = sa.norm * sb.norm + eps;
    axpy(ga, b, g / den, n);
    if (sa.norm > T(0)) axpy(ga, a, -g * dot(a, b, n) * sb.norm / (den * den * sa.norm), n);
  } else {
    overlap_pair_grad_a(a, b, ga, n, m, eps, g, sa, sb);
  }
}

// A map whose sums are not finite (NaN or Inf inside): its pairs are never skipped for a
// zero weight, since 0 * NaN is NaN in the reference too.
template <typename T>
bool finite_map(const MapStats<T>& s) {
  return std::isfinite(s.sum) && std::isfinite(s.norm);
}

template <typename T>
std::vector<MapStats<T>> all_map_stats(const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP) {
  std::vector<MapStats<T>> stats(G * P);
  at::parallel_for(0, G * P, grain(2 * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) stats[i] = map_stats(cams + (i / P) * sG + (i % P) * sP, N);
  });
  return stats;
}

// out[g, p, q] = overlap(map p, map q) for every group, out contiguous [G, P, P].
template <typename T>
void overlap_forward(const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP, Measure m, T eps,
                     T* out) {
  const auto stats = all_map_stats(cams, G, P, N, sG, sP);
  at::parallel_for(0, G * P, grain(P * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / P, p = i % P;
      const T* a = cams + g * sG + p * sP;
      for (int64_t q = p; q < P; ++q) {  // the measures are symmetric: one triangle
        const T v = overlap_value(a, cams + g * sG + q * sP, N, m, eps, stats[i], stats[g * P + q]);
        out[(g * P + p) * P + q] = v;
        out[(g * P + q) * P + p] = v;
      }
    }
  });
}

// grad[map p] += sum_q (gout[g, p, q] + gout[g, q, p]) * d overlap(map p, map q) / d map p.
// Each task owns one map's gradient: no races, and no dependence on the thread count.
// `stats`: the maps' all_map_stats when the caller has them already.
template <typename T>
void overlap_backward(const T* gout, const T* cams, int64_t G, int64_t P, int64_t N, int64_t sG, int64_t sP,
                      Measure m, T eps, T* grad, const std::vector<MapStats<T>>* known_stats = nullptr) {
  const auto stats = known_stats ? *known_stats : all_map_stats(cams, G, P, N, sG, sP);
  at::parallel_for(0, G * P, grain(P * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / P, p = i % P;
      const T* a = cams + g * sG + p * sP;
      T* ga = grad + g * sG + p * sP;
      for (int64_t q = 0; q < P; ++q) {
        const T w = gout[(g * P + p) * P + q] + gout[(g * P + q) * P + p];
        if (w == T(0) && finite_map(stats[i]) && finite_map(stats[g * P + q])) continue;
        overlap_grad(a, cams + g * sG + q * sP, ga, N, m, eps, w, stats[i], stats[g * P + q]);
      }
    }
  });
}

}  // namespace fastcam::cpu
