// The loss terms of SPEC §2.3 on CUDA: the ATen binding (checks, outputs, stream) of the
// kernels in attention_terms.cu. Same checks, outputs and semantics as
// csrc/cpu/attention_terms.cpp; nothing here reads a device value.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../common/checks.h"
#include "../common/options.h"
#include "binding.h"
#include "launch.h"

namespace fastcam::cuda {
namespace {

constexpr const char* kOp = "fastcam::attention_terms";

using Inputs = TermsInputs;

TermsArgs terms_args(const Inputs& in, c10::string_view measure, double eps, bool predicted, int64_t grid_h,
                     int64_t grid_w, c10::ArrayRef<double> weights) {
  const TermWeights w = parse_weights(weights);
  TORCH_CHECK(w.coherence == 0 || (grid_h > 0 && grid_w > 0),
              "fastcam::attention_terms: the coherence term needs the positions' grid, got grid_h = ", grid_h,
              ", grid_w = ", grid_w);
  TermsArgs a{};
  a.logits = in.logits.const_data_ptr();
  a.cams = in.cams.const_data_ptr();
  a.labels = in.labels.defined() ? in.labels.const_data_ptr() : nullptr;
  a.mask = in.mask.defined() ? in.mask.const_data_ptr<bool>() : nullptr;
  a.dbl = in.cams.scalar_type() == at::kDouble;
  a.B = in.B, a.C = in.C, a.N = in.N;
  a.measure = parse_measure(std::string(measure));
  a.eps = eps;
  a.predicted = predicted;
  a.grid_h = grid_h, a.grid_w = grid_w;
  a.w_bce = w.bce, a.w_distinct = w.distinct, a.w_consist = w.consist, a.w_coherence = w.coherence;
  return a;
}

at::Tensor attention_terms_cuda(const at::Tensor& logits, const at::Tensor& cams,
                                const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& label_mask,
                                c10::string_view measure, double eps, bool predicted, int64_t grid_h, int64_t grid_w,
                                c10::ArrayRef<double> weights) {
  const c10::cuda::CUDAGuard guard(cams.device());
  const Inputs in = prepare_terms(logits, cams, labels, label_mask);
  const TermsArgs a = terms_args(in, measure, eps, predicted, grid_h, grid_w, weights);
  at::Tensor out = at::zeros({5}, in.cams.options());
  const at::Tensor ws = workspace(attention_terms_workspace_bytes(a, false), in.cams);
  C10_CUDA_CHECK(attention_terms_forward(a, out.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_terms_backward_cuda(
    const at::Tensor& grad_terms, const at::Tensor& logits, const at::Tensor& cams,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& label_mask, c10::string_view measure,
    double eps, bool predicted, int64_t grid_h, int64_t grid_w, c10::ArrayRef<double> weights) {
  const c10::cuda::CUDAGuard guard(cams.device());
  const Inputs in = prepare_terms(logits, cams, labels, label_mask);
  const TermsArgs a = terms_args(in, measure, eps, predicted, grid_h, grid_w, weights);
  check_device(grad_terms, cams.device(), "fastcam::attention_terms_backward", "grad_terms");
  const at::Tensor gt = grad_terms.to(in.cams.scalar_type()).contiguous();
  TORCH_CHECK(gt.numel() == 5, "fastcam::attention_terms_backward: grad_terms must have 5 values");
  at::Tensor grad_logits = at::zeros_like(in.logits), grad_cams = at::zeros_like(in.cams);
  const at::Tensor ws = workspace(attention_terms_workspace_bytes(a, true), in.cams);
  C10_CUDA_CHECK(attention_terms_backward(a, gt.const_data_ptr(), grad_logits.mutable_data_ptr(),
                                          grad_cams.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_logits, grad_cams};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CUDA, m) {
  m.impl("attention_terms", &attention_terms_cuda);
  m.impl("attention_terms_backward", &attention_terms_backward_cuda);
}

}  // namespace fastcam::cuda
