// cam_head on CUDA: the ATen binding (checks, outputs, stream) of the kernels in cam_head.cu.
// Same checks, outputs and semantics as csrc/cpu/cam_head.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "../common/checks.h"
#include "../common/options.h"
#include "binding.h"
#include "launch.h"

namespace fastcam::cuda {
namespace {

// [B, K, N] with N contiguous (NCHW) or K contiguous (channels_last, tokens).
bool positions_contiguous(const at::Tensor& f) { return f.stride(2) == 1 || f.size(2) == 1; }

// The common checks, and the layouts the kernels read: stride 1 along N or along K.
void check_head(const at::Tensor& features, const at::Tensor& weight) {
  fastcam::check_head(features, weight, "fastcam::cam_head");
  TORCH_CHECK(positions_contiguous(features) || features.stride(1) == 1 || features.size(1) == 1,
              "fastcam::cam_head: features need stride 1 along N or along K, got strides ", features.strides());
}

// S = W F and dF = W^T G of bf16 features as cuBLAS GEMMs (ATen's bmm) on the bf16 parts of W
// and G stacked (split_stack_bf16: three parts of W for S, two each for dF, so that one GEMM with
// fp32 accumulation sums the parts' products: the kernels' accuracy), or on cam_head.cu's
// kernels; dW stays on the kernels. FASTCAM_CUDA_GEMM (read once): "cublas" or "kernels"
// forces one; unset, "auto": cuBLAS for NCHW features with more than 16 classes or at least
// 128 MiB. On an H200 (2026-11-26, benchmarks/NOTES.md) cuBLAS took a step at resnet50@1024 B128
// from 2.32 to 1.17 ms, at 174 classes from 2.72 to 2.06, at resnet50@1024 B32 0.94 to 0.91, but
// was slower at densenet121@512 (0.51 -> 0.70) and for vit tokens (0.44 -> 0.85).
enum class GemmChoice { Auto, Cublas, Kernels };

GemmChoice gemm_choice() {
  static const GemmChoice choice = [] {
    const char* v = std::getenv("FASTCAM_CUDA_GEMM");
    if (v != nullptr && std::strcmp(v, "cublas") == 0) return GemmChoice::Cublas;
    if (v != nullptr && std::strcmp(v, "kernels") == 0) return GemmChoice::Kernels;
    return GemmChoice::Auto;
  }();
  return choice;
}

// aten::bmm.dtype (bf16 x bf16 -> float32), looked up at run time: a torch without it keeps
// the kernels.
const c10::OperatorHandle* bmm_to_float() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"aten::bmm", "dtype"});
  return op.has_value() ? &*op : nullptr;
}

bool use_cublas(const at::Tensor& features, int64_t C) {
  const GemmChoice choice = gemm_choice();
  if (features.scalar_type() != at::kBFloat16 || choice == GemmChoice::Kernels || bmm_to_float() == nullptr) {
    return false;
  }
  if (choice == GemmChoice::Auto) {
    const bool nchw = positions_contiguous(features);
    const bool large = features.numel() * features.element_size() >= (int64_t{128} << 20);
    if (!nchw || (C <= 16 && !large)) return false;
  }
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, features.device().index()) == cudaSuccess &&
         major >= 8;
}

// S [B, C, N] (float32, contiguous) = W F through cuBLAS: S3 = [W_hi; W_mid; W_lo] F, then the
// three row blocks summed. w: [C, K] float32, contiguous; features: [B, K, N], bf16, any strides.
void scores_on_cublas(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // bf16 stays bf16
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = w.size(0);
  at::Tensor w3 = at::empty({3 * C, K}, features.options());
  const int parts[3] = {0, 1, 2};
  C10_CUDA_CHECK(split_stack_bf16(w.const_data_ptr<float>(), 1, C, K, 3, parts, w3.mutable_data_ptr(),
                                  current_stream()));
  const at::Tensor s3 = bmm_to_float()
                            ->typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>()
                            .call(w3.expand({B, 3 * C, K}), features, at::kFloat)
                            .contiguous();
  C10_CUDA_CHECK(sum_score_parts(s3.const_data_ptr<float>(), B, C, N, scores.mutable_data_ptr<float>(),
                                 current_stream()));
}

// dF [B, K, N] (bf16, its own strides) = W^T G through cuBLAS: [W_hi; W_hi; W_lo]^T [G_hi;
// G_lo; G_hi], fp32 accumulation, rounded to bf16 once. g: [B, C, N] float32, contiguous.
void grad_features_on_cublas(const at::Tensor& w, const at::Tensor& g, at::Tensor& df) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = df.size(0), K = df.size(1), N = df.size(2), C = w.size(0);
  at::Tensor wcat = at::empty({3 * C, K}, df.options());
  at::Tensor gcat = at::empty({B, 3 * C, N}, df.options());
  const int w_parts[3] = {0, 0, 1}, g_parts[3] = {0, 1, 0};
  C10_CUDA_CHECK(split_stack_bf16(w.const_data_ptr<float>(), 1, C, K, 2, w_parts, wcat.mutable_data_ptr(),
                                  current_stream()));
  C10_CUDA_CHECK(split_stack_bf16(g.const_data_ptr<float>(), B, C, N, 2, g_parts, gcat.mutable_data_ptr(),
                                  current_stream()));
  at::bmm_out(df, wcat.t().expand({B, K, 3 * C}), gcat);
}

