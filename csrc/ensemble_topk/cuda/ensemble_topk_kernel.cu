// CUDA kernel of mtkernels::ensemble_topk (ARCHITECTURE.md §3.3): same schema, contract and error
// messages as the CPU kernel (csrc/ensemble_topk/cpu/ensemble_topk_kernel.cpp).
//
// Weighted mode, k <= kMaxSharedK: one block per row, one pass over the scores. Each thread computes
// the fused score of its items on the fly (transform and weighted sum over the S sources, float32,
// in source order, never written out); an item whose packed key (below) beats the block's threshold
// is checked against the row's exclusions (binary search in the row's sorted list) and appended to
// a candidate buffer in shared memory. When the buffer could overflow on the next tile, the block
// sorts it (bitonic), keeps the best k and raises the threshold to the k-th key. This is the
// "filter by a rising threshold, compact when full" scheme of the CPU kernel (and of FAISS's
// block select, which keeps per-thread queues in front of a shared k-buffer), written with a shared
// buffer only because it is simpler to get right without a GPU to test on.
//
// Larger k, and rank fusion (rrf): composite ATen ops on the device, over chunks of rows. Every
// item gets a packed int64 key (a NaN or excluded item gets -1) and at::topk selects the best k
// keys; rrf ranks each source with at::sort of the same keys first. These paths materialise a
// [rows, N] int64 chunk (bounded to kChunkElements per chunk).
//
// Packed keys: the float value mapped to an order-preserving uint32 (-0.0 == +0.0), then the index
// complemented, so a larger key is a larger value or, for equal values, a smaller index. All keys
// are distinct, so "ties by the smaller index" needs no stable sort anywhere.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>
#include <vector>

#include "common/checks.h"
#include "ensemble_topk/ensemble_topk.h"

namespace mtkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 4;
constexpr int kTile = kThreads * kItemsPerThread;  // items a block scores between two syncs
// The candidate buffer holds k kept items plus one tile: 4096 keys (32 KiB) allows k <= 3072.
constexpr int kMaxBuffer = 4096;
constexpr int64_t kMaxSharedK = kMaxBuffer - kTile;
// Elements of one [rows, N] chunk of the composite paths (512 MiB per int64 matrix; rrf holds
// about six such matrices at once).
constexpr int64_t kChunkElements = int64_t{1} << 26;

// One source of non-zero weight, as the kernel reads it.
struct SourceMeta {
  const void* data;     // row 0, item 0
  int64_t row_stride;   // in elements
  float weight;
  int32_t transform;
};

// ---- packed keys -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t ordered_key(float value) {
  const uint32_t bits = __float_as_uint(value + 0.0f);  // -0.0 -> +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_ordered_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return __uint_as_float(bits);
}

// Shared-memory path: 32 bits of value, 32 bits of complemented index; 0 is below every item.
__device__ __forceinline__ uint64_t pack64(float value, int64_t index) {
  return (static_cast<uint64_t>(ordered_key(value)) << 32) |
         static_cast<uint64_t>(0xffffffffu - static_cast<uint32_t>(index));
}

// Composite path (signed int64 for at::topk/at::sort): 32 bits of value, 31 bits of index; -1 is
// below every item.
__device__ __forceinline__ int64_t pack63(float value, int64_t index) {
  return static_cast<int64_t>((static_cast<uint64_t>(ordered_key(value)) << 31) |
                              static_cast<uint64_t>(0x7fffffff - index));
}

// ---- fused score of one item ---------------------------------------------------------------------

template <typename scalar_t>
__device__ __forceinline__ float fused_score(const SourceMeta* sources, int num_sources, int64_t row,
                                             int64_t item) {
  float fused = 0.0f;
  for (int s = 0; s < num_sources; ++s) {
    const SourceMeta m = sources[s];
    const float x =
        static_cast<float>(static_cast<const scalar_t*>(m.data)[row * m.row_stride + item]);
    float t = x;
    if (m.transform == kSigmoid) {
      t = 1.0f / (1.0f + expf(-x));
    } else if (m.transform == kLogSigmoid) {
      t = fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
      if (x != x) t = x;  // fminf drops a NaN
    }
    // Rounded products and sums as the reference's `fused += w * transform(x)`: no FMA
    // contraction, so values match the CPU up to the transform's own rounding.
    const float term = __fmul_rn(m.weight, t);
    fused = s == 0 ? term : __fadd_rn(fused, term);
  }
  return fused;
}

