// The loss terms of SPEC §2.3 on the CPU, from the logits and the normalized maps:
// masked BCE, class distinctiveness, spatial consistency and spatial coherence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "../common/options.h"
#include "overlap.h"

namespace fastcam::cpu {
namespace {

using Inputs = TermsInputs;

// Per-entry pair weights q and whether each entry's label is known.
template <typename T>
void class_weights(const Inputs& in, bool predicted, std::vector<T>& q, std::vector<char>& known) {
  const int64_t n = in.B * in.C;
  q.assign(n, T(0));
  known.assign(n, 0);
  const T* x = in.logits.const_data_ptr<T>();
  const T* y = in.labels.defined() ? in.labels.const_data_ptr<T>() : nullptr;
  const bool* mk = in.mask.defined() ? in.mask.const_data_ptr<bool>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    known[i] = y != nullptr && (mk == nullptr || mk[i]);
    q[i] = known[i] ? y[i] : (predicted ? sigmoid(x[i]) : T(0));
  }
}

// Sum over off-diagonal pairs of the weights v[g, p] v[g, q] within each group, as
// sum_p v_p (sum - v_p): (sum v)^2 - sum v^2 would cancel, and with one nonzero weight leave a
// rounding residual (which a fused multiply-add keeps) instead of 0.
template <typename T>
T pair_weight_total(const std::vector<T>& v, int64_t G, int64_t P, int64_t sG, int64_t sP) {
  T total = 0;
  for (int64_t g = 0; g < G; ++g) {
    T sum = 0;
    for (int64_t p = 0; p < P; ++p) sum += v[g * sG + p * sP];
    for (int64_t p = 0; p < P; ++p) {
      const T x = v[g * sG + p * sP];
      total += x * (sum - x);
    }
  }
  return total;
}

// The group layouts of the two pairwise terms over cams [B, C, N] and q [B, C]:
// distinctiveness pairs the classes of an image, consistency the images of a class.
struct Grouping {
  int64_t G, P, map_sG, map_sP, q_sG, q_sP;
};
Grouping by_image(const Inputs& in) { return {in.B, in.C, in.C * in.N, in.N, in.C, 1}; }
Grouping by_class(const Inputs& in) { return {in.C, in.B, in.N, in.C * in.N, 1, in.C}; }

// Dot and cosine overlaps of a group with many weighted maps are one GEMM (their Gram
// matrix) instead of a loop over pairs: an unlabeled image weighs every pair of classes.
constexpr int64_t kGemmMaps = 16;

bool gemm_measure(Measure m) { return m == Measure::Dot || m == Measure::Cosine; }

// The maps of group g whose pairs count, and whether the group's maps are all finite: every
// map if one is not (its NaN must reach the sum and every gradient of the group, as in the
// reference, where 0 * NaN is NaN) or if `all` (a NaN pair weight); else the maps of nonzero
// weight (a pair with a zero weight adds 0).
template <typename T>
std::vector<int64_t> active_maps(const std::vector<T>& q, const std::vector<MapStats<T>>& stats, const Grouping& gr,
                                 int64_t g, bool all, bool& finite) {
  finite = true;
  for (int64_t p = 0; p < gr.P; ++p) finite = finite && finite_map(stats[g * gr.P + p]);
  std::vector<int64_t> active;
  for (int64_t p = 0; p < gr.P; ++p)
    if (all || !finite || q[g * gr.q_sG + p * gr.q_sP] != T(0)) active.push_back(p);
  return active;
}

// The maps `active` of group g, gathered: [len(active), N] (a view when they are all of them).
at::Tensor gather_maps(const Inputs& in, const Grouping& gr, int64_t g, const std::vector<int64_t>& active) {
  const at::Tensor group =
      in.cams.as_strided({gr.P, in.N}, {gr.map_sP, 1}, in.cams.storage_offset() + g * gr.map_sG);
  if (int64_t(active.size()) == gr.P) return group;
  return group.index_select(0, at::tensor(c10::ArrayRef<int64_t>(active), at::kLong));
}

// overlap(map active[x], map active[y]) from the Gram matrix of the gathered maps.
template <typename T>
T gram_overlap(const T* gram, int64_t nz, int64_t x, int64_t y, Measure m, T eps, const MapStats<T>& sx,
               const MapStats<T>& sy) {
  const T d = gram[x * nz + y];
  return m == Measure::Dot ? d : d / (sx.norm * sy.norm + eps);
}

// The groups' maps that count (active_maps), and which groups take the Gram matrix: dot and
// cosine with many maps, all finite.
template <typename T>
struct GroupPlan {
  std::vector<std::vector<int64_t>> active;
  std::vector<char> dense;
  // (group, index into its active list) of every active map of the other groups
  std::vector<std::pair<int64_t, int64_t>> items;
};

template <typename T>
GroupPlan<T> plan_groups(const std::vector<T>& q, const std::vector<MapStats<T>>& stats, const Grouping& gr, Measure m,
                         bool all) {
  GroupPlan<T> plan;
  plan.active.resize(gr.G);
  plan.dense.assign(gr.G, 0);
  for (int64_t g = 0; g < gr.G; ++g) {
    bool finite = true;
    plan.active[g] = active_maps(q, stats, gr, g, all, finite);
    plan.dense[g] = gemm_measure(m) && finite && !all && int64_t(plan.active[g].size()) >= kGemmMaps;
    if (!plan.dense[g])
      for (int64_t x = 0; x < int64_t(plan.active[g].size()); ++x) plan.items.emplace_back(g, x);
  }
  return plan;
}

// sum over groups and off-diagonal pairs of q[g, p] q[g, r] overlap(map p, map r), over the
// active maps only (labeled images weigh only their positive classes), a group with many
// as one Gram matrix. Per-map partial sums added in a fixed order: the result does not depend
// on the threads.
template <typename T>
T weighted_overlap(const Inputs& in, const std::vector<T>& q, const Grouping& gr, Measure m, T eps) {
  const T* cams = in.cams.const_data_ptr<T>();
  const auto stats = all_map_stats(cams, gr.G, gr.P, in.N, gr.map_sG, gr.map_sP);
  const GroupPlan<T> plan = plan_groups(q, stats, gr, m, false);
  auto weight = [&](int64_t g, int64_t p) { return q[g * gr.q_sG + p * gr.q_sP]; };
  T total = 0;
  for (int64_t g = 0; g < gr.G; ++g) {
    if (!plan.dense[g]) continue;
    const auto& active = plan.active[g];
    const int64_t nz = int64_t(active.size());
    const at::Tensor maps = gather_maps(in, gr, g, active);
    const at::Tensor gram = at::mm(maps, maps.t()).contiguous();
    const T* gp = gram.const_data_ptr<T>();
    // Row sums on every thread (30k pairs at 174 classes), added in row order.
    std::vector<T> row(nz, T(0));
    at::parallel_for(0, nz, grain(8 * nz), [&](int64_t x0, int64_t x1) {
      for (int64_t x = x0; x < x1; ++x)
        for (int64_t y = x + 1; y < nz; ++y)
          row[x] += weight(g, active[x]) * weight(g, active[y]) *
                    gram_overlap(gp, nz, x, y, m, eps, stats[g * gr.P + active[x]], stats[g * gr.P + active[y]]);
    });
    T sum = 0;
    for (const T v : row) sum += v;
    total += T(2) * sum;
  }
  const int64_t items = int64_t(plan.items.size());
  std::vector<T> partial(items, T(0));
  at::parallel_for(0, items, grain(8 * in.N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [g, x] = plan.items[i];
      const auto& active = plan.active[g];
      const int64_t p = active[x];
      const T* a = cams + g * gr.map_sG + p * gr.map_sP;
      T sum = 0;
      for (int64_t y = x + 1; y < int64_t(active.size()); ++y) {  // symmetric: each pair once, counted twice
        const int64_t r = active[y];
        sum += weight(g, p) * weight(g, r) *
               overlap_value(a, cams + g * gr.map_sG + r * gr.map_sP, in.N, m, eps, stats[g * gr.P + p],
                             stats[g * gr.P + r]);
      }
      partial[i] = T(2) * sum;
    }
  });
  for (const T v : partial) total += v;
  return total;
}

