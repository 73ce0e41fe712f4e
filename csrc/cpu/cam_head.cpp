// cam_head on the CPU. S = W F forward: on the CPU's bf16 matrix units for bf16 features where
// it has them (bf16_gemm.h), else by ATen's BLAS an image per thread on converted copies;
// normalization and logits per map after it. Backward: G = dL/dS + dL/dlogits / N split in a
// dense part over the few weighted maps and a rank-one part, by direct loops over the features
// for most images and GEMMs for the images with many weighted maps (head_backward below).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../common/map_math.h"
#include "../common/checks.h"
#include "../common/options.h"
#include "bf16_gemm.h"
#include "head_maps.h"
#include "parallel.h"
#include "vec.h"

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

// S[b] = W F[b]. bf16 features: on the CPU's bf16 matrix units where it has them
// (bf16_gemm.h). Otherwise, and for the images they leave, fp32 GEMMs by ATen's BLAS, an image
// per task when there are enough images for the threads (each converted into its thread's
// buffer, still in its cache when BLAS reads it, and multiplied there on one thread: splitting
// one small GEMM across threads costs more than it gains), else an image at a time on every
// thread. BLAS reads F[b] as it lies: [K, N] for NCHW, transposed for channels-last and tokens.
void scores_gemm(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores) {
  const int64_t B = features.size(0);
  std::vector<char> done(B, 0);
  if (features.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat && bf16_gemm_available())
    done = scores_bf16(features, w, scores);
  std::vector<int64_t> todo;
  for (int64_t b = 0; b < B; ++b)
    if (!done[b]) todo.push_back(b);
  // Small images stay on the calling thread: waking the pool costs more than their GEMM.
  const int64_t per_image = w.size(0) * features.size(1) * features.size(2);
  if (int64_t(todo.size()) < at::get_num_threads() || gemm_grain(per_image) > 1) {
    for (const int64_t b : todo) {
      at::Tensor out = scores[b];
      at::mm_out(out, w, chunk_as_acc(features, b, b + 1, w.scalar_type())[0]);
    }
    return;
  }
  const at::ThreadLocalState state;  // the caller's dispatch state (below autograd, inference mode)
  at::parallel_for(0, int64_t(todo.size()), 1, [&](int64_t i0, int64_t i1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = todo[i];
      at::Tensor out = scores[b];
      at::mm_out(out, w, chunk_as_acc(features, b, b + 1, w.scalar_type())[0]);
    }
  });
}

// Images whose Gm has at most this many nonzero rows take direct loops instead of GEMMs.
constexpr int64_t kDirectRows = 8;