// Is item in the sorted exclusion keys [begin, end) of this row (key = row * N + item)?
__device__ __forceinline__ bool is_excluded(const int64_t* sorted_keys, int64_t begin, int64_t end,
                                            int64_t key) {
  while (begin < end) {
    const int64_t mid = begin + (end - begin) / 2;
    const int64_t v = sorted_keys[mid];
    if (v == key) return true;
    if (v < key) {
      begin = mid + 1;
    } else {
      end = mid;
    }
  }
  return false;
}

// Sorts buffer[0, size) descending; size is a power of two; every thread of the block calls it.
__device__ void bitonic_sort_descending(uint64_t* buffer, int size) {
  for (int block = 2; block <= size; block <<= 1) {
    for (int stride = block >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < size / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & block) == 0;
        const uint64_t a = buffer[lo];
        const uint64_t b = buffer[hi];
        if (descending ? (a < b) : (a > b)) {
          buffer[lo] = b;
          buffer[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Pads the buffer past `count` with 0 (below every item), sorts it; returns nothing (the caller
// reads the first entries). Every thread calls it.
__device__ void sort_candidates(uint64_t* buffer, int count, int capacity) {
  for (int i = count + threadIdx.x; i < capacity; i += blockDim.x) buffer[i] = 0;
  __syncthreads();
  bitonic_sort_descending(buffer, capacity);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    weighted_topk_kernel(const SourceMeta* __restrict__ sources, int num_sources, int64_t num_items,
                         int k, int capacity, const int64_t* __restrict__ exclude_offsets,
                         const int64_t* __restrict__ exclude_keys, float* __restrict__ out_values,
                         int64_t* __restrict__ out_indices) {
  extern __shared__ uint64_t buffer[];  // [capacity]
  __shared__ int count;
  __shared__ uint64_t threshold;  // an item is a candidate when its key is above it
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    count = 0;
    threshold = 0;
  }
  __syncthreads();
  const int64_t excluded_begin = exclude_offsets != nullptr ? exclude_offsets[row] : 0;
  const int64_t excluded_end = exclude_offsets != nullptr ? exclude_offsets[row + 1] : 0;
  const int64_t row_key = row * num_items;

  for (int64_t base = 0; base < num_items; base += kTile) {
    const uint64_t bar = threshold;
#pragma unroll
    for (int j = 0; j < kItemsPerThread; ++j) {
      const int64_t item = base + j * kThreads + threadIdx.x;
      if (item < num_items) {
        const float value = fused_score<scalar_t>(sources, num_sources, row, item);
        if (value == value) {  // NaN is never an item
          const uint64_t key = pack64(value, item);
          if (key > bar &&
              !is_excluded(exclude_keys, excluded_begin, excluded_end, row_key + item)) {
            buffer[atomicAdd(&count, 1)] = key;
          }
        }
      }
    }
    __syncthreads();
    const int held = count;
    __syncthreads();  // everyone has read `count` before anyone changes it again
    if (held > capacity - kTile) {
      sort_candidates(buffer, held, capacity);
      if (threadIdx.x == 0) {
        count = held < k ? held : k;
        if (held >= k) threshold = buffer[k - 1];
      }
      __syncthreads();
    }
  }
  const int held = count;
  sort_candidates(buffer, held, capacity);
  const int kept = held < k ? held : k;
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    if (j < kept) {
      const uint64_t key = buffer[j];
      out_values[row * k + j] = from_ordered_key(static_cast<uint32_t>(key >> 32));
      out_indices[row * k + j] = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key));
    } else {
      out_values[row * k + j] = -std::numeric_limits<float>::infinity();
      out_indices[row * k + j] = -1;
    }
  }
}

// keys[r, n] for rows row_begin .. row_begin + rows - 1: the packed key of the fused score, -1 for
// NaN. Exclusions are applied afterwards (index_fill_).
template <typename scalar_t>
__global__ void packed_keys_kernel(const SourceMeta* __restrict__ sources, int num_sources,
                                   int64_t row_begin, int64_t rows, int64_t num_items,
                                   int64_t* __restrict__ keys) {
  const int64_t total = rows * num_items;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / num_items;
    const int64_t item = i - r * num_items;
    const float value = fused_score<scalar_t>(sources, num_sources, row_begin + r, item);
    keys[i] = value == value ? pack63(value, item) : int64_t{-1};
  }
}

// Top keys [rows, kk] -> values and indices [rows, k] (kk <= k; the tail and key -1 are -inf/-1).
__global__ void unpack_keys_kernel(const int64_t* __restrict__ top_keys, int64_t rows, int64_t kk,
                                   int64_t k, float* __restrict__ out_values,
                                   int64_t* __restrict__ out_indices) {
  const int64_t total = rows * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    const int64_t key = j < kk ? top_keys[r * kk + j] : int64_t{-1};
    if (key < 0) {
      out_values[i] = -std::numeric_limits<float>::infinity();
      out_indices[i] = -1;
    } else {
      out_values[i] = from_ordered_key(static_cast<uint32_t>(static_cast<uint64_t>(key) >> 31));
      out_indices[i] = 0x7fffffff - (key & 0x7fffffff);
    }
  }
}

