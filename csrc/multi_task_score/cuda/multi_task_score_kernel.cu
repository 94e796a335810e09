// multi_task_score, CUDA (ARCHITECTURE §3.2): same schema, layout and messages as the CPU kernel
// (csrc/multi_task_score/cpu/multi_task_score_kernel.cpp; checks in multi_task_score.h).
//
// 1. The expert first layers and every gate's logits are one cuBLAS product (at::addmm):
//    x [M, D] times [E*H_1 + T*E, D]^T, bias included, then ReLU on the expert columns. When the
//    params come from pack_multi_task_params the gate rows follow the expert rows in memory and
//    the concatenated matrix is a view; otherwise it is one copy per call.
// 2. Each later expert layer is one batched product over the experts (at::baddbmm) and a ReLU.
// 3. Everything else is one kernel, one warp per (row, task): the masked softmax of the gate
//    (warp max and sum), the mixture of the last expert layer, every tower layer (bias, ReLU,
//    warp-wide dot products) and the output transform. The gate, the mixture and the tower
//    activations live in shared memory (float32 accumulation), never in global memory.
// Warp sums use a fixed butterfly, so the result does not change from run to run.
// Inference only: no autograd (the Python wrapper refuses inputs that require grad).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "multi_task_score/multi_task_score.h"

namespace mtkernels {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarpsPerBlock = 8;
constexpr size_t kSharedBytes = 48 * 1024;  // the default dynamic shared memory limit

struct TowerLayer {
  const void* weight;  // [T, out, in] contiguous
  const void* bias;    // [T, out]
  int64_t out;
  int64_t in;
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t value) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t value) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
    const acc_t other = __shfl_xor_sync(0xffffffffu, value, mask);
    value = other > value ? other : value;
  }
  return value;
}

// One warp per (row m, task t). `experts` holds element (m, e, j) at
// experts[m * expert_row_stride + e * expert_stride + j]; `logits` the gate logits (bias added)
// of row m and task t at logits[m * logit_row_stride + t * E + e].
template <typename scalar_t>
__global__ void gates_towers_kernel(const scalar_t* __restrict__ experts, int64_t expert_row_stride,
                                    int64_t expert_stride, const scalar_t* __restrict__ logits,
                                    int64_t logit_row_stride, const bool* __restrict__ mask,
                                    const TowerLayer* __restrict__ layers, int num_layers,
                                    const bool* __restrict__ sigmoid, int64_t rows, int64_t tasks,
                                    int64_t num_experts, int64_t width, int64_t scratch_per_warp,
                                    at::opmath_type<scalar_t>* __restrict__ global_scratch,
                                    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int warp_in_block = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp_in_block;
  if (warp >= rows * tasks) return;
  const int64_t m = warp / tasks;
  const int64_t t = warp - m * tasks;
  acc_t* scratch = global_scratch != nullptr
                       ? global_scratch + warp * scratch_per_warp
                       : reinterpret_cast<acc_t*>(shared_raw) + warp_in_block * scratch_per_warp;
  acc_t* gate = scratch;                       // [E]
  acc_t* buffer_a = scratch + num_experts;     // [max width]
  acc_t* buffer_b = buffer_a + (scratch_per_warp - num_experts) / 2;
  const bool* allowed = mask + t * num_experts;

  // Masked softmax over the task's experts.
  const scalar_t* logit = logits + m * logit_row_stride + t * num_experts;
  acc_t local_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t e = lane; e < num_experts; e += kWarp) {
    const acc_t v = static_cast<acc_t>(logit[e]);
    gate[e] = v;
    if (allowed[e] && v > local_max) local_max = v;
  }
  const acc_t max_logit = warp_max(local_max);
  acc_t local_sum = acc_t(0);
  for (int64_t e = lane; e < num_experts; e += kWarp) {
    const acc_t g = allowed[e] ? exp(gate[e] - max_logit) : acc_t(0);
    gate[e] = g;
    local_sum += g;
  }
  const acc_t inverse = acc_t(1) / warp_sum(local_sum);
  for (int64_t e = lane; e < num_experts; e += kWarp) gate[e] *= inverse;
  __syncwarp();

  // Mixture of the last expert layer.
  const scalar_t* expert_row = experts + m * expert_row_stride;
  for (int64_t j = lane; j < width; j += kWarp) {
    acc_t mix = acc_t(0);
    for (int64_t e = 0; e < num_experts; ++e) {
      if (allowed[e]) mix += gate[e] * static_cast<acc_t>(expert_row[e * expert_stride + j]);
    }
    buffer_a[j] = mix;
  }
  __syncwarp();

  // Tower: ReLU between layers, one output in the last one, then the transform.
  acc_t* in = buffer_a;
  acc_t* next = buffer_b;
  for (int k = 0; k < num_layers; ++k) {
    const TowerLayer layer = layers[k];
    const scalar_t* w = static_cast<const scalar_t*>(layer.weight) + t * layer.out * layer.in;
    const scalar_t* b = static_cast<const scalar_t*>(layer.bias) + t * layer.out;
    const bool last = k + 1 == num_layers;
    for (int64_t o = 0; o < layer.out; ++o) {
      acc_t partial = acc_t(0);
      for (int64_t j = lane; j < layer.in; j += kWarp) {
        partial += static_cast<acc_t>(w[o * layer.in + j]) * in[j];
      }
      const acc_t s = warp_sum(partial) + static_cast<acc_t>(b[o]);
      if (last) {
        if (lane == 0) {
          const acc_t score = sigmoid[t] ? acc_t(1) / (acc_t(1) + exp(-s)) : s;
          out[m * tasks + t] = static_cast<scalar_t>(score);
        }
      } else if (lane == static_cast<int>(o % kWarp)) {
        next[o] = s > acc_t(0) ? s : acc_t(0);
      }
    }
    __syncwarp();
    acc_t* swap = in;
    in = next;
    next = swap;
  }
}

