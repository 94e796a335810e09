// CPU backward of mtkernels::embedding_bags: dense table gradients, row-sparse table gradients,
// and the fused optimizer update (SGD, FBGEMM's EXACT_ROWWISE_ADAGRAD) that never materialises
// the gradient.
//
// All three share one deterministic reduction. Per table, the (row, bag) pairs of its features
// are grouped by row with a counting sort (a comparison sort when the batch touches few rows of
// a large table), stable in the position order; then each unique row is owned by exactly one
// thread, which sums its contributions in position order and hands the row gradient to a sink
// (write it, or apply the optimizer to the row). No atomics, no per-thread partial gradients, and
// the result does not depend on the thread count. This follows the "sort indices, then segment
// reduce" scheme of FBGEMM's TBE backward (split_embedding_backward_codegen), done with a
// counting sort because CPU tables are addressed directly.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "embedding_bags/cpu/embedding_bags_cpu.h"
#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace {

// The entries of one table grouped by row: unique rows ascending; for row u, entries
// starts[u] .. starts[u+1] of `bags` (and `positions`) in ascending position order.
struct RowGroups {
  std::vector<int64_t> rows;
  std::vector<int64_t> starts{0};
  std::vector<int64_t> bags;
  std::vector<int64_t> positions;  // filled only with per-sample weights
};

inline void record_bad(std::atomic<int64_t>& first_bad, int64_t p) {
  int64_t seen = first_bad.load(std::memory_order_relaxed);
  while (p < seen && !first_bad.compare_exchange_weak(seen, p)) {
  }
}

template <typename index_t>
void group_rows(int64_t table, const Layout& layout, const index_t* idx, const index_t* off,
                bool want_positions, RowGroups& groups, std::atomic<int64_t>& first_bad) {
  const int64_t batch = layout.batch_size;
  const int64_t num_rows = layout.num_rows[table];
  std::vector<int64_t> features;
  int64_t count = 0;
  for (int64_t f = 0; f < layout.num_features; ++f) {
    if (layout.feature_table[f] != table) continue;
    features.push_back(f);
    count += off[(f + 1) * batch] - off[f * batch];
  }
  if (count == 0) return;
  auto valid = [&](int64_t row) {
    return static_cast<uint64_t>(row) < static_cast<uint64_t>(num_rows);
  };

  // Counting sort costs O(num_rows) to clear and scan the counters: worth it unless the batch
  // touches a small part of a large table, where sorting the entries is cheaper.
  if (num_rows <= 16 * count + 4096) {
    std::vector<int64_t> cursor(static_cast<size_t>(num_rows), 0);
    for (const int64_t f : features) {
      for (int64_t p = off[f * batch]; p < off[(f + 1) * batch]; ++p) {
        const int64_t row = idx[p];
        if (valid(row)) {
          ++cursor[row];
        } else {
          record_bad(first_bad, p);
        }
      }
    }
    int64_t running = 0;
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t c = cursor[row];
      if (c == 0) continue;
      groups.rows.push_back(row);
      cursor[row] = running;
      running += c;
      groups.starts.push_back(running);
    }
    groups.bags.resize(static_cast<size_t>(running));
    if (want_positions) groups.positions.resize(static_cast<size_t>(running));
    for (const int64_t f : features) {
      for (int64_t bag = f * batch; bag < (f + 1) * batch; ++bag) {
        for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
          const int64_t row = idx[p];
          if (!valid(row)) continue;
          const int64_t q = cursor[row]++;
          groups.bags[q] = bag;
          if (want_positions) groups.positions[q] = p;
        }
      }
    }
    return;
  }

  std::vector<std::tuple<int64_t, int64_t, int64_t>> entries;  // (row, position, bag)
  entries.reserve(static_cast<size_t>(count));
  for (const int64_t f : features) {
    for (int64_t bag = f * batch; bag < (f + 1) * batch; ++bag) {
      for (int64_t p = off[bag]; p < off[bag + 1]; ++p) {
        const int64_t row = idx[p];
        if (valid(row)) {
          entries.emplace_back(row, p, bag);
        } else {
          record_bad(first_bad, p);
        }
      }
    }
  }
  std::sort(entries.begin(), entries.end());
  groups.bags.reserve(entries.size());
  if (want_positions) groups.positions.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const int64_t row = std::get<0>(entries[i]);
    if (i == 0 || row != groups.rows.back()) {
      if (i != 0) groups.starts.push_back(static_cast<int64_t>(i));
      groups.rows.push_back(row);
    }
    groups.bags.push_back(std::get<2>(entries[i]));
    if (want_positions) groups.positions.push_back(std::get<1>(entries[i]));
  }
  groups.starts.push_back(static_cast<int64_t>(entries.size()));
}

