// The loss terms of SPEC §2.3 on CUDA, from the logits and the normalized maps: masked BCE,
// class distinctiveness, spatial consistency and spatial coherence; the mirror of
// csrc/cpu/attention_terms.cpp.
//
// Everything stays on the device: the pair weights q, the normalizers (pair-weight totals,
// the number of known labels, sum q) and the terms' upstream gradients are computed and read
// by kernels, never by the host. The reductions are single-block kernels with a fixed tree
// order (block_sum), the per-map and per-pair work a thread per map or pair (overlap.cuh):
// no atomics, so every result is deterministic.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/map_math.h"
#include "common.cuh"
#include "launch.h"
#include "overlap.cuh"

namespace fastcam::cuda {
namespace {

// The group layouts of the two pairwise terms over cams [B, C, N] and q [B, C]:
// distinctiveness pairs the classes of an image, consistency the images of a class.
struct Grouping {
  int64_t G, P, map_sG, map_sP, q_sG, q_sP;
};
Grouping by_image(const TermsArgs& a) { return {a.B, a.C, a.C * a.N, a.N, a.C, 1}; }
Grouping by_class(const TermsArgs& a) { return {a.C, a.B, a.N, a.C * a.N, 1, a.C}; }

// Slots of the device scalars of the backward: [scale, den] per pairwise term, and
// [g_coherence, g_coherence / (sum q + eps)].
constexpr int kDistinctSlot = 0, kConsistSlot = 2, kCoherenceSlot = 4, kScalars = 8;

template <typename T>
struct Workspace {
  T* q;                // [B * C] pair weights
  MapStats<T>* stats;  // [B * C] per-map statistics
  T* overlaps;         // forward: [max(B C C, C B B)] overlaps of the pairwise terms
  T* rows;             // forward: [B C] their row sums (pair_rows_kernel)
  T* var;              // forward: [B * C] map variances
  T* scalars;          // backward: [kScalars]
  PairCoef<T>* coef;   // backward: [max(B C C, C B B)] pair coefficients of the pairwise terms
};

template <typename T>
Workspace<T> carve(Carver& c, const TermsArgs& a, bool backward) {
  Workspace<T> ws{};
  const int64_t maps = a.B * a.C;
  ws.q = c.take<T>(maps);
  const bool pairs = a.w_distinct != 0 || a.w_consist != 0;
  ws.stats = c.take<MapStats<T>>(pairs ? maps : 0);
  int64_t o = 0;  // pairs of the larger pairwise term
  if (a.w_distinct != 0) o = a.B * a.C * a.C;
  if (a.w_consist != 0 && a.C * a.B * a.B > o) o = a.C * a.B * a.B;
  if (backward) {
    ws.scalars = c.take<T>(kScalars);
    ws.coef = c.take<PairCoef<T>>(o);
  } else {
    ws.overlaps = c.take<T>(o);
    ws.rows = c.take<T>(pairs ? maps : 0);
    ws.var = c.take<T>(a.w_coherence != 0 ? maps : 0);
  }
  return ws;
}

__device__ __forceinline__ bool is_known(const void* y, const bool* mk, int64_t i) {
  return y != nullptr && (mk == nullptr || mk[i]);
}

// q = y where the label is known, else sigmoid(logit) (predicted) or 0.
template <typename T>
__global__ void class_weights_kernel(const T* __restrict__ x, const T* __restrict__ y, const bool* __restrict__ mk,
                                     bool predicted, int64_t n, T* __restrict__ q) {
  for (int64_t i = global_index(); i < n; i += global_stride())
    q[i] = is_known(y, mk, i) ? y[i] : (predicted ? sigmoid(x[i]) : T(0));
}

// --------------------------------------------------------------------------- forward

// res[1] = mean over the known entries of bce_with_logits (0 when none is known).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    bce_kernel(const T* __restrict__ x, const T* __restrict__ y, const bool* __restrict__ mk, int64_t n,
               T* __restrict__ res) {
  T total = 0;
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
    if (!is_known(y, mk, i)) continue;
    total += bce_with_logits(x[i], y[i]);
    ++count;
  }
  total = block_sum<kReduceThreads>(total);
  count = block_sum<kReduceThreads>(count);
  if (threadIdx.x == 0) res[1] = total / T(count > 0 ? count : 1);
}