// Gradient into grad (cams layout) of sum over pairs of c[p, r] overlap(map p, map r), with
// c[p, r] = scale q_p q_r / den for p != r (the weight of overlap(p, r) in the loss), over
// the active maps: a dense group through its Gram matrix, the others map by map (each task
// owns one map's gradient: no races, and no dependence on the thread count).
template <typename T>
void weighted_overlap_backward(const Inputs& in, const std::vector<T>& q, const Grouping& gr, Measure m, T eps, T scale,
                               T den, T* grad) {
  const T* cams = in.cams.const_data_ptr<T>();
  const auto stats = all_map_stats(cams, gr.G, gr.P, in.N, gr.map_sG, gr.map_sP);
  const bool all = !std::isfinite(den);  // a NaN weight: every pair's coefficient is NaN
  const GroupPlan<T> plan = plan_groups(q, stats, gr, m, all);
  auto weight = [&](int64_t g, int64_t p) { return q[g * gr.q_sG + p * gr.q_sP]; };
  // c[p, r] + c[r, p], each as the reference's pair weight matrix has it
  auto coefficient = [&](int64_t g, int64_t p, int64_t r) {
    const T qp = weight(g, p), qr = weight(g, r);
    return scale * qp * qr / den + scale * qr * qp / den;
  };
  for (int64_t g = 0; g < gr.G; ++g) {
    if (!plan.dense[g]) continue;
    const auto& active = plan.active[g];
    const int64_t nz = int64_t(active.size());
    const at::Tensor maps = gather_maps(in, gr, g, active);
    const at::Tensor gram = at::mm(maps, maps.t()).contiguous();
    const T* gp = gram.const_data_ptr<T>();
    // d/d map x of sum_{x,y} c[x, y] O(x, y) = M @ maps - along * maps (cosine), M @ maps (dot):
    // one GEMM, with -along on M's diagonal (c[x, x] is 0). The rows of M on every thread (30k
    // pairs at 174 classes), each row's sum in order.
    at::Tensor coef = at::empty({nz, nz}, maps.options());
    T* cp = coef.mutable_data_ptr<T>();
    at::parallel_for(0, nz, grain(8 * nz), [&](int64_t x0, int64_t x1) {
      for (int64_t x = x0; x < x1; ++x) {
        const MapStats<T>& sx = stats[g * gr.P + active[x]];
        T along = 0;
        for (int64_t y = 0; y < nz; ++y) {
          const T gs = x == y ? T(0) : coefficient(g, active[x], active[y]);
          if (m == Measure::Dot) {
            cp[x * nz + y] = gs;
            continue;
          }
          const MapStats<T>& sy = stats[g * gr.P + active[y]];
          const T d = sx.norm * sy.norm + eps;
          cp[x * nz + y] = gs / d;
          if (sx.norm > T(0)) along += gs * gp[x * nz + y] * sy.norm / (d * d * sx.norm);
        }
        cp[x * nz + x] -= along;
      }
    });
    if (nz == gr.P) {  // every map of the group, in order: added into grad by the GEMM itself
      at::Tensor out = at::from_blob(grad + g * gr.map_sG, {nz, in.N}, {gr.map_sP, 1}, maps.options());
      out.addmm_(coef, maps);
    } else {
      const at::Tensor gmaps = at::mm(coef, maps).contiguous();
      const T* gm = gmaps.const_data_ptr<T>();
      for (int64_t x = 0; x < nz; ++x) axpy(grad + g * gr.map_sG + active[x] * gr.map_sP, gm + x * in.N, T(1), in.N);
    }
  }
  at::parallel_for(0, int64_t(plan.items.size()), grain(8 * in.N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto [g, x] = plan.items[i];
      const auto& active = plan.active[g];
      const int64_t p = active[x];
      const T* a = cams + g * gr.map_sG + p * gr.map_sP;
      T* ga = grad + g * gr.map_sG + p * gr.map_sP;
      for (int64_t y = 0; y < int64_t(active.size()); ++y) {
        const int64_t r = active[y];
        if (r == p) continue;
        overlap_grad(a, cams + g * gr.map_sG + r * gr.map_sP, ga, in.N, m, eps, coefficient(g, p, r),
                     stats[g * gr.P + p], stats[g * gr.P + r]);
      }
    }
  });
}

