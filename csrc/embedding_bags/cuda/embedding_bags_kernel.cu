// CUDA forward of mtkernels::embedding_bags, and the gradient of the per-sample weights (same
// schemas, contract and error messages as csrc/embedding_bags/cpu/embedding_bags_kernel.cpp).
//
// One warp per bag (feature f, sample b): each lane owns 16 bytes of the row (4 float32, 8
// float16/bfloat16, 2 float64), so a warp covers 128 float32 columns per pass, and walks the
// bag's indices in order, accumulating in float32 (float64 for float64 tables) in registers; the
// indices are loaded four at a time so that four row loads are in flight per lane. This is the
// warp-per-bag layout of FBGEMM's TBE forward (embedding_forward_split_kernel, one warp per bag
// with vectorised row loads), written without its code generation. Features whose rows or output
// columns are not 16-byte aligned take a scalar loop (one column per lane).
//
// Out-of-range indices and malformed offsets are detected on the device (the kernel never reads
// outside a table or outside `indices`) and written to a small status buffer, read back after the
// launch; the CPU kernel's checks then run on host copies to raise the same IndexError or
// ValueError. That read-back is one synchronisation per call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "embedding_bags/cpu/embedding_bags_cpu.h"  // unit_column_stride, check_grad_output
#include "embedding_bags/cuda/embedding_bags_cuda.cuh"
#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace cuda {
namespace {

template <typename scalar_t>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const FeatureMeta* __restrict__ features, const index_t* __restrict__ indices,
                   const index_t* __restrict__ offsets,
                   const scalar_t* __restrict__ per_sample_weights, int64_t num_indices,
                   int64_t batch_size, int64_t num_bags, int64_t total_dim, bool mean,
                   scalar_t* __restrict__ out, int64_t* __restrict__ status) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecT = Vec<scalar_t>;
  constexpr int kVec = VecT::kSize;
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) return;
  const int64_t f = bag / batch_size;
  const int64_t b = bag - f * batch_size;
  const FeatureMeta m = features[f];
  const scalar_t* __restrict__ table = static_cast<const scalar_t*>(m.table);
  int64_t start, stop;
  bag_range(offsets, bag, num_indices, start, stop);
  // Every index is checked here once, even for a table of dim 0; the loops below skip bad rows.
  for (int64_t p = start + lane; p < stop; p += kWarp) {
    const int64_t row = indices[p];
    if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(m.num_rows)) record_bad_index(status, p);
  }
  const acc_t scale = mean && stop > start ? acc_t(1) / static_cast<acc_t>(stop - start) : acc_t(1);
  scalar_t* __restrict__ out_row = out + b * total_dim + m.column;
  auto valid = [&](int64_t row) {
    return static_cast<uint64_t>(row) < static_cast<uint64_t>(m.num_rows);
  };
  auto weight_of = [&](int64_t p) {
    return per_sample_weights != nullptr ? static_cast<acc_t>(per_sample_weights[p]) : acc_t(1);
  };

  if (m.vectorized) {
    for (int64_t d0 = static_cast<int64_t>(lane) * kVec; d0 < m.dim; d0 += kWarp * kVec) {
      acc_t acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = acc_t(0);
      int64_t p = start;
      // Four rows in flight; they are added in position order, as in the CPU kernel.
      for (; p + 4 <= stop; p += 4) {
        VecT rows[4];
        acc_t w[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t row = indices[p + u];
          w[u] = valid(row) ? weight_of(p + u) : acc_t(0);
          if (valid(row)) {
            rows[u] = *reinterpret_cast<const VecT*>(table + row * m.row_stride + d0);
          } else {
#pragma unroll
            for (int j = 0; j < kVec; ++j) rows[u].v[j] = scalar_t(0);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] += w[u] * static_cast<acc_t>(rows[u].v[j]);
        }
      }
      for (; p < stop; ++p) {
        const int64_t row = indices[p];
        if (!valid(row)) continue;
        const VecT r = *reinterpret_cast<const VecT*>(table + row * m.row_stride + d0);
        const acc_t w = weight_of(p);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += w * static_cast<acc_t>(r.v[j]);
      }
      VecT result;
#pragma unroll
      for (int j = 0; j < kVec; ++j) result.v[j] = static_cast<scalar_t>(acc[j] * scale);
      *reinterpret_cast<VecT*>(out_row + d0) = result;
    }
    return;
  }
  for (int64_t d = lane; d < m.dim; d += kWarp) {
    acc_t acc = acc_t(0);
    for (int64_t p = start; p < stop; ++p) {
      const int64_t row = indices[p];
      if (!valid(row)) continue;
      acc += weight_of(p) * static_cast<acc_t>(table[row * m.row_stride + d]);
    }
    out_row[d] = static_cast<scalar_t>(acc * scale);
  }
}