// An acc [B, C, N] input of the backward, contiguous.
at::Tensor maps_input(const at::Tensor& t, at::ScalarType acc, int64_t B, int64_t C, int64_t N, const at::Device& device,
                      const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == C && t.size(2) == N, "fastcam::cam_head_backward: ", name,
              " must be [B, C, N] = [", B, ", ", C, ", ", N, "], got ", t.sizes());
  check_device(t, device, "fastcam::cam_head_backward", name);
  return t.to(acc).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_head_cuda(const at::Tensor& features, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              c10::string_view normalize, double temperature,
                                                              double eps) {
  check_head(features, weight);
  const Normalize mode = parse_normalize(std::string(normalize));
  const DType dtype = dtype_tag(features.scalar_type(), "fastcam::cam_head");
  const c10::cuda::CUDAGuard guard(features.device());
  const auto acc = acc_type(features.scalar_type());
  const int64_t B = features.size(0), N = features.size(2), C = weight.size(0);
  const at::Tensor w = weight.to(acc).contiguous();
  at::Tensor bvec;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == C, "fastcam::cam_head: bias must have C = ", C, " values, got ", bias->sizes());
    check_device(*bias, features.device(), "fastcam::cam_head", "bias");
    bvec = bias->to(acc).contiguous();
  }
  auto opts = features.options().dtype(acc);
  at::Tensor scores = at::empty({B, C, N}, opts), cams = at::empty({B, C, N}, opts), logits = at::empty({B, C}, opts);
  const bool cublas = B * C * N > 0 && use_cublas(features, C);
  if (cublas) scores_on_cublas(features, w, scores);
  C10_CUDA_CHECK(cam_head_forward(feature_view(features, dtype), features.const_data_ptr(), w.const_data_ptr(),
                                  bvec.defined() ? bvec.const_data_ptr() : nullptr, C, mode, temperature, eps,
                                  logits.mutable_data_ptr(), scores.mutable_data_ptr(), cams.mutable_data_ptr(),
                                  cublas, current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {logits, scores, cams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_head_backward_cuda(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& cams,
    c10::string_view normalize, double temperature, double eps, std::array<bool, 3> output_mask) {
  check_head(features, weight);
  const Normalize mode = parse_normalize(std::string(normalize));
  const DType dtype = dtype_tag(features.scalar_type(), "fastcam::cam_head_backward");
  const c10::cuda::CUDAGuard guard(features.device());
  const auto acc = acc_type(features.scalar_type());
  const at::Device device = features.device();
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = weight.size(0);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor s = maps_input(scores, acc, B, C, N, device, "scores");
  const at::Tensor cm = maps_input(cams, acc, B, C, N, device, "cams");
  at::Tensor gl, gc;
  if (grad_logits.has_value()) {
    TORCH_CHECK(grad_logits->dim() == 2 && grad_logits->size(0) == B && grad_logits->size(1) == C,
                "fastcam::cam_head_backward: grad_logits must be [B, C] = [", B, ", ", C, "], got ",
                grad_logits->sizes());
    check_device(*grad_logits, device, "fastcam::cam_head_backward", "grad_logits");
    gl = grad_logits->to(acc).contiguous();
  }
  if (grad_cams.has_value()) gc = maps_input(*grad_cams, acc, B, C, N, device, "grad_cams");
  auto opts = features.options().dtype(acc);
  at::Tensor g = at::empty({B, C, N}, opts);
  at::Tensor df = output_mask[0] ? at::empty_like(features) : at::Tensor();
  at::Tensor dw = output_mask[1] ? at::zeros({C, K}, opts) : at::Tensor();
  at::Tensor db = output_mask[2] ? (gl.defined() ? gl.sum(0) : at::zeros({C}, opts)) : at::Tensor();
  at::Tensor partials;
  if (dw.defined()) partials = at::empty({cam_head_dw_partials(B, N, C, K)}, opts);
  if (df.defined() || dw.defined()) {
    // On the cuBLAS path the launcher makes G (and dW), then dF is a cuBLAS GEMM of G.
    const bool cublas = df.defined() && B * K * N > 0 && use_cublas(features, C);
    const FeatureView dfv = df.defined() ? feature_view(df, dtype) : feature_view(features, dtype);
    C10_CUDA_CHECK(cam_head_backward(
        feature_view(features, dtype), features.const_data_ptr(), w.const_data_ptr(), C,
        gl.defined() ? gl.const_data_ptr() : nullptr, gc.defined() ? gc.const_data_ptr() : nullptr,
        s.const_data_ptr(), cm.const_data_ptr(), mode, temperature, eps, g.mutable_data_ptr(), dfv,
        df.defined() && !cublas ? df.mutable_data_ptr() : nullptr, dw.defined() ? dw.mutable_data_ptr() : nullptr,
        partials.defined() && partials.numel() > 0 ? partials.mutable_data_ptr() : nullptr, current_stream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (cublas) grad_features_on_cublas(w, g, df);
  }
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {df.defined() ? df : at::empty({0}, features.options()), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CUDA, m) {
  m.impl("cam_head", &cam_head_cuda);
  m.impl("cam_head_backward", &cam_head_backward_cuda);
}

}  // namespace fastcam::cuda
