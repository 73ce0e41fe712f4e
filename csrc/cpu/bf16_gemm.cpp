#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#if defined(__has_include)
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif
#endif

#include "amx.h"
#include "head_maps.h"
#include "parallel.h"
#include "vec.h"

// ATen's brgemm with bf16 inputs and fp32 output (torch >= 2.6 on x86-64).
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define FASTCAM_HAVE_BRGEMM 1
#else
#define FASTCAM_HAVE_BRGEMM 0
#endif

namespace fastcam::cpu {
namespace {

constexpr int64_t kParts = 3;   // W = hi + mid + lo
constexpr int64_t kBlock = 64;  // columns of a packed block of the B operand (its ld_b)
constexpr int64_t kRows = 64;   // positions per task with the features channels-last (the GEMM's M)
constexpr int64_t kMRows = 64;  // rows of the parts per call with the features NCHW (the GEMM's M)

// bf16 bits of x rounded to nearest even (NaN kept a NaN), and back: by bits, so that the
// loops below vectorize.
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// out[rows[r] * ldo + k] += (in[k][r] + in[k][nr + r]) + in[k][2 nr + r] for r < nr, k < kb
// (in: row stride ld): the three parts of dW^T summed and transposed into dW, through 16 x 16
// tiles in L1 so that both the reads and the writes run along rows.
FC_MULTIVERSION void add_transposed_parts(const float* in, int64_t ld, int64_t kb, int64_t nr, const int64_t* rows,
                                          float* out, int64_t ldo) {
  float tile[16][16];
  for (int64_t r0 = 0; r0 < nr; r0 += 16) {
    const int64_t rn = std::min<int64_t>(16, nr - r0);
    for (int64_t k0 = 0; k0 < kb; k0 += 16) {
      const int64_t kn = std::min<int64_t>(16, kb - k0);
      for (int64_t k = 0; k < kn; ++k) {
        const float* row = in + (k0 + k) * ld + r0;
        for (int64_t r = 0; r < rn; ++r) tile[r][k] = (row[r] + row[nr + r]) + row[2 * nr + r];
      }
      for (int64_t r = 0; r < rn; ++r) {
        float* __restrict o = out + rows[r0 + r] * ldo + k0;
        for (int64_t k = 0; k < kn; ++k) o[k] += tile[r][k];
      }
    }
  }
}

// The bf16 parts of n values: hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid), whose
// sum is x to 2^-24.
FC_MULTIVERSION void split_values(const float* x, int64_t n, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = to_bf16(x[i]);
    const float rest = x[i] - from_bf16(h);
    const uint16_t m = to_bf16(rest);
    hi[i] = h;
    mid[i] = m;
    lo[i] = to_bf16(rest - from_bf16(m));
  }
}

// W [C, K] as kParts bf16 matrices stacked [rows, ld], rows >= kParts * C: row p * C + c holds
// part p of row c (hi, mid, lo of split_values); columns K..ld and the rows past kParts * C are
// zero.
amx::Buffer<uint16_t> split_weight(const float* w, int64_t C, int64_t K, int64_t rows, int64_t ld) {
  static_assert(kParts == 3, "split_values makes three parts");
  amx::Buffer<uint16_t> out(rows * ld);  // every element written below
  // By ranges of classes on every thread (174 classes x 1024 channels: ~100 us on one).
  at::parallel_for(0, C, std::max<int64_t>(1, grain(8 * K)), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      uint16_t *hi = out.data() + c * ld, *mid = out.data() + (C + c) * ld, *lo = out.data() + (2 * C + c) * ld;
      split_values(w + c * K, K, hi, mid, lo);
      std::fill(hi + K, hi + ld, uint16_t(0));
      std::fill(mid + K, mid + ld, uint16_t(0));
      std::fill(lo + K, lo + ld, uint16_t(0));
    }
  });
  std::fill(out.data() + kParts * C * ld, out.data() + rows * ld, uint16_t(0));
  return out;
}

// scores[c * ldd + i] = (hi + mid) + lo of the parts' products out[p * C + c] (row stride ld,
// column stride step) for `count` positions; whether every sum is finite.
FC_MULTIVERSION bool combine_parts(const float* out, int64_t C, int64_t ld, int64_t step, int64_t count,
                                   float* scores, int64_t ldd) {
  float zero = 0;  // stays 0 unless a sum is Inf or NaN (x * 0)
  for (int64_t c = 0; c < C; ++c) {
    const float *__restrict hi = out + c * ld, *__restrict mid = out + (C + c) * ld,
                *__restrict lo = out + (2 * C + c) * ld;
    float* __restrict dst = scores + c * ldd;
    if (step == 1) {
#pragma omp simd reduction(+ : zero)
      for (int64_t i = 0; i < count; ++i) {
        const float v = (hi[i] + mid[i]) + lo[i];
        dst[i] = v;
        zero += v * 0.f;
      }
    } else {
      for (int64_t i = 0; i < count; ++i) {
        const float v = (hi[i * step] + mid[i * step]) + lo[i * step];
        dst[i] = v;
        zero += v * 0.f;
      }
    }
  }
  return zero == 0.f;
}

