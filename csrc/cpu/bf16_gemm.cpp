#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#if defined(__has_include)
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif
#endif

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

// W [C, K] as kParts bf16 matrices stacked [kParts * C, ld]: row p * C + c holds part p of row
// c (hi = bf16(W), mid = bf16(W - hi), lo = bf16(W - hi - mid)); columns K..ld are zero.
FC_MULTIVERSION void split_rows(const float* w, int64_t C, int64_t K, int64_t ld, uint16_t* out) {
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict row = w + c * K;
    uint16_t* __restrict hi = out + c * ld;
    uint16_t* __restrict mid = out + (C + c) * ld;
    uint16_t* __restrict lo = out + (2 * C + c) * ld;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t h = to_bf16(row[k]);
      const float rest = row[k] - from_bf16(h);
      const uint16_t m = to_bf16(rest);
      hi[k] = h;
      mid[k] = m;
      lo[k] = to_bf16(rest - from_bf16(m));
    }
    for (int64_t k = K; k < ld; ++k) hi[k] = mid[k] = lo[k] = 0;
  }
}

std::unique_ptr<uint16_t[]> split_weight(const float* w, int64_t C, int64_t K, int64_t ld) {
  static_assert(kParts == 3, "split_rows writes three parts");
  std::unique_ptr<uint16_t[]> out(new uint16_t[kParts * C * ld]);  // every element written below
  split_rows(w, C, K, ld, out.get());
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

// The brgemm's B operand in the VNNI layout: rows [0, K) and columns [0, nb) of a bf16 matrix
// (element (k, j) at in[k * ld + j]) as pairs of rows, out[(k / 2) * kBlock + j] holding
// (row k, row k + 1) of column j; a missing last odd row is zero.
FC_MULTIVERSION void pack_pairs(const uint16_t* in, int64_t K, int64_t nb, int64_t ld, uint32_t* out) {
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const uint16_t* __restrict r0 = in + k * ld;
    const uint16_t* __restrict r1 = r0 + ld;
    uint32_t* __restrict o = out + (k / 2) * kBlock;
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) o[j] = uint32_t(r0[j]) | (uint32_t(r1[j]) << 16);
  }
  if (k < K) {
    const uint16_t* __restrict r0 = in + k * ld;
    uint32_t* __restrict o = out + (k / 2) * kBlock;
    for (int64_t j = 0; j < nb; ++j) o[j] = uint32_t(r0[j]);
  }
}

template <typename T>
T* thread_buffer(std::vector<T>& buffer, int64_t size) {
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

}  // namespace

bool bf16_gemm_available() {
#if FASTCAM_HAVE_BRGEMM
  static const bool hardware = at::native::cpublas::could_pack(at::kBFloat16);
  const char* env = std::getenv("FASTCAM_CPU_BF16_GEMM");
  return hardware && !(env && std::string(env) == "0");
#else
  return false;
#endif
}