// Sum over the groups of the off-diagonal pair weights q[g, p] q[g, r] (every thread gets it),
// as sum_p q_p (sum - q_p): (sum q)^2 - sum q^2 cancels, and nvcc's fused multiply-add kept its
// rounding residual where a single weight is nonzero (seen on an H200: a term of 2e-12 for 0).
template <typename T>
__device__ T pair_weight_total(const T* q, const Grouping& gr) {
  T part = 0;
  for (int64_t g = threadIdx.x; g < gr.G; g += kReduceThreads) {
    T sum = 0;
    for (int64_t p = 0; p < gr.P; ++p) sum += q[g * gr.q_sG + p * gr.q_sP];
    for (int64_t p = 0; p < gr.P; ++p) {
      const T x = q[g * gr.q_sG + p * gr.q_sP];
      part += x * (sum - x);
    }
  }
  return block_sum<kReduceThreads>(part);
}

// rows[g * P + p] = sum over r != p of w[g, p, r] O[g, p, r], w the off-diagonal pair weights
// q[g, p] q[g, r], O the overlaps [G, P, P]: a warp per row, in a fixed order. As on the CPU, a
// pair of zero weight is left out unless one of its maps is not finite (stats [G * P]), so that a
// zero weight never meets the NaN of an overlap of finite maps (eps = 0, a zero map).
template <typename T>
__global__ void __launch_bounds__(kPairWarps * 32)
    pair_rows_kernel(const T* __restrict__ o, const T* __restrict__ q, const MapStats<T>* __restrict__ stats,
                     Grouping gr, T* __restrict__ rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kPairWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= gr.G * gr.P) return;  // the whole warp
  const int64_t g = i / gr.P, p = i % gr.P;
  const T qp = q[g * gr.q_sG + p * gr.q_sP];
  const T* op = o + i * gr.P;
  const bool finite_p = finite_map(stats[i]);
  T part = 0;
  for (int64_t r = lane; r < gr.P; r += 32) {
    if (r == p) continue;
    const T w = qp * q[g * gr.q_sG + r * gr.q_sP];
    if (w == T(0) && finite_p && finite_map(stats[g * gr.P + r])) continue;
    part += w * op[r];
  }
  part = warp_sum(part);
  if (lane == 0) rows[i] = part;
}

// *res = sum w O / (sum w + eps) (distinctiveness) or sum w (1 - O) / (sum w + eps)
// (consistency), from pair_rows_kernel's row sums.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    pair_term_kernel(const T* __restrict__ rows, const T* __restrict__ q, Grouping gr, T eps, bool consist,
                     T* __restrict__ res) {
  const T den = pair_weight_total(q, gr);
  T part = 0;
  for (int64_t i = threadIdx.x; i < gr.G * gr.P; i += kReduceThreads) part += rows[i];
  const T weighted = block_sum<kReduceThreads>(part);
  // sum v (1 - O) = sum v - sum v O
  if (threadIdx.x == 0) *res = consist ? (den - weighted) / (den + eps) : weighted / (den + eps);
}

template <typename T>
__global__ void variance_kernel(const T* __restrict__ cams, int64_t maps, int64_t N, int64_t grid_h, int64_t grid_w,
                                T eps, T* __restrict__ var) {
  for (int64_t i = global_index(); i < maps; i += global_stride())
    var[i] = map_variance(cams + i * N, N, grid_h, grid_w, eps);
}

// res[4] = sum q var / (sum q + eps).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    coherence_term_kernel(const T* __restrict__ q, const T* __restrict__ var, int64_t n, T eps, T* __restrict__ res) {
  T num = 0, den = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) {
    num += q[i] * var[i];
    den += q[i];
  }
  num = block_sum<kReduceThreads>(num);
  den = block_sum<kReduceThreads>(den);
  if (threadIdx.x == 0) res[4] = num / (den + eps);
}

template <typename T>
__global__ void total_kernel(T w_bce, T w_distinct, T w_consist, T w_coherence, T* __restrict__ res) {
  res[0] = w_bce * res[1] + w_distinct * res[2] + w_consist * res[3] + w_coherence * res[4];
}

// -------------------------------------------------------------------------- backward

// The gradient of a term: directly (grad_terms[idx]) and through the total (grad_terms[0]).
template <typename T>
__device__ __forceinline__ T term_grad(const T* gt, int idx, T weight) {
  return gt[idx] + gt[0] * weight;
}

// gl[i] = g_bce (sigmoid(x) - y) / count where known (gl is zero-filled); nothing when g_bce = 0.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    bce_grad_kernel(const T* __restrict__ gt, T w_bce, const T* __restrict__ x, const T* __restrict__ y,
                    const bool* __restrict__ mk, int64_t n, T* __restrict__ gl) {
  long long count = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) count += is_known(y, mk, i) ? 1 : 0;
  count = block_sum<kReduceThreads>(count);
  const T g_bce = term_grad(gt, 1, w_bce);
  if (g_bce == T(0)) return;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads)
    if (is_known(y, mk, i)) gl[i] = g_bce * (sigmoid(x[i]) - y[i]) / T(count);
}

