// pairwise_overlap on the CPU: every pair of maps within each group.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/options.h"
#include "overlap.h"

namespace fastcam::cpu {
namespace {

at::Tensor pairwise_overlap_cpu(const at::Tensor& cams, c10::string_view measure, double eps) {
  check_cams(cams, "fastcam::pairwise_overlap");
  const Measure m = parse_measure(std::string(measure));
  const at::Tensor c = cams.contiguous();
  const int64_t G = c.size(0), P = c.size(1), N = c.size(2);
  at::Tensor out = at::empty({G, P, P}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "fastcam_pairwise_overlap_cpu", [&] {
    overlap_forward<scalar_t>(c.const_data_ptr<scalar_t>(), G, P, N, P * N, N, m, scalar_t(eps),
                              out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor pairwise_overlap_backward_cpu(const at::Tensor& grad, const at::Tensor& cams, c10::string_view measure,
                                         double eps) {
  check_cams(cams, "fastcam::pairwise_overlap");
  const Measure m = parse_measure(std::string(measure));
  const at::Tensor c = cams.contiguous();
  const at::Tensor g = grad.to(c.scalar_type()).contiguous();
  const int64_t G = c.size(0), P = c.size(1), N = c.size(2);
  TORCH_CHECK(g.sizes() == at::IntArrayRef({G, P, P}), "fastcam::pairwise_overlap_backward: grad must be [G, P, P]");
  at::Tensor out = at::zeros_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "fastcam_pairwise_overlap_bwd_cpu", [&] {
    overlap_backward<scalar_t>(g.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), G, P, N, P * N, N, m,
                               scalar_t(eps), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CPU, m) {
  m.impl("pairwise_overlap", &pairwise_overlap_cpu);
  m.impl("pairwise_overlap_backward", &pairwise_overlap_backward_cpu);
}

}  // namespace fastcam::cpu
