// What the CUDA kernels of embedding_bags share: per-feature metadata on the device, the
// validation of offsets and indices on the device (a status buffer read back after the launch,
// then the CPU's own checks on a host copy, so the messages are the CPU kernel's), and launch
// helpers. Host checks of shapes/dtypes are embedding_bags_common.h's, as on the CPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "embedding_bags/embedding_bags_common.h"

namespace mtkernels {
namespace embedding_bags {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps a block
constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

// One feature as the kernels read it (an array of F, on the device).
struct FeatureMeta {
  void* table;         // weights[t] data (read, or updated in place by the fused optimizer)
  int64_t row_stride;  // elements
  int64_t dim;
  int64_t num_rows;
  int64_t column;      // first output column of the feature
  int64_t table_id;
  int64_t vectorized;  // 16-byte loads and stores are aligned for this feature
  int64_t row_base;    // rows of the tables before table_id (a row's global id is row_base + row)
};

// The status buffer the kernels write: [0] offsets malformed (0/1), [1] first bad index position
// (kNoError when none). Positions are non-negative, so atomicMin on the unsigned view is exact.
inline at::Tensor new_status(const at::Device& device) {
  return at::full({2}, kNoError, at::TensorOptions().dtype(at::kLong).device(device));
}

__device__ __forceinline__ void record_bad_index(int64_t* status, int64_t position) {
  atomicMin(reinterpret_cast<unsigned long long*>(status + 1),
            static_cast<unsigned long long>(position));
}

// offsets[0] == 0, offsets[-1] == num_indices, non-decreasing; sets status[0] = 1 when not.
template <typename index_t>
__global__ void check_offsets_kernel(const index_t* __restrict__ offsets, int64_t num_offsets,
                                     int64_t num_indices, int64_t* __restrict__ status) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_offsets;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = offsets[i];
    const bool bad = (i == 0 && o != 0) || (i == num_offsets - 1 && o != num_indices) ||
                     (i > 0 && o < static_cast<int64_t>(offsets[i - 1]));
    if (bad) status[0] = 1;
  }
}

// The range of bag `bag`, clamped into [0, num_indices] so that malformed offsets never make a
// kernel read outside `indices` (the call raises afterwards from the status buffer).
template <typename index_t>
__device__ __forceinline__ void bag_range(const index_t* offsets, int64_t bag, int64_t num_indices,
                                          int64_t& start, int64_t& stop) {
  start = static_cast<int64_t>(offsets[bag]);
  stop = static_cast<int64_t>(offsets[bag + 1]);
  start = start < 0 ? 0 : (start > num_indices ? num_indices : start);
  stop = stop < start ? start : (stop > num_indices ? num_indices : stop);
}

// Every index of every bag against its table; records the first bad position. One warp per bag.
template <typename index_t>
__global__ void check_indices_kernel(const FeatureMeta* __restrict__ features,
                                     const index_t* __restrict__ indices,
                                     const index_t* __restrict__ offsets, int64_t num_indices,
                                     int64_t batch_size, int64_t num_bags,
                                     int64_t* __restrict__ status) {
  const int64_t bag = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (bag >= num_bags) return;
  const int64_t num_rows = features[bag / batch_size].num_rows;
  int64_t start, stop;
  bag_range(offsets, bag, num_indices, start, stop);
  for (int64_t p = start + lane; p < stop; p += kWarp) {
    const int64_t row = indices[p];
    if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(num_rows)) record_bad_index(status, p);
  }
}

inline unsigned blocks_for_warps(int64_t warps) {
  const int64_t per_block = kThreads / kWarp;
  return static_cast<unsigned>(std::max<int64_t>(1, (warps + per_block - 1) / per_block));
}

inline unsigned blocks_for(int64_t items, int threads = kThreads) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), int64_t{1} << 20));
}

// Per-feature metadata of this call, copied to the device. `vector_elements` is how many
// elements one 16-byte access holds; a feature is vectorised when its table, row stride, dim,
// output column and output row width all allow aligned 16-byte accesses.
inline at::Tensor feature_meta(const Layout& layout, const std::vector<at::Tensor>& weights,
                               int64_t vector_elements, const at::Device& device) {
  std::vector<FeatureMeta> meta(static_cast<size_t>(layout.num_features));
  std::vector<int64_t> row_base(layout.num_rows.size() + 1, 0);
  for (size_t t = 0; t < layout.num_rows.size(); ++t) row_base[t + 1] = row_base[t] + layout.num_rows[t];
  for (int64_t f = 0; f < layout.num_features; ++f) {
    const int64_t t = layout.feature_table[f];
    const at::Tensor& w = weights[t];
    const bool aligned = reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0 &&
                         w.stride(0) % vector_elements == 0 && layout.dim[t] % vector_elements == 0 &&
                         layout.column[f] % vector_elements == 0 &&
                         layout.total_dim % vector_elements == 0;
    meta[f] = {w.data_ptr(), w.stride(0), layout.dim[t], layout.num_rows[t], layout.column[f], t,
               aligned ? 1 : 0, row_base[t]};
  }
  at::Tensor host = at::empty({static_cast<int64_t>(meta.size() * sizeof(FeatureMeta))},
                              at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), meta.data(), host.numel());
  return host.to(device);
}

// Reads the status buffer back (this synchronises the stream) and raises like the CPU kernel:
// its check_offsets / raise_bad_index run on host copies, so the messages are the same.
template <typename index_t>
void raise_on_status(const at::Tensor& status, const Layout& layout, const at::Tensor& indices,
                     const at::Tensor& offsets) {
  const at::Tensor host = status.cpu();
  const int64_t* s = host.const_data_ptr<int64_t>();
  if (s[0] == kNoError && s[1] == kNoError) return;
  const at::Tensor host_offsets = offsets.cpu();
  check_offsets(host_offsets.const_data_ptr<index_t>(), host_offsets.numel(), indices.numel());
  TORCH_CHECK(s[1] != kNoError, "embedding_bags: the device reported malformed offsets that the "
              "host check accepts (internal error)");
  const at::Tensor host_indices = indices.cpu();
  raise_bad_index(layout, host_indices.const_data_ptr<index_t>(),
                  host_offsets.const_data_ptr<index_t>(), s[1]);
}

// Launches the offsets and indices checks (no sync).
template <typename index_t>
void launch_checks(const at::Tensor& features, const Layout& layout, const at::Tensor& indices,
                   const at::Tensor& offsets, at::Tensor& status, cudaStream_t stream) {
  check_offsets_kernel<index_t><<<blocks_for(offsets.numel()), kThreads, 0, stream>>>(
      offsets.const_data_ptr<index_t>(), offsets.numel(), indices.numel(),
      status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t num_bags = layout.num_features * layout.batch_size;
  if (num_bags == 0) return;
  check_indices_kernel<index_t><<<blocks_for_warps(num_bags), kThreads, 0, stream>>>(
      reinterpret_cast<const FeatureMeta*>(features.const_data_ptr()),
      indices.const_data_ptr<index_t>(), offsets.const_data_ptr<index_t>(), indices.numel(),
      layout.batch_size, num_bags, status.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Warp-wide sum in a fixed butterfly order (deterministic).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, mask);
  }
  return value;
}

}  // namespace cuda
}  // namespace embedding_bags
}  // namespace mtkernels
