// CPU forward of mtkernels::embedding_bags, and the gradient of the per-sample weights.
//
// Table-major order: the work is (feature, chunk of its bags) items, claimed in feature order by
// the threads from one atomic counter, so all threads gather from the same table at the same time
// (the table's touched rows stay in the shared L3, as in a loop of nn.EmbeddingBag or FBGEMM's
// TBE CPU kernel) and a thread that the shared machine descheduled leaves its items to the
// others. Rows are prefetched a few indices ahead, as FBGEMM's EmbeddingSpMDM does, because the
// gathers are random and latency-bound. float32 tables of dim 8/16/32/64/128 take a specialised
// loop (compile-time width, AVX2 accumulators held in registers across a bag, the bounds check
// folded into the gather); other dtypes and dims take the generic one.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "embedding_bags/cpu/embedding_bags_cpu.h"
#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace {

// How many indices ahead the row of a later index is prefetched (FBGEMM's EmbeddingSpMDM uses
// 16): the gathers are random rows of large tables, so they are bound by memory latency, and the
// prefetches keep several misses in flight. Indices of the following bags of the same feature are
// prefetched too (with pooling factor 1 a bag has a single index).
constexpr int64_t kPrefetchDistance = 16;

// The id ahead may not be bounds-checked yet: the address is formed as an integer (no
// out-of-object pointer arithmetic) and x86/ARM prefetches never fault, so a bad id costs at most
// a useless prefetch; it is caught before its row is read.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* table, int64_t row, int64_t row_stride, int64_t dim) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(table) +
                            static_cast<uintptr_t>(row * row_stride) * sizeof(scalar_t);
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(reinterpret_cast<const void*>(address + b), 0, 3);
}

// What one bag needs: its index range, the table and where its pooled row goes.
template <typename scalar_t, typename index_t>
struct BagTask {
  const index_t* indices;
  const scalar_t* per_sample_weights;  // nullptr: unweighted
  const scalar_t* table;
  int64_t row_stride;
  int64_t dim;
  int64_t start, stop;
  int64_t prefetch_stop;  // end of this feature's ids: the ids ahead that index the same table
};

// Pools columns [column, column + kWidth) of the bag: the kWidth accumulators have a
// compile-time size, so they live in vector registers across the whole bag instead of being
// re-loaded and re-stored for every index (what FBGEMM's JIT kernels do with their registers).
template <int kWidth, bool kWeighted, typename scalar_t, typename index_t, typename acc_t>
inline void pool_columns(const BagTask<scalar_t, index_t>& bag, int64_t column, acc_t scale, scalar_t* out) {
  acc_t acc[kWidth];
  for (int d = 0; d < kWidth; ++d) acc[d] = acc_t(0);
  for (int64_t p = bag.start; p < bag.stop; ++p) {
    if (column == 0 && p + kPrefetchDistance < bag.prefetch_stop) {
      prefetch_row(bag.table, static_cast<int64_t>(bag.indices[p + kPrefetchDistance]), bag.row_stride, bag.dim);
    }
    const scalar_t* __restrict src = bag.table + static_cast<int64_t>(bag.indices[p]) * bag.row_stride + column;
    if (kWeighted) {
      const acc_t w = static_cast<acc_t>(bag.per_sample_weights[p]);
      for (int d = 0; d < kWidth; ++d) acc[d] += w * static_cast<acc_t>(src[d]);
    } else {
      for (int d = 0; d < kWidth; ++d) acc[d] += static_cast<acc_t>(src[d]);
    }
  }
  for (int d = 0; d < kWidth; ++d) out[column + d] = static_cast<scalar_t>(acc[d] * scale);
}

template <bool kWeighted, typename scalar_t, typename index_t, typename acc_t>
inline void pool_bag(const BagTask<scalar_t, index_t>& bag, acc_t scale, scalar_t* out) {
  int64_t column = 0;
  // 64 columns at a time (8 AVX2 registers of float32), then narrower blocks for the tail
  for (; column + 64 <= bag.dim; column += 64) pool_columns<64, kWeighted>(bag, column, scale, out);
  if (column + 32 <= bag.dim) { pool_columns<32, kWeighted>(bag, column, scale, out); column += 32; }
  if (column + 16 <= bag.dim) { pool_columns<16, kWeighted>(bag, column, scale, out); column += 16; }
  if (column + 8 <= bag.dim) { pool_columns<8, kWeighted>(bag, column, scale, out); column += 8; }
  for (; column < bag.dim; ++column) pool_columns<1, kWeighted>(bag, column, scale, out);
}

