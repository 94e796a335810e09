// Input checks shared by the CPU and CUDA kernels, so both reject the same bad input with the same
// message. TORCH_CHECK_VALUE / _TYPE / _INDEX surface in Python as ValueError / TypeError /
// IndexError; every message names the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mtkernels {

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                   " must be an int32 or int64 tensor, got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
                   name, " must be a float32, float64, float16 or bfloat16 tensor, got ",
                   t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), a_name, " and ", b_name,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace mtkernels