template <typename index_t>
std::vector<RowGroups> group_all_tables(const Layout& layout, const at::Tensor& indices,
                                        const at::Tensor& offsets, bool want_positions) {
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  check_offsets(off, offsets.numel(), indices.numel());
  const int64_t num_tables = static_cast<int64_t>(layout.num_rows.size());
  std::vector<RowGroups> groups(static_cast<size_t>(num_tables));
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, num_tables, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      group_rows(t, layout, idx, off, want_positions, groups[t], first_bad);
    }
  });
  const int64_t bad = first_bad.load();
  if (bad != std::numeric_limits<int64_t>::max()) raise_bad_index(layout, idx, off, bad);
  return groups;
}

// Sums, for every unique row of every table, its contributions grad_output[b, columns of f] *
// scale (per-sample weight, 1/len for mean, or 1). The unique rows of all tables form one range
// split across threads. Row gradients are handed to the sink kBatch rows at a time:
// sink(table, rows, first_unit, count, gradients [count, dim], dim), so that the sink can issue the
// independent random reads of several table rows (and accumulators) together and the memory
// system overlaps their latencies, instead of one full miss per row.
constexpr int64_t kBatch = 8;

template <typename scalar_t, typename index_t, typename Sink>
void reduce_rows(const std::vector<RowGroups>& groups, const Layout& layout,
                 const at::Tensor& grad_output, const at::Tensor& offsets,
                 const c10::optional<at::Tensor>& per_sample_weights, Pooling pooling,
                 const Sink& sink) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad_output.data_ptr<scalar_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  const scalar_t* psw = per_sample_weights.has_value() ? per_sample_weights->data_ptr<scalar_t>() : nullptr;
  const bool mean = pooling == Pooling::kMean;
  std::vector<int64_t> first_unit{0};
  for (const auto& group : groups) first_unit.push_back(first_unit.back() + static_cast<int64_t>(group.rows.size()));
  const int64_t total = first_unit.back();

  at::parallel_for(0, total, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(static_cast<size_t>(kBatch * std::max<int64_t>(layout.max_dim, 1)));
    int64_t t = std::upper_bound(first_unit.begin(), first_unit.end(), begin) - first_unit.begin() - 1;
    for (int64_t i = begin; i < end;) {
      while (i >= first_unit[t + 1]) ++t;
      const RowGroups& group = groups[t];
      const int64_t dim = layout.dim[t];
      const int64_t u_first = i - first_unit[t];
      const int64_t count = std::min({kBatch, end - i, first_unit[t + 1] - i});
      for (int64_t k = 0; k < count; ++k) {
        acc_t* __restrict a = buffer.data() + k * dim;
        const int64_t u = u_first + k;
        for (int64_t d = 0; d < dim; ++d) a[d] = acc_t(0);
        const int64_t q_end = group.starts[u + 1];
        for (int64_t q = group.starts[u]; q < q_end; ++q) {
          const int64_t bag = group.bags[q];
          const int64_t f = bag / layout.batch_size;
          const int64_t b = bag - f * layout.batch_size;
          acc_t scale = acc_t(1);
          if (psw != nullptr) {
            scale = static_cast<acc_t>(psw[group.positions[q]]);
          } else if (mean) {
            scale = acc_t(1) / static_cast<acc_t>(off[bag + 1] - off[bag]);
          }
          const scalar_t* __restrict src = g + b * layout.total_dim + layout.column[f];
          for (int64_t d = 0; d < dim; ++d) a[d] += scale * static_cast<acc_t>(src[d]);
        }
      }
      sink(t, group.rows.data() + u_first, u_first, count, static_cast<const acc_t*>(buffer.data()), dim);
      i += count;
    }
  });
}

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

std::vector<at::Tensor> embedding_bags_backward_cpu(
    const at::Tensor& grad_output, at::TensorList weights, const at::Tensor& indices,
    const at::Tensor& offsets, at::IntArrayRef feature_table, c10::string_view pooling,
    const c10::optional<at::Tensor>& per_sample_weights) {
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  std::vector<at::Tensor> grads;
  for (const auto& w : p.weights) grads.push_back(at::zeros(w.sizes(), w.options()));
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_backward_cpu", [&] {
    const auto groups = group_all_tables<index_t>(p.layout, p.indices, p.offsets, p.per_sample_weights.has_value());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<scalar_t*> out;
      for (auto& gr : grads) out.push_back(gr.data_ptr<scalar_t>());
      reduce_rows<scalar_t, index_t>(groups, p.layout, p.grad_output, p.offsets, p.per_sample_weights, p.pooling,
          [&](int64_t t, const int64_t* rows, int64_t, int64_t count, const acc_t* a, int64_t dim) {
            for (int64_t k = 0; k < count; ++k, a += dim) {
              scalar_t* __restrict dst = out[t] + rows[k] * dim;
              for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(a[d]);
            }
          });
    });
  });
  return grads;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> embedding_bags_backward_sparse_cpu(
    const at::Tensor& grad_output, at::TensorList weights, const at::Tensor& indices,
    const at::Tensor& offsets, at::IntArrayRef feature_table, c10::string_view pooling,
    const c10::optional<at::Tensor>& per_sample_weights) {
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  std::vector<at::Tensor> rows, row_grads;
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_backward_sparse_cpu", [&] {
    const auto groups = group_all_tables<index_t>(p.layout, p.indices, p.offsets, p.per_sample_weights.has_value());
    for (size_t t = 0; t < groups.size(); ++t) {
      const int64_t unique = static_cast<int64_t>(groups[t].rows.size());
      at::Tensor r = at::empty({unique}, p.indices.options().dtype(at::kLong));
      std::copy(groups[t].rows.begin(), groups[t].rows.end(), r.data_ptr<int64_t>());
      rows.push_back(r);
      row_grads.push_back(at::empty({unique, p.layout.dim[t]}, p.weights[t].options()));
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_backward_sparse_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<scalar_t*> out;
      for (auto& gr : row_grads) out.push_back(gr.data_ptr<scalar_t>());
      reduce_rows<scalar_t, index_t>(groups, p.layout, p.grad_output, p.offsets, p.per_sample_weights, p.pooling,
          [&](int64_t t, const int64_t*, int64_t u_first, int64_t count, const acc_t* a, int64_t dim) {
            scalar_t* __restrict dst = out[t] + u_first * dim;
            for (int64_t d = 0; d < count * dim; ++d) dst[d] = static_cast<scalar_t>(a[d]);
          });
    });
  });
  return {rows, row_grads};
}