// The GEMM's B operand in the VNNI layout: rows [0, K) and columns [0, nb) of a bf16 matrix
// (element (k, j) at in[k * ld + j]) as pairs of rows, out[(k / 2) * ldo + j] holding
// (row k, row k + 1) of column j; a missing last odd row is zero, and so are the pair rows
// [ceil(K / 2), pair_rows) and the columns [nb, cols) (the matrix units' padding).
FC_MULTIVERSION void pack_pairs(const uint16_t* in, int64_t K, int64_t nb, int64_t ld, int64_t pair_rows, int64_t cols,
                                uint32_t* out, int64_t ldo = kBlock) {
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const uint16_t* __restrict r0 = in + k * ld;
    const uint16_t* __restrict r1 = r0 + ld;
    uint32_t* __restrict o = out + (k / 2) * ldo;
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) o[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
    std::fill(o + nb, o + cols, uint32_t(0));
  }
  if (k < K) {
    const uint16_t* __restrict r0 = in + k * ld;
    uint32_t* __restrict o = out + (k / 2) * ldo;
    for (int64_t j = 0; j < nb; ++j) o[j] = uint32_t(r0[j]);
    for (int64_t j = nb; j < cols; ++j) o[j] = 0;
    k += 2;
  }
  for (int64_t r = k / 2; r < pair_rows; ++r) std::fill(out + r * ldo, out + r * ldo + cols, uint32_t(0));
}

// Whether every one of n values is finite (x * 0 is 0 for those, NaN otherwise).
FC_MULTIVERSION bool all_finite(const float* x, int64_t n) {
  float zero = 0;
#pragma omp simd reduction(+ : zero)
  for (int64_t i = 0; i < n; ++i) zero += x[i] * 0.f;
  return zero == 0.f;
}

// Whether the first `cols` values (rounded up to 16, within ld) of each of `rows` rows (row
// stride ld) are all finite: 16 at a time, one vector each (a reduction loop per short row
// costs more than the check).
FC_MULTIVERSION bool all_finite_rows(const float* x, int64_t rows, int64_t cols, int64_t ld) {
  float zero[16] = {};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const float* v = x + r * ld + c0;
      for (int i = 0; i < 16; ++i) zero[i] += v[i] * 0.f;
    }
  float total = 0;
  for (int i = 0; i < 16; ++i) total += zero[i];
  return total == 0.f;
}

// out[i] = (hi[i] + mid[i]) + lo[i] for n values; whether all are finite.
FC_MULTIVERSION bool add3(const float* hi, const float* mid, const float* lo, int64_t n, float* out) {
  float zero = 0;
#pragma omp simd reduction(+ : zero)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = (hi[i] + mid[i]) + lo[i];
    zero += out[i] * 0.f;
  }
  return zero == 0.f;
}

// out[n * ldo + j] = rows[j][n] for j < nrows (at most 16), n < len: each position's values
// written together.
void transpose_rows(const uint16_t* const* rows, int64_t nrows, int64_t len, uint16_t* out, int64_t ldo) {
  for (int64_t n = 0; n < len; ++n) {
    uint16_t* __restrict o = out + n * ldo;
    for (int64_t j = 0; j < nrows; ++j) o[j] = rows[j][n];
  }
}

// The same by pairs of positions, as the VNNI layout wants them: the 32-bit word
// out[m * ldo + j] = (rows[j][2m], rows[j][2m + 1]), the last one (rows[j][len - 1], 0) for an odd len.
void transpose_pairs(const uint16_t* const* rows, int64_t nrows, int64_t len, uint32_t* out, int64_t ldo) {
  for (int64_t m = 0; 2 * m < len; ++m) {
    uint32_t* __restrict o = out + m * ldo;
    if (2 * m + 1 < len)
      for (int64_t j = 0; j < nrows; ++j) o[j] = uint32_t(rows[j][2 * m]) | (uint32_t(rows[j][2 * m + 1]) << 16);
    else
      for (int64_t j = 0; j < nrows; ++j) o[j] = uint32_t(rows[j][2 * m]);
  }
}

