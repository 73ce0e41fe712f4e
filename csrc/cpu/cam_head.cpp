// cam_head on the CPU. The two GEMMs over the features (S = W F forward; dF = W^T G and
// dW = G F^T backward) run on ATen's BLAS, a chunk of images at a time, converting each
// chunk of bf16/fp16 features to fp32 once; normalization, logits and G = dL/dS +
// dL/dlogits / N are fused per map around them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/map_math.h"
#include "../common/checks.h"
#include "../common/options.h"
#include "parallel.h"

namespace fastcam::cpu {
namespace {

// A scratch buffer of this thread, kept between calls and grown as needed: fresh large
// allocations cost a page fault per 4 KiB on first touch, more than the conversions written
// into them. slot 0: converted features; slot 1: one image's dF before its conversion.
at::Tensor scratch(int slot, int64_t numel, at::ScalarType dtype) {
  thread_local std::array<at::Tensor, 2> buffers;
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < numel) buf = at::empty({numel}, at::dtype(dtype));
  return buf;
}

// The images of features[b0:b1] as acc tensors [b, K, N] with the features' strides: a view
// when they already are acc, else converted into the scratch buffer.
at::Tensor chunk_as_acc(const at::Tensor& features, int64_t b0, int64_t b1, at::ScalarType acc) {
  const at::Tensor chunk = features.slice(0, b0, b1);
  if (chunk.scalar_type() == acc) return chunk;
  if (!chunk.is_non_overlapping_and_dense()) return chunk.to(acc);
  std::vector<int64_t> strides(chunk.strides().begin(), chunk.strides().end());
  strides[0] = chunk.size(1) * chunk.size(2);  // the images packed one after the other
  at::Tensor out = scratch(0, chunk.numel(), acc).as_strided(chunk.sizes(), strides, 0);
  out.copy_(chunk);
  return out;
}

// Images per chunk: about 2^18 converted values (1 MiB of fp32) at a time, so that the
// converted chunk is still in the L2 cache when BLAS reads it.
int64_t chunk_size(const at::Tensor& features) {
  const int64_t per_image = std::max<int64_t>(1, features.size(1) * features.size(2));
  return std::max<int64_t>(1, (int64_t(1) << 18) / per_image);
}

// S[b] = W F[b], the GEMM done by ATen's BLAS on each image of a converted chunk
// (BLAS reads F[b] as it lies: [K, N] for NCHW, transposed for channels-last and tokens).
void scores_gemm(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores) {
  const int64_t B = features.size(0), step = chunk_size(features);
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t b1 = std::min(B, b0 + step);
    const at::Tensor fc = chunk_as_acc(features, b0, b1, w.scalar_type());
    for (int64_t i = 0; i < b1 - b0; ++i) {
      at::Tensor out = scores[b0 + i];
      at::mm_out(out, w, fc[i]);
    }
  }
}