// A double as Python's repr() writes it: the shortest digits that read back to the same
// value, in fixed notation for decimal exponents -4..15 and scientific ("1e-09") otherwise.
std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // "-d.ddde+XX"
  const size_t e_at = sci.find('e');
  const int exponent = std::stoi(sci.substr(e_at + 1));
  const bool negative = sci[0] == '-';
  std::string digits;
  for (size_t i = negative ? 1 : 0; i < e_at; ++i)
    if (sci[i] != '.') digits += sci[i];
  std::string out = negative ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    out += digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    const std::string mag = std::to_string(std::abs(exponent));
    return out + "e" + (exponent < 0 ? "-" : "+") + (mag.size() < 2 ? "0" + mag : mag);
  }
  if (exponent < 0) return out + "0." + std::string(-exponent - 1, '0') + digits;
  if (int64_t(digits.size()) <= exponent + 1) return out + digits + std::string(exponent + 1 - digits.size(), '0') + ".0";
  return out + digits.substr(0, exponent + 1) + "." + digits.substr(exponent + 1);
}

// Known labels must lie in [0, 1] (NaN does not). Checked here, on the labels as given, for
// CPU tensors: fastcam.functional leaves this check to the cpu backend's kernel (a dozen small
// tensor ops less per step) and raises the same ValueError, with the same message, elsewhere.
void check_known_labels(const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& label_mask) {
  if (!labels.has_value() || labels->scalar_type() == at::kBool || labels->dim() != 2) return;
  const at::Tensor y = labels->contiguous();
  const at::Tensor m = label_mask.has_value() ? label_mask->contiguous() : at::Tensor();
  if (m.defined() && (m.scalar_type() != at::kBool || m.sizes() != y.sizes())) return;  // prepare_terms says why
  int64_t count = 0, first = -1;
  double first_value = 0;
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "fastcam_check_labels", [&] {
    const scalar_t* p = y.const_data_ptr<scalar_t>();
    const bool* mk = m.defined() ? m.const_data_ptr<bool>() : nullptr;
    for (int64_t i = 0; i < y.numel(); ++i) {
      const double v = static_cast<double>(p[i]);
      if ((mk && !mk[i]) || (v >= 0 && v <= 1)) continue;
      if (first < 0) first = i, first_value = v;
      ++count;
    }
  });
  if (count == 0) return;
  const int64_t C = y.size(1);
  const std::string value = at::isIntegralType(y.scalar_type(), false)
                                ? std::to_string(static_cast<int64_t>(first_value))
                                : python_float_repr(first_value);
  TORCH_CHECK_VALUE(false, "labels must lie in [0, 1] where known (label_mask True); ", count,
                    " known entries do not, e.g. labels[", first / C, ", ", first % C, "] = ", value);
}

