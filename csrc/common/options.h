// Parsing of the string options of the op schemas (host code only).
#pragma once

#include <c10/util/Exception.h>

#include <string>

#include "map_math.h"

namespace fastcam {

inline Normalize parse_normalize(const std::string& name) {
  if (name == "none") return Normalize::None;
  if (name == "max") return Normalize::Max;
  if (name == "sum") return Normalize::Sum;
  if (name == "l2") return Normalize::L2;
  if (name == "softmax") return Normalize::Softmax;
  TORCH_CHECK(false, "fastcam: unknown normalize '", name, "'; expected none, max, sum, l2 or softmax");
}

inline Measure parse_measure(const std::string& name) {
  if (name == "cosine") return Measure::Cosine;
  if (name == "dot") return Measure::Dot;
  if (name == "soft_iou") return Measure::SoftIoU;
  if (name == "dice") return Measure::Dice;
  if (name == "intersection") return Measure::Intersection;
  TORCH_CHECK(false, "fastcam: unknown measure '", name, "'; expected cosine, dot, soft_iou, dice or intersection");
}

// The four weights of attention_terms: classification (0/1) and the three lambdas.
struct TermWeights {
  double bce, distinct, consist, coherence;
};

inline TermWeights parse_weights(c10::ArrayRef<double> w) {
  TORCH_CHECK(w.size() == 4, "fastcam: weights must be [classification, lambda_distinct, lambda_consist, "
              "lambda_coherence], got ", w.size(), " values");
  return {w[0], w[1], w[2], w[3]};
}

}  // namespace fastcam
