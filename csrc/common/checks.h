// Argument checks and input preparation shared by the CPU kernels and the CUDA bindings
// (host code with ATen; never included by a .cu file).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastcam {

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `t` (when defined) must be on `device`, like the op's other inputs.
inline void check_device(const at::Tensor& t, const at::Device& device, const char* op, const char* name) {
  if (!t.defined()) return;
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got ",
              t.device());
}

// features: a [B, K, N] view; weight: [C, K] on the same device.
inline void check_head(const at::Tensor& features, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(features.dim() == 3, op, ": features must be a [B, K, N] view, got ", features.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features.size(1), op, ": weight must be [C, K] with K = ",
              features.size(1), ", got ", weight.sizes());
  TORCH_CHECK(features.size(2) > 0, op, ": features have no positions");
  check_device(weight, features.device(), op, "weight");
}

// cams: [G, P, N], float32 or float64.
inline void check_cams(const at::Tensor& cams, const char* op) {
  TORCH_CHECK(cams.dim() == 3, op, ": cams must be [G, P, N], got ", cams.sizes());
  TORCH_CHECK(cams.scalar_type() == at::kFloat || cams.scalar_type() == at::kDouble, op,
              ": cams must be float32 or float64, got ", cams.scalar_type());
}

// The inputs of attention_terms(_backward): logits [B, C] and cams [B, C, N] contiguous in
// the accumulation dtype, labels [B, C] (acc) and label_mask [B, C] (bool) where given.
struct TermsInputs {
  at::Tensor logits, cams, labels, mask;
  int64_t B, C, N;
};

inline TermsInputs prepare_terms(const at::Tensor& logits, const at::Tensor& cams,
                                 const std::optional<at::Tensor>& labels,
                                 const std::optional<at::Tensor>& label_mask) {
  constexpr const char* op = "fastcam::attention_terms";
  TORCH_CHECK(cams.dim() == 3 && logits.dim() == 2 && logits.size(0) == cams.size(0) &&
                  logits.size(1) == cams.size(1),
              op, ": logits must be [B, C] and cams [B, C, N], got ", logits.sizes(), " and ", cams.sizes());
  check_cams(cams, op);
  const at::Device device = cams.device();
  check_device(logits, device, op, "logits");
  TermsInputs in;
  in.cams = cams.contiguous();
  in.logits = logits.to(in.cams.scalar_type()).contiguous();
  in.B = cams.size(0), in.C = cams.size(1), in.N = cams.size(2);
  if (labels.has_value()) {
    check_device(*labels, device, op, "labels");
    in.labels = labels->to(in.cams.scalar_type()).contiguous();
    TORCH_CHECK(in.labels.sizes() == logits.sizes(), op, ": labels must be [B, C]");
    if (label_mask.has_value()) {
      check_device(*label_mask, device, op, "label_mask");
      in.mask = label_mask->contiguous();
      TORCH_CHECK(in.mask.scalar_type() == at::kBool && in.mask.sizes() == logits.sizes(), op,
                  ": label_mask must be a bool [B, C] tensor");
    }
  }
  return in;
}

}  // namespace fastcam
