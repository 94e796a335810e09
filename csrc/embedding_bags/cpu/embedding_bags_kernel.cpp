// CPU forward of mtkernels::embedding_bags, and the gradient of the per-sample weights.
//
// Bags are processed in feature-major order (the order of `offsets`): at::parallel_for hands each
// thread one contiguous range of bags, so a thread walks its features one after the other and
// gathers from one table at a time (the table-major order of FBGEMM's TBE CPU kernel and of a loop
// of nn.EmbeddingBag, which keeps the working set of one table in cache). Rows are prefetched a
// few indices ahead, as FBGEMM's EmbeddingSpMDM does, because the gathers are random and
// latency-bound.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "embedding_bags/cpu/embedding_bags_cpu.h"
#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace {

// How many indices ahead the row of a later index is prefetched (FBGEMM uses 16 for its JIT
// kernels; 8 is enough here: each row is 1..8 cache lines).
constexpr int64_t kPrefetchDistance = 8;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

template <typename scalar_t, typename index_t>
void forward_kernel(const std::vector<at::Tensor>& weights, const at::Tensor& indices,
                    const at::Tensor& offsets, const c10::optional<at::Tensor>& per_sample_weights,
                    Pooling pooling, const Layout& layout, at::Tensor& output) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  const scalar_t* psw = per_sample_weights.has_value() ? per_sample_weights->data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.data_ptr<scalar_t>();
  const int64_t num_bags = layout.num_features * layout.batch_size;
  std::vector<const scalar_t*> table_data;
  std::vector<int64_t> row_stride;
  for (const auto& w : weights) {
    table_data.push_back(w.data_ptr<scalar_t>());
    row_stride.push_back(w.stride(0));
  }
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};

  at::parallel_for(0, num_bags, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(layout.max_dim));
    acc_t* __restrict a = acc.data();
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t f = bag / layout.batch_size;
      const int64_t b = bag - f * layout.batch_size;
      const int64_t t = layout.feature_table[f];
      const int64_t dim = layout.dim[t];
      const int64_t num_rows = layout.num_rows[t];
      const scalar_t* table = table_data[t];
      const int64_t stride = row_stride[t];
      const int64_t start = off[bag];
      const int64_t stop = off[bag + 1];
      const int64_t feature_stop = off[(f + 1) * layout.batch_size];
      for (int64_t d = 0; d < dim; ++d) a[d] = acc_t(0);
      for (int64_t p = start; p < stop; ++p) {
        const int64_t row = idx[p];
        // one unsigned compare catches both row < 0 and row >= num_rows
        if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(num_rows)) {
          int64_t seen = first_bad.load(std::memory_order_relaxed);
          while (p < seen && !first_bad.compare_exchange_weak(seen, p)) {
          }
          break;
        }
        if (p + kPrefetchDistance < feature_stop) {
          const int64_t ahead = idx[p + kPrefetchDistance];
          if (static_cast<uint64_t>(ahead) < static_cast<uint64_t>(num_rows)) {
            prefetch_row(table + ahead * stride, dim);
          }
        }
        const scalar_t* __restrict src = table + row * stride;
        if (psw != nullptr) {
          const acc_t w = static_cast<acc_t>(psw[p]);
          for (int64_t d = 0; d < dim; ++d) a[d] += w * static_cast<acc_t>(src[d]);
        } else {
          for (int64_t d = 0; d < dim; ++d) a[d] += static_cast<acc_t>(src[d]);
        }
      }
      acc_t scale = acc_t(1);
      if (pooling == Pooling::kMean && stop > start) scale = acc_t(1) / static_cast<acc_t>(stop - start);
      scalar_t* __restrict dst = out + b * layout.total_dim + layout.column[f];
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(a[d] * scale);
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) raise_bad_index(layout, idx, off, bad);
}

