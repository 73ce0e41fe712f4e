// cam_head on the CPU. The two GEMMs over the features (S = W F forward; dF = W^T G and
// dW = G F^T backward) run on ATen's BLAS, a chunk of images at a time, converting each
// chunk of bf16/fp16 features to fp32 once; normalization, logits and G = dL/dS +
// dL/dlogits / N are fused per map around them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/map_math.h"
#include "../common/checks.h"
#include "../common/options.h"
#include "head_maps.h"
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

// Fsum[b, k] = sum_n F[b, k, n] in the accumulation type, reading F once as it lies (at::sum
// with a dtype would convert all of F first).
at::Tensor feature_sums(const at::Tensor& features, at::ScalarType acc) {
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2);
  at::Tensor out = at::empty({B, K}, features.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "fastcam_feature_sums", [&] {
    const scalar_t* f = features.const_data_ptr<scalar_t>();
    auto* o = out.mutable_data_ptr<at::opmath_type<scalar_t>>();
    const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
    at::parallel_for(0, B, grain(K * N), [&](int64_t begin, int64_t end) {
      sum_positions(f + begin * sb, o + begin * K, end - begin, K, N, sb, sk, sn);
    });
  });
  return out;
}

// Images whose Gm has at most this many nonzero rows take direct loops instead of GEMMs.
constexpr int64_t kDirectRows = 8;