// out[n] = (a[n], b[n]) as one 32-bit word (b null: 0), n < len: two rows as one VNNI pair row.
FC_MULTIVERSION void interleave(const uint16_t* a, const uint16_t* b, int64_t len, uint32_t* out) {
  if (b == nullptr) {
    for (int64_t n = 0; n < len; ++n) out[n] = uint32_t(a[n]);
    return;
  }
#pragma omp simd
  for (int64_t n = 0; n < len; ++n) out[n] = uint32_t(a[n]) | (uint32_t(b[n]) << 16);
}


template <typename T>
T* thread_buffer(amx::Buffer<T>& buffer, int64_t size) {
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// ATen's brgemm (oneDNN's ukernel) where the tiles are not used: whether the CPU has what it
// needs, and the calls of the two layouts.
bool brgemm_hardware() {
#if FASTCAM_HAVE_BRGEMM
  static const bool hardware = at::native::cpublas::could_pack(at::kBFloat16);
  return hardware;
#else
  return false;
#endif
}

// out[M, kBlock] = parts[M, Kg] x packed block (NCHW), the parts' rows in chunks of kMRows per
// call so that the chunk (and the packed block of F) stays in L2 with many classes (174: 522
// rows, 1 MiB; 1.5x faster than one call).
void brgemm_rows(int64_t M, int64_t nb, int64_t Kg, const uint16_t* parts, int64_t lda, const uint32_t* pb, float* po) {
#if FASTCAM_HAVE_BRGEMM
  for (int64_t m0 = 0; m0 < M; m0 += kMRows)
    at::native::cpublas::brgemm(std::min(kMRows, M - m0), nb, Kg, lda, kBlock, kBlock, false,
                                reinterpret_cast<const at::BFloat16*>(parts + m0 * lda),
                                reinterpret_cast<const at::BFloat16*>(pb), po + m0 * kBlock, true);
#endif
}

// out[mb, nb] (row stride ldc) = rows of F (row stride lda) x a packed block of parts^T.
void brgemm_block(int64_t mb, int64_t nb, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* pw, float* po,
                  int64_t ldc) {
#if FASTCAM_HAVE_BRGEMM
  at::native::cpublas::brgemm(mb, nb, K, lda, kBlock, ldc, false, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(pw), po, true);
#endif
}

void brgemm_done() {
#if FASTCAM_HAVE_BRGEMM
  at::native::cpublas::brgemm_release(true);
#endif
}

}  // namespace

bool bf16_gemm_available() {
  const bool hardware = amx::available() || brgemm_hardware();
  const char* env = std::getenv("FASTCAM_CPU_BF16_GEMM");
  return hardware && !(env && std::string(env) == "0");
}

