// relu_dropout, CPU: y = relu(x) * keep(i, seed) * scale and its backward (see relu_dropout.h).
// One pass over x; rows of a 2-D input may be strided (a column slice of a wider GEMM output, as
// the MMoE/PLE training path passes the expert part of [experts | gates] logits); the output is
// contiguous.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "common/checks.h"
#include "relu_dropout/relu_dropout.h"

namespace mtkernels {
namespace {

void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be a float32 or float64 tensor, got ", t.scalar_type());
}

// A [rows, cols] view of x whose rows are contiguous (a copy only when they are not).
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor rows = x.dim() == 2 ? x : x.reshape({x.numel() == 0 ? 0 : -1, x.dim() ? x.size(-1) : 1});
  if (rows.dim() == 2 && rows.size(1) > 0 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

// no-trapping-math: see relu_dropout_row in relu_dropout.h.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

template <typename scalar_t>
void relu_dropout_backward_block(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ result,
                                 scalar_t* __restrict__ out, int64_t n, scalar_t scale) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v = grad[i] * scale;
    out[i] = result[i] > scalar_t(0) ? v : scalar_t(0);
  }
}

#pragma GCC pop_options

at::Tensor relu_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  check_float(x, "x");
  check_p(p);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const at::Tensor rows = as_rows(x);
  const int64_t num_rows = rows.size(0), cols = rows.size(1), row_stride = rows.stride(0);
  const uint32_t threshold = dropout_threshold(p);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t seed_lo = static_cast<uint32_t>(useed), seed_hi = static_cast<uint32_t>(useed >> 32);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_dropout", [&] {
    const scalar_t scale = static_cast<scalar_t>(dropout_scale(threshold));
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
    at::parallel_for(0, num_rows, grain, [=](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        relu_dropout_row(src + r * row_stride, dst + r * cols, cols, static_cast<uint64_t>(r) * static_cast<uint64_t>(cols),
                         threshold, seed_lo, seed_hi, scale);
      }
    });
  });
  return out;
}

at::Tensor relu_dropout_backward_cpu(const at::Tensor& grad_output, const at::Tensor& result, double p) {
  check_float(grad_output, "grad_output");
  check_p(p);
  TORCH_CHECK_VALUE(grad_output.sizes() == result.sizes(), "grad_output must have the shape of result ",
                    result.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == result.scalar_type(), "grad_output and result must have one dtype, got ",
                   grad_output.scalar_type(), " and ", result.scalar_type());
  const at::Tensor grad = grad_output.contiguous(), y = result.contiguous();
  at::Tensor grad_input = at::empty(y.sizes(), y.options());
  const int64_t n = y.numel();
  if (n == 0) return grad_input;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "relu_dropout_backward", [&] {
    const scalar_t scale = static_cast<scalar_t>(dropout_scale(dropout_threshold(p)));
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* yv = y.const_data_ptr<scalar_t>();
    scalar_t* o = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [=](int64_t begin, int64_t end) {
      relu_dropout_backward_block(g + begin, yv + begin, o + begin, end - begin, scale);
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("relu_dropout", &relu_dropout_cpu);
  m.impl("relu_dropout_backward", &relu_dropout_backward_cpu);
}

}  // namespace mtkernels