// The head's backward, with G = Gm + g0 1^T split in two: Gm = dL/dS through the maps,
// g0 = dL/dlogits / N (constant over the positions). Then
//   dF[b] = W^T Gm[b] + v[b] 1^T, v[b] = W^T g0[b]      dW = sum_b Gm[b] F[b]^T + g0[b] Fsum[b]^T
// with Fsum[b] = sum_n F[b, :, n]. A row of Gm is zero for every map that no loss term
// weighs (a labeled image's maps without a positive partner: most of a batch at the real
// label rates), so only the nonzero rows `rows[b]` of each image enter its products.
//
// One parallel region over ranges of channels does every image's light part: v, Fsum and the
// g0 part of dW, and, for an image with few nonzero rows, its whole dF and dW by direct loops
// over the features as they lie (no conversion, dF written in one pass). Each thread owns the
// columns [k0, k1) of dW across all images: no atomics, and the order of every sum is fixed
// whatever the thread count. (Channels-last and tokens: over images, each image's part of dW
// in buffers added after, in image order, just as fixed.) The images with many nonzero rows then take GEMMs, one converted
// image at a time; their dF[b] is computed in its own memory order ([N, K] for channels-last
// and tokens) and written once, in the features' dtype and strides, with v added on the way.
void head_backward(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                   const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0, at::Tensor& df, at::Tensor& dw) {
  const int64_t B = features.size(0), K = w.size(1), C = w.size(0), N = features.size(2);
  const bool channels_last = df.defined() && N > 1 && df.stride(1) == 1;
  // What the AMX tiles take (bf16_gemm.h): the dense images' GEMMs, and with NCHW every image's dW.
  const TilesBackward tiles = tiles_backward_plan(features, w, gm, rows, g0, df, dw, kDirectRows);
  const bool need_v = df.defined() && g0.defined(), need_fsum = dw.defined() && g0.defined() && !tiles.weights;
  at::Tensor v = need_v ? at::empty({B, K}, w.options()) : at::Tensor();
  std::vector<int64_t> gemm_images;
  for (int64_t b = 0; b < B; ++b)
    if (int64_t(rows[b].size()) > kDirectRows) gemm_images.push_back(b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, features.scalar_type(), "fastcam_head_bwd_direct", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* g0p = g0.defined() ? g0.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gmp = gm.defined() ? gm.const_data_ptr<acc_t>() : nullptr;
    acc_t* vp = need_v ? v.mutable_data_ptr<acc_t>() : nullptr;
    auto fill_v = [&](int64_t b, int64_t k0, int64_t k1) {  // v[b, k0:k1] = (W^T g0[b])[k0:k1]
      acc_t* vb = vp + b * K;
      std::fill(vb + k0, vb + k1, acc_t(0));
      for (int64_t c = 0; c < C; ++c) axpy(vb + k0, wp + c * K + k0, g0p[b * C + c], k1 - k0);
    };
    acc_t* dwp = dw.defined() ? dw.mutable_data_ptr<acc_t>() : nullptr;
    const scalar_t* fp = features.const_data_ptr<scalar_t>();
    scalar_t* dfp = df.defined() ? df.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
    const int64_t dsb = df.defined() ? df.stride(0) : 0, dsk = df.defined() ? df.stride(1) : 0,
                  dsn = df.defined() ? df.stride(2) : 0;
    if (sk == 1 && N > 1 && (!dfp || dsk == 1)) {
      // Channels-last and tokens: an image per task, so that each thread streams whole images.
      // (Split by channels, two threads read alternate halves of every position's row, which the
      // prefetchers serve badly: vit B=8, this region took 253 us on two threads, 216 on one.)
      // Each image's Fsum and its rows' dW go to buffers, added to dW after, in image order.
      bool any_rows = false;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t nr = int64_t(rows[b].size());
        any_rows = any_rows || (nr > 0 && nr <= kDirectRows);
      }
      at::Tensor fsum = need_fsum ? at::empty({B, K}, w.options()) : at::Tensor();
      at::Tensor partial = dwp && any_rows && !tiles.weights ? at::empty({B, C, K}, w.options()) : at::Tensor();
      acc_t* fsp = fsum.defined() ? fsum.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pp = partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<const acc_t*> g(kDirectRows);
        for (int64_t b = b0; b < b1; ++b) {
          const bool direct = int64_t(rows[b].size()) <= kDirectRows;
          const int64_t nr = direct ? int64_t(rows[b].size()) : 0;
          acc_t* vb = vp ? vp + b * K : nullptr;
          if (vb) fill_v(b, 0, K);
          for (int64_t r = 0; r < nr; ++r) g[r] = gmp + (b * C + rows[b][r]) * N;
          scalar_t* dfb = (direct && dfp) ? dfp + b * dsb : nullptr;
          acc_t* dwb = (pp && nr > 0) ? pp + b * C * K : nullptr;
          for (int64_t r = 0; dwb && r < nr; ++r) std::fill(dwb + rows[b][r] * K, dwb + (rows[b][r] + 1) * K, acc_t(0));
          acc_t* fs = fsp ? fsp + b * K : nullptr;
          if (dfb || dwb || fs)
            direct_image_backward(fp + b * sb, sk, sn, dfb, dsk, dsn, K, N, wp, g.data(), rows[b].data(), nr, vb, dwb,
                                  fs, 0, K);
        }
      });
      if (fsp || pp)
        at::parallel_for(0, K, std::max<int64_t>(16, grain(B * C)), [&](int64_t k0, int64_t k1) {
          for (int64_t b = 0; b < B; ++b) {
            const int64_t nr = int64_t(rows[b].size());
            for (int64_t r = 0; pp && nr <= kDirectRows && r < nr; ++r) {
              const int64_t c = rows[b][r];
              axpy(dwp + c * K + k0, pp + (b * C + c) * K + k0, acc_t(1), k1 - k0);
            }
            for (int64_t c = 0; fsp && c < C; ++c)  // dW[c, k] += g0[b, c] Fsum[b, k]
              axpy(dwp + c * K + k0, fsp + b * K + k0, g0p[b * C + c], k1 - k0);
          }
        });
      return;
    }
    // Work per channel: every image's reads of F (and writes of dF), its rows' products, v.
    int64_t per_channel = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t nr = int64_t(rows[b].size()) > kDirectRows ? 0 : int64_t(rows[b].size());
      per_channel += (2 * nr + 2) * N + (need_v ? C : 0) + (need_fsum ? C : 0);
    }
    at::parallel_for(0, K, std::max<int64_t>(16, grain(per_channel)), [&](int64_t k0, int64_t k1) {
      std::vector<acc_t> fsum(need_fsum ? K : 0);
      std::vector<const acc_t*> g(kDirectRows);
      for (int64_t b = 0; b < B; ++b) {
        const bool direct = int64_t(rows[b].size()) <= kDirectRows;
        const int64_t nr = direct ? int64_t(rows[b].size()) : 0;
        acc_t* vb = vp ? vp + b * K : nullptr;
        if (vb) fill_v(b, k0, k1);
        for (int64_t r = 0; r < nr; ++r) g[r] = gmp + (b * C + rows[b][r]) * N;
        // The GEMM images only get their Fsum here (their dF and dW come below).
        scalar_t* dfb = (direct && dfp) ? dfp + b * dsb : nullptr;
        acc_t* dwb = (direct && nr > 0 && !tiles.weights) ? dwp : nullptr;
        acc_t* fs = need_fsum ? fsum.data() : nullptr;
        if (dfb || dwb || fs)
          direct_image_backward(fp + b * sb, sk, sn, dfb, dsk, dsn, K, N, wp, g.data(), rows[b].data(), nr, vb, dwb,
                                fs, k0, k1);
        if (fs)  // dW[c, k] += g0[b, c] Fsum[b, k]
          for (int64_t c = 0; c < C; ++c) axpy(dwp + c * K + k0, fs + k0, g0p[b * C + c], k1 - k0);
      }
    });
  });
  if (tiles.any()) head_backward_tiles(features, w, gm, rows, g0, v, df, dw, tiles);
  // The other GEMM images (all where the tiles do not run), one at a time with BLAS on every
  // thread. (An image per thread, each with its own dW accumulator, measured no faster at batch 4-8.)
  for (const int64_t b : gemm_images) {
    if (tiles.dense[b]) continue;
    const int64_t nr = int64_t(rows[b].size());
    const bool do_dw = dw.defined() && !tiles.weights;
    const at::Tensor fb = do_dw ? chunk_as_acc(features, b, b + 1, w.scalar_type())[0] : at::Tensor();
    at::Tensor ga = gm[b], wa = w, index;
    if (nr < C) {
      index = at::tensor(c10::ArrayRef<int64_t>(rows[b]), at::kLong);
      ga = ga.index_select(0, index);
      wa = w.index_select(0, index);
    }
    if (do_dw) {
      if (nr == C) dw.addmm_(ga, fb.t());
      else dw.index_add_(0, index, at::mm(ga, fb.t()));
    }
    if (!df.defined()) continue;
    // dF[b] = W_A^T G_A (+ v[b] 1^T), the product in dF's memory order ([N, K] for channels-last
    // and tokens), v added while it is converted into dF.
    at::Tensor product = scratch(1, K * N, w.scalar_type());
    const int64_t rows_out = channels_last ? N : K, cols_out = channels_last ? K : N;
    product = product.narrow(0, 0, K * N).view({rows_out, cols_out});
    if (channels_last) at::mm_out(product, ga.t(), wa);
    else at::mm_out(product, wa.t(), ga);
    const int64_t ld = channels_last ? df.stride(2) : df.stride(1);
    // df is empty_like of the [B, K, N] view, which has stride 1 along N or K (features_as_bkn).
    TORCH_INTERNAL_ASSERT(cols_out == 1 || (channels_last ? df.stride(1) : df.stride(2)) == 1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, df.scalar_type(), "fastcam_head_bwd_store", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      store_plus(product.const_data_ptr<acc_t>(), rows_out, cols_out, cols_out,
                 v.defined() ? v.const_data_ptr<acc_t>() + b * K : nullptr, !channels_last,
                 df.mutable_data_ptr<scalar_t>() + b * df.stride(0), ld);
    });
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
  // g0 = dL/dlogits / N and db = its column sums, by loops (two ATen ops cost more than the work).
  at::Tensor db = output_mask[2] ? at::zeros({C}, opts) : at::Tensor();
  at::Tensor g0 = gl.defined() ? at::empty({B, C}, opts) : at::Tensor();
  if (gl.defined()) {
    AT_DISPATCH_FLOATING_TYPES(acc, "fastcam_cam_head_bwd_g0", [&] {
      const scalar_t* src = gl.const_data_ptr<scalar_t>();
      scalar_t* g = g0.mutable_data_ptr<scalar_t>();
      scalar_t* bsum = db.defined() ? db.mutable_data_ptr<scalar_t>() : nullptr;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) {
          g[b * C + c] = src[b * C + c] / scalar_t(N);
          if (bsum) bsum[c] += src[b * C + c];
        }
    });
  }
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