void embedding_bags_fused_update_cpu(at::TensorList weights, at::TensorList accumulators,
                                     const at::Tensor& grad_output, const at::Tensor& indices,
                                     const at::Tensor& offsets, at::IntArrayRef feature_table,
                                     c10::string_view pooling,
                                     const c10::optional<at::Tensor>& per_sample_weights,
                                     c10::string_view optimizer, double lr, double eps) {
  const bool adagrad = check_fused_optimizer(optimizer, weights);
  Prepared p = prepare(grad_output, weights, indices, offsets, feature_table, pooling, per_sample_weights);
  if (adagrad) check_accumulators(accumulators, weights, p.layout);
  AT_DISPATCH_INDEX_TYPES(p.indices.scalar_type(), "embedding_bags_fused_update_cpu", [&] {
    const auto groups = group_all_tables<index_t>(p.layout, p.indices, p.offsets, p.per_sample_weights.has_value());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weights[0].scalar_type(),
                                    "embedding_bags_fused_update_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<scalar_t*> table_data;
      std::vector<int64_t> row_stride;
      std::vector<float*> acc_data;
      for (const auto& w : weights) {
        table_data.push_back(w.data_ptr<scalar_t>());
        row_stride.push_back(w.stride(0));
      }
      if (adagrad) {
        for (const auto& a : accumulators) acc_data.push_back(a.data_ptr<float>());
      }
      const acc_t step = static_cast<acc_t>(lr);
      const acc_t epsilon = static_cast<acc_t>(eps);
      reduce_rows<scalar_t, index_t>(groups, p.layout, p.grad_output, p.offsets, p.per_sample_weights, p.pooling,
          [&](int64_t t, const int64_t* rows, int64_t, int64_t count, const acc_t* a, int64_t dim) {
            const int64_t stride = row_stride[t];
            scalar_t* table = table_data[t];
            if (!adagrad) {
              for (int64_t k = 0; k < count; ++k) {
                scalar_t* __restrict w = table + rows[k] * stride;
                const acc_t* __restrict ak = a + k * dim;
                for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - step * ak[d]);
              }
              return;
            }
            // FBGEMM EXACT_ROWWISE_ADAGRAD: one accumulator per row, the mean of the squared
            // row gradient. Each row is owned by this thread, so the update is race-free. The
            // accumulators of the batch are read first, together (independent misses).
            acc_t multiplier[kBatch];
            float* accumulator = acc_data[t];
            for (int64_t k = 0; k < count; ++k) {
              const acc_t* __restrict ak = a + k * dim;
              acc_t square_sum = acc_t(0);
              for (int64_t d = 0; d < dim; ++d) square_sum += ak[d] * ak[d];
              float& slot = accumulator[rows[k]];
              if (dim > 0) slot += static_cast<float>(square_sum / static_cast<acc_t>(dim));
              multiplier[k] = step / (std::sqrt(static_cast<acc_t>(slot)) + epsilon);
            }
            for (int64_t k = 0; k < count; ++k) {
              scalar_t* __restrict w = table + rows[k] * stride;
              const acc_t* __restrict ak = a + k * dim;
              const acc_t m = multiplier[k];
              for (int64_t d = 0; d < dim; ++d) w[d] = static_cast<scalar_t>(static_cast<acc_t>(w[d]) - m * ak[d]);
            }
          });
    });
  });
}

}  // namespace
}  // namespace embedding_bags
}  // namespace mtkernels

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("embedding_bags_backward", &mtkernels::embedding_bags::embedding_bags_backward_cpu);
  m.impl("embedding_bags_backward_sparse", &mtkernels::embedding_bags::embedding_bags_backward_sparse_cpu);
  m.impl("embedding_bags_fused_update", &mtkernels::embedding_bags::embedding_bags_fused_update_cpu);
}