std::vector<char> scores_bf16(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores) {
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = w.size(0);
  std::vector<char> done(B, 0);
  if (B == 0 || K == 0 || N == 0 || C == 0) return done;
  const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
  const bool unit_n = sn == 1 || N == 1, unit_k = (sk == 1 || K == 1) && K % 2 == 0;
  // The tiles read channels-last rows as they lie, 32 channels a step: K % 32 == 0 there, else
  // brgemm (pairs of channels).
  const bool use_amx = amx::available() && (unit_n || K % 32 == 0);
  if (!use_amx && !brgemm_hardware()) return done;
  // Measured on Sapphire Rapids (2 cores, AMX) against the fp32 path (converted features, MKL),
  // one thread, the two paths alternated in one process (benchmarks/NOTES.md 24, brgemm): NCHW
  // 1.6-1.9x faster (resnet50@224 B=8 519 -> 277 us, densenet121@512 B=4 669 -> 341, 174
  // classes B=2 1627 -> 981). Channels-last: 1.1-2x faster from 128 positions, up to 2.6x
  // slower with few (7x7: ResNet-50 at 224), which stay on the fp32 path.
  if (!(unit_n || (unit_k && N >= 128))) return done;
  // Kg: the GEMM's inner dimension, K padded with zeros (to a multiple of 32 for the tiles, of 2
  // for brgemm); Mg: the parts' rows, padded to a multiple of 16 for the tiles.
  // The parts' rows padded by 64 bytes: with a row stride of a power of two (K = 2048: 4 KiB)
  // every row of an A tile falls in the same L1 set (measured: the forward 1.6x slower).
  const int64_t M = kParts * C, Kg = use_amx ? amx::round_up(K, 32) : K + K % 2;
  const int64_t Mg = use_amx ? amx::round_up(M, 16) : M, lda = Kg + 32;
  const amx::Buffer<uint16_t> parts = split_weight(w.const_data_ptr<float>(), C, K, Mg, lda);
  const auto* f = reinterpret_cast<const uint16_t*>(features.const_data_ptr<c10::BFloat16>());
  float* s = scores.mutable_data_ptr<float>();
  // done[b]: every one of image b's `blocks` tasks finished with finite scores.
  auto images_done = [&](const std::vector<char>& ok, int64_t blocks) {
    for (int64_t b = 0; b < B; ++b) {
      done[b] = 1;
      for (int64_t j = 0; j < blocks; ++j) done[b] = done[b] && ok[b * blocks + j];
    }
  };
  // Sums the parts' products out[p * C + c] (row stride `ld`, column stride `step`) of `count`
  // positions into scores[b, c, n0 + i]; whether every sum is finite.
  auto combine = [&](const float* out, int64_t ld, int64_t step, int64_t b, int64_t n0, int64_t count) {
    return combine_parts(out, C, ld, step, count, s + b * C * N + n0, N);
  };
  if (unit_n) {
    // NCHW: S[b][:, block] = parts x F[b][:, block] for blocks of kBlock positions; each task
    // packs its block of the features (Kg x kBlock, in the L2 cache) and runs the GEMM on it.
    const int64_t blocks = (N + kBlock - 1) / kBlock, tasks = B * blocks;
    std::vector<char> ok(tasks, 0);
    at::parallel_for(0, tasks, gemm_grain(M * std::min(kBlock, N) * Kg), [&](int64_t t0, int64_t t1) {
      thread_local amx::Buffer<uint32_t> packed;
      thread_local amx::Buffer<float> out;
      uint32_t* pb = thread_buffer(packed, (Kg / 2) * kBlock);
      float* po = thread_buffer(out, Mg * kBlock);
      std::optional<amx::Tiles> tiles;
      if (use_amx) tiles.emplace();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blocks, n0 = (t % blocks) * kBlock, nb = std::min(kBlock, N - n0);
        const int64_t cols = use_amx ? amx::round_up(nb, 16) : nb;
        pack_pairs(f + b * sb + n0, K, nb, sk, Kg / 2, cols, pb);
        if (use_amx) amx::gemm(Mg, cols, Kg, parts.data(), lda, pb, kBlock, po, kBlock, false);
        else brgemm_rows(M, nb, Kg, parts.data(), lda, pb, po);
        ok[t] = combine(po, kBlock, 1, b, n0, nb);
      }
      if (!use_amx) brgemm_done();
    });
    images_done(ok, blocks);
    return done;
  }
  // Channels-last and tokens: S[b]^T[rows] = F[b][rows, :] x parts^T, the features read as they
  // lie (each position's K channels contiguous) and the parts packed once, transposed into
  // blocks of kBlock of their Mg columns: the pair (k, k + 1) of row m of the parts is one
  // 32-bit word, moved to block m / kBlock, pair-row k / 2, column m % kBlock.
  const int64_t wblocks = (Mg + kBlock - 1) / kBlock, ldw = use_amx ? Mg : kBlock;
  amx::Buffer<uint32_t> wpacked(wblocks * (Kg / 2) * kBlock, 0);
  for (int64_t m = 0; m < Mg; ++m) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(parts.data() + m * lda);
    // the tiles read one matrix of Mg columns (ldw = Mg), brgemm blocks of kBlock columns
    uint32_t* dst = use_amx ? wpacked.data() + m : wpacked.data() + (m / kBlock) * (Kg / 2) * kBlock + m % kBlock;
    for (int64_t kk = 0; kk < Kg / 2; ++kk) dst[kk * ldw] = row[kk];
  }
  const int64_t row_blocks = (N + kRows - 1) / kRows, tasks = B * row_blocks;
  std::vector<char> ok(tasks, 0);
  at::parallel_for(0, tasks, gemm_grain(std::min(kRows, N) * M * K), [&](int64_t t0, int64_t t1) {
    thread_local amx::Buffer<float> out;
    thread_local amx::Buffer<uint16_t> tail;
    float* po = thread_buffer(out, kRows * Mg);
    std::optional<amx::Tiles> tiles;
    if (use_amx) tiles.emplace();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / row_blocks, n0 = (t % row_blocks) * kRows, mb = std::min(kRows, N - n0);
      const uint16_t* a = f + b * sb + n0 * sn;
      if (use_amx) {
        int64_t rows = mb, ld = sn;
        if (mb % 16 != 0) {  // the last rows of an image, copied into a block padded with zero rows
          rows = amx::round_up(mb, 16), ld = K;
          uint16_t* pa = thread_buffer(tail, rows * K);
          for (int64_t i = 0; i < mb; ++i) std::memcpy(pa + i * K, a + i * sn, K * sizeof(uint16_t));
          std::fill(pa + mb * K, pa + rows * K, uint16_t(0));
          a = pa;
        }
        amx::gemm(rows, Mg, Kg, a, ld, wpacked.data(), Mg, po, Mg, false);
        ok[t] = combine(po, 1, Mg, b, n0, mb);
        continue;
      }
      for (int64_t j = 0; j < wblocks; ++j)
        brgemm_block(mb, std::min(kBlock, M - j * kBlock), K, a, sn, wpacked.data() + j * (Kg / 2) * kBlock, po + j * kBlock, M);
      ok[t] = combine(po, 1, M, b, n0, mb);
    }
    if (!use_amx) brgemm_done();
  });
  images_done(ok, row_blocks);
  return done;
}

