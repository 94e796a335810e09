// CUDA backward of mtkernels::embedding_bags: dense table gradients, row-sparse table gradients,
// and the fused optimizer update (SGD, row-wise Adagrad as FBGEMM's EXACT_ROWWISE_ADAGRAD), with
// the schemas, contract and messages of csrc/embedding_bags/cpu/embedding_bags_backward_kernel.cpp.
//
// Deterministic, no float atomics: every position p gets the key (global row id of its table row)
// and a stable sort of the keys (at::sort, a CUB radix sort underneath) groups the positions by
// row, in position order within a row. One warp then owns each unique row: it sums the row's
// contributions grad_output[b, columns of f] * scale in that order (float32 accumulation) and
// hands the row gradient to a sink (write it; or update the table row, and the row's Adagrad
// accumulator, in place). This is the "sort, then segment-reduce" scheme of FBGEMM's TBE backward
// (split_embedding_backward_codegen: radix sort of linearised indices, one warp per run), and the
// same order of additions as the CPU kernel, so the result does not depend on the launch.
//
// Offsets and indices are validated on the device first; the status is read back (one sync)
// and bad input raises, before any gradient or table is written.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "embedding_bags/cpu/embedding_bags_cpu.h"  // unit_column_stride, check_grad_output
#include "embedding_bags/cuda/embedding_bags_cuda.cuh"
#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace cuda {
namespace {

constexpr int kColumnsPerLane = 4;  // a warp reduces 128 columns of a row per pass

// Where the reduced row of table t goes.
struct TableSink {
  void* out;            // dense: grads[t]; sparse: row_grads[t]; fused: weights[t]
  int64_t row_stride;   // elements
  int64_t dim;
  int64_t row_base;     // global id of the table's row 0
  int64_t unique_begin; // sparse: index of the table's first unique row
  float* accumulator;   // rowwise_adagrad: [num_rows] float32, else nullptr
};

enum class Sink : int { kDense, kSparse, kSgd, kRowwiseAdagrad };

// bag_of[p] and key[p] = row_base of the feature's table + indices[p]; one warp per bag.
template <typename index_t>
__global__ void __launch_bounds__(kThreads)
    keys_kernel(const FeatureMeta* __restrict__ features, const index_t* __restrict__ indices,
                const index_t* __restrict__ offsets, int64_t batch_size, int64_t num_bags,
                int64_t* __restrict__ bag_of, int64_t* __restrict__ keys) {
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) return;
  const int64_t base = features[bag / batch_size].row_base;
  const int64_t stop = offsets[bag + 1];
  for (int64_t p = static_cast<int64_t>(offsets[bag]) + lane; p < stop; p += kWarp) {
    bag_of[p] = bag;
    keys[p] = base + static_cast<int64_t>(indices[p]);
  }
}

// The table owning global row `key`: the last t with row_base <= key (tables without rows own
// no key, so ties between equal bases resolve to the table that has the rows).
__device__ __forceinline__ int table_of(const TableSink* tables, int num_tables, int64_t key) {
  int lo = 0, hi = num_tables - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tables[mid].row_base <= key) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// One warp per unique row u: a[c] = sum over the row's positions (in order) of
// scale * grad_output[b, column of f + c], for the columns c this lane owns in pass `c0`.
template <typename scalar_t, typename index_t>
__device__ __forceinline__ void reduce_columns(
    at::opmath_type<scalar_t> (&a)[kColumnsPerLane], int64_t c0, int lane, int64_t dim,
    int64_t q_begin, int64_t q_end, const int64_t* __restrict__ order,
    const int64_t* __restrict__ bag_of, const FeatureMeta* __restrict__ features,
    const index_t* __restrict__ offsets, const scalar_t* __restrict__ per_sample_weights,
    bool mean, const scalar_t* __restrict__ grad_output, int64_t batch_size, int64_t total_dim) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll
  for (int j = 0; j < kColumnsPerLane; ++j) a[j] = acc_t(0);
  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t p = order[q];
    const int64_t bag = bag_of[p];
    const int64_t f = bag / batch_size;
    const int64_t b = bag - f * batch_size;
    acc_t scale = acc_t(1);
    if (per_sample_weights != nullptr) {
      scale = static_cast<acc_t>(per_sample_weights[p]);
    } else if (mean) {
      scale = acc_t(1) / static_cast<acc_t>(static_cast<int64_t>(offsets[bag + 1]) -
                                            static_cast<int64_t>(offsets[bag]));
    }
    const scalar_t* __restrict__ g = grad_output + b * total_dim + features[f].column;