// dF[b] = W^T G[b] (written once, in the features' dtype and strides) and dW = sum_b G[b] F[b]^T,
// each chunk of features converted once. dF[b] is computed in its own memory order
// ([N, K] for channels-last and tokens), so that the conversion into it is a plain copy.
void head_backward_gemm(const at::Tensor& features, const at::Tensor& w, const at::Tensor& g, at::Tensor& df,
                        at::Tensor& dw) {
  const int64_t B = features.size(0), step = chunk_size(features);
  const at::Tensor wt = w.t();
  const bool channels_last = df.defined() && df.size(2) > 1 && df.stride(1) == 1;
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t b1 = std::min(B, b0 + step);
    const at::Tensor fc = dw.defined() ? chunk_as_acc(features, b0, b1, w.scalar_type()) : at::Tensor();
    for (int64_t i = 0; i < b1 - b0; ++i) {
      const at::Tensor gi = g[b0 + i];
      if (dw.defined()) dw.addmm_(gi, fc[i].t());
      if (!df.defined()) continue;
      const int64_t K = w.size(1), N = gi.size(1);
      at::Tensor product = scratch(1, K * N, w.scalar_type());
      if (channels_last) {
        product = product.narrow(0, 0, N * K).view({N, K});
        at::mm_out(product, gi.t(), w);
        df[b0 + i].t().copy_(product);
      } else {
        product = product.narrow(0, 0, K * N).view({K, N});
        at::mm_out(product, wt, gi);
        df[b0 + i].copy_(product);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_head_cpu(const at::Tensor& features, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view normalize, double temperature,
                                                             double eps) {
  check_head(features, weight, "fastcam::cam_head");
  const Normalize mode = parse_normalize(std::string(normalize));
  const auto acc = acc_type(features.scalar_type());
  const int64_t B = features.size(0), N = features.size(2), C = weight.size(0);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor bvec = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  auto opts = features.options().dtype(acc);
  at::Tensor scores = at::empty({B, C, N}, opts), cams = at::empty({B, C, N}, opts), logits = at::empty({B, C}, opts);
  scores_gemm(features, w, scores);
  AT_DISPATCH_FLOATING_TYPES(acc, "fastcam_cam_head_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* s = scores.const_data_ptr<acc_t>();
    const acc_t* bp = bvec.defined() ? bvec.const_data_ptr<acc_t>() : nullptr;
    acc_t* cp = cams.mutable_data_ptr<acc_t>();
    acc_t* lp = logits.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * C, grain(4 * N), [&](int64_t begin, int64_t end) {
      for (int64_t map = begin; map < end; ++map) {
        acc_t total = 0;
        for (int64_t n = 0; n < N; ++n) total += s[map * N + n];
        lp[map] = total / acc_t(N) + (bp ? bp[map % C] : acc_t(0));
        normalize_forward<acc_t>(s + map * N, cp + map * N, N, mode, acc_t(temperature), acc_t(eps));
      }
    });
  });
  return {logits, scores, cams};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_head_backward_cpu(
    const std::optional<at::Tensor>& grad_logits, const std::optional<at::Tensor>& grad_cams,
    const at::Tensor& features, const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& cams,
    c10::string_view normalize, double temperature, double eps, std::array<bool, 3> output_mask) {
  check_head(features, weight, "fastcam::cam_head");
  const Normalize mode = parse_normalize(std::string(normalize));
  const auto acc = acc_type(features.scalar_type());
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = weight.size(0);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor s = scores.contiguous(), cm = cams.contiguous();
  const at::Tensor gl = grad_logits.has_value() ? grad_logits->to(acc).contiguous() : at::Tensor();
  const at::Tensor gc = grad_cams.has_value() ? grad_cams->to(acc).contiguous() : at::Tensor();
  auto opts = features.options().dtype(acc);
  at::Tensor g = at::empty({B, C, N}, opts);
  at::Tensor df = output_mask[0] ? at::empty_like(features) : at::Tensor();
  at::Tensor dw = output_mask[1] ? at::zeros({C, K}, opts) : at::Tensor();
  at::Tensor db = output_mask[2] ? (gl.defined() ? gl.sum(0) : at::zeros({C}, opts)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "fastcam_cam_head_bwd_cpu", [&] {
    using acc_t = scalar_t;
    // G = dL/dS through the normalization + dL/dlogits / N.
    acc_t* gp = g.mutable_data_ptr<acc_t>();
    const acc_t* glp = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gcp = gc.defined() ? gc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t* cp = cm.const_data_ptr<acc_t>();
    at::parallel_for(0, B * C, grain(4 * N), [&](int64_t begin, int64_t end) {
      for (int64_t map = begin; map < end; ++map) {
        acc_t* out = gp + map * N;
        if (gcp) {
          normalize_backward<acc_t>(gcp + map * N, sp + map * N, cp + map * N, out, N, mode, acc_t(temperature),
                                    acc_t(eps));
        } else {
          std::fill(out, out + N, acc_t(0));
        }
        if (glp) {
          const acc_t from_logit = glp[map] / acc_t(N);
          for (int64_t n = 0; n < N; ++n) out[n] += from_logit;
        }
      }
    });
  });
  if (df.defined() || dw.defined()) head_backward_gemm(features, w, g, df, dw);
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {df.defined() ? df : at::empty({0}, features.options()), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CPU, m) {
  m.impl("cam_head", &cam_head_cpu);
  m.impl("cam_head_backward", &cam_head_backward_cpu);
}

}  // namespace fastcam::cpu
