// pairwise_overlap on CUDA: the ATen binding (checks, outputs, stream) of the kernels in
// pairwise_overlap.cu. Same checks, outputs and semantics as csrc/cpu/pairwise_overlap.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../common/checks.h"
#include "../common/options.h"
#include "binding.h"
#include "launch.h"

namespace fastcam::cuda {
namespace {

at::Tensor pairwise_overlap_cuda(const at::Tensor& cams, c10::string_view measure, double eps) {
  check_cams(cams, "fastcam::pairwise_overlap");
  const Measure m = parse_measure(std::string(measure));
  const c10::cuda::CUDAGuard guard(cams.device());
  const at::Tensor c = cams.contiguous();
  const int64_t G = c.size(0), P = c.size(1), N = c.size(2);
  const bool dbl = c.scalar_type() == at::kDouble;
  at::Tensor out = at::empty({G, P, P}, c.options());
  const at::Tensor ws = workspace(pairwise_overlap_workspace_bytes(G, P, dbl, false), c);
  C10_CUDA_CHECK(pairwise_overlap_forward(c.const_data_ptr(), dbl, G, P, N, m, eps, out.mutable_data_ptr(),
                                          ws.mutable_data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pairwise_overlap_backward_cuda(const at::Tensor& grad, const at::Tensor& cams, c10::string_view measure,
                                          double eps) {
  check_cams(cams, "fastcam::pairwise_overlap");
  const Measure m = parse_measure(std::string(measure));
  check_device(grad, cams.device(), "fastcam::pairwise_overlap_backward", "grad");
  const c10::cuda::CUDAGuard guard(cams.device());
  const at::Tensor c = cams.contiguous();
  const at::Tensor g = grad.to(c.scalar_type()).contiguous();
  const int64_t G = c.size(0), P = c.size(1), N = c.size(2);
  TORCH_CHECK(g.sizes() == at::IntArrayRef({G, P, P}), "fastcam::pairwise_overlap_backward: grad must be [G, P, P]");
  const bool dbl = c.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros_like(c);
  const at::Tensor ws = workspace(pairwise_overlap_workspace_bytes(G, P, dbl, true), c);
  C10_CUDA_CHECK(pairwise_overlap_backward(g.const_data_ptr(), c.const_data_ptr(), dbl, G, P, N, m, eps,
                                           out.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CUDA, m) {
  m.impl("pairwise_overlap", &pairwise_overlap_cuda);
  m.impl("pairwise_overlap_backward", &pairwise_overlap_backward_cuda);
}

}  // namespace fastcam::cuda