at::Tensor attention_terms_cpu(const at::Tensor& logits, const at::Tensor& cams, const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& label_mask, c10::string_view measure, double eps,
                               bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  check_known_labels(labels, label_mask);
  const Inputs in = prepare_terms(logits, cams, labels, label_mask);
  const Measure m = parse_measure(std::string(measure));
  const TermWeights w = parse_weights(weights);
  at::Tensor out = at::zeros({5}, in.cams.options());
  AT_DISPATCH_FLOATING_TYPES(in.cams.scalar_type(), "fastcam_attention_terms_cpu", [&] {
    using T = scalar_t;
    const T e = T(eps);
    std::vector<T> q;
    std::vector<char> known;
    class_weights<T>(in, predicted, q, known);
    T* res = out.mutable_data_ptr<T>();
    if (w.bce != 0) {
      const T* x = in.logits.const_data_ptr<T>();
      const T* y = in.labels.defined() ? in.labels.const_data_ptr<T>() : nullptr;
      T total = 0;
      int64_t count = 0;
      for (int64_t i = 0; i < in.B * in.C; ++i) {
        if (!known[i]) continue;
        total += bce_with_logits(x[i], y[i]);
        ++count;
      }
      res[1] = total / T(count > 0 ? count : 1);
    }
    if (w.distinct != 0) {
      const Grouping gr = by_image(in);
      res[2] = weighted_overlap(in, q, gr, m, e) / (pair_weight_total(q, gr.G, gr.P, gr.q_sG, gr.q_sP) + e);
    }
    if (w.consist != 0) {
      const Grouping gr = by_class(in);
      const T den = pair_weight_total(q, gr.G, gr.P, gr.q_sG, gr.q_sP);
      // sum v (1 - O) = sum v - sum v O
      res[3] = (den - weighted_overlap(in, q, gr, m, e)) / (den + e);
    }
    if (w.coherence != 0) {
      const T* c = in.cams.const_data_ptr<T>();
      std::vector<T> var(in.B * in.C);
      at::parallel_for(0, in.B * in.C, grain(8 * in.N), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) var[i] = map_variance(c + i * in.N, in.N, grid_h, grid_w, e);
      });
      T num = 0, den = 0;
      for (int64_t i = 0; i < in.B * in.C; ++i) {
        num += q[i] * var[i];
        den += q[i];
      }
      res[4] = num / (den + e);
    }
    res[0] = T(w.bce) * res[1] + T(w.distinct) * res[2] + T(w.consist) * res[3] + T(w.coherence) * res[4];
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_terms_backward_cpu(
    const at::Tensor& grad_terms, const at::Tensor& logits, const at::Tensor& cams,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& label_mask, c10::string_view measure,
    double eps, bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  const Inputs in = prepare_terms(logits, cams, labels, label_mask);
  const Measure m = parse_measure(std::string(measure));
  const TermWeights w = parse_weights(weights);
  const at::Tensor gt = grad_terms.to(in.cams.scalar_type()).contiguous();
  TORCH_CHECK(gt.numel() == 5, "fastcam::attention_terms_backward: grad_terms must have 5 values");
  at::Tensor grad_logits = at::zeros_like(in.logits), grad_cams = at::zeros_like(in.cams);
  AT_DISPATCH_FLOATING_TYPES(in.cams.scalar_type(), "fastcam_attention_terms_bwd_cpu", [&] {
    using T = scalar_t;
    const T e = T(eps);
    const T* g = gt.const_data_ptr<T>();
    // Each term's gradient: directly, and through the total.
    const T g_bce = g[1] + g[0] * T(w.bce), g_dist = g[2] + g[0] * T(w.distinct);
    const T g_cons = g[3] + g[0] * T(w.consist), g_coh = g[4] + g[0] * T(w.coherence);
    std::vector<T> q;
    std::vector<char> known;
    class_weights<T>(in, predicted, q, known);
    const T* c = in.cams.const_data_ptr<T>();
    T* gc = grad_cams.mutable_data_ptr<T>();
    if (w.bce != 0 && g_bce != T(0)) {
      const T* x = in.logits.const_data_ptr<T>();
      const T* y = in.labels.defined() ? in.labels.const_data_ptr<T>() : nullptr;
      int64_t count = 0;
      for (int64_t i = 0; i < in.B * in.C; ++i) count += known[i];
      T* gl = grad_logits.mutable_data_ptr<T>();
      for (int64_t i = 0; i < in.B * in.C; ++i)
        if (known[i]) gl[i] = g_bce * (sigmoid(x[i]) - y[i]) / T(count);
    }
    // d/dO of sum w O / (sum w + eps) is w / (sum w + eps), scaled by the term's gradient;
    // consistency has 1 - O, hence the minus sign.
    auto pair_grads = [&](const Grouping& gr, T scale) {
      const T den = pair_weight_total(q, gr.G, gr.P, gr.q_sG, gr.q_sP) + e;
      weighted_overlap_backward<T>(in, q, gr, m, e, scale, den, gc);
    };
    if (w.distinct != 0 && g_dist != T(0)) pair_grads(by_image(in), g_dist);
    if (w.consist != 0 && g_cons != T(0)) pair_grads(by_class(in), -g_cons);
    if (w.coherence != 0 && g_coh != T(0)) {
      T qsum = 0;
      for (int64_t i = 0; i < in.B * in.C; ++i) qsum += q[i];
      const T scale = g_coh / (qsum + e);
      at::parallel_for(0, in.B * in.C, grain(8 * in.N), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          if (q[i] != T(0) || !finite_map(map_stats(c + i * in.N, in.N)))  // 0 * NaN is NaN, as in the reference
            map_variance_grad(c + i * in.N, gc + i * in.N, in.N, grid_h, grid_w, e, scale * q[i]);
      });
    }
  });
  return {grad_logits, grad_cams};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CPU, m) {
  m.impl("attention_terms", &attention_terms_cpu);
  m.impl("attention_terms_backward", &attention_terms_backward_cpu);
}

}  // namespace fastcam::cpu