// Pools bags [bag_begin, bag_end) of one feature whose ids are all in range. The per-bag work is
// kept minimal (no division, no per-bag lookups of the feature's table): with pooling factor 1
// a bag is a single row, and a short loop body lets the out-of-order core keep several row
// misses in flight. kWidth > 0: the dim is a multiple of kWidth (register-blocked pass per
// kWidth columns); kWidth == 0: any dim.
template <int kWidth, bool kWeighted, typename scalar_t, typename index_t, typename acc_t>
void pool_feature(BagTask<scalar_t, index_t> bag, const index_t* off, int64_t bag_begin, int64_t bag_end,
                  bool mean, scalar_t* dst, int64_t dst_stride) {
  for (int64_t b = bag_begin; b < bag_end; ++b, dst += dst_stride) {
    bag.start = off[b];
    bag.stop = off[b + 1];
    const acc_t scale = (mean && bag.stop > bag.start) ? acc_t(1) / static_cast<acc_t>(bag.stop - bag.start) : acc_t(1);
    if (kWidth == 0) {
      pool_bag<kWeighted>(bag, scale, dst);
    } else {
      for (int64_t column = 0; column < bag.dim; column += kWidth) {
        pool_columns<kWidth, kWeighted>(bag, column, scale, dst);
      }
    }
  }
}

template <bool kWeighted, typename scalar_t, typename index_t, typename acc_t>
void pool_feature_any_dim(const BagTask<scalar_t, index_t>& bag, const index_t* off, int64_t bag_begin,
                          int64_t bag_end, bool mean, scalar_t* dst, int64_t dst_stride) {
  if (bag.dim % 64 == 0) {
    pool_feature<64, kWeighted, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, dst_stride);
  } else if (bag.dim == 32) {
    pool_feature<32, kWeighted, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, dst_stride);
  } else if (bag.dim == 16) {
    pool_feature<16, kWeighted, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, dst_stride);
  } else if (bag.dim == 8) {
    pool_feature<8, kWeighted, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, dst_stride);
  } else {
    pool_feature<0, kWeighted, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, dst_stride);
  }
}

// 8 floats: GCC/Clang vector extension (AVX2 with -march=native); loads through the
// 4-byte-aligned alias, since table rows need not be 32-byte aligned.
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));

// float32 rows of kVecs * 8 columns: pools bags [bag_begin, bag_end) of one feature into dst.
// Returns the first position whose id is out of range (the rest of the chunk is skipped: the
// output is discarded and an IndexError raised), or -1. No per-bag branch on the dim, the
// weighting or the index width: each is a template parameter.
template <int kVecs, bool kWeighted, typename index_t>
int64_t pool_feature_f32(const float* table, int64_t row_stride, uint64_t num_rows, const index_t* idx,
                         const float* psw, const index_t* off, int64_t bag_begin, int64_t bag_end,
                         int64_t prefetch_stop, bool mean, float* dst, int64_t dst_stride) {
  constexpr int kLines = (kVecs * 32 + 63) / 64;
  for (int64_t b = bag_begin; b < bag_end; ++b, dst += dst_stride) {
    const int64_t start = off[b], stop = off[b + 1];
    vec8 acc[kVecs];
    for (int v = 0; v < kVecs; ++v) acc[v] = vec8{};
    for (int64_t p = start; p < stop; ++p) {
      if (p + kPrefetchDistance < prefetch_stop) {
        // formed as an integer: the id ahead is not bounds-checked yet (a prefetch never faults)
        const uintptr_t ahead = reinterpret_cast<uintptr_t>(table) +
                                static_cast<uintptr_t>(static_cast<int64_t>(idx[p + kPrefetchDistance]) * row_stride) *
                                    sizeof(float);
        for (int l = 0; l < kLines; ++l) __builtin_prefetch(reinterpret_cast<const void*>(ahead + 64 * l), 0, 3);
      }
      const int64_t row = static_cast<int64_t>(idx[p]);
      if (__builtin_expect(static_cast<uint64_t>(row) >= num_rows, 0)) return p;
      const float* src = table + row * row_stride;
      if (kWeighted) {
        const float w = psw[p];
        for (int v = 0; v < kVecs; ++v) acc[v] += w * *reinterpret_cast<const vec8_unaligned*>(src + 8 * v);
      } else {
        for (int v = 0; v < kVecs; ++v) acc[v] += *reinterpret_cast<const vec8_unaligned*>(src + 8 * v);
      }
    }
    if (mean && stop > start) {
      const float scale = 1.f / static_cast<float>(stop - start);
      for (int v = 0; v < kVecs; ++v) acc[v] *= scale;
    }
    for (int v = 0; v < kVecs; ++v) *reinterpret_cast<vec8_unaligned*>(dst + 8 * v) = acc[v];
  }
  return -1;
}