std::vector<char> scores_bf16(const at::Tensor& features, const at::Tensor& w, at::Tensor& scores) {
  const int64_t B = features.size(0), K = features.size(1), N = features.size(2), C = w.size(0);
  std::vector<char> done(B, 0);
#if FASTCAM_HAVE_BRGEMM
  if (B == 0 || K == 0 || N == 0 || C == 0) return done;
  const int64_t sb = features.stride(0), sk = features.stride(1), sn = features.stride(2);
  const bool unit_n = sn == 1 || N == 1, unit_k = (sk == 1 || K == 1) && K % 2 == 0;
  // Measured on Sapphire Rapids (2 cores, AMX) against the fp32 path (converted features, MKL),
  // one thread, the two paths alternated in one process (benchmarks/NOTES.md 24): NCHW 1.6-1.9x faster (resnet50@224 B=8 519 -> 277 us, densenet121@512 B=4
  // 669 -> 341, 174 classes B=2 1627 -> 981). Channels-last: 1.1-2x faster from 128 positions,
  // up to 2.6x slower with few (7x7: ResNet-50 at 224), which stay on the fp32 path.
  if (!(unit_n || (unit_k && N >= 128))) return done;
  // The parts' rows padded by 64 bytes: with a row stride of a power of two (K = 2048: 4 KiB)
  // every row of an A tile falls in the same L1 set (measured: the forward 1.6x slower).
  // Their rows in chunks of kMRows per call, so that the chunk (and the packed block of F)
  // stays in L2 with many classes (174: 522 rows, 1 MiB; 1.5x faster than one call).
  const int64_t Kp = K + K % 2, M = kParts * C, lda = Kp + 32;
  const std::unique_ptr<uint16_t[]> parts = split_weight(w.const_data_ptr<float>(), C, K, lda);
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
    // packs its block of the features (Kp x kBlock, in the L2 cache) and runs the GEMM on it.
    const int64_t blocks = (N + kBlock - 1) / kBlock, tasks = B * blocks;
    std::vector<char> ok(tasks, 0);
    at::parallel_for(0, tasks, gemm_grain(M * std::min(kBlock, N) * Kp), [&](int64_t t0, int64_t t1) {
      thread_local std::vector<uint32_t> packed;
      thread_local std::vector<float> out;
      uint32_t* pb = thread_buffer(packed, (Kp / 2) * kBlock);
      float* po = thread_buffer(out, M * kBlock);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / blocks, n0 = (t % blocks) * kBlock, nb = std::min(kBlock, N - n0);
        pack_pairs(f + b * sb + n0, K, nb, sk, pb);
        for (int64_t m0 = 0; m0 < M; m0 += kMRows)
          at::native::cpublas::brgemm(std::min(kMRows, M - m0), nb, Kp, lda, kBlock, kBlock, false,
                                      reinterpret_cast<const at::BFloat16*>(parts.get() + m0 * lda),
                                      reinterpret_cast<const at::BFloat16*>(pb), po + m0 * kBlock, true);
        ok[t] = combine(po, kBlock, 1, b, n0, nb);
      }
      at::native::cpublas::brgemm_release(true);
    });
    images_done(ok, blocks);
    return done;
  }
  // Channels-last and tokens: S[b]^T[rows] = F[b][rows, :] x parts^T, the features read as they
  // lie (each position's K channels contiguous) and the parts packed once, in blocks of kBlock
  // of their M = kParts * C columns.
  // parts^T packed: the pair (k, k + 1) of row m of the parts is one 32-bit word, moved to
  // block m / kBlock, pair-row k / 2, column m % kBlock.
  const int64_t wblocks = (M + kBlock - 1) / kBlock;
  std::vector<uint32_t> wpacked(wblocks * (Kp / 2) * kBlock, 0);
  for (int64_t m = 0; m < M; ++m) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(parts.get() + m * lda);
    uint32_t* dst = wpacked.data() + (m / kBlock) * (Kp / 2) * kBlock + m % kBlock;
    for (int64_t kk = 0; kk < Kp / 2; ++kk) dst[kk * kBlock] = row[kk];
  }
  const int64_t row_blocks = (N + kRows - 1) / kRows, tasks = B * row_blocks;
  std::vector<char> ok(tasks, 0);
  at::parallel_for(0, tasks, gemm_grain(std::min(kRows, N) * M * K), [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> out;
    float* po = thread_buffer(out, kRows * M);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / row_blocks, n0 = (t % row_blocks) * kRows, mb = std::min(kRows, N - n0);
      const auto* a = reinterpret_cast<const at::BFloat16*>(f + b * sb + n0 * sn);
      for (int64_t j = 0; j < wblocks; ++j)
        at::native::cpublas::brgemm(mb, std::min(kBlock, M - j * kBlock), K, sn, kBlock, M, false, a,
                                    reinterpret_cast<const at::BFloat16*>(wpacked.data() + j * (Kp / 2) * kBlock),
                                    po + j * kBlock, true);
      ok[t] = combine(po, 1, M, b, n0, mb);
    }
    at::native::cpublas::brgemm_release(true);
  });
  images_done(ok, row_blocks);
#endif
  return done;
}

}  // namespace fastcam::cpu