// The head's backward, with G = Gm + g0 1^T split in two: Gm = dL/dS through the maps,
// g0 = dL/dlogits / N (constant over the positions). Then
//   dF[b] = W^T Gm[b] + (W^T g0[b]) 1^T        dW = sum_b Gm[b] F[b]^T + g0^T Fsum
// with Fsum[b] = sum_n F[b, :, n]. A row of Gm is zero for every map that no loss term
// weighs (a labeled image's maps without a positive partner: most of a batch at the real
// label rates), so only the nonzero rows `rows[b]` of each image enter its products: by
// direct loops over the features as they lie when there are few (no conversion, dF written
// in one pass), by GEMMs on a converted chunk of images otherwise. dF[b] is written once, in
// the features' dtype and strides; the GEMM path computes it in its own memory order ([N, K]
// for channels-last and tokens) so that the conversion into it is a plain copy.
void head_backward(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                   const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0, at::Tensor& df, at::Tensor& dw) {
  const int64_t B = features.size(0), K = w.size(1), C = w.size(0), N = features.size(2);
  const int64_t step = chunk_size(features);
  const bool channels_last = df.defined() && N > 1 && df.stride(1) == 1;
  const at::Tensor v = (df.defined() && g0.defined()) ? at::mm(g0, w) : at::Tensor();  // [B, K]
  for (int64_t b0 = 0; b0 < B; b0 += step) {
    const int64_t b1 = std::min(B, b0 + step);
    bool any_gemm = false;
    for (int64_t b = b0; b < b1; ++b) any_gemm = any_gemm || int64_t(rows[b].size()) > kDirectRows;
    const at::Tensor fc = (dw.defined() && any_gemm) ? chunk_as_acc(features, b0, b1, w.scalar_type()) : at::Tensor();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t nr = int64_t(rows[b].size());
      if (nr <= kDirectRows) {
        if (!df.defined() && (!dw.defined() || nr == 0)) continue;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "fastcam_head_bwd_direct", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          std::vector<const acc_t*> g(nr);
          for (int64_t r = 0; r < nr; ++r) g[r] = gm.const_data_ptr<acc_t>() + (b * C + rows[b][r]) * N;
          const scalar_t* fb = features.const_data_ptr<scalar_t>() + b * features.stride(0);
          scalar_t* dfb = df.defined() ? df.mutable_data_ptr<scalar_t>() + b * df.stride(0) : nullptr;
          const acc_t* vb = v.defined() ? v.const_data_ptr<acc_t>() + b * K : nullptr;
          acc_t* dwp = dw.defined() ? dw.mutable_data_ptr<acc_t>() : nullptr;
          const int64_t dsk = df.defined() ? df.stride(1) : 0, dsn = df.defined() ? df.stride(2) : 0;
          at::parallel_for(0, K, grain((2 * nr + 1) * N), [&](int64_t k0, int64_t k1) {
            direct_image_backward(fb, features.stride(1), features.stride(2), dfb, dsk, dsn, K, N,
                                  w.const_data_ptr<acc_t>(), g.data(), rows[b].data(), nr, vb, dwp, k0, k1);
          });
        });
        continue;
      }
      at::Tensor ga = gm[b], wa = w, index;
      if (nr < C) {
        index = at::tensor(c10::ArrayRef<int64_t>(rows[b]), at::kLong);
        ga = ga.index_select(0, index);
        wa = w.index_select(0, index);
      }
      if (dw.defined()) {
        if (nr == C) dw.addmm_(ga, fc[b - b0].t());
        else dw.index_add_(0, index, at::mm(ga, fc[b - b0].t()));
      }
      if (!df.defined()) continue;
      at::Tensor product = scratch(1, K * N, w.scalar_type());
      if (channels_last) {
        product = product.narrow(0, 0, N * K).view({N, K});
        if (v.defined()) at::addmm_out(product, v[b].unsqueeze(0), ga.t(), wa);
        else at::mm_out(product, ga.t(), wa);
        df[b].t().copy_(product);
      } else {
        product = product.narrow(0, 0, K * N).view({K, N});
        if (v.defined()) at::addmm_out(product, v[b].unsqueeze(1), wa.t(), ga);
        else at::mm_out(product, wa.t(), ga);
        df[b].copy_(product);
      }
    }
  }
  if (dw.defined() && g0.defined()) dw.addmm_(g0.t(), feature_sums(features, w.scalar_type()));
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
      head_maps_forward(s + begin * N, cp + begin * N, lp + begin, bp, begin, end - begin, C, N, mode,
                        acc_t(temperature), acc_t(eps));
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
  at::Tensor df = output_mask[0] ? at::empty_like(features) : at::Tensor();
  at::Tensor dw = output_mask[1] ? at::zeros({C, K}, opts) : at::Tensor();
  at::Tensor db = output_mask[2] ? (gl.defined() ? gl.sum(0) : at::zeros({C}, opts)) : at::Tensor();
  const at::Tensor g0 = gl.defined() ? gl / double(N) : at::Tensor();
  // Gm = dL/dS through the normalization, and which of its rows are not zero (only those are
  // written: a zero gradient on a map of finite scores has a zero dL/dS).
  at::Tensor gm = gc.defined() ? at::empty({B, C, N}, opts) : at::Tensor();
  std::vector<char> nonzero(B * C, 0);
  if (gc.defined()) {
    AT_DISPATCH_FLOATING_TYPES(acc, "fastcam_cam_head_bwd_cpu", [&] {
      using acc_t = scalar_t;
      acc_t* gp = gm.mutable_data_ptr<acc_t>();
      const acc_t* gcp = gc.const_data_ptr<acc_t>();
      const acc_t* sp = s.const_data_ptr<acc_t>();
      const acc_t* cp = cm.const_data_ptr<acc_t>();
      // Blocks of maps dealt round-robin to the tasks: the weighted maps, the costly ones,
      // gather in a few images (the unlabeled ones), which a split into contiguous ranges
      // would hand to one thread.
      constexpr int64_t kBlock = 8;
      const int64_t maps = B * C, blocks = (maps + kBlock - 1) / kBlock;
      const int64_t tasks = std::min<int64_t>(blocks, std::max<int64_t>(1, maps / grain(4 * N)));
      at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t blk = t; blk < blocks; blk += tasks) {
            const int64_t begin = blk * kBlock, count = std::min(kBlock, maps - begin);
            head_maps_backward(gcp + begin * N, sp + begin * N, cp + begin * N, gp + begin * N,
                               nonzero.data() + begin, count, N, mode, acc_t(temperature), acc_t(eps));
          }
      });
    });
  }
  std::vector<std::vector<int64_t>> rows(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      if (nonzero[b * C + c]) rows[b].push_back(c);
  if (df.defined() || dw.defined()) head_backward(features, w, gm, rows, g0, df, dw);
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {df.defined() ? df : at::empty({0}, features.options()), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CPU, m) {
  m.impl("cam_head", &cam_head_cpu);
  m.impl("cam_head_backward", &cam_head_backward_cpu);
}

}  // namespace fastcam::cpu
