// The loss terms of SPEC §2.3 on the CPU, from the logits and the normalized maps:
// masked BCE, class distinctiveness, spatial consistency and spatial coherence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../common/options.h"
#include "overlap.h"

namespace fastcam::cpu {
namespace {

struct Inputs {
  at::Tensor logits, cams, labels, mask;  // logits [B, C], cams [B, C, N] contiguous, acc dtype
  int64_t B, C, N;
};

Inputs prepare(const at::Tensor& logits, const at::Tensor& cams, const std::optional<at::Tensor>& labels,
               const std::optional<at::Tensor>& label_mask) {
  TORCH_CHECK(cams.dim() == 3 && logits.dim() == 2 && logits.size(0) == cams.size(0) &&
                  logits.size(1) == cams.size(1),
              "fastcam::attention_terms: logits must be [B, C] and cams [B, C, N], got ", logits.sizes(), " and ",
              cams.sizes());
  Inputs in;
  in.cams = cams.contiguous();
  in.logits = logits.to(in.cams.scalar_type()).contiguous();
  in.B = cams.size(0), in.C = cams.size(1), in.N = cams.size(2);
  if (labels.has_value()) {
    in.labels = labels->to(in.cams.scalar_type()).contiguous();
    TORCH_CHECK(in.labels.sizes() == logits.sizes(), "fastcam::attention_terms: labels must be [B, C]");
    if (label_mask.has_value()) {
      in.mask = label_mask->contiguous();
      TORCH_CHECK(in.mask.scalar_type() == at::kBool && in.mask.sizes() == logits.sizes(),
                  "fastcam::attention_terms: label_mask must be a bool [B, C] tensor");
    }
  }
  return in;
}

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

// Sum over off-diagonal pairs of the weights v[g, p] v[g, q] within each group.
template <typename T>
T pair_weight_total(const std::vector<T>& v, int64_t G, int64_t P, int64_t sG, int64_t sP) {
  T total = 0;
  for (int64_t g = 0; g < G; ++g) {
    T sum = 0, sq = 0;
    for (int64_t p = 0; p < P; ++p) {
      const T x = v[g * sG + p * sP];
      sum += x;
      sq += x * x;
    }
    total += sum * sum - sq;
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

// sum over groups and off-diagonal pairs of q[g, p] q[g, r] overlap(map p, map r), computing
// only the pairs of nonzero weight (labeled images weigh only their positive classes) or
// with a non-finite map (whose NaN must reach the sum, as in the reference).
// Per-map partial sums added in a fixed order: the result does not depend on the threads.
template <typename T>
T weighted_overlap(const Inputs& in, const std::vector<T>& q, const Grouping& gr, Measure m, T eps) {
  const T* cams = in.cams.const_data_ptr<T>();
  const auto stats = all_map_stats(cams, gr.G, gr.P, in.N, gr.map_sG, gr.map_sP);
  std::vector<T> partial(gr.G * gr.P, T(0));
  at::parallel_for(0, gr.G * gr.P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / gr.P, p = i % gr.P;
      const T qp = q[g * gr.q_sG + p * gr.q_sP];
      const T* a = cams + g * gr.map_sG + p * gr.map_sP;
      T sum = 0;
      for (int64_t r = p + 1; r < gr.P; ++r) {  // symmetric: each unordered pair once, counted twice
        const T w = qp * q[g * gr.q_sG + r * gr.q_sP];
        const MapStats<T>& sr = stats[g * gr.P + r];
        if (w == T(0) && finite_map(stats[i]) && finite_map(sr)) continue;
        sum += w * overlap_value(a, cams + g * gr.map_sG + r * gr.map_sP, in.N, m, eps, stats[i], sr);
      }
      partial[i] = T(2) * sum;
    }
  });
  T total = 0;
  for (const T v : partial) total += v;
  return total;
}

at::Tensor attention_terms_cpu(const at::Tensor& logits, const at::Tensor& cams, const std::optional<at::Tensor>& labels,
                               const std::optional<at::Tensor>& label_mask, c10::string_view measure, double eps,
                               bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  const Inputs in = prepare(logits, cams, labels, label_mask);
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
      at::parallel_for(0, in.B * in.C, 8, [&](int64_t begin, int64_t end) {
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
  const Inputs in = prepare(logits, cams, labels, label_mask);
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
      std::vector<T> go(gr.G * gr.P * gr.P, T(0));
      for (int64_t gi = 0; gi < gr.G; ++gi)
        for (int64_t p = 0; p < gr.P; ++p)
          for (int64_t r = 0; r < gr.P; ++r)
            if (p != r)
              go[(gi * gr.P + p) * gr.P + r] =
                  scale * q[gi * gr.q_sG + p * gr.q_sP] * q[gi * gr.q_sG + r * gr.q_sP] / den;
      overlap_backward<T>(go.data(), c, gr.G, gr.P, in.N, gr.map_sG, gr.map_sP, m, e, gc);
    };
    if (w.distinct != 0 && g_dist != T(0)) pair_grads(by_image(in), g_dist);
    if (w.consist != 0 && g_cons != T(0)) pair_grads(by_class(in), -g_cons);
    if (w.coherence != 0 && g_coh != T(0)) {
      T qsum = 0;
      for (int64_t i = 0; i < in.B * in.C; ++i) qsum += q[i];
      const T scale = g_coh / (qsum + e);
      at::parallel_for(0, in.B * in.C, 8, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          if (q[i] != T(0)) map_variance_grad(c + i * in.N, gc + i * in.N, in.N, grid_h, grid_w, e, scale * q[i]);
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