// grad[p] = <grad_output[b, columns of f], weights[t][indices[p]]>: one warp per bag, one
// warp-wide dot product per position (fixed reduction order).
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    per_sample_weights_backward_kernel(const FeatureMeta* __restrict__ features,
                                       const index_t* __restrict__ indices,
                                       const index_t* __restrict__ offsets,
                                       const scalar_t* __restrict__ grad_output,
                                       int64_t num_indices, int64_t batch_size, int64_t num_bags,
                                       int64_t total_dim, scalar_t* __restrict__ grad,
                                       int64_t* __restrict__ status) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) return;
  const int64_t f = bag / batch_size;
  const int64_t b = bag - f * batch_size;
  const FeatureMeta m = features[f];
  const scalar_t* __restrict__ table = static_cast<const scalar_t*>(m.table);
  const scalar_t* __restrict__ grad_row = grad_output + b * total_dim + m.column;
  int64_t start, stop;
  bag_range(offsets, bag, num_indices, start, stop);
  for (int64_t p = start; p < stop; ++p) {
    const int64_t row = indices[p];
    if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(m.num_rows)) {
      if (lane == 0) {
        record_bad_index(status, p);
        grad[p] = scalar_t(0);
      }
      continue;
    }
    const scalar_t* __restrict__ src = table + row * m.row_stride;
    acc_t dot = acc_t(0);
    for (int64_t d = lane; d < m.dim; d += kWarp) {
      dot += static_cast<acc_t>(grad_row[d]) * static_cast<acc_t>(src[d]);
    }
    dot = warp_sum(dot);
    if (lane == 0) grad[p] = static_cast<scalar_t>(dot);
  }
}

at::Tensor embedding_bags_cuda(at::TensorList weights_in, const at::Tensor& indices_in,
                               const at::Tensor& offsets_in, at::IntArrayRef feature_table,
                               c10::string_view pooling_name,
                               const c10::optional<at::Tensor>& per_sample_weights_in, bool sparse) {
  (void)sparse;  // only the backward (registered in Python) reads it
  const Pooling pooling = parse_pooling(pooling_name);
  const Layout layout = check_inputs(weights_in, indices_in, offsets_in, feature_table,
                                     per_sample_weights_in, pooling);
  const c10::cuda::CUDAGuard device_guard(indices_in.device());
  const auto weights = unit_column_stride(weights_in);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  c10::optional<at::Tensor> psw;
  if (per_sample_weights_in.has_value()) psw = per_sample_weights_in->contiguous();
  at::Tensor output = at::empty({layout.batch_size, layout.total_dim}, weights[0].options());
  const int64_t num_bags = layout.num_features * layout.batch_size;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor status = new_status(indices.device());

  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bags_cuda", [&] {
    check_offsets_kernel<index_t><<<blocks_for(offsets.numel()), kThreads, 0, stream>>>(
        offsets.const_data_ptr<index_t>(), offsets.numel(), indices.numel(),
        status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(),
                                    "embedding_bags_cuda", [&] {
      const at::Tensor features =
          feature_meta(layout, weights, Vec<scalar_t>::kSize, indices.device());
      if (num_bags > 0) {
        forward_kernel<scalar_t, index_t><<<blocks_for_warps(num_bags), kThreads, 0, stream>>>(
            reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
            indices.const_data_ptr<index_t>(), offsets.const_data_ptr<index_t>(),
            psw.has_value() ? psw->const_data_ptr<scalar_t>() : nullptr, indices.numel(),
            layout.batch_size, num_bags, layout.total_dim, pooling == Pooling::kMean,
            output.data_ptr<scalar_t>(), status.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    raise_on_status<index_t>(status, layout, indices, offsets);
  });
  return output;
}

at::Tensor embedding_bags_per_sample_weights_backward_cuda(const at::Tensor& grad_output_in,
                                                           at::TensorList weights_in,
                                                           const at::Tensor& indices_in,
                                                           const at::Tensor& offsets_in,
                                                           at::IntArrayRef feature_table) {
  const Layout layout = check_inputs(weights_in, indices_in, offsets_in, feature_table,
                                     c10::nullopt, Pooling::kSum);
  check_grad_output(grad_output_in, weights_in[0], layout);
  const c10::cuda::CUDAGuard device_guard(indices_in.device());
  const auto weights = unit_column_stride(weights_in);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  at::Tensor grad = at::empty({indices.numel()}, weights[0].options());
  const int64_t num_bags = layout.num_features * layout.batch_size;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor status = new_status(indices.device());

  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bags_psw_backward_cuda", [&] {
    check_offsets_kernel<index_t><<<blocks_for(offsets.numel()), kThreads, 0, stream>>>(
        offsets.const_data_ptr<index_t>(), offsets.numel(), indices.numel(),
        status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(),
                                    "embedding_bags_psw_backward_cuda", [&] {
      const at::Tensor features = feature_meta(layout, weights, 1, indices.device());
      if (num_bags > 0) {
        per_sample_weights_backward_kernel<scalar_t, index_t>
            <<<blocks_for_warps(num_bags), kThreads, 0, stream>>>(
                reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
                indices.const_data_ptr<index_t>(), offsets.const_data_ptr<index_t>(),
                grad_output.const_data_ptr<scalar_t>(), indices.numel(), layout.batch_size,
                num_bags, layout.total_dim, grad.data_ptr<scalar_t>(), status.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    raise_on_status<index_t>(status, layout, indices, offsets);
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace embedding_bags
}  // namespace mtkernels

TORCH_LIBRARY_IMPL(mtkernels, CUDA, m) {
  m.impl("embedding_bags", &mtkernels::embedding_bags::cuda::embedding_bags_cuda);
  m.impl("embedding_bags_per_sample_weights_backward",
         &mtkernels::embedding_bags::cuda::embedding_bags_per_sample_weights_backward_cuda);
}