// d out[b, columns of f] / d per_sample_weights[p] = weights[t][indices[p]] (bag (f, b) holds p).
template <typename scalar_t, typename index_t>
void per_sample_weights_backward_kernel(const at::Tensor& grad_output,
                                        const std::vector<at::Tensor>& weights,
                                        const at::Tensor& indices, const at::Tensor& offsets,
                                        const Layout& layout, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  const scalar_t* g = grad_output.data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const int64_t num_bags = layout.num_features * layout.batch_size;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, num_bags, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bag = begin; bag < end; ++bag) {
      const int64_t f = bag / layout.batch_size;
      const int64_t b = bag - f * layout.batch_size;
      const int64_t t = layout.feature_table[f];
      const int64_t dim = layout.dim[t];
      const scalar_t* table = weights[t].data_ptr<scalar_t>();
      const int64_t stride = weights[t].stride(0);
      const scalar_t* __restrict grad_row = g + b * layout.total_dim + layout.column[f];
      for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
        const int64_t row = idx[p];
        if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(layout.num_rows[t])) {
          int64_t seen = first_bad.load(std::memory_order_relaxed);
          while (p < seen && !first_bad.compare_exchange_weak(seen, p)) {
          }
          out[p] = scalar_t(0);
          continue;
        }
        const scalar_t* __restrict src = table + row * stride;
        acc_t dot = acc_t(0);
        for (int64_t d = 0; d < dim; ++d) dot += static_cast<acc_t>(grad_row[d]) * static_cast<acc_t>(src[d]);
        out[p] = static_cast<scalar_t>(dot);
      }
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) raise_bad_index(layout, idx, off, bad);
}

at::Tensor embedding_bags_cpu(at::TensorList weights_in, const at::Tensor& indices_in,
                              const at::Tensor& offsets_in, at::IntArrayRef feature_table,
                              c10::string_view pooling_name,
                              const c10::optional<at::Tensor>& per_sample_weights_in, bool sparse) {
  (void)sparse;  // only the backward (registered in Python) reads it
  const Pooling pooling = parse_pooling(pooling_name);
  const Layout layout = check_inputs(weights_in, indices_in, offsets_in, feature_table,
                                     per_sample_weights_in, pooling);
  const auto weights = unit_column_stride(weights_in);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  c10::optional<at::Tensor> psw;
  if (per_sample_weights_in.has_value()) psw = per_sample_weights_in->contiguous();
  at::Tensor output = at::empty({layout.batch_size, layout.total_dim}, weights[0].options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bags_cpu", [&] {
    check_offsets(offsets.data_ptr<index_t>(), offsets.numel(), indices.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(),
                                    "embedding_bags_cpu", [&] {
      forward_kernel<scalar_t, index_t>(weights, indices, offsets, psw, pooling, layout, output);
    });
  });
  return output;
}

at::Tensor embedding_bags_per_sample_weights_backward_cpu(const at::Tensor& grad_output_in,
                                                          at::TensorList weights_in,
                                                          const at::Tensor& indices_in,
                                                          const at::Tensor& offsets_in,
                                                          at::IntArrayRef feature_table) {
  const Layout layout = check_inputs(weights_in, indices_in, offsets_in, feature_table,
                                     c10::nullopt, Pooling::kSum);
  check_grad_output(grad_output_in, weights_in[0], layout);
  const auto weights = unit_column_stride(weights_in);
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  at::Tensor grad = at::empty({indices.numel()}, weights[0].options());
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "embedding_bags_psw_backward_cpu", [&] {
    check_offsets(offsets.data_ptr<index_t>(), offsets.numel(), indices.numel());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(),
                                    "embedding_bags_psw_backward_cpu", [&] {
      per_sample_weights_backward_kernel<scalar_t, index_t>(grad_output, weights, indices, offsets,
                                                            layout, grad);
    });
  });
  return grad;
}

}  // namespace
}  // namespace embedding_bags
}  // namespace mtkernels

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("embedding_bags", &mtkernels::embedding_bags::embedding_bags_cpu);
  m.impl("embedding_bags_per_sample_weights_backward",
         &mtkernels::embedding_bags::embedding_bags_per_sample_weights_backward_cpu);
}
