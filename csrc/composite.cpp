// attention_loss as one op: the head and the loss terms with the views and casts around them,
// so that a training step makes one call from Python instead of a dozen. Its autograd is one
// node (autograd.cpp) whose backward calls the two backward ops directly; this composite kernel
// serves the calls below autograd (inference mode, fake tensors for torch.compile).
#include "composite.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace fastcam {

using OptTensor = std::optional<at::Tensor>;

at::Tensor features_as_bkn(const at::Tensor& features) {
  at::Tensor f = features.dim() == 4 ? features.flatten(2) : features.transpose(1, 2);
  if (f.stride(2) != 1 && f.stride(1) != 1 && f.size(2) != 1 && f.size(1) != 1) f = f.contiguous();
  return f;
}

AttentionLossParts attention_loss_parts(const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias,
                                        const OptTensor& labels, const OptTensor& label_mask,
                                        c10::string_view normalize, c10::string_view measure, double temperature,
                                        double eps, bool predicted, int64_t grid_h, int64_t grid_w,
                                        c10::ArrayRef<double> weights) {
  static auto head = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastcam::cam_head", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double, double)>();
  static auto terms_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcam::attention_terms", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, c10::string_view,
                            double, bool, int64_t, int64_t, c10::ArrayRef<double>)>();
  AttentionLossParts p;
  p.features = features_as_bkn(features);
  std::tie(p.logits, p.scores, p.cams) = head.call(p.features, weight, bias, normalize, temperature, eps);
  // labels as given: the kernels cast them (the CPU kernel checks their range first).
  p.terms = terms_op.call(p.logits, p.cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w, weights);
  return p;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_loss(
    const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias, const OptTensor& labels,
    const OptTensor& label_mask, c10::string_view normalize, c10::string_view measure, double temperature, double eps,
    bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  const AttentionLossParts p = attention_loss_parts(features, weight, bias, labels, label_mask, normalize, measure,
                                                    temperature, eps, predicted, grid_h, grid_w, weights);
  const auto t = p.terms.unbind();
  return {t[0], t[1], t[2], t[3], t[4], logits_like_features(p.logits, features), maps_like_features(p.cams, features)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CompositeExplicitAutograd, m) { m.impl("attention_loss", &attention_loss); }

}  // namespace fastcam