template <bool kWeighted, typename index_t>
using PoolF32 = int64_t (*)(const float*, int64_t, uint64_t, const index_t*, const float*, const index_t*, int64_t,
                            int64_t, int64_t, bool, float*, int64_t);

template <bool kWeighted, typename index_t>
PoolF32<kWeighted, index_t> pool_f32_for_dim(int64_t dim) {
  switch (dim) {
    case 8: return &pool_feature_f32<1, kWeighted, index_t>;
    case 16: return &pool_feature_f32<2, kWeighted, index_t>;
    case 32: return &pool_feature_f32<4, kWeighted, index_t>;
    case 64: return &pool_feature_f32<8, kWeighted, index_t>;
    case 128: return &pool_feature_f32<16, kWeighted, index_t>;
    default: return nullptr;
  }
}

// Bags per work item: at least 256 (the claim is an atomic add), and about two items per thread
// per feature so that a descheduled thread's share is picked up by the others.
inline int64_t bags_per_item(int64_t batch, int64_t threads) {
  return std::max<int64_t>(std::min<int64_t>(batch, 256), (batch + 2 * threads - 1) / (2 * threads));
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
  const int64_t batch = layout.batch_size;
  const int64_t num_features = layout.num_features;
  const bool mean = pooling == Pooling::kMean;
  if (batch == 0 || num_features == 0) return;
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  auto record_bad = [&](int64_t p) {
    int64_t seen = first_bad.load(std::memory_order_relaxed);
    while (p < seen && !first_bad.compare_exchange_weak(seen, p)) {
    }
  };

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = bags_per_item(batch, threads);
  const int64_t items_per_feature = (batch + chunk - 1) / chunk;
  const int64_t num_items = num_features * items_per_feature;
  std::atomic<int64_t> next_item{0};

  at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
    for (int64_t item = next_item.fetch_add(1); item < num_items; item = next_item.fetch_add(1)) {
      const int64_t f = item / items_per_feature;
      const int64_t bag_begin = f * batch + (item - f * items_per_feature) * chunk;
      const int64_t bag_end = std::min(bag_begin + chunk, (f + 1) * batch);
      const int64_t t = layout.feature_table[f];
      const at::Tensor& table = weights[t];
      const uint64_t num_rows = static_cast<uint64_t>(layout.num_rows[t]);
      const int64_t prefetch_stop = static_cast<int64_t>(off[(f + 1) * batch]);
      scalar_t* dst = out + (bag_begin - f * batch) * layout.total_dim + layout.column[f];

      if constexpr (std::is_same_v<scalar_t, float>) {
        const int64_t dim = layout.dim[t];
        if (psw != nullptr) {
          if (auto pool = pool_f32_for_dim<true, index_t>(dim)) {
            const int64_t bad = pool(table.data_ptr<float>(), table.stride(0), num_rows, idx, psw, off, bag_begin,
                                     bag_end, prefetch_stop, mean, dst, layout.total_dim);
            if (bad >= 0) record_bad(bad);
            continue;
          }
        } else if (auto pool = pool_f32_for_dim<false, index_t>(dim)) {
          const int64_t bad = pool(table.data_ptr<float>(), table.stride(0), num_rows, idx, nullptr, off, bag_begin,
                                   bag_end, prefetch_stop, mean, dst, layout.total_dim);
          if (bad >= 0) record_bad(bad);
          continue;
        }
      }

      // Generic dtype / dim: bounds check every id of these bags in one sequential pass
      // (branch-free OR, vectorised) before any row is read; only when it fails is the bad
      // position searched for.
      BagTask<scalar_t, index_t> bag{idx, psw, table.data_ptr<scalar_t>(), table.stride(0), layout.dim[t], 0, 0,
                                     prefetch_stop};
      const int64_t p_begin = off[bag_begin], p_end = off[bag_end];
      bool any_bad = false;
      for (int64_t p = p_begin; p < p_end; ++p) {
        any_bad |= static_cast<uint64_t>(static_cast<int64_t>(idx[p])) >= num_rows;
      }
      if (any_bad) {
        for (int64_t p = p_begin; p < p_end; ++p) {
          if (static_cast<uint64_t>(static_cast<int64_t>(idx[p])) >= num_rows) {
            record_bad(p);
            break;
          }
        }
        // the output is discarded: an IndexError is raised below
      } else if (psw != nullptr) {
        pool_feature_any_dim<true, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, layout.total_dim);
      } else {
        pool_feature_any_dim<false, scalar_t, index_t, acc_t>(bag, off, bag_begin, bag_end, mean, dst, layout.total_dim);
      }
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
