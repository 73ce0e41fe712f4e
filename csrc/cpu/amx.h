// A bf16 GEMM with fp32 results on Intel's AMX tiles (Sapphire Rapids and later), written for
// this library's shapes: oneDNN's brgemm ukernel (ATen's cpublas::brgemm) reached ~230 GMAC/s a
// core on them, these four-accumulator blocks 450-600 (benchmarks/NOTES.md, version 27).
#pragma once

#include <cstdint>

namespace fastcam::cpu::amx {

// Whether the kernels below can run here: an x86-64 build with a compiler that knows the AMX
// intrinsics, a CPU with AMX-BF16, an OS that lets this process use the tile registers (Linux
// grants them on request, asked once), and FASTCAM_CPU_AMX is not "0".
bool available();

// The tile registers configured for gemm() on the calling thread while the object lives
// (ldtilecfg), released after (tilerelease). One per parallel task that calls gemm().
class Tiles {
 public:
  Tiles();
  ~Tiles();
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;
};

// c[M x N] = a[M x K] * b[K x N] (or += with accumulate), fp32 sums of exact bf16 products:
// a bf16 row-major (row stride lda elements); b bf16 in pairs of rows, the 32-bit word
// b[(k / 2) * ldb + j] holding (b[k][j], b[k + 1][j]) (the VNNI layout); c fp32, row stride ldc.
// M and N multiples of 16, K a multiple of 32: callers pad their operands with zeros. Inside a
// Tiles scope, and only where available().
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate);

// n rounded up to a multiple of m.
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace fastcam::cpu::amx
