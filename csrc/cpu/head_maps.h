// The per-map loops of cam_head on the CPU (logits, normalization and its backward), kept
// out of the op's translation unit so that they are compiled for several instruction sets
// (AVX-512, AVX2+FMA, baseline) and picked at load time, like vec.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../common/map_math.h"

namespace fastcam::cpu {

// For `count` maps of N values, the first being map `first` of the [B, C] grid:
// logits[i] = mean(s[i]) + bias[(first + i) % C] (bias may be null), cams[i] = normalize(s[i]).
void head_maps_forward(const float* s, float* cams, float* logits, const float* bias, int64_t first, int64_t count,
                       int64_t C, int64_t N, Normalize mode, float temperature, float eps);
void head_maps_forward(const double* s, double* cams, double* logits, const double* bias, int64_t first,
                       int64_t count, int64_t C, int64_t N, Normalize mode, double temperature, double eps);

// gs[i] = dL/dS of map i from gc[i] = dL/dcams, and nonzero[i] whether that row is not zero.
// A zero gc row on finite scores gives a zero row, left unwritten (nonzero[i] = 0).
void head_maps_backward(const float* gc, const float* s, const float* cams, float* gs, char* nonzero, int64_t count,
                        int64_t N, Normalize mode, float temperature, float eps);
void head_maps_backward(const double* gc, const double* s, const double* cams, double* gs, char* nonzero,
                        int64_t count, int64_t N, Normalize mode, double temperature, double eps);

// The features' storage types with their accumulation types, for the functions below:
// X(storage, accumulation). The fp32-accumulating ones are compiled for several instruction
// sets (head_maps.cpp); the float64 one, the gradcheck path, is a plain loop.
#define FC_FLOAT_ACC_TYPES(X) X(float, float) X(c10::BFloat16, float) X(c10::Half, float)
#define FC_FEATURE_TYPES(X) FC_FLOAT_ACC_TYPES(X) X(double, double)

// One image's part of the head backward by direct loops, for an image whose Gm has few
// nonzero rows (a GEMM would be mostly overhead, and would need the features converted):
// for the channels k in [k0, k1),
//   dF[k, n] = v[k] + sum_r W[rows[r], k] g[r][n]     (written in the features' type)
//   dW[rows[r], k] += sum_n g[r][n] F[k, n]
//   fsum[k] = sum_n F[k, n]
// f, df: the image's features and gradient, F[k, n] at f[k * sk + n * sn]; g: nr rows of N
// values; v and fsum (K values), df and dw may be null. dW [C, K] and W [C, K] are contiguous.
#define FC_DIRECT_BACKWARD(T, A)                                                                                  \
  void direct_image_backward(const T* f, int64_t sk, int64_t sn, T* df, int64_t dsk, int64_t dsn, int64_t K,     \
                             int64_t N, const A* w, const A* const* g, const int64_t* rows, int64_t nr, const A* v, \
                             A* dw, A* fsum, int64_t k0, int64_t k1);
FC_FEATURE_TYPES(FC_DIRECT_BACKWARD)
#undef FC_DIRECT_BACKWARD

// out[r * ld + c] = p[r * ldp + c] + (v ? v[v_per_row ? r : c] : 0) for a [rows, cols] block
// p, written in the features' type (bf16 rounded to nearest even): one image's dF from its
// GEMM product, the logits' part v added on the way.
#define FC_STORE_PLUS(T, A)                                                                                    \
  void store_plus(const A* p, int64_t rows, int64_t cols, int64_t ldp, const A* v, bool v_per_row, T* out, \
                  int64_t ld);
FC_FEATURE_TYPES(FC_STORE_PLUS)
#undef FC_STORE_PLUS

}  // namespace fastcam::cpu
