// Autograd of the fastcam ops, in C++ (registered for the Autograd key, so for CPU and CUDA
// alike): each forward op saves what its backward op needs, and the backward op computes
// every input gradient in one call. Doing this in C++ rather than in Python keeps the
// per-step overhead small. Double backward raises (fastcam/_ops.py registers the backward
// ops' own autograd as an error; a backward without create_graph calls them below it),
// instead of returning wrong values.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "composite.h"

namespace fastcam {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// f(), a backward op's call in a backward. The backward ops' own autograd (fastcam/_ops.py)
// exists only to refuse a double backward, so without create_graph (grad mode off) the call
// goes below autograd and skips that Python kernel (~9 us a call, two calls a step).
template <typename F>
auto unless_create_graph_below_autograd(F&& f) {
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (!at::GradMode::is_enabled()) below.emplace();
  return f();
}

// ------------------------------------------------------------------------------ cam_head

class CamHead : public Function<CamHead> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const OptTensor& bias, c10::string_view normalize, double temperature, double eps) {
    static auto fwd = op<Tensor3(const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double,
                                 double)>("fastcam::cam_head");
    at::AutoDispatchBelowADInplaceOrView below;
    auto [logits, scores, cams] = fwd.call(features, weight, bias, normalize, temperature, eps);
    ctx->save_for_backward({features, weight, scores, cams});
    ctx->saved_data["normalize"] = std::string(normalize);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? int64_t(bias->scalar_type()) : int64_t(-1);
    ctx->mark_non_differentiable({scores});
    ctx->set_materialize_grads(false);
    return {logits, scores, cams};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<Tensor3(const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, c10::string_view, double, double,
                                 std::array<bool, 3>)>("fastcam::cam_head_backward");
    const auto saved = ctx->get_saved_variables();
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const bool has_bias = bias_dtype >= 0;
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    variable_list out(6);
    if (!grads[0].defined() && !grads[2].defined()) return out;
    const std::string normalize = ctx->saved_data["normalize"].toStringRef();
    auto [gf, gw, gb] = unless_create_graph_below_autograd([&] {
      return bwd.call(defined_or_none(grads[0]), defined_or_none(grads[2]), saved[0], saved[1], saved[2], saved[3],
                      normalize, ctx->saved_data["temperature"].toDouble(), ctx->saved_data["eps"].toDouble(), mask);
    });
    if (mask[0]) out[0] = gf;
    if (mask[1]) out[1] = gw.to(saved[1].scalar_type());
    if (mask[2]) out[2] = gb.to(c10::ScalarType(bias_dtype));
    return out;
  }
};

Tensor3 cam_head_autograd(const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias,
                          c10::string_view normalize, double temperature, double eps) {
  auto out = CamHead::apply(features, weight, bias, normalize, temperature, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------- pairwise_overlap

class PairwiseOverlap : public Function<PairwiseOverlap> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& cams, c10::string_view measure, double eps) {
    static auto fwd = op<at::Tensor(const at::Tensor&, c10::string_view, double)>("fastcam::pairwise_overlap");
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({cams});
    ctx->saved_data["measure"] = std::string(measure);
    ctx->saved_data["eps"] = eps;
    return {fwd.call(cams, measure, eps)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double)>(
        "fastcam::pairwise_overlap_backward");
    const std::string measure = ctx->saved_data["measure"].toStringRef();
    at::Tensor grad = unless_create_graph_below_autograd(
        [&] { return bwd.call(grads[0], ctx->get_saved_variables()[0], measure, ctx->saved_data["eps"].toDouble()); });
    return {grad, at::Tensor(), at::Tensor()};
  }
};

at::Tensor pairwise_overlap_autograd(const at::Tensor& cams, c10::string_view measure, double eps) {
  return PairwiseOverlap::apply(cams, measure, eps)[0];
}

// ----------------------------------------------------------------------- attention_terms

using TermsSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                                  c10::string_view, double, bool, int64_t, int64_t, c10::ArrayRef<double>);
using TermsBackwardSignature = Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                       const OptTensor&, c10::string_view, double, bool, int64_t, int64_t,
                                       c10::ArrayRef<double>);

class AttentionTerms : public Function<AttentionTerms> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& cams,
                               const OptTensor& labels, const OptTensor& label_mask, c10::string_view measure,
                               double eps, bool predicted, int64_t grid_h, int64_t grid_w,
                               c10::ArrayRef<double> weights) {
    static auto fwd = op<TermsSignature>("fastcam::attention_terms");
    at::AutoDispatchBelowADInplaceOrView below;
    const at::Tensor terms = fwd.call(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w,
                                      weights);
    ctx->save_for_backward({logits, cams, labels.value_or(at::Tensor()), label_mask.value_or(at::Tensor())});
    ctx->saved_data["measure"] = std::string(measure);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["predicted"] = predicted;
    ctx->saved_data["grid_h"] = grid_h;
    ctx->saved_data["grid_w"] = grid_w;
    ctx->saved_data["weights"] = std::vector<double>(weights.begin(), weights.end());
    return {terms};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op<TermsBackwardSignature>("fastcam::attention_terms_backward");
    const auto saved = ctx->get_saved_variables();
    const std::string measure = ctx->saved_data["measure"].toStringRef();
    const std::vector<double> weights = ctx->saved_data["weights"].toDoubleVector();
    auto [gl, gc] = unless_create_graph_below_autograd([&] {
      return bwd.call(grads[0], saved[0], saved[1], defined_or_none(saved[2]), defined_or_none(saved[3]), measure,
                      ctx->saved_data["eps"].toDouble(), ctx->saved_data["predicted"].toBool(),
                      ctx->saved_data["grid_h"].toInt(), ctx->saved_data["grid_w"].toInt(), weights);
    });
    variable_list out(10);
    if (ctx->needs_input_grad(0)) out[0] = gl.to(saved[0].scalar_type());
    if (ctx->needs_input_grad(1)) out[1] = gc;
    return out;
  }
};

at::Tensor attention_terms_autograd(const at::Tensor& logits, const at::Tensor& cams, const OptTensor& labels,
                                    const OptTensor& label_mask, c10::string_view measure, double eps, bool predicted,
                                    int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  return AttentionTerms::apply(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w,
                               weights)[0];
}

// ----------------------------------------------------------------------- attention_loss