bool TilesBackward::any() const {
  return weights || std::any_of(dense.begin(), dense.end(), [](char d) { return d != 0; });
}

TilesBackward tiles_backward_plan(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                                  const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0,
                                  const at::Tensor& df, const at::Tensor& dw, int64_t dense_above) {
  TilesBackward plan;
  plan.dense.assign(features.size(0), 0);
  if ((!df.defined() && !dw.defined()) || !amx::available() || features.scalar_type() != at::kBFloat16 ||
      w.scalar_type() != at::kFloat)
    return plan;
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = w.size(0);
  if (K % 16 != 0 || N == 0 || C == 0 || B == 0) return plan;
  const int64_t sk = features.stride(1), sn = features.stride(2);
  const bool nchw = sn == 1;
  if (!nchw && sk != 1) return plan;
  if (df.defined() && !(nchw ? df.stride(2) == 1 || N == 1 : df.stride(1) == 1)) return plan;
  TORCH_INTERNAL_ASSERT(w.is_contiguous() && (!gm.defined() || gm.is_contiguous()) &&
                        (!g0.defined() || g0.is_contiguous()));
  // Non-finite operands: the parts' products could add up to NaN where fp32 gives inf.
  if (!all_finite(w.const_data_ptr<float>(), C * K)) return plan;
  if (g0.defined() && !all_finite(g0.const_data_ptr<float>(), B * C)) return plan;
  for (int64_t b = 0; b < B; ++b)
    for (const int64_t c : rows[b])
      if (!all_finite(gm.const_data_ptr<float>() + (b * C + c) * N, N)) return plan;
  for (int64_t b = 0; b < B; ++b) plan.dense[b] = int64_t(rows[b].size()) == C && C > dense_above;
  plan.weights = nchw && dw.defined();
  return plan;
}