// scalars = [scale, den]: scale = +-(the term's gradient), den = total pair weight + eps.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    pair_scale_kernel(const T* __restrict__ q, Grouping gr, const T* __restrict__ gt, int idx, T weight, bool negate,
                      T eps, T* __restrict__ scalars) {
  const T den = pair_weight_total(q, gr) + eps;
  if (threadIdx.x == 0) {
    const T g = term_grad(gt, idx, weight);
    scalars[0] = negate ? -g : g;
    scalars[1] = den;
  }
}

// d/dO[g, p, r] of the term is scale q[g, p] q[g, r] / den off the diagonal (the CPU's go),
// and a map's gradient weight for the pair (p, r) is go[p, r] + go[r, p]. When the term's
// gradient is zero the whole term is skipped (skip()), as on the CPU.
template <typename T>
struct PairWeight {
  const T* q;
  int64_t q_sG, q_sP;
  const T* scalars;  // [scale, den], on the device
  __device__ __forceinline__ bool skip() const { return scalars[0] == T(0); }
  __device__ __forceinline__ T operator()(int64_t g, int64_t p, int64_t r) const {
    if (p == r) return T(0);
    const T scale = scalars[0];
    const T den = scalars[1];
    const T qp = q[g * q_sG + p * q_sP], qr = q[g * q_sG + r * q_sP];
    return scale * qp * qr / den + scale * qr * qp / den;
  }
};

// scalars = [g_coherence, g_coherence / (sum q + eps)].
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    coherence_scale_kernel(const T* __restrict__ q, int64_t n, const T* __restrict__ gt, T weight, T eps,
                           T* __restrict__ scalars) {
  T qsum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) qsum += q[i];
  qsum = block_sum<kReduceThreads>(qsum);
  if (threadIdx.x == 0) {
    const T g = term_grad(gt, 4, weight);
    scalars[0] = g;
    scalars[1] = g / (qsum + eps);
  }
}

template <typename T>
__global__ void variance_grad_kernel(const T* __restrict__ cams, const T* __restrict__ q, int64_t maps, int64_t N,
                                     int64_t grid_h, int64_t grid_w, T eps, const T* __restrict__ scalars,
                                     T* __restrict__ gc) {
  const T g_coh = scalars[0], scale = scalars[1];
  if (g_coh == T(0)) return;
  for (int64_t i = global_index(); i < maps; i += global_stride()) {
    const T* a = cams + i * N;
    // A zero weight is skipped only for a finite map: 0 * NaN is NaN, as on the CPU and in the reference.
    if (q[i] != T(0) || !finite_map(map_stats(a, N)))
      map_variance_grad(a, gc + i * N, N, grid_h, grid_w, eps, scale * q[i]);
  }
}

}  // namespace

size_t attention_terms_workspace_bytes(const TermsArgs& a, bool backward) {
  Carver c(nullptr);
  if (a.dbl) {
    carve<double>(c, a, backward);
  } else {
    carve<float>(c, a, backward);
  }
  return c.used();
}