// True when `second` starts right where `first` ends in one buffer (the packer's layout), so the
// two read as one matrix without a copy.
bool adjacent(const at::Tensor& first, const at::Tensor& second) {
  return first.is_contiguous() && second.is_contiguous() && first.numel() > 0 &&
         first.storage().is_alias_of(second.storage()) &&
         static_cast<const char*>(first.const_data_ptr()) + first.nbytes() ==
             static_cast<const char*>(second.const_data_ptr());
}

template <typename T>
at::Tensor to_device(const std::vector<T>& items, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(std::max<size_t>(1, items.size() * sizeof(T)))},
                              at::TensorOptions().dtype(at::kByte));
  if (!items.empty()) std::memcpy(host.data_ptr(), items.data(), items.size() * sizeof(T));
  return host.to(device);
}

at::Tensor multi_task_score_cuda(const at::Tensor& x_in, at::TensorList expert_weights_in,
                                 at::TensorList expert_biases_in, const at::Tensor& gate_weight,
                                 const at::Tensor& gate_bias, const at::Tensor& gate_mask,
                                 at::TensorList tower_weights_in, at::TensorList tower_biases_in,
                                 std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const MultiTaskScoreDims d =
      check_multi_task_score_inputs(x_in, expert_weights_in, expert_biases_in, gate_weight, gate_bias,
                                    gate_mask, tower_weights_in, tower_biases_in, transforms);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const int64_t E = d.experts, T = d.tasks, D = d.width, M = d.rows, H1 = d.expert_sizes[0];
  const at::Device device = x_in.device();

  // The mask is T x E booleans: checked on the host (one small copy).
  const at::Tensor mask_host = gate_mask.cpu().contiguous();
  const bool* mask_ptr = mask_host.const_data_ptr<bool>();
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t e = 0; e < E; ++e) any = any || mask_ptr[t * E + e];
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task");
  }

  at::Tensor out = at::empty({M, T}, x_in.options());
  if (M == 0) return out;
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= D ? x_in : x_in.contiguous();

  // 1. expert first layers + gate logits: one product (bias included), ReLU on the expert part.
  const at::Tensor& w0 = expert_weights_in[0];
  const at::Tensor& b0 = expert_biases_in[0];
  const int64_t N1 = E * H1 + T * E;
  at::Tensor first_weight, first_bias;
  if (adjacent(w0, gate_weight)) {
    first_weight = at::Tensor(w0).as_strided({N1, D}, {D, 1});
  } else {
    first_weight = at::cat({w0.reshape({E * H1, D}), gate_weight.reshape({T * E, D})});
  }
  if (adjacent(b0, gate_bias)) {
    first_bias = at::Tensor(b0).as_strided({N1}, {1});
  } else {
    first_bias = at::cat({b0.reshape({E * H1}), gate_bias.reshape({T * E})});
  }
  const at::Tensor first = at::addmm(first_bias, x, first_weight.t());  // [M, N1]
  first.narrow(1, 0, E * H1).relu_();

  // 2. later expert layers: [E, M, H_l] = bias + [E, M, H_{l-1}] x W_l^T, then ReLU.
  at::Tensor experts = first.narrow(1, 0, E * H1);
  int64_t expert_row_stride = N1, expert_stride = H1;
  if (expert_weights_in.size() > 1) {
    at::Tensor h = first.narrow(1, 0, E * H1).view({M, E, H1}).transpose(0, 1);  // [E, M, H1]
    for (size_t l = 1; l < expert_weights_in.size(); ++l) {
      h = at::baddbmm(expert_biases_in[l].unsqueeze(1), h, expert_weights_in[l].transpose(1, 2));
      h.relu_();
    }
    experts = h.contiguous();  // [E, M, H]
    expert_row_stride = experts.size(2);
    expert_stride = M * experts.size(2);
  }
  const int64_t width = d.expert_sizes.back();

  // 3. gates, mixture, towers, transforms.
  std::vector<at::Tensor> tower_weights, tower_biases;
  std::vector<TowerLayer> layers;
  int64_t max_width = width;
  for (size_t k = 0; k < tower_weights_in.size(); ++k) {
    tower_weights.push_back(tower_weights_in[k].contiguous());
    tower_biases.push_back(tower_biases_in[k].contiguous());
    layers.push_back({tower_weights.back().const_data_ptr(), tower_biases.back().const_data_ptr(),
                      tower_weights.back().size(1), tower_weights.back().size(2)});
    max_width = std::max(max_width, tower_weights.back().size(1));
  }
  std::vector<uint8_t> sigmoid_host(d.sigmoid.begin(), d.sigmoid.end());
  const at::Tensor layers_device = to_device(layers, device);
  const at::Tensor sigmoid_device = to_device(sigmoid_host, device);
  const at::Tensor mask_device = gate_mask.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multi_task_score_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t scratch_per_warp = E + 2 * max_width;
    const size_t warp_bytes = static_cast<size_t>(scratch_per_warp) * sizeof(acc_t);
    const int64_t num_warps = M * T;
    int warps_per_block = kMaxWarpsPerBlock;
    while (warps_per_block > 1 && warps_per_block * warp_bytes > kSharedBytes) warps_per_block /= 2;
    // Very wide towers: the per-warp scratch goes to global memory instead.
    at::Tensor global_scratch;
    size_t shared = warps_per_block * warp_bytes;
    if (warp_bytes > kSharedBytes) {
      global_scratch = at::empty({num_warps * scratch_per_warp}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      shared = 0;
    }
    const int64_t blocks = (num_warps + warps_per_block - 1) / warps_per_block;
    TORCH_CHECK_VALUE(blocks < (int64_t{1} << 31), "x has too many rows for one launch: ", M);
    gates_towers_kernel<scalar_t><<<static_cast<unsigned>(blocks), warps_per_block * kWarp, shared, stream>>>(
        experts.const_data_ptr<scalar_t>(), expert_row_stride, expert_stride,
        first.const_data_ptr<scalar_t>() + E * H1, N1, mask_device.const_data_ptr<bool>(),
        reinterpret_cast<const TowerLayer*>(layers_device.const_data_ptr()),
        static_cast<int>(layers.size()), reinterpret_cast<const bool*>(sigmoid_device.const_data_ptr()),
        M, T, E, width, scratch_per_warp,
        global_scratch.defined() ? global_scratch.data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CUDA, m) {
  m.impl("multi_task_score", &multi_task_score_cuda);
}

}  // namespace mtkernels
