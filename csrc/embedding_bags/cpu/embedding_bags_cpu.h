// Helpers the CPU forward and backward kernels of embedding_bags share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {

// The kernels address a table as `data + row * stride(0) + column`: a table whose columns are
// not contiguous is copied (read-only uses only; the fused update rejects such tables instead).
inline std::vector<at::Tensor> unit_column_stride(at::TensorList weights) {
  std::vector<at::Tensor> result;
  result.reserve(weights.size());
  for (const auto& w : weights) {
    result.push_back(w.size(1) <= 1 || w.stride(1) == 1 ? w : w.contiguous());
  }
  return result;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& table,
                              const Layout& layout) {
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && grad_output.size(0) == layout.batch_size &&
                        grad_output.size(1) == layout.total_dim,
                    "grad_output must have shape [B, total_dim]=[", layout.batch_size, ", ",
                    layout.total_dim, "], got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == table.scalar_type(),
                   "grad_output must have the tables' dtype ", table.scalar_type(), ", got ",
                   grad_output.scalar_type());
  check_same_device(grad_output, "grad_output", table, "weights");
}

}  // namespace embedding_bags
}  // namespace mtkernels
