#include "amx.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__has_include)
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif
#endif

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12))
#define FASTCAM_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FC_AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
#else
#define FASTCAM_AMX 0
#endif

namespace fastcam::cpu::amx {

#if FASTCAM_AMX
namespace {

// The 64-byte operand of ldtilecfg (palette 1): 8 tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool hardware_and_os() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;  // the OS saves XTILECFG and XTILEDATA
  // Linux 5.16+: a process must ask for the tile data state before its first use
  // (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); oneDNN asks the same, which is harmless.
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
}

// Tiles: c(i, j) = 2 i + j (i, j < 2), a(i) = 4 + i, b(j) = 6 + j. One block of c, 16 MT rows by
// 16 NT columns, over the whole of K: the accumulators stay in the tiles.
template <int MT, int NT>
FC_AMX_TARGET inline void block(int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
                                int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sb = ldb * 4, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if constexpr (NT == 2) _tile_loadd(1, c + 16, sc);
    if constexpr (MT == 2) _tile_loadd(2, c + 16 * ldc, sc);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  for (int64_t k = 0; k < K; k += 32) {
    const uint32_t* bk = b + (k / 2) * ldb;
    _tile_loadd(4, a + k, sa);
    _tile_loadd(6, bk, sb);
    if constexpr (NT == 2) _tile_loadd(7, bk + 16, sb);
    if constexpr (MT == 2) _tile_loadd(5, a + 16 * lda + k, sa);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc);
  if constexpr (NT == 2) _tile_stored(1, c + 16, sc);
  if constexpr (MT == 2) _tile_stored(2, c + 16 * ldc, sc);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c + 16 * ldc + 16, sc);
}

FC_AMX_TARGET void configure() {
  static const TileConfig config = [] {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    return cfg;
  }();
  __asm__ volatile("" : : "r"(&config) : "memory");  // GCC may not see ldtilecfg read its operand
  _tile_loadconfig(&config);
}

// tilerelease, through ATen's brgemm_release where torch has it: ATen caches which brgemm
// configured this thread's tiles and skips configuring them again, so its cache is reset with
// them (else its next brgemm call would run on released tiles).
FC_AMX_TARGET void release() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  at::native::cpublas::brgemm_release(true);
#else
  _tile_release();
#endif
}

}  // namespace

bool available() {
  static const bool ok = hardware_and_os();
  const char* env = std::getenv("FASTCAM_CPU_AMX");
  return ok && !(env && std::string(env) == "0");
}

Tiles::Tiles() { configure(); }
Tiles::~Tiles() { release(); }

// Columns outer, rows inner: a column block of b (K x 32, 64 KiB at K = 1024) is reused by
// every row block of a while a streams through; measured at the forward's shapes (522-row
// weight parts by 64 positions, K 1024-2048) the fastest of the orders and K-chunkings tried.
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(M % 16 == 0 && N % 16 == 0 && K % 32 == 0, "amx::gemm: unpadded operands");
  for (int64_t n = 0; n < N; n += 32) {
    const bool two_n = n + 32 <= N;
    for (int64_t m = 0; m < M; m += 32) {
      const uint16_t* am = a + m * lda;
      float* cm = c + m * ldc + n;
      if (m + 32 <= M) {
        if (two_n) block<2, 2>(K, am, lda, b + n, ldb, cm, ldc, accumulate);
        else block<2, 1>(K, am, lda, b + n, ldb, cm, ldc, accumulate);
      } else {
        if (two_n) block<1, 2>(K, am, lda, b + n, ldb, cm, ldc, accumulate);
        else block<1, 1>(K, am, lda, b + n, ldb, cm, ldc, accumulate);
      }
    }
  }
}

#else  // no AMX in this build

bool available() { return false; }
Tiles::Tiles() {}
Tiles::~Tiles() {}
void gemm(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "amx::gemm: this build has no AMX kernels");
}

#endif

}  // namespace fastcam::cpu::amx
