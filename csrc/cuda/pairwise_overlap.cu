// pairwise_overlap on CUDA: every pair of maps within each group (kernels in overlap.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/map_math.h"
#include "common.cuh"
#include "launch.h"
#include "overlap.cuh"

namespace fastcam::cuda {

size_t pairwise_overlap_workspace_bytes(int64_t G, int64_t P, bool dbl, bool backward) {
  Carver c(nullptr);
  if (dbl) {
    c.take<MapStats<double>>(G * P);
    c.take<PairCoef<double>>(backward ? G * P * P : 0);
  } else {
    c.take<MapStats<float>>(G * P);
    c.take<PairCoef<float>>(backward ? G * P * P : 0);
  }
  return c.used();
}

cudaError_t pairwise_overlap_forward(const void* cams, bool dbl, int64_t G, int64_t P, int64_t N, Measure m,
                                     double eps, void* out, void* workspace, cudaStream_t stream) {
  return dispatch_acc(dbl, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Carver c(workspace);
    MapStats<T>* stats = c.take<MapStats<T>>(G * P);
    return launch_overlap_forward<T>(static_cast<const T*>(cams), G, P, N, P * N, N, m, T(eps), stats,
                                     static_cast<T*>(out), stream);
  });
}

cudaError_t pairwise_overlap_backward(const void* grad, const void* cams, bool dbl, int64_t G, int64_t P, int64_t N,
                                      Measure m, double eps, void* grad_cams, void* workspace, cudaStream_t stream) {
  return dispatch_acc(dbl, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    Carver c(workspace);
    MapStats<T>* stats = c.take<MapStats<T>>(G * P);
    PairCoef<T>* coef = c.take<PairCoef<T>>(G * P * P);
    return launch_overlap_backward<T>(GradOutWeight<T>{static_cast<const T*>(grad), P}, static_cast<const T*>(cams),
                                      G, P, N, P * N, N, m, T(eps), stats, coef, static_cast<T*>(grad_cams), stream);
  });
}

}  // namespace fastcam::cuda