int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

// ---- host side ---------------------------------------------------------------------------------

// The sources of non-zero weight, as a device array of SourceMeta.
at::Tensor source_meta(const std::vector<SourceMeta>& sources, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(sources.size() * sizeof(SourceMeta))},
                              at::TensorOptions().dtype(at::kByte));
  if (!sources.empty()) std::memcpy(host.data_ptr(), sources.data(), host.numel());
  return host.to(device);
}

template <typename scalar_t>
void launch_packed_keys(const at::Tensor& meta, int num_sources, int64_t row_begin, int64_t rows,
                        int64_t num_items, at::Tensor& keys, cudaStream_t stream) {
  const int threads = 256;
  packed_keys_kernel<scalar_t><<<grid_for(rows * num_items, threads), threads, 0, stream>>>(
      reinterpret_cast<const SourceMeta*>(meta.const_data_ptr()), num_sources, row_begin, rows,
      num_items, keys.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_packed_keys(at::ScalarType dtype, const at::Tensor& meta, int num_sources,
                        int64_t row_begin, int64_t rows, int64_t num_items, at::Tensor& keys,
                        cudaStream_t stream) {
  switch (dtype) {
    case at::kHalf:
      launch_packed_keys<c10::Half>(meta, num_sources, row_begin, rows, num_items, keys, stream);
      break;
    case at::kBFloat16:
      launch_packed_keys<c10::BFloat16>(meta, num_sources, row_begin, rows, num_items, keys,
                                        stream);
      break;
    case at::kDouble:
      launch_packed_keys<double>(meta, num_sources, row_begin, rows, num_items, keys, stream);
      break;
    default:
      launch_packed_keys<float>(meta, num_sources, row_begin, rows, num_items, keys, stream);
  }
}

template <typename scalar_t>
void launch_weighted(const at::Tensor& meta, int num_sources, int64_t batch_size,
                     int64_t num_items, int64_t k, const int64_t* offsets, const int64_t* keys,
                     at::Tensor& values, at::Tensor& indices, cudaStream_t stream) {
  // Smallest power of two holding k kept items plus one tile.
  int capacity = 2 * kTile;
  while (capacity < k + kTile) capacity <<= 1;
  const size_t shared = static_cast<size_t>(capacity) * sizeof(uint64_t);
  weighted_topk_kernel<scalar_t><<<static_cast<unsigned>(batch_size), kThreads, shared, stream>>>(
      reinterpret_cast<const SourceMeta*>(meta.const_data_ptr()), num_sources, num_items,
      static_cast<int>(k), capacity, offsets, keys, values.data_ptr<float>(),
      indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Exclusions, checked like the CPU kernel (same messages), as int64 offsets and the sorted keys
// row * N + item (so each row's segment of the sorted keys is that row's list, sorted).
std::pair<at::Tensor, at::Tensor> checked_exclusions(const at::Tensor& offsets_in,
                                                     const at::Tensor& indices_in,
                                                     const at::Device& device, int64_t batch_size,
                                                     int64_t num_items) {
  const at::Tensor host_offsets = checked_exclusion_offsets(offsets_in, indices_in, device, batch_size);
  const int64_t nnz = indices_in.numel();
  at::Tensor items = indices_in.to(at::kLong).contiguous();
  if (nnz > 0) {
    const auto [low, high] = items.aminmax();
    const int64_t lo = low.item<int64_t>();
    const int64_t hi = high.item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_items, "exclude_indices must lie in [0, N=", num_items,
                      "), got ", lo < 0 ? lo : hi);
  }
  const at::Tensor offsets = host_offsets.to(device);
  const at::Tensor counts = host_offsets.narrow(0, 1, batch_size) - host_offsets.narrow(0, 0, batch_size);
  const at::Tensor rows = at::repeat_interleave(counts).to(device);  // row of each exclusion
  const at::Tensor keys = std::get<0>(at::sort(rows * num_items + items));
  return {offsets, keys};
}

// Rows [row_begin, row_begin + rows): -1 at every excluded item of the chunk's key matrix.
void exclude_in_chunk(at::Tensor& keys, const at::Tensor& exclude_keys, int64_t row_begin,
                      int64_t rows, int64_t num_items) {
  if (!exclude_keys.defined() || exclude_keys.numel() == 0) return;
  const int64_t first = row_begin * num_items;
  const int64_t last = (row_begin + rows) * num_items;
  const at::Tensor in_chunk = exclude_keys.masked_select((exclude_keys >= first) & (exclude_keys < last));
  keys.view({-1}).index_fill_(0, in_chunk - first, -1);
}

// Selects the best k keys of each row of the chunk and writes them to values/indices.
void select_chunk(const at::Tensor& keys, int64_t row_begin, int64_t rows, int64_t k,
                  at::Tensor& values, at::Tensor& indices, cudaStream_t stream) {
  const int64_t kk = std::min<int64_t>(k, keys.size(1));
  const at::Tensor top = std::get<0>(at::topk(keys, kk, /*dim=*/1, /*largest=*/true, /*sorted=*/true))
                             .contiguous();
  const int threads = 256;
  unpack_keys_kernel<<<grid_for(rows * k, threads), threads, 0, stream>>>(
      top.const_data_ptr<int64_t>(), rows, kk, k, values.data_ptr<float>() + row_begin * k,
      indices.data_ptr<int64_t>() + row_begin * k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> ensemble_topk_cuda(
    at::TensorList scores, at::ArrayRef<double> weights, int64_t k, at::IntArrayRef transforms,
    const std::optional<at::Tensor>& exclude_offsets,
    const std::optional<at::Tensor>& exclude_indices, c10::string_view mode, double rrf_c) {
  const std::string_view mode_name(mode.data(), mode.size());
  check_ensemble_topk_args(scores, weights, k, transforms, exclude_offsets, exclude_indices,
                           mode_name, rrf_c);
  const auto num_sources = static_cast<int64_t>(scores.size());
  const at::Tensor& first = scores[0];

  const c10::cuda::CUDAGuard device_guard(first.device());
  const at::Device device = first.device();
  const int64_t batch_size = first.size(0);
  const int64_t num_items = first.size(1);
  // The composite paths pack the item index in 31 bits.
  TORCH_CHECK_VALUE(num_items < (int64_t{1} << 31),
                    "scores must have fewer than 2^31 items per row on CUDA, got ", num_items);
  at::Tensor offsets, exclusion_keys;
  if (exclude_offsets.has_value()) {
    std::tie(offsets, exclusion_keys) =
        checked_exclusions(*exclude_offsets, *exclude_indices, device, batch_size, num_items);
  }

  at::Tensor values = at::empty({batch_size, k}, first.options().dtype(at::kFloat));
  at::Tensor items = at::empty({batch_size, k}, first.options().dtype(at::kLong));
  if (batch_size == 0 || k == 0) {
    return {values, items};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const bool rrf = mode_name == "rrf";
  // Rows per chunk of the composite paths.
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, num_items));

  if (rrf) {
    // Rank fusion needs each source's full ranking of a row: composite ATen ops (see the top).
    const float c = static_cast<float>(rrf_c);
    for (int64_t r0 = 0; r0 < batch_size; r0 += chunk_rows) {
      const int64_t rows = std::min(chunk_rows, batch_size - r0);
      at::Tensor fused = at::zeros({rows, num_items}, first.options().dtype(at::kFloat));
      at::Tensor keys = at::empty({rows, num_items}, first.options().dtype(at::kLong));
      const at::Tensor positions = at::arange(1, num_items + 1, first.options().dtype(at::kLong))
                                       .expand({rows, num_items})
                                       .contiguous();
      for (int64_t s = 0; s < num_sources; ++s) {
        if (weights[s] == 0.0) continue;
        const at::Tensor x = scores[s].narrow(0, r0, rows).to(at::kFloat).contiguous();
        const std::vector<SourceMeta> one = {{x.const_data_ptr(), x.stride(0), 1.0f, kIdentity}};
        const at::Tensor meta = source_meta(one, device);
        launch_packed_keys(at::kFloat, meta, 1, 0, rows, num_items, keys, stream);
        const at::Tensor order = std::get<1>(at::sort(keys, /*dim=*/1, /*descending=*/true));
        at::Tensor ranks = at::empty({rows, num_items}, first.options().dtype(at::kLong));
        ranks.scatter_(1, order, positions);
        const at::Tensor ranks_f = ranks.to(at::kFloat);
        const at::Tensor term =
            at::full({rows, num_items}, static_cast<float>(weights[s]), fused.options()) /
            (ranks_f + c);
        fused += at::where(at::isnan(x), x, term);
      }
      const std::vector<SourceMeta> one = {{fused.const_data_ptr(), fused.stride(0), 1.0f, kIdentity}};
      const at::Tensor meta = source_meta(one, device);
      launch_packed_keys(at::kFloat, meta, 1, 0, rows, num_items, keys, stream);
      exclude_in_chunk(keys, exclusion_keys, r0, rows, num_items);
      select_chunk(keys, r0, rows, k, values, items, stream);
    }
    return {values, items};
  }

  std::vector<at::Tensor> keep_alive;  // contiguous copies of strided sources
  std::vector<SourceMeta> sources;
  for (int64_t s = 0; s < num_sources; ++s) {
    if (weights[s] == 0.0) continue;  // contributes nothing, not even the NaN of 0 * inf
    at::Tensor source = scores[s];
    if (source.stride(1) != 1) {
      source = source.contiguous();
      keep_alive.push_back(source);
    }
    sources.push_back({source.const_data_ptr(), source.stride(0), static_cast<float>(weights[s]),
                       static_cast<int32_t>(transforms[s])});
  }
  const at::Tensor meta = source_meta(sources, device);
  const int active = static_cast<int>(sources.size());

  if (k <= kMaxSharedK) {
    const int64_t* offsets_data = offsets.defined() ? offsets.const_data_ptr<int64_t>() : nullptr;
    const int64_t* keys_data =
        exclusion_keys.defined() ? exclusion_keys.const_data_ptr<int64_t>() : nullptr;
    // One block per row: grid.x is limited to 2^31 - 1 rows.
    TORCH_CHECK_VALUE(batch_size < (int64_t{1} << 31), "scores must have fewer than 2^31 rows, got ",
                      batch_size);
    switch (first.scalar_type()) {
      case at::kHalf:
        launch_weighted<c10::Half>(meta, active, batch_size, num_items, k, offsets_data, keys_data,
                                   values, items, stream);
        break;
      case at::kBFloat16:
        launch_weighted<c10::BFloat16>(meta, active, batch_size, num_items, k, offsets_data,
                                       keys_data, values, items, stream);
        break;
      case at::kDouble:
        launch_weighted<double>(meta, active, batch_size, num_items, k, offsets_data, keys_data,
                                values, items, stream);
        break;
      default:
        launch_weighted<float>(meta, active, batch_size, num_items, k, offsets_data, keys_data,
                               values, items, stream);
    }
    return {values, items};
  }

  // k above what the shared buffer holds: packed keys per chunk of rows, then at::topk.
  for (int64_t r0 = 0; r0 < batch_size; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, batch_size - r0);
    at::Tensor keys = at::empty({rows, num_items}, first.options().dtype(at::kLong));
    launch_packed_keys(first.scalar_type(), meta, active, r0, rows, num_items, keys, stream);
    exclude_in_chunk(keys, exclusion_keys, r0, rows, num_items);
    select_chunk(keys, r0, rows, k, values, items, stream);
  }
  return {values, items};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CUDA, m) { m.impl("ensemble_topk", &ensemble_topk_cuda); }

}  // namespace mtkernels