#pragma unroll
    for (int j = 0; j < kColumnsPerLane; ++j) {
      const int64_t c = c0 + lane + j * kWarp;
      if (c < dim) a[j] += scale * static_cast<acc_t>(g[c]);
    }
  }
}

template <typename scalar_t, typename index_t, Sink kSink>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(const int64_t* __restrict__ unique_keys, const int64_t* __restrict__ run_ends,
                       const int64_t* __restrict__ counts, int64_t num_unique,
                       const int64_t* __restrict__ order, const int64_t* __restrict__ bag_of,
                       const FeatureMeta* __restrict__ features, const TableSink* __restrict__ tables,
                       int num_tables, const index_t* __restrict__ offsets,
                       const scalar_t* __restrict__ per_sample_weights, bool mean,
                       const scalar_t* __restrict__ grad_output, int64_t batch_size,
                       int64_t total_dim, double lr, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t u = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (u >= num_unique) return;
  const int64_t key = unique_keys[u];
  const TableSink sink = tables[table_of(tables, num_tables, key)];
  const int64_t row = key - sink.row_base;
  const int64_t q_end = run_ends[u];
  const int64_t q_begin = q_end - counts[u];
  const int64_t dim = sink.dim;
  scalar_t* __restrict__ out = static_cast<scalar_t*>(sink.out);
  acc_t a[kColumnsPerLane];
  auto reduce = [&](int64_t c0) {
    reduce_columns<scalar_t, index_t>(a, c0, lane, dim, q_begin, q_end, order, bag_of, features,
                                      offsets, per_sample_weights, mean, grad_output, batch_size,
                                      total_dim);
  };
  constexpr int64_t kPass = kWarp * kColumnsPerLane;

  acc_t denominator = acc_t(1);
  if constexpr (kSink == Sink::kRowwiseAdagrad) {
    // First pass: the row gradient's mean square (recomputed below in the same order, so the
    // update uses exactly the gradient that was squared).
    acc_t square_sum = acc_t(0);
    for (int64_t c0 = 0; c0 < dim; c0 += kPass) {
      reduce(c0);
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) square_sum += a[j] * a[j];
    }
    square_sum = warp_sum(square_sum);
    float* accumulator = sink.accumulator + row;
    float updated = *accumulator;
    if (dim > 0) updated += static_cast<float>(square_sum / static_cast<acc_t>(dim));
    __syncwarp();
    if (lane == 0) *accumulator = updated;
    denominator = sqrt(static_cast<acc_t>(updated)) + static_cast<acc_t>(eps);
  }

  for (int64_t c0 = 0; c0 < dim; c0 += kPass) {
    reduce(c0);
#pragma unroll
    for (int j = 0; j < kColumnsPerLane; ++j) {
      const int64_t c = c0 + lane + j * kWarp;
      if (c >= dim) continue;
      if constexpr (kSink == Sink::kDense) {
        out[row * sink.row_stride + c] = static_cast<scalar_t>(a[j]);
      } else if constexpr (kSink == Sink::kSparse) {
        out[(u - sink.unique_begin) * sink.row_stride + c] = static_cast<scalar_t>(a[j]);
      } else if constexpr (kSink == Sink::kSgd) {
        scalar_t& w = out[row * sink.row_stride + c];
        w = static_cast<scalar_t>(static_cast<acc_t>(w) - static_cast<acc_t>(lr) * a[j]);
      } else {
        scalar_t& w = out[row * sink.row_stride + c];
        w = static_cast<scalar_t>(static_cast<acc_t>(w) -
                                  static_cast<acc_t>(lr) * a[j] / denominator);
      }
    }
  }
}

// The validated, contiguous inputs of one backward call (the CPU's `Prepared`).
struct Prepared {
  Layout layout;
  std::vector<at::Tensor> weights;
  at::Tensor grad_output, indices, offsets;
  c10::optional<at::Tensor> per_sample_weights;
  Pooling pooling;
};

Prepared prepare(const at::Tensor& grad_output, at::TensorList weights, const at::Tensor& indices,
                 const at::Tensor& offsets, at::IntArrayRef feature_table,
                 c10::string_view pooling_name, const c10::optional<at::Tensor>& per_sample_weights) {
  Prepared p;
  p.pooling = parse_pooling(pooling_name);
  p.layout = check_inputs(weights, indices, offsets, feature_table, per_sample_weights, p.pooling);
  check_grad_output(grad_output, weights[0], p.layout);
  p.weights = unit_column_stride(weights);
  p.grad_output = grad_output.contiguous();
  p.indices = indices.contiguous();
  p.offsets = offsets.contiguous();
  if (per_sample_weights.has_value()) p.per_sample_weights = per_sample_weights->contiguous();
  return p;
}

