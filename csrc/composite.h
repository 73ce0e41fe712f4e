// The forward of fastcam::attention_loss, shared by its composite kernel (composite.cpp,
// used below autograd: inference mode, fake tensors) and its autograd node (autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>

namespace fastcam {

// Features as the ops take them, [B, K, N] with stride 1 along N (NCHW) or K (channels-last,
// tokens); copied only when neither is (fastcam.reference.features_as_bkn does the same).
at::Tensor features_as_bkn(const at::Tensor& features);

// What one forward computes: the head's outputs in the accumulation dtype and the five terms.
struct AttentionLossParts {
  at::Tensor features;  // the [B, K, N] view the ops took
  at::Tensor logits, scores, cams;  // [B, C], [B, C, N], [B, C, N] (acc)
  at::Tensor terms;  // [5] (acc): loss, bce, distinct, consist, coherence
};

// Calls fastcam::cam_head and fastcam::attention_terms through the dispatcher (below autograd
// when the caller is).
AttentionLossParts attention_loss_parts(const at::Tensor& features, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& labels,
                                        const std::optional<at::Tensor>& label_mask, c10::string_view normalize,
                                        c10::string_view measure, double temperature, double eps, bool predicted,
                                        int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights);

// The maps as the API returns them: [B, C, H, W] for 4-D features, else [B, C, N] (a view).
inline at::Tensor maps_like_features(const at::Tensor& cams, const at::Tensor& features) {
  return features.dim() == 4 ? cams.view({cams.size(0), cams.size(1), features.size(2), features.size(3)}) : cams;
}

// The logits in the features' dtype (no aten::to call when they already are: below autograd, to()
// would return its input itself, which an op may not).
inline at::Tensor logits_like_features(const at::Tensor& logits, const at::Tensor& features) {
  return logits.scalar_type() == features.scalar_type() ? logits : logits.to(features.scalar_type());
}

}  // namespace fastcam
