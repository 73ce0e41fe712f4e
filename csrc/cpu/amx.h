// A bf16 GEMM with fp32 results on Intel's AMX tiles (Sapphire Rapids and later), written for
// this library's shapes: oneDNN's brgemm ukernel (ATen's cpublas::brgemm) reached ~230 GMAC/s a
// core on them, these four-accumulator blocks 450-600 (benchmarks/NOTES.md, version 27).
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

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

// The allocator of tile operands and results: a tile row is 64 bytes, and in a buffer that
// starts off a cache line (glibc's malloc aligns to 16) every row load and store of a tile
// spans two lines (measured: the 174-class backward's dF GEMM 1.7x slower on the thread whose
// buffers were off). Elements are left uninitialized unless a value is given (vector(n) and
// resize(n) do not zero): every user writes what it reads.
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;  // default-initialized: no zeroing
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(static_cast<Args&&>(args)...);
  }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const {
    return false;
  }
};
template <typename T>
using Buffer = std::vector<T, CacheAligned<T>>;

// n rounded up to a multiple of m.
inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace fastcam::cpu::amx