// Positions grouped by row: sorted keys' runs (unique keys ascending, run ends, run lengths),
// the positions in run order, and the bag of every position.
struct Groups {
  at::Tensor features;  // FeatureMeta [F] on the device
  at::Tensor unique_keys, run_ends, counts, order, bag_of;
  int64_t num_unique = 0;
};

template <typename index_t>
Groups group_rows(const Prepared& p, cudaStream_t stream) {
  const Layout& layout = p.layout;
  const at::Device device = p.indices.device();
  Groups g;
  g.features = feature_meta(layout, p.weights, 1, device);
  at::Tensor status = new_status(device);
  launch_checks<index_t>(g.features, layout, p.indices, p.offsets, status, stream);
  raise_on_status<index_t>(status, layout, p.indices, p.offsets);  // syncs; raises on bad input
  const int64_t num_indices = p.indices.numel();
  const int64_t num_bags = layout.num_features * layout.batch_size;
  const auto long_options = p.indices.options().dtype(at::kLong);
  g.bag_of = at::empty({num_indices}, long_options);
  at::Tensor keys = at::empty({num_indices}, long_options);
  if (num_indices == 0) return g;
  keys_kernel<index_t><<<blocks_for_warps(num_bags), kThreads, 0, stream>>>(
      reinterpret_cast<const FeatureMeta*>(g.features.const_data_ptr()),
      p.indices.const_data_ptr<index_t>(), p.offsets.const_data_ptr<index_t>(), layout.batch_size,
      num_bags, g.bag_of.data_ptr<int64_t>(), keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor sorted_keys;
  std::tie(sorted_keys, g.order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor inverse;
  std::tie(g.unique_keys, inverse, g.counts) =
      at::unique_consecutive(sorted_keys, /*return_inverse=*/false, /*return_counts=*/true);
  g.run_ends = at::cumsum(g.counts, 0);
  g.num_unique = g.unique_keys.numel();
  return g;
}

std::vector<int64_t> table_row_bases(const Layout& layout) {
  std::vector<int64_t> base(layout.num_rows.size() + 1, 0);
  for (size_t t = 0; t < layout.num_rows.size(); ++t) base[t + 1] = base[t] + layout.num_rows[t];
  return base;
}

at::Tensor to_device(const std::vector<TableSink>& tables, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(tables.size() * sizeof(TableSink))},
                              at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), tables.data(), host.numel());
  return host.to(device);
}