// With P = 3C parts and, for dF, the inner dimension (W_hi | W_hi | W_mid)^T against
// (G_hi; G_mid; G_hi) (error ~2^-16 of |W||G|, far below dF's bf16 rounding), the operands
// padded with zeros to the tiles' multiples:
//   NCHW (F[b] is [K, N]): dW^T [K, 3r + 1] = F[b] [K, N] x (G parts of the r weighted rows | 1)^T,
//                          the last column Fsum[b]; the F rows read as they lie
//                          dF[b] [K, N] = W parts^T [K, P'] x G parts [P', N]          (dense images)
//   channels-last (F[b] [N, K]): dW parts [P, K] += G parts [P, N] x F[b] [N, K]       (dense images)
//                          dF[b]^T [N, K] = G parts^T [N, P'] x W parts [P', K]        (dense images)
// in one parallel region over blocks of 64 channels: each task owns its channels of dW and dF
// (no atomics; the sums' order does not depend on the threads) and prepares its block of the
// weight operand once for all images.
void head_backward_tiles(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                         const std::vector<std::vector<int64_t>>& rows, const at::Tensor& g0, const at::Tensor& v,
                         at::Tensor& df, at::Tensor& dw, const TilesBackward& plan) {
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = w.size(0);
  const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
  const bool nchw = sn == 1;
  const float* wp = w.const_data_ptr<float>();
  const float* gp = gm.defined() ? gm.const_data_ptr<float>() : nullptr;
  const float* g0p = g0.defined() ? g0.const_data_ptr<float>() : nullptr;
  const int64_t P = kParts * C, M3 = amx::round_up(P, 16), I3 = amx::round_up(P, 32);
  const int64_t Np32 = amx::round_up(N, 32), Np16 = amx::round_up(N, 16);
  // The images each part takes: dF of the dense ones (every map weighted); dW of every image
  // with a weighted map or a logits' gradient (NCHW), else of the dense ones (channels-last).
  std::vector<int64_t> dense, weighted;
  for (int64_t b = 0; b < B; ++b) {
    const bool is_dense = plan.dense[b];
    if (is_dense) dense.push_back(b);
    if (plan.weights ? !rows[b].empty() || g0p : is_dense && dw.defined()) weighted.push_back(b);
  }
  const bool do_df = df.defined() && !dense.empty();
  // The bf16 parts of W [3][C][K] and of the weighted rows of G: for image b, offset goff[b],
  // [3][rows][N].
  amx::Buffer<uint16_t> wparts(do_df ? kParts * C * K : 0);  // written whole below
  if (do_df)  // by ranges of classes on every thread (174 x 1024 values: ~100 us on one)
    at::parallel_for(0, C, std::max<int64_t>(1, grain(8 * K)), [&](int64_t c0, int64_t c1) {
      uint16_t* hi = wparts.data() + c0 * K;
      split_values(wp + c0 * K, (c1 - c0) * K, hi, hi + C * K, hi + 2 * C * K);
    });
  std::vector<char> uses_g(B, 0);  // the images whose G parts an operand below takes
  for (const int64_t b : weighted) uses_g[b] = 1;
  for (const int64_t b : dense) uses_g[b] = 1;
  std::vector<int64_t> goff(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) goff[b + 1] = goff[b] + (uses_g[b] ? kParts * int64_t(rows[b].size()) * N : 0);
  amx::Buffer<uint16_t> gparts(goff[B]);  // written whole below
  auto gpart = [&](int64_t b, int64_t p, int64_t r) {
    return gparts.data() + goff[b] + (p * int64_t(rows[b].size()) + r) * N;
  };
  auto wpart = [&](int64_t p, int64_t c) { return wparts.data() + (p * C + c) * K; };
  // Row j of dF's inner dimension: (hi, hi, mid) of W against (hi, mid, hi) of G, class j % C.
  constexpr int64_t kWPart[3] = {0, 0, 1}, kGPart[3] = {0, 1, 0};
  // The G operands, zero-filled first (the padding):
  //   dW, NCHW: VNNI of (G parts | 1)^T [Np32 / 2][wcols[b]]; channels-last: G parts [M3][Np32].
  //   dF: NCHW VNNI of dF's G rows [I3 / 2][Np16]; channels-last dF's G rows^T [Np16][I3].
  std::vector<int64_t> wcols(B, 0), woff(B + 1, 0);
  for (const int64_t b : weighted)
    wcols[b] = nchw ? amx::round_up(kParts * int64_t(rows[b].size()) + (g0p ? 1 : 0), 16) : M3;
  for (int64_t b = 0; b < B; ++b) woff[b + 1] = woff[b] + (nchw ? (Np32 / 2) * wcols[b] * 2 : wcols[b] * Np32);
  const int64_t gd_size = nchw ? (I3 / 2) * Np16 * 2 : Np16 * I3;
  // gd of the i-th dense image at dslot[b] = i.
  std::vector<int64_t> dslot(B, -1);
  for (int64_t i = 0; i < int64_t(dense.size()); ++i) dslot[dense[i]] = i;
  amx::Buffer<uint16_t> gw(woff[B], 0), gd(do_df ? int64_t(dense.size()) * gd_size : 0, 0);
  // Two regions over blocks of 16 rows of every image (an unlabeled image has C rows, the
  // others a few: by images, one thread would do nearly all): the bf16 parts of the weighted
  // rows of G, then the operands built from them.
  struct Item {
    int64_t b, r0;
  };
  std::vector<Item> split_items, build_items;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t nr = int64_t(rows[b].size());
    for (int64_t r0 = 0; uses_g[b] && r0 < nr; r0 += 16) split_items.push_back({b, r0});
    const int64_t np = std::max(wcols[b] > 0 ? kParts * nr : 0, do_df && plan.dense[b] ? P : 0);
    for (int64_t j0 = 0; j0 < np; j0 += 16) build_items.push_back({b, j0});
    if (wcols[b] > 0 && np == 0) build_items.push_back({b, 0});  // the column of ones alone
  }
  at::parallel_for(0, int64_t(split_items.size()), grain(48 * N), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, r0] = split_items[i];
      const int64_t nr = int64_t(rows[b].size());
      uint16_t* out = gparts.data() + goff[b];
      for (int64_t r = r0; r < std::min(nr, r0 + 16); ++r)
        split_values(gp + (b * C + rows[b][r]) * N, N, out + r * N, out + (nr + r) * N, out + (2 * nr + r) * N);
    }
  });
  at::parallel_for(0, int64_t(build_items.size()), grain(32 * N), [&](int64_t i0, int64_t i1) {
    const uint16_t* src[16];
    for (int64_t i = i0; i < i1; ++i) {
      const auto [b, j0] = build_items[i];
      const int64_t nr = int64_t(rows[b].size()), np = kParts * nr;
      if (wcols[b] > 0 && j0 < np) {  // rows j0.. of the parts (part j / nr of row j % nr)
        uint16_t* out = gw.data() + woff[b];
        const int64_t jn = std::min<int64_t>(16, np - j0);
        for (int64_t j = 0; j < jn; ++j) src[j] = gpart(b, (j0 + j) / nr, (j0 + j) % nr);
        if (nchw)
          transpose_pairs(src, jn, N, reinterpret_cast<uint32_t*>(out) + j0, wcols[b]);
        else
          for (int64_t j = 0; j < jn; ++j) std::memcpy(out + (j0 + j) * Np32, src[j], N * sizeof(uint16_t));
      }
      if (wcols[b] > 0 && j0 == 0 && nchw && g0p) {  // the column of ones, after the parts: Fsum[b]
        auto* ones = reinterpret_cast<uint32_t*>(gw.data() + woff[b]) + np;
        constexpr uint32_t kOne = 0x3f80;  // 1.0 in bf16
        for (int64_t n = 0; n < N; n += 2) ones[(n / 2) * wcols[b]] = kOne | (n + 1 < N ? kOne << 16 : 0);
      }
      if (do_df && plan.dense[b] && j0 < P) {  // dF's G rows j0..: (hi, mid, hi)[j / C] of class j % C
        uint16_t* out = gd.data() + dslot[b] * gd_size;
        const int64_t jn = std::min<int64_t>(16, P - j0);
        for (int64_t j = 0; j < jn; ++j) src[j] = gpart(b, kGPart[(j0 + j) / C], (j0 + j) % C);
        if (nchw)
          for (int64_t j = 0; j < jn; j += 2)  // pair row (j0 + j) / 2: j0 is even
            interleave(src[j], j + 1 < jn ? src[j + 1] : nullptr, N,
                       reinterpret_cast<uint32_t*>(out) + (j0 + j) / 2 * Np16);
        else
          transpose_rows(src, jn, N, out + j0, I3);
      }
    }
  });
  const auto* f = reinterpret_cast<const uint16_t*>(features.const_data_ptr<c10::BFloat16>());
  auto* dfp = df.defined() ? df.mutable_data_ptr<c10::BFloat16>() : nullptr;
  float* dwp = dw.defined() ? dw.mutable_data_ptr<float>() : nullptr;
  const float* vp = v.defined() ? v.const_data_ptr<float>() : nullptr;
  // Elements readable from f: a row's tile reads run Np32 - N values into the next row, which
  // the zero rows of the G operand cancel; past the storage's end they are copied instead.
  const int64_t readable = int64_t(features.storage().nbytes() / sizeof(uint16_t)) - features.storage_offset();
  // NCHW: Fsum[b] per image (the column of ones); channels-last: dW's parts [M3][K] over the dense images.
  std::vector<float> fsum(nchw && g0p ? B * K : 0);
  amx::Buffer<float> dw_parts(!nchw && dw.defined() && !weighted.empty() ? M3 * K : 0);  // the first image's GEMM writes it
  // dW[rows[b], k0:k0 + kb] (and Fsum[b] into fsum_b, if not null) of image b in fp32 by direct
  // loops, where the tiles' sums were not finite.
  auto redo_in_fp32 = [&](int64_t b, float* fsum_b, int64_t k0, int64_t kb) {
    const int64_t nr = int64_t(rows[b].size());
    std::vector<const float*> g(nr);
    for (int64_t r = 0; r < nr; ++r) g[r] = gp + (b * C + rows[b][r]) * N;
    direct_image_backward(features.const_data_ptr<c10::BFloat16>() + b * sb, sk, sn, nullptr, 0, 0, K, N, wp, g.data(),
                          rows[b].data(), nr, nullptr, dwp, fsum_b, k0, k0 + kb);
  };
  constexpr int64_t kChannels = 64;
  const int64_t blocks = (K + kChannels - 1) / kChannels;
  int64_t work = 0;  // multiply-adds of a block
  for (const int64_t b : weighted) work += kChannels * wcols[b] * Np32;
  if (do_df) work += int64_t(dense.size()) * kChannels * Np16 * I3;
  at::parallel_for(0, blocks, gemm_grain(work), [&](int64_t t0, int64_t t1) {
    thread_local amx::Buffer<uint16_t> wblock, fblock;
    thread_local amx::Buffer<float> dfblock, cblock, sums;
    const uint16_t* src[16];
    amx::Tiles tiles;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kChannels, kb = std::min(kChannels, K - k0);
      // This block's W operand for dF: NCHW W parts^T [kb][I3]; channels-last VNNI [I3 / 2][kb].
      uint16_t* wb = nullptr;
      if (do_df) {
        wb = thread_buffer(wblock, kb * I3);
        std::fill(wb, wb + kb * I3, uint16_t(0));
        for (int64_t j0 = 0; j0 < P; j0 += 16) {
          const int64_t jn = std::min<int64_t>(16, P - j0);
          for (int64_t j = 0; j < jn; ++j) src[j] = wpart(kWPart[(j0 + j) / C], (j0 + j) % C) + k0;
          if (nchw)
            transpose_rows(src, jn, kb, wb + j0, I3);
          else
            for (int64_t j = 0; j < jn; j += 2)
              interleave(src[j], j + 1 < jn ? src[j + 1] : nullptr, kb, reinterpret_cast<uint32_t*>(wb) + (j0 + j) / 2 * kb);
        }
      }
      for (int64_t i = 0; i < int64_t(weighted.size()); ++i) {
        const int64_t b = weighted[i], nr = int64_t(rows[b].size());
        const uint16_t* fb = f + b * sb;
        const auto* gwb = reinterpret_cast<const uint32_t*>(gw.data() + woff[b]);
        if (!nchw) {  // B = F[b]'s columns k0..k0 + kb in pairs of positions; the dense images' parts summed
          uint32_t* pb = reinterpret_cast<uint32_t*>(thread_buffer(fblock, Np32 * kb));
          pack_pairs(fb + k0, N, kb, sn, Np32 / 2, kb, pb, kb);
          amx::gemm(M3, kb, Np32, gw.data() + woff[b], Np32, pb, kb, dw_parts.data() + k0, K, i > 0);
          continue;
        }
        // A = F[b]'s rows k0..k0 + kb as they lie, or copied where the reads would pass the storage's end.
        const uint16_t* a = fb + k0 * sk;
        int64_t lda = sk;
        if (b * sb + (k0 + kb - 1) * sk + Np32 > readable) {
          uint16_t* pa = thread_buffer(fblock, kb * Np32);
          for (int64_t k = 0; k < kb; ++k) {
            std::memcpy(pa + k * Np32, a + k * sk, N * sizeof(uint16_t));
            std::fill(pa + k * Np32 + N, pa + (k + 1) * Np32, uint16_t(0));
          }
          a = pa, lda = Np32;
        }
        const int64_t ld = wcols[b], used = kParts * nr + (g0p ? 1 : 0);
        float* cb = thread_buffer(cblock, kb * ld);
        amx::gemm(kb, ld, Np32, a, lda, gwb, ld, cb, ld, false);
        if (all_finite_rows(cb, kb, used, ld)) {
          add_transposed_parts(cb, ld, kb, nr, rows[b].data(), dwp + k0, K);  // dW[row r, k] += (hi + mid) + lo
          if (g0p)  // Fsum[b, k] from the column of ones
            for (int64_t k = 0; k < kb; ++k) fsum[b * K + k0 + k] = cb[k * ld + 3 * nr];
        } else {
          // A sum that is not finite (an infinite or NaN feature, or one in the next row's first
          // values that the tiles read): this block of image b again in fp32.
          redo_in_fp32(b, g0p ? fsum.data() + b * K : nullptr, k0, kb);
        }
      }
      // NCHW: dW[c, k] += g0[b, c] Fsum[b, k], in a fixed order of images.
      if (nchw && g0p && dwp)
        for (int64_t c = 0; c < C; ++c)
          for (const int64_t b : weighted) axpy(dwp + c * K + k0, fsum.data() + b * K + k0, g0p[b * C + c], kb);
      // Channels-last: dW[c, k] += (hi + mid) + lo of the dense images' summed parts, unless a sum
      // is not finite (an infinite feature): then this block of each dense image again in fp32.
      if (!nchw && !weighted.empty()) {
        float* sum = thread_buffer(sums, kb * C);
        bool finite = true;
        for (int64_t c = 0; c < C; ++c) {
          const float* hi = dw_parts.data() + c * K + k0;
          finite = add3(hi, hi + C * K, hi + 2 * C * K, kb, sum + c * kb) && finite;
        }
        if (finite) {
          for (int64_t c = 0; c < C; ++c) axpy(dwp + c * K + k0, sum + c * kb, 1.f, kb);
        } else {
          for (const int64_t b : weighted) redo_in_fp32(b, nullptr, k0, kb);  // dense: rows[b] is every class
        }
      }
      if (!do_df) continue;
      float* dfb = thread_buffer(dfblock, kb * Np16);
      for (const int64_t b : dense) {
        const float* vb = vp ? vp + b * K + k0 : nullptr;
        if (nchw) {
          amx::gemm(kb, Np16, I3, wb, I3, reinterpret_cast<const uint32_t*>(gd.data() + dslot[b] * gd_size), Np16, dfb, Np16,
                    false);
          store_plus(dfb, kb, N, Np16, vb, true, dfp + b * df.stride(0) + k0 * df.stride(1), df.stride(1));
        } else {
          amx::gemm(Np16, kb, I3, gd.data() + dslot[b] * gd_size, I3, reinterpret_cast<const uint32_t*>(wb), kb, dfb, kb,
                    false);
          store_plus(dfb, N, kb, kb, vb, false, dfp + b * df.stride(0) + k0, df.stride(2));
        }
      }
    }
  });
}

}  // namespace fastcam::cpu
