// attention_loss as one op: the head and the loss terms with the views and casts around them,
// so that a training step makes one call from Python instead of a dozen. Registered as
// CompositeImplicitAutograd: autograd runs through cam_head's and attention_terms' own
// autograd, and torch.compile traces the two ops (with their fake kernels).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastcam {
namespace {

using OptTensor = std::optional<at::Tensor>;

// Features as the ops take them, [B, K, N] with stride 1 along N (NCHW) or K (channels-last,
// tokens); copied only when neither is (fastcam.reference.features_as_bkn does the same).
at::Tensor features_as_bkn(const at::Tensor& features) {
  at::Tensor f = features.dim() == 4 ? features.flatten(2) : features.transpose(1, 2);
  if (f.stride(2) != 1 && f.stride(1) != 1 && f.size(2) != 1 && f.size(1) != 1) f = f.contiguous();
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_loss(
    const at::Tensor& features, const at::Tensor& weight, const OptTensor& bias, const OptTensor& labels,
    const OptTensor& label_mask, c10::string_view normalize, c10::string_view measure, double temperature, double eps,
    bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  static auto head = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastcam::cam_head", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const OptTensor&, c10::string_view, double, double)>();
  static auto terms_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastcam::attention_terms", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, c10::string_view,
                            double, bool, int64_t, int64_t, c10::ArrayRef<double>)>();
  auto [logits, scores, cams] = head.call(features_as_bkn(features), weight, bias, normalize, temperature, eps);
  // labels as given: the kernels cast them (the CPU kernel checks their range first).
  const at::Tensor terms =
      terms_op.call(logits, cams, labels, label_mask, measure, eps, predicted, grid_h, grid_w, weights);
  const auto t = terms.unbind();
  const at::Tensor maps = features.dim() == 4 ? cams.unflatten(-1, {features.size(2), features.size(3)}) : cams;
  return {t[0], t[1], t[2], t[3], t[4], logits.to(features.scalar_type()), maps};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CompositeImplicitAutograd, m) { m.impl("attention_loss", &attention_loss); }

}  // namespace fastcam