template <typename scalar_t, typename index_t, Sink kSink>
void launch_reduce(const Prepared& p, const Groups& g, const at::Tensor& tables, double lr,
                   double eps, cudaStream_t stream) {
  if (g.num_unique == 0) return;
  reduce_rows_kernel<scalar_t, index_t, kSink>
      <<<blocks_for_warps(g.num_unique), kThreads, 0, stream>>>(
          g.unique_keys.const_data_ptr<int64_t>(), g.run_ends.const_data_ptr<int64_t>(),
          g.counts.const_data_ptr<int64_t>(), g.num_unique, g.order.const_data_ptr<int64_t>(),
          g.bag_of.const_data_ptr<int64_t>(),
          reinterpret_cast<const FeatureMeta*>(g.features.const_data_ptr()),
          reinterpret_cast<const TableSink*>(tables.const_data_ptr()),
          static_cast<int>(p.layout.num_rows.size()), p.offsets.const_data_ptr<index_t>(),
          p.per_sample_weights.has_value() ? p.per_sample_weights->const_data_ptr<scalar_t>()
                                           : nullptr,
          p.pooling == Pooling::kMean, p.grad_output.const_data_ptr<scalar_t>(),
          p.layout.batch_size, p.layout.total_dim, lr, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<at::Tensor> embedding_bags_backward_cuda(
    const at::Tensor& grad_output, at::TensorList weights, const at::Tensor& indices,
    const at::Tensor& offsets, at::IntArrayRef feature_table, c10::string_view pooling,
    const c10::optional<at::Tensor>& per_sample_weights) {
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  const c10::cuda::CUDAGuard device_guard(p.indices.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  std::vector<at::Tensor> grads;
  for (const auto& w : p.weights) grads.push_back(at::zeros(w.sizes(), w.options()));
  const std::vector<int64_t> base = table_row_bases(p.layout);
  std::vector<TableSink> sinks;
  for (size_t t = 0; t < grads.size(); ++t) {
    sinks.push_back({grads[t].data_ptr(), p.layout.dim[t], p.layout.dim[t], base[t], 0, nullptr});
  }
  const at::Tensor tables = to_device(sinks, p.indices.device());
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_backward_cuda", [&] {
    const Groups g = group_rows<index_t>(p, stream);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_backward_cuda", [&] {
      launch_reduce<scalar_t, index_t, Sink::kDense>(p, g, tables, 0.0, 0.0, stream);
    });
  });
  return grads;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> embedding_bags_backward_sparse_cuda(
    const at::Tensor& grad_output, at::TensorList weights, const at::Tensor& indices,
    const at::Tensor& offsets, at::IntArrayRef feature_table, c10::string_view pooling,
    const c10::optional<at::Tensor>& per_sample_weights) {
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  const c10::cuda::CUDAGuard device_guard(p.indices.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Device device = p.indices.device();
  const std::vector<int64_t> base = table_row_bases(p.layout);
  const auto num_tables = static_cast<int64_t>(p.weights.size());
  std::vector<at::Tensor> rows, row_grads;
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_backward_sparse_cuda", [&] {
    const Groups g = group_rows<index_t>(p, stream);
    // Unique keys ascend, so each table's unique rows are one contiguous run of them.
    std::vector<int64_t> begin(static_cast<size_t>(num_tables) + 1, 0);
    if (g.num_unique > 0) {
      at::Tensor bases = at::empty({num_tables + 1}, at::TensorOptions().dtype(at::kLong));
      std::memcpy(bases.data_ptr<int64_t>(), base.data(), base.size() * sizeof(int64_t));
      bases = bases.to(device);
      const at::Tensor found = at::searchsorted(g.unique_keys, bases).cpu();
      std::memcpy(begin.data(), found.const_data_ptr<int64_t>(), begin.size() * sizeof(int64_t));
    }
    std::vector<TableSink> sinks;
    for (int64_t t = 0; t < num_tables; ++t) {
      const int64_t unique = begin[t + 1] - begin[t];
      rows.push_back(g.num_unique > 0 ? g.unique_keys.narrow(0, begin[t], unique) - base[t]
                                      : at::empty({0}, p.indices.options().dtype(at::kLong)));
      row_grads.push_back(at::empty({unique, p.layout.dim[t]}, p.weights[t].options()));
      sinks.push_back({row_grads.back().data_ptr(), p.layout.dim[t], p.layout.dim[t], base[t],
                       begin[t], nullptr});
    }
    const at::Tensor tables = to_device(sinks, device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_backward_sparse_cuda", [&] {
      launch_reduce<scalar_t, index_t, Sink::kSparse>(p, g, tables, 0.0, 0.0, stream);
    });
  });
  return {rows, row_grads};
}

void embedding_bags_fused_update_cuda(at::TensorList weights, at::TensorList accumulators,
                                      const at::Tensor& grad_output, const at::Tensor& indices,
                                      const at::Tensor& offsets, at::IntArrayRef feature_table,
                                      c10::string_view pooling,
                                      const c10::optional<at::Tensor>& per_sample_weights,
                                      c10::string_view optimizer, double lr, double eps) {
  const bool adagrad = check_fused_optimizer(optimizer, weights);
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  if (adagrad) check_accumulators(accumulators, weights, p.layout);
  const c10::cuda::CUDAGuard device_guard(p.indices.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const std::vector<int64_t> base = table_row_bases(p.layout);
  std::vector<TableSink> sinks;
  for (size_t t = 0; t < weights.size(); ++t) {
    // The tables themselves (not p.weights, which may be copies): the update is in place.
    sinks.push_back({weights[t].data_ptr(), weights[t].stride(0), p.layout.dim[t], base[t], 0,
                     adagrad ? accumulators[t].data_ptr<float>() : nullptr});
  }
  const at::Tensor tables = to_device(sinks, p.indices.device());
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_fused_update_cuda", [&] {
    const Groups g = group_rows<index_t>(p, stream);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_fused_update_cuda", [&] {
      if (adagrad) {
        launch_reduce<scalar_t, index_t, Sink::kRowwiseAdagrad>(p, g, tables, lr, eps, stream);
      } else {
        launch_reduce<scalar_t, index_t, Sink::kSgd>(p, g, tables, lr, eps, stream);
      }
    });
  });
}

}  // namespace
}  // namespace cuda
}  // namespace embedding_bags
}  // namespace mtkernels

TORCH_LIBRARY_IMPL(mtkernels, CUDA, m) {
  m.impl("embedding_bags_backward", &mtkernels::embedding_bags::cuda::embedding_bags_backward_cuda);
  m.impl("embedding_bags_backward_sparse",
         &mtkernels::embedding_bags::cuda::embedding_bags_backward_sparse_cuda);
  m.impl("embedding_bags_fused_update",
         &mtkernels::embedding_bags::cuda::embedding_bags_fused_update_cuda);
}
