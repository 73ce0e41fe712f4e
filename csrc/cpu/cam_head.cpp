// cam_head on the CPU: scores, logits and maps in one pass over the features, and the
// backward in one pass over the features (dF written once, dW reduced per thread-owned
// block of channels, so the result does not depend on the thread count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/map_math.h"
#include "../common/options.h"
#include "vec.h"

namespace fastcam::cpu {
namespace {

constexpr int64_t kBlock = 256;  // positions (NCHW) or channels (channels-last) per task

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// [B, K, N] with N contiguous (NCHW) or K contiguous (channels_last, tokens).
bool positions_contiguous(const at::Tensor& f) { return f.stride(2) == 1 || f.size(2) == 1; }

void check_head(const at::Tensor& features, const at::Tensor& weight) {
  TORCH_CHECK(features.dim() == 3, "fastcam::cam_head: features must be a [B, K, N] view, got ", features.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == features.size(1),
              "fastcam::cam_head: weight must be [C, K] with K = ", features.size(1), ", got ", weight.sizes());
  TORCH_CHECK(features.size(2) > 0, "fastcam::cam_head: features have no positions");
  TORCH_CHECK(positions_contiguous(features) || features.stride(1) == 1 || features.size(1) == 1,
              "fastcam::cam_head: features need stride 1 along N or along K, got strides ", features.strides());
}

// A row of n features as acc_t: the row itself when it is already acc_t and contiguous,
// else converted into buf.
template <typename scalar_t, typename acc_t>
const acc_t* row_as_acc(const scalar_t* src, int64_t stride, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1 || n == 1) return src;
  }
  load(src, stride, buf, n);
  return buf;
}

// S[b, c, n] = sum_k W[c, k] F[b, k, n].
template <typename scalar_t, typename acc_t>
void scores_kernel(const at::Tensor& f, const acc_t* w, acc_t* s, int64_t C) {
  const int64_t B = f.size(0), K = f.size(1), N = f.size(2);
  const int64_t sB = f.stride(0), sK = f.stride(1), sN = f.stride(2);
  const scalar_t* fp = f.const_data_ptr<scalar_t>();
  if (positions_contiguous(f)) {
    const int64_t blocks = (N + kBlock - 1) / kBlock;
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(C * kBlock), buf(kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, n0 = (task % blocks) * kBlock, len = std::min(kBlock, N - n0);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const acc_t* x = row_as_acc(fp + b * sB + k * sK + n0 * sN, sN, buf.data(), len);
          for (int64_t c = 0; c < C; ++c) axpy(acc.data() + c * kBlock, x, w[c * K + k], len);
        }
        for (int64_t c = 0; c < C; ++c) std::copy_n(acc.data() + c * kBlock, len, s + (b * C + c) * N + n0);
      }
    });
    return;
  }
  at::parallel_for(0, B * N, 8, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / N, n = task % N;
      const acc_t* x = row_as_acc(fp + b * sB + n * sN, sK, buf.data(), K);
      for (int64_t c = 0; c < C; ++c) s[(b * C + c) * N + n] = dot(w + c * K, x, K);
    }
  });
}

// dF = W^T G and dW = sum_b G F^T, one pass over F; each task owns a block of channels k.
template <typename scalar_t, typename acc_t>
void head_backward_kernel(const at::Tensor& f, const acc_t* w, const acc_t* g, int64_t C, at::Tensor& df,
                          acc_t* dw) {
  const int64_t B = f.size(0), K = f.size(1), N = f.size(2);
  const int64_t sB = f.stride(0), sK = f.stride(1), sN = f.stride(2);
  const scalar_t* fp = f.const_data_ptr<scalar_t>();
  scalar_t* dfp = df.defined() ? df.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t dB = df.defined() ? df.stride(0) : 0, dK = df.defined() ? df.stride(1) : 0,
                dN = df.defined() ? df.stride(2) : 0;
  if (positions_contiguous(f)) {
    at::parallel_for(0, K, 4, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(N), out(N);
      for (int64_t k = begin; k < end; ++k) {
        for (int64_t b = 0; b < B; ++b) {
          const acc_t* gb = g + b * C * N;
          if (dw) {
            const acc_t* x = row_as_acc(fp + b * sB + k * sK, sN, buf.data(), N);
            for (int64_t c = 0; c < C; ++c) dw[c * K + k] += dot(gb + c * N, x, N);
          }
          if (dfp) {
            std::fill(out.begin(), out.end(), acc_t(0));
            for (int64_t c = 0; c < C; ++c) axpy(out.data(), gb + c * N, w[c * K + k], N);
            store(out.data(), dfp + b * dB + k * dK, dN, N);
          }
        }
      }
    });
    return;
  }
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kBlock), out(kBlock);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t k0 = block * kBlock, len = std::min(kBlock, K - k0);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t n = 0; n < N; ++n) {
          const acc_t* x = dw ? row_as_acc(fp + b * sB + n * sN + k0 * sK, sK, buf.data(), len) : nullptr;
          if (dfp) std::fill(out.begin(), out.begin() + len, acc_t(0));
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gv = g[(b * C + c) * N + n];
            if (dw) axpy(dw + c * K + k0, x, gv, len);
            if (dfp) axpy(out.data(), w + c * K + k0, gv, len);
          }
          if (dfp) store(out.data(), dfp + b * dB + n * dN + k0 * dK, dK, len);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cam_head_cpu(const at::Tensor& features, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::string_view normalize, double temperature,
                                                             double eps) {
  check_head(features, weight);
  const Normalize mode = parse_normalize(std::string(normalize));
  const auto acc = acc_type(features.scalar_type());
  const int64_t B = features.size(0), N = features.size(2), C = weight.size(0);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor bvec = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  auto opts = features.options().dtype(acc);
  at::Tensor scores = at::empty({B, C, N}, opts), cams = at::empty({B, C, N}, opts), logits = at::empty({B, C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "fastcam_cam_head_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scores_kernel<scalar_t, acc_t>(features, w.const_data_ptr<acc_t>(), scores.mutable_data_ptr<acc_t>(), C);
    const acc_t* s = scores.const_data_ptr<acc_t>();
    const acc_t* bp = bvec.defined() ? bvec.const_data_ptr<acc_t>() : nullptr;
    acc_t* cp = cams.mutable_data_ptr<acc_t>();
    acc_t* lp = logits.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
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
  check_head(features, weight);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "fastcam_cam_head_bwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // G = dL/dS through the normalization + dL/dlogits / N.
    acc_t* gp = g.mutable_data_ptr<acc_t>();
    const acc_t* glp = gl.defined() ? gl.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gcp = gc.defined() ? gc.const_data_ptr<acc_t>() : nullptr;
    const acc_t* sp = s.const_data_ptr<acc_t>();
    const acc_t* cp = cm.const_data_ptr<acc_t>();
    at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
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
    if (df.defined() || dw.defined()) {
      head_backward_kernel<scalar_t, acc_t>(features, w.const_data_ptr<acc_t>(), gp, C, df,
                                            dw.defined() ? dw.mutable_data_ptr<acc_t>() : nullptr);
    }
  });
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {df.defined() ? df : at::empty({0}, features.options()), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcam, CPU, m) {
  m.impl("cam_head", &cam_head_cpu);
  m.impl("cam_head_backward", &cam_head_backward_cpu);
}

}  // namespace fastcam::cpu