// The whole loss as one autograd node: its backward calls attention_terms_backward and
// cam_head_backward directly, with the gradients that reach the returned logits and maps added
// in between. One node instead of the five a composite makes (the head, the terms, the unbind of
// the terms, the logits' cast, the maps' view): less per-step overhead in the autograd engine.
class AttentionLoss : public Function<AttentionLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& labels, const OptTensor& label_mask,
                               c10::string_view normalize, c10::string_view measure, double temperature, double eps,
                               bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
    at::AutoDispatchBelowADInplaceOrView below;
    const AttentionLossParts p = attention_loss_parts(features, weight, bias, labels, label_mask, normalize, measure,
                                                      temperature, eps, predicted, grid_h, grid_w, weights);
    ctx->save_for_backward({p.features, weight, p.scores, p.cams, p.logits, labels.value_or(at::Tensor()),
                            label_mask.value_or(at::Tensor())});
    ctx->saved_data["normalize"] = std::string(normalize);
    ctx->saved_data["measure"] = std::string(measure);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["predicted"] = predicted;
    ctx->saved_data["grid_h"] = grid_h;
    ctx->saved_data["grid_w"] = grid_w;
    ctx->saved_data["weights"] = std::vector<double>(weights.begin(), weights.end());
    ctx->saved_data["bias_dtype"] = bias.has_value() ? int64_t(bias->scalar_type()) : int64_t(-1);
    ctx->saved_data["features_shape"] = features.sizes().vec();
    ctx->set_materialize_grads(false);
    const auto t = p.terms.unbind();
    return {t[0], t[1], t[2], t[3], t[4], logits_like_features(p.logits, features), maps_like_features(p.cams, features)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto terms_bwd = op<TermsBackwardSignature>("fastcam::attention_terms_backward");
    static auto head_bwd = op<Tensor3(const OptTensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, c10::string_view, double, double,
                                      std::array<bool, 3>)>("fastcam::cam_head_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &f = saved[0], &weight = saved[1], &scores = saved[2], &cams = saved[3], &logits = saved[4];
    variable_list out(13);
    // dL/dlogits and dL/dcams [B, C, N] (acc): through the terms, plus what reached the outputs.
    at::Tensor gl, gc;
    bool any_term = false;
    for (int i = 0; i < 5; ++i) any_term = any_term || grads[i].defined();
    if (any_term) {
      // The terms' gradients in one vector, zero where none reached a term (one fill and a copy
      // per defined gradient: a stack of five converted scalars cost ~15 us a step on a CPU).
      const at::Tensor grad_terms = at::zeros({5}, cams.options());
      for (int i = 0; i < 5; ++i)
        if (grads[i].defined()) grad_terms.select(0, i).copy_(grads[i]);
      const std::string measure = ctx->saved_data["measure"].toStringRef();
      const std::vector<double> weights = ctx->saved_data["weights"].toDoubleVector();
      std::tie(gl, gc) = unless_create_graph_below_autograd([&] {
        return terms_bwd.call(grad_terms, logits, cams, defined_or_none(saved[5]), defined_or_none(saved[6]), measure,
                              ctx->saved_data["eps"].toDouble(), ctx->saved_data["predicted"].toBool(),
                              ctx->saved_data["grid_h"].toInt(), ctx->saved_data["grid_w"].toInt(), weights);
      });
    }
    if (grads[5].defined()) gl = gl.defined() ? gl.add(grads[5]) : grads[5].to(logits.scalar_type());
    if (grads[6].defined()) {
      const at::Tensor g = grads[6].reshape(cams.sizes());
      gc = gc.defined() ? gc.add(g) : g.to(cams.scalar_type());
    }
    if (!gl.defined() && !gc.defined()) return out;
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      bias_dtype >= 0 && ctx->needs_input_grad(2)};
    if (!mask[0] && !mask[1] && !mask[2]) return out;
    const std::string normalize = ctx->saved_data["normalize"].toStringRef();
    auto [gf, gw, gb] = unless_create_graph_below_autograd([&] {
      return head_bwd.call(defined_or_none(gl), defined_or_none(gc), f, weight, scores, cams, normalize,
                           ctx->saved_data["temperature"].toDouble(), ctx->saved_data["eps"].toDouble(), mask);
    });
    if (mask[0]) {
      // gf has the [B, K, N] view's strides: back to the features' shape ([B, K, H, W] or [B, N, K]).
      const auto shape = ctx->saved_data["features_shape"].toIntVector();
      out[0] = shape.size() == 4 ? gf.view(shape) : gf.transpose(1, 2);
    }
    if (mask[1]) out[1] = gw.to(weight.scalar_type());
    if (mask[2]) out[2] = gb.to(c10::ScalarType(bias_dtype));
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_loss_autograd(
    const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias, const OptTensor& labels,
    const OptTensor& label_mask, c10::string_view normalize, c10::string_view measure, double temperature, double eps,
    bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  auto o = AttentionLoss::apply(features, weight, bias, labels, label_mask, normalize, measure, temperature, eps,
                                predicted, grid_h, grid_w, weights);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, Autograd, m) {
  m.impl("cam_head", &cam_head_autograd);
  m.impl("pairwise_overlap", &pairwise_overlap_autograd);
  m.impl("attention_terms", &attention_terms_autograd);
  m.impl("attention_loss", &attention_loss_autograd);
}

}  // namespace fastcam