cudaError_t attention_terms_forward(const TermsArgs& a, void* terms, void* workspace, cudaStream_t stream) {
  return dispatch_acc(a.dbl, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Carver c(workspace);
    const Workspace<T> ws = carve<T>(c, a, false);
    const T e = T(a.eps);
    const T* x = static_cast<const T*>(a.logits);
    const T* y = static_cast<const T*>(a.labels);
    const T* cams = static_cast<const T*>(a.cams);
    T* res = static_cast<T*>(terms);
    const int64_t maps = a.B * a.C;
    if (maps > 0) {
      class_weights_kernel<T><<<grid_for(maps, kMapThreads), kMapThreads, 0, stream>>>(x, y, a.mask, a.predicted,
                                                                                        maps, ws.q);
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    if (a.w_bce != 0) {
      bce_kernel<T><<<1, kReduceThreads, 0, stream>>>(x, y, a.mask, maps, res);
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    auto pair_term = [&](const Grouping& gr, bool consist) -> cudaError_t {
      const cudaError_t err = launch_overlap_forward<T>(cams, gr.G, gr.P, a.N, gr.map_sG, gr.map_sP, a.measure, e,
                                                        ws.stats, ws.overlaps, stream);
      if (err != cudaSuccess) return err;
      if (gr.G * gr.P > 0) {
        pair_rows_kernel<T><<<static_cast<unsigned>(ceil_div(gr.G * gr.P, kPairWarps)), kPairWarps * 32, 0,
                              stream>>>(ws.overlaps, ws.q, ws.stats, gr, ws.rows);
        FC_RETURN_IF_LAUNCH_ERROR();
      }
      pair_term_kernel<T><<<1, kReduceThreads, 0, stream>>>(ws.rows, ws.q, gr, e, consist, res + (consist ? 3 : 2));
      FC_RETURN_IF_LAUNCH_ERROR();
      return cudaSuccess;
    };
    if (a.w_distinct != 0) {
      const cudaError_t err = pair_term(by_image(a), false);
      if (err != cudaSuccess) return err;
    }
    if (a.w_consist != 0) {
      const cudaError_t err = pair_term(by_class(a), true);
      if (err != cudaSuccess) return err;
    }
    if (a.w_coherence != 0) {
      if (maps > 0) {
        variance_kernel<T><<<grid_for(maps, kMapThreads), kMapThreads, 0, stream>>>(cams, maps, a.N, a.grid_h,
                                                                                     a.grid_w, e, ws.var);
        FC_RETURN_IF_LAUNCH_ERROR();
      }
      coherence_term_kernel<T><<<1, kReduceThreads, 0, stream>>>(ws.q, ws.var, maps, e, res);
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    total_kernel<T><<<1, 1, 0, stream>>>(T(a.w_bce), T(a.w_distinct), T(a.w_consist), T(a.w_coherence), res);
    FC_RETURN_IF_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

cudaError_t attention_terms_backward(const TermsArgs& a, const void* grad_terms, void* grad_logits, void* grad_cams,
                                     void* workspace, cudaStream_t stream) {
  const int64_t maps = a.B * a.C;
  if (maps == 0) return cudaSuccess;  // both gradients are empty
  return dispatch_acc(a.dbl, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Carver c(workspace);
    const Workspace<T> ws = carve<T>(c, a, true);
    const T e = T(a.eps);
    const T* gt = static_cast<const T*>(grad_terms);
    const T* x = static_cast<const T*>(a.logits);
    const T* y = static_cast<const T*>(a.labels);
    const T* cams = static_cast<const T*>(a.cams);
    T* gc = static_cast<T*>(grad_cams);
    class_weights_kernel<T><<<grid_for(maps, kMapThreads), kMapThreads, 0, stream>>>(x, y, a.mask, a.predicted, maps,
                                                                                      ws.q);
    FC_RETURN_IF_LAUNCH_ERROR();
    if (a.w_bce != 0) {
      bce_grad_kernel<T><<<1, kReduceThreads, 0, stream>>>(gt, T(a.w_bce), x, y, a.mask, maps,
                                                           static_cast<T*>(grad_logits));
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    // Distinctiveness, then consistency (with 1 - O: the gradient's sign flips), accumulated
    // into grad_cams in that order, as on the CPU.
    auto pair_grads = [&](const Grouping& gr, int idx, double weight, bool negate, int slot) -> cudaError_t {
      T* scalars = ws.scalars + slot;
      pair_scale_kernel<T><<<1, kReduceThreads, 0, stream>>>(ws.q, gr, gt, idx, T(weight), negate, e, scalars);
      FC_RETURN_IF_LAUNCH_ERROR();
      return launch_overlap_backward<T>(PairWeight<T>{ws.q, gr.q_sG, gr.q_sP, scalars}, cams, gr.G, gr.P, a.N,
                                        gr.map_sG, gr.map_sP, a.measure, e, ws.stats, ws.coef, gc, stream);
    };
    if (a.w_distinct != 0) {
      const cudaError_t err = pair_grads(by_image(a), 2, a.w_distinct, false, kDistinctSlot);
      if (err != cudaSuccess) return err;
    }
    if (a.w_consist != 0) {
      const cudaError_t err = pair_grads(by_class(a), 3, a.w_consist, true, kConsistSlot);
      if (err != cudaSuccess) return err;
    }
    if (a.w_coherence != 0) {
      T* scalars = ws.scalars + kCoherenceSlot;
      coherence_scale_kernel<T><<<1, kReduceThreads, 0, stream>>>(ws.q, maps, gt, T(a.w_coherence), e, scalars);
      FC_RETURN_IF_LAUNCH_ERROR();
      variance_grad_kernel<T><<<grid_for(maps, kMapThreads), kMapThreads, 0, stream>>>(
          cams, ws.q, maps, a.N, a.grid_h, a.grid_w, e, scalars, gc);
      FC_RETURN_IF_LAUNCH_ERROR();
    }
    return cudaSuccess;
  });
}

}  // namespace fastcam::cuda
