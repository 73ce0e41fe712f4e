// The schema of every fastcam op, and the Python module that loading the library needs.
// Kernels: csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu + <op>.cpp (CUDA).
// Fake kernels and autograd: fastcam/_ops.py.
//
// Conventions shared by every op:
//   * features are passed as a [B, K, N] view of any strides (NCHW: flatten(2); channels_last
//     and tokens [B, N, K]: a view with stride 1 along K);
//   * work happens in the accumulation dtype acc: float64 for float64 features, else float32;
//     scores, cams, logits, q and the loss terms are acc tensors, [B, C, N] contiguous;
//   * a gradient that output_mask does not ask for is returned as an empty tensor.
#ifdef FASTCAM_PYTHON_MODULE
#include <Python.h>
#endif
#include <torch/library.h>

#include <string>

#include "cpu/amx.h"
#include "cpu/bf16_gemm.h"

// What this library was built against, set by setup.py / the JIT build (fastcam/_build.py).
#define FASTCAM_STR2(x) #x
#define FASTCAM_STR(x) FASTCAM_STR2(x)
#ifndef FASTCAM_TORCH_VERSION
#define FASTCAM_TORCH_VERSION unknown
#endif
#ifndef FASTCAM_CUDA_VERSION
#define FASTCAM_CUDA_VERSION none
#endif
#ifndef FASTCAM_CUDA_ARCHS
#define FASTCAM_CUDA_ARCHS none
#endif

namespace {
// "torch=<version> cuda=<version or none> archs=<arch>_<arch>... (none without CUDA kernels)"
std::string build_info() {
  return "torch=" FASTCAM_STR(FASTCAM_TORCH_VERSION) " cuda=" FASTCAM_STR(FASTCAM_CUDA_VERSION) " archs=" FASTCAM_STR(
      FASTCAM_CUDA_ARCHS);
}
}  // namespace

#ifdef FASTCAM_PYTHON_MODULE
extern "C" {
// Importing fastcam._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(fastcam, m) {
  m.def("build_info() -> str", &build_info);
  // Whether the CPU kernels compute S = W F of bf16 features on the CPU's bf16 matrix units
  // here (csrc/cpu/bf16_gemm.h); FASTCAM_CPU_BF16_GEMM=0 turns that off.
  m.def("cpu_bf16_gemm() -> bool", &fastcam::cpu::bf16_gemm_available);
  // Whether that runs on this library's own AMX kernels (csrc/cpu/amx.h) rather than ATen's
  // brgemm; FASTCAM_CPU_AMX=0 turns them off.
  m.def("cpu_amx() -> bool", &fastcam::cpu::amx::available);
  // logits [B, C] (acc), scores S = W F [B, C, N] (acc), cams = normalize(S) [B, C, N] (acc).
  m.def(
      "cam_head(Tensor features, Tensor weight, Tensor? bias, str normalize, float temperature, "
      "float eps) -> (Tensor logits, Tensor scores, Tensor cams)");
  // With G = dL/dS (through the normalization) + dL/dlogits / N:
  // dF = W^T G (features' dtype and strides), dW = sum G F^T (acc), db = sum dL/dlogits (acc).
  m.def(
      "cam_head_backward(Tensor? grad_logits, Tensor? grad_cams, Tensor features, Tensor weight, "
      "Tensor scores, Tensor cams, str normalize, float temperature, float eps, bool[3] output_mask) "
      "-> (Tensor grad_features, Tensor grad_weight, Tensor grad_bias)");
  // cams [G, P, N] (acc) -> O [G, P, P], O[g, p, q] = overlap(cams[g, p], cams[g, q]).
  m.def("pairwise_overlap(Tensor cams, str measure, float eps) -> Tensor");
  m.def("pairwise_overlap_backward(Tensor grad, Tensor cams, str measure, float eps) -> Tensor");
  // The loss terms of SPEC §2.3 from the logits [B, C] and maps [B, C, N] (acc):
  // -> [loss, bce, distinct, consist, coherence] (acc). weights = [classification (0 or 1),
  // lambda_distinct, lambda_consist, lambda_coherence]; a term of weight 0 is not computed (0).
  // labels [B, C] (acc) or None (nothing known); label_mask [B, C] bool or None (all known).
  m.def(
      "attention_terms(Tensor logits, Tensor cams, Tensor? labels, Tensor? label_mask, str measure, "
      "float eps, bool predicted, int grid_h, int grid_w, float[] weights) -> Tensor");
  // grad_terms [5] -> (dL/dlogits [B, C], dL/dcams [B, C, N]); the pair weights are constants.
  // The whole forward of fastcam.attention_loss (composite of cam_head and attention_terms):
  // the five terms, logits in the features' dtype and the maps [B, C, H, W] or [B, C, N].
  m.def(
      "attention_loss(Tensor features, Tensor weight, Tensor? bias, Tensor? labels, Tensor? label_mask, "
      "str normalize, str measure, float temperature, float eps, bool predicted, int grid_h, int grid_w, "
      "float[] weights) -> (Tensor loss, Tensor bce, Tensor distinct, Tensor consist, Tensor coherence, "
      "Tensor logits, Tensor cams)");
  m.def(
      "attention_terms_backward(Tensor grad_terms, Tensor logits, Tensor cams, Tensor? labels, "
      "Tensor? label_mask, str measure, float eps, bool predicted, int grid_h, int grid_w, "
      "float[] weights) -> (Tensor grad_logits, Tensor grad_cams)");
}
