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
// part p of row c (hi = bf16(W), mid = bf16(W - hi), lo = bf16(W - hi - mid)); columns K..ld and
// the rows past kParts * C are zero.
FC_MULTIVERSION void split_rows(const float* w, int64_t C, int64_t K, int64_t ld, uint16_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    uint16_t *hi = out + c * ld, *mid = out + (C + c) * ld, *lo = out + (2 * C + c) * ld;
    split_values(w + c * K, K, hi, mid, lo);
    for (int64_t k = K; k < ld; ++k) hi[k] = mid[k] = lo[k] = 0;
  }
}

std::unique_ptr<uint16_t[]> split_weight(const float* w, int64_t C, int64_t K, int64_t rows, int64_t ld) {
  static_assert(kParts == 3, "split_rows writes three parts");
  std::unique_ptr<uint16_t[]> out(new uint16_t[rows * ld]);  // every element written below
  split_rows(w, C, K, ld, out.get());
  std::fill(out.get() + kParts * C * ld, out.get() + rows * ld, uint16_t(0));
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
    for (int64_t j = nb; j < cols; ++j) o[j] = 0;
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
T* thread_buffer(std::vector<T>& buffer, int64_t size) {
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
  const std::unique_ptr<uint16_t[]> parts = split_weight(w.const_data_ptr<float>(), C, K, Mg, lda);
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
      thread_local std::vector<uint32_t> packed;
      thread_local std::vector<float> out;
      uint32_t* pb = thread_buffer(packed, (Kg / 2) * kBlock);
      float* po = thread_buffer(out, Mg * kBlock);
      std::optional<amx::Tiles> tiles;
      if (use_amx) tiles.emplace();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blocks, n0 = (t % blocks) * kBlock, nb = std::min(kBlock, N - n0);
        const int64_t cols = use_amx ? amx::round_up(nb, 16) : nb;
        pack_pairs(f + b * sb + n0, K, nb, sk, Kg / 2, cols, pb);
        if (use_amx) amx::gemm(Mg, cols, Kg, parts.get(), lda, pb, kBlock, po, kBlock, false);
        else brgemm_rows(M, nb, Kg, parts.get(), lda, pb, po);
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
  std::vector<uint32_t> wpacked(wblocks * (Kg / 2) * kBlock, 0);
  for (int64_t m = 0; m < Mg; ++m) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(parts.get() + m * lda);
    // the tiles read one matrix of Mg columns (ldw = Mg), brgemm blocks of kBlock columns
    uint32_t* dst = use_amx ? wpacked.data() + m : wpacked.data() + (m / kBlock) * (Kg / 2) * kBlock + m % kBlock;
    for (int64_t kk = 0; kk < Kg / 2; ++kk) dst[kk * ldw] = row[kk];
  }
  const int64_t row_blocks = (N + kRows - 1) / kRows, tasks = B * row_blocks;
  std::vector<char> ok(tasks, 0);
  at::parallel_for(0, tasks, gemm_grain(std::min(kRows, N) * M * K), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> out;
    thread_local std::vector<uint16_t> tail;
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

// The backward's GEMM images on the tiles. With P = 3C parts and, for dF, the inner dimension
// (W_hi | W_hi | W_mid)^T against (G_hi; G_mid; G_hi) (error ~2^-16 of |W||G|, far below dF's
// bf16 rounding), the operands padded with zeros to the tiles' multiples:
//   NCHW (F[b] is [K, N]):        dW^T parts [K, P] += F[b] [K, N] x G parts^T [N, P]
//                                 dF[b] [K, N] = W parts^T [K, P'] x G parts [P', N]
//   channels-last (F[b] [N, K]):  dW parts [P, K] += G parts [P, N] x F[b] [N, K]
//                                 dF[b]^T [N, K] = G parts^T [N, P'] x W parts [P', K]
// in one parallel region over blocks of 64 channels: each task owns its channels of dW and dF
// (no atomics; the sums' order does not depend on the threads) and prepares its block of the
// weight operand once for all images. The parts of dW are added up at the end.
bool grad_images_bf16(const at::Tensor& features, const at::Tensor& w, const at::Tensor& gm,
                      const std::vector<int64_t>& images, const at::Tensor& v, at::Tensor& df, at::Tensor& dw) {
  const int64_t I = int64_t(images.size());
  if (I == 0 || !amx::available() || features.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kFloat ||
      gm.scalar_type() != at::kFloat || (!df.defined() && !dw.defined()))
    return false;
  const int64_t K = features.size(1), N = features.size(2), C = w.size(0);
  if (K % 16 != 0 || N == 0 || C == 0) return false;
  const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
  const bool nchw = sn == 1;
  if (!nchw && sk != 1) return false;
  if (df.defined() && !(nchw ? df.stride(2) == 1 || N == 1 : df.stride(1) == 1)) return false;
  TORCH_INTERNAL_ASSERT(w.is_contiguous() && gm.is_contiguous() && (!v.defined() || v.is_contiguous()));
  const float* wp = w.const_data_ptr<float>();
  const float* gp = gm.const_data_ptr<float>();
  // Non-finite operands: the parts' products could add up to NaN where fp32 gives inf.
  if (!all_finite(wp, C * K)) return false;
  for (const int64_t b : images)
    if (!all_finite(gp + b * C * N, C * N)) return false;
  const int64_t P = kParts * C, M3 = amx::round_up(P, 16), I3 = amx::round_up(P, 32);
  const int64_t Np32 = amx::round_up(N, 32), Np16 = amx::round_up(N, 16);
  // The bf16 parts of W [3][C][ld] and of each image's G [3][C][N].
  const int64_t ldw = K;
  std::vector<uint16_t> wparts(kParts * C * ldw), gparts(I * kParts * C * N);
  split_values(wp, C * K, wparts.data(), wparts.data() + C * K, wparts.data() + 2 * C * K);
  at::parallel_for(0, I, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      uint16_t* g = gparts.data() + i * kParts * C * N;
      split_values(gp + images[i] * C * N, C * N, g, g + C * N, g + 2 * C * N);
    }
  });
  auto wpart = [&](int64_t p, int64_t c) { return wparts.data() + (p * C + c) * ldw; };
  auto gpart = [&](int64_t i, int64_t p, int64_t c) { return gparts.data() + ((i * kParts + p) * C + c) * N; };
  // Row j of dF's inner dimension: (hi, hi, mid) of W against (hi, mid, hi) of G, class j % C.
  constexpr int64_t kWPart[3] = {0, 0, 1}, kGPart[3] = {0, 1, 0};
  // The G operands of every image, in the layouts above.
  //   NCHW: gw[i] = VNNI of the G parts^T [Np32 / 2][M3]; gd[i] = VNNI of dF's G rows [I3 / 2][Np16].
  //   channels-last: gw[i] = the G parts [M3][Np32]; gd[i] = dF's G rows^T [Np16][I3].
  // Zero-filled first (the padding), then written by blocks of 16 rows of G parts in parallel.
  const int64_t gw_size = nchw ? (Np32 / 2) * M3 * 2 : M3 * Np32, gd_size = nchw ? (I3 / 2) * Np16 * 2 : Np16 * I3;
  std::vector<uint16_t> gw(dw.defined() ? I * gw_size : 0, 0), gd(df.defined() ? I * gd_size : 0, 0);
  const int64_t row_blocks = (P + 15) / 16;
  at::parallel_for(0, I * row_blocks, grain(16 * N), [&](int64_t t0, int64_t t1) {
    const uint16_t* rows[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / row_blocks, j0 = (t % row_blocks) * 16, jn = std::min<int64_t>(16, P - j0);
      if (dw.defined()) {  // rows j0.. of the G parts (part j / C of class j % C)
        uint16_t* out = gw.data() + i * gw_size;
        for (int64_t j = 0; j < jn; ++j) rows[j] = gpart(i, (j0 + j) / C, (j0 + j) % C);
        if (nchw)
          transpose_pairs(rows, jn, N, reinterpret_cast<uint32_t*>(out) + j0, M3);
        else
          for (int64_t j = 0; j < jn; ++j) std::memcpy(out + (j0 + j) * Np32, rows[j], N * sizeof(uint16_t));
      }
      if (df.defined()) {  // rows j0.. of dF's G operand: (hi, mid, hi)[j / C] of class j % C
        uint16_t* out = gd.data() + i * gd_size;
        for (int64_t j = 0; j < jn; ++j) rows[j] = gpart(i, kGPart[(j0 + j) / C], (j0 + j) % C);
        if (nchw)
          for (int64_t j = 0; j < jn; j += 2)  // pair row (j0 + j) / 2: j0 is even
            interleave(rows[j], j + 1 < jn ? rows[j + 1] : nullptr, N,
                       reinterpret_cast<uint32_t*>(out) + (j0 + j) / 2 * Np16);
        else
          transpose_rows(rows, jn, N, out + j0, I3);
      }
    }
  });
  // dW's parts: NCHW [K][M3], channels-last [M3][K].
  std::vector<float> dw_parts(dw.defined() ? K * M3 : 0);
  const auto* f = reinterpret_cast<const uint16_t*>(features.const_data_ptr<c10::BFloat16>());
  auto* dfp = df.defined() ? df.mutable_data_ptr<c10::BFloat16>() : nullptr;
  const float* vp = v.defined() ? v.const_data_ptr<float>() : nullptr;
  // dW[c, k0:k0 + kb] += (hi + mid) + lo of the block's parts, while they are in this thread's
  // cache. A sum that is not finite (an infinite feature: the parts' products can add up to NaN
  // where the fp32 product is infinite) has this block of dW computed again in fp32 instead.
  float* dwp = dw.defined() ? dw.mutable_data_ptr<float>() : nullptr;
  auto add_parts = [&](int64_t k0, int64_t kb) {
    thread_local std::vector<float> sums;
    float* sum = thread_buffer(sums, kb * C);
    bool finite = true;
    if (nchw) {  // parts [k][M3]: the three parts of a channel's classes are contiguous
      for (int64_t k = 0; k < kb; ++k) {
        const float* row = dw_parts.data() + (k0 + k) * M3;
        finite = add3(row, row + C, row + 2 * C, C, sum + k * C) && finite;
      }
      if (finite)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t k = 0; k < kb; ++k) dwp[c * K + k0 + k] += sum[k * C + c];
    } else {  // parts [M3][K]
      for (int64_t c = 0; c < C; ++c) {
        const float* hi = dw_parts.data() + c * K + k0;
        finite = add3(hi, hi + C * K, hi + 2 * C * K, kb, sum + c * kb) && finite;
      }
      if (finite)
        for (int64_t c = 0; c < C; ++c) axpy(dwp + c * K + k0, sum + c * kb, 1.f, kb);
    }
    if (finite) return;
    std::vector<const float*> g(C);
    std::vector<int64_t> all(C);
    for (int64_t c = 0; c < C; ++c) all[c] = c;
    for (const int64_t b : images) {
      for (int64_t c = 0; c < C; ++c) g[c] = gp + (b * C + c) * N;
      direct_image_backward(features.const_data_ptr<c10::BFloat16>() + b * sb, sk, sn, nullptr, 0, 0, K, N, wp,
                            g.data(), all.data(), C, nullptr, dwp, nullptr, k0, k0 + kb);
    }
  };
  constexpr int64_t kChannels = 64;
  const int64_t blocks = (K + kChannels - 1) / kChannels;
  const int64_t per_block = I * kChannels * ((dw.defined() ? M3 * Np32 : 0) + (df.defined() ? Np16 * I3 : 0));
  at::parallel_for(0, blocks, gemm_grain(per_block), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint16_t> wblock, fblock;
    thread_local std::vector<float> dfblock;
    amx::Tiles tiles;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kChannels, kb = std::min(kChannels, K - k0);
      // This block's W operand for dF: NCHW W parts^T [kb][I3]; channels-last VNNI [I3 / 2][kb].
      uint16_t* wb = nullptr;
      if (df.defined()) {
        wb = thread_buffer(wblock, kb * I3);
        std::fill(wb, wb + kb * I3, uint16_t(0));
        const uint16_t* rows[16];
        for (int64_t j0 = 0; j0 < P; j0 += 16) {
          const int64_t jn = std::min<int64_t>(16, P - j0);
          for (int64_t j = 0; j < jn; ++j) rows[j] = wpart(kWPart[(j0 + j) / C], (j0 + j) % C) + k0;
          if (nchw)
            transpose_rows(rows, jn, kb, wb + j0, I3);
          else
            for (int64_t j = 0; j < jn; j += 2)
              interleave(rows[j], j + 1 < jn ? rows[j + 1] : nullptr, kb, reinterpret_cast<uint32_t*>(wb) + (j0 + j) / 2 * kb);
        }
      }
      float* dfb = df.defined() ? thread_buffer(dfblock, kb * Np16) : nullptr;
      for (int64_t i = 0; i < I; ++i) {
        const int64_t b = images[i];
        const uint16_t* fb = f + b * sb;
        if (dw.defined()) {
          if (nchw) {
            // A = F[b]'s rows k0..k0 + kb, read as they lie when a row is whole 32-value steps.
            const uint16_t* a = fb + k0 * sk;
            int64_t lda = sk;
            if (N % 32 != 0) {
              uint16_t* pa = thread_buffer(fblock, kb * Np32);
              for (int64_t k = 0; k < kb; ++k) {
                std::memcpy(pa + k * Np32, a + k * sk, N * sizeof(uint16_t));
                std::fill(pa + k * Np32 + N, pa + (k + 1) * Np32, uint16_t(0));
              }
              a = pa, lda = Np32;
            }
            amx::gemm(kb, M3, Np32, a, lda, reinterpret_cast<const uint32_t*>(gw.data() + i * gw_size), M3,
                      dw_parts.data() + k0 * M3, M3, i > 0);
          } else {
            // B = F[b]'s columns k0..k0 + kb in pairs of positions.
            uint32_t* pb = reinterpret_cast<uint32_t*>(thread_buffer(fblock, Np32 * kb));
            pack_pairs(fb + k0, N, kb, sn, Np32 / 2, kb, pb, kb);
            amx::gemm(M3, kb, Np32, gw.data() + i * gw_size, Np32, pb, kb, dw_parts.data() + k0, K, i > 0);
          }
        }
        if (df.defined()) {
          const float* vb = vp ? vp + b * K + k0 : nullptr;
          if (nchw) {
            amx::gemm(kb, Np16, I3, wb, I3, reinterpret_cast<const uint32_t*>(gd.data() + i * gd_size), Np16, dfb, Np16,
                      false);
            store_plus(dfb, kb, N, Np16, vb, true, dfp + b * df.stride(0) + k0 * df.stride(1), df.stride(1));
          } else {
            amx::gemm(Np16, kb, I3, gd.data() + i * gd_size, I3, reinterpret_cast<const uint32_t*>(wb), kb, dfb, kb,
                      false);
            store_plus(dfb, N, kb, kb, vb, false, dfp + b * df.stride(0) + k0, df.stride(2));
          }
        }
      }
      if (dw.defined()) add_parts(k0, kb);
    }
  });
  return true;
}

}  // namespace fastcam::cpu
