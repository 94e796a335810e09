// multi_task_score, CPU: experts, per-task softmax gates, task towers and output transforms fused
// over blocks of rows (ARCHITECTURE §3.2).
//
// Per block of rows, inside one at::parallel_for:
//   1. one matrix product x_block [B, D] x [D, E*H_1 + T*E] gives every expert's first layer and
//      every gate's logits (the packer stores the gate rows right after the expert first-layer
//      rows; otherwise they are concatenated once per call);
//   2. bias + ReLU in place; the remaining expert layers are one product per expert on the block;
//   3. per row: masked softmax over the allowed experts (float accumulation), the mixture of the
//      last expert layer per task, the tower (small products on the block, the last layer a dot
//      product) and the output transform.
// The [M, T, H] mixtures and the [M, E*H] expert activations only ever exist per block, sized to
// stay in L2. The products are ATen's (MKL / oneDNN underneath); everything else is here.
// The per-block structure follows the "fused MLP" idea of FBGEMM's and oneDNN's inference paths
// (keep activations of one row tile in cache across layers); the code is our own.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "multi_task_score/multi_task_score.h"

namespace mtkernels {
namespace {

// Rows per block: enough blocks to keep every thread busy, few enough rows that one block's
// activations ([B, E*H_1 + T*E] plus the later layers) stay in a 1 MiB L2.
int64_t block_rows(int64_t rows, int64_t row_bytes) {
  constexpr int64_t kCacheBytes = 512 * 1024;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t cap = std::max<int64_t>(16, kCacheBytes / std::max<int64_t>(1, row_bytes));
  cap = std::min<int64_t>(cap, 256);
  const int64_t per_thread = (rows + threads - 1) / threads;
  int64_t block = std::min(cap, per_thread);
  // Equal blocks: 300 rows on one thread run as 2 x 150, not 256 + 44.
  const int64_t blocks = (rows + block - 1) / std::max<int64_t>(1, block);
  block = (rows + blocks - 1) / std::max<int64_t>(1, blocks);
  return std::max<int64_t>(1, block);
}

// True when `second` starts right where `first` ends in one contiguous buffer, so the two can be
// read as one matrix without a copy.
bool adjacent(const at::Tensor& first, const at::Tensor& second) {
  return first.is_contiguous() && second.is_contiguous() && first.numel() > 0 &&
         first.storage().is_alias_of(second.storage()) &&
         static_cast<const char*>(first.const_data_ptr()) + first.nbytes() ==
             static_cast<const char*>(second.const_data_ptr());
}

template <typename scalar_t>
void score_blocks(const at::Tensor& x, const MultiTaskScoreDims& d, const at::Tensor& first_weight,
                  const at::Tensor& first_bias, const std::vector<at::Tensor>& expert_weights,
                  const std::vector<at::Tensor>& expert_biases, const std::vector<uint8_t>& mask,
                  const std::vector<at::Tensor>& tower_weights, const std::vector<at::Tensor>& tower_biases,
                  at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = d.rows, E = d.experts, T = d.tasks;
  const int64_t num_expert_layers = static_cast<int64_t>(d.expert_sizes.size());
  const int64_t num_tower_layers = static_cast<int64_t>(d.tower_sizes.size());
  const int64_t H1 = d.expert_sizes[0];
  const int64_t H = d.expert_sizes.back();  // width of the mixture
  const int64_t N1 = E * H1 + T * E;

  int64_t row_elems = N1;
  for (int64_t l = 1; l < num_expert_layers; ++l) row_elems += E * d.expert_sizes[l];
  row_elems += H;
  for (int64_t k = 0; k + 1 < num_tower_layers; ++k) row_elems += d.tower_sizes[k];
  const int64_t B = block_rows(M, row_elems * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t num_blocks = (M + B - 1) / B;

  // Transposed views of the weights, made once: each product reads W^T without a copy.
  const at::Tensor first_t = first_weight.t();
  std::vector<std::vector<at::Tensor>> expert_t(num_expert_layers);
  for (int64_t l = 1; l < num_expert_layers; ++l)
    for (int64_t e = 0; e < E; ++e) expert_t[l].push_back(expert_weights[l][e].t());
  std::vector<std::vector<at::Tensor>> tower_t(num_tower_layers);
  for (int64_t k = 0; k + 1 < num_tower_layers; ++k)
    for (int64_t t = 0; t < T; ++t) tower_t[k].push_back(tower_weights[k][t].t());

  const scalar_t* b1 = first_bias.const_data_ptr<scalar_t>();
  const scalar_t* last_w = tower_weights.back().const_data_ptr<scalar_t>();  // [T, 1, G]
  const scalar_t* last_b = tower_biases.back().const_data_ptr<scalar_t>();   // [T, 1]
  const int64_t G_last_in = num_tower_layers > 1 ? d.tower_sizes[num_tower_layers - 2] : H;
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const auto opts = x.options();

  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    // Dispatch state is thread-local and OpenMP workers do not inherit it: skip autograd for the
    // products here too (this op has no backward; it also saves the autograd wrappers' overhead).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // Per-thread scratch, allocated once per chunk of blocks and reused by every block.
    at::Tensor first_buf = at::empty({B, N1}, opts);
    std::vector<at::Tensor> layer_buf(num_expert_layers);
    layer_buf[0] = first_buf;
    for (int64_t l = 1; l < num_expert_layers; ++l) layer_buf[l] = at::empty({B, E * d.expert_sizes[l]}, opts);
    at::Tensor mix_buf = at::empty({B, H}, opts);
    std::vector<at::Tensor> tower_buf(num_tower_layers);
    for (int64_t k = 0; k + 1 < num_tower_layers; ++k) tower_buf[k] = at::empty({B, d.tower_sizes[k]}, opts);
    std::vector<acc_t> gate(static_cast<size_t>(B * T * E));
    std::vector<acc_t> acc(static_cast<size_t>(std::max(H, G_last_in)));

    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t r0 = block * B;
      const int64_t nb = std::min(B, M - r0);
      const bool full = nb == B;
      auto rows_of = [&](const at::Tensor& buf) { return full ? buf : buf.narrow(0, 0, nb); };

      // 1. expert first layers and gate logits: one product.
      at::Tensor h1 = rows_of(first_buf);
      at::mm_out(h1, x.narrow(0, r0, nb), first_t);
      scalar_t* h1p = h1.data_ptr<scalar_t>();
      for (int64_t r = 0; r < nb; ++r) {
        scalar_t* row = h1p + r * N1;
        for (int64_t j = 0; j < E * H1; ++j) {
          const acc_t v = static_cast<acc_t>(row[j]) + static_cast<acc_t>(b1[j]);
          row[j] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
        }
        // 3a. masked softmax over each task's allowed experts, in float.
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* logit = row + E * H1 + t * E;
          const scalar_t* bias = b1 + E * H1 + t * E;
          const uint8_t* allowed = mask.data() + t * E;
          acc_t* g = gate.data() + (r * T + t) * E;
          acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
          for (int64_t e = 0; e < E; ++e) {
            g[e] = static_cast<acc_t>(logit[e]) + static_cast<acc_t>(bias[e]);
            if (allowed[e] && g[e] > max_logit) max_logit = g[e];
          }
          acc_t sum = 0;
          for (int64_t e = 0; e < E; ++e) {
            g[e] = allowed[e] ? std::exp(g[e] - max_logit) : acc_t(0);
            sum += g[e];
          }
          const acc_t inv = acc_t(1) / sum;
          for (int64_t e = 0; e < E; ++e) g[e] *= inv;
        }
      }

      // 2. remaining expert layers: one product per expert on the block, then bias + ReLU.
      for (int64_t l = 1; l < num_expert_layers; ++l) {
        const int64_t in_w = d.expert_sizes[l - 1], out_w = d.expert_sizes[l];
        at::Tensor in = rows_of(layer_buf[l - 1]);
        at::Tensor h = rows_of(layer_buf[l]);
        for (int64_t e = 0; e < E; ++e) {
          at::Tensor h_e = h.narrow(1, e * out_w, out_w);
          at::mm_out(h_e, in.narrow(1, e * in_w, in_w), expert_t[l][e]);
        }
        const scalar_t* b = expert_biases[l].const_data_ptr<scalar_t>();  // [E, out_w]
        scalar_t* hp = h.data_ptr<scalar_t>();
        const int64_t width = E * out_w;
        for (int64_t r = 0; r < nb; ++r) {
          scalar_t* row = hp + r * width;
          for (int64_t j = 0; j < width; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]) + static_cast<acc_t>(b[j]);
            row[j] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
          }
        }
      }
      const at::Tensor last_expert = rows_of(layer_buf[num_expert_layers - 1]);
      const scalar_t* ep = last_expert.const_data_ptr<scalar_t>();
      const int64_t ep_stride = num_expert_layers == 1 ? N1 : E * H;

      // 3b. per task: mixture, tower, transform.
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* allowed = mask.data() + t * E;
        const scalar_t* wl = last_w + t * G_last_in;
        const acc_t bl = static_cast<acc_t>(last_b[t]);
        const bool sigmoid = d.sigmoid[t];
        auto transform = [sigmoid](acc_t s) { return sigmoid ? acc_t(1) / (acc_t(1) + std::exp(-s)) : s; };
        at::Tensor mix = rows_of(mix_buf);
        scalar_t* mp = mix.data_ptr<scalar_t>();
        for (int64_t r = 0; r < nb; ++r) {
          const acc_t* g = gate.data() + (r * T + t) * E;
          const scalar_t* er = ep + r * ep_stride;
          acc_t* a = acc.data();
          std::fill(a, a + H, acc_t(0));
          for (int64_t e = 0; e < E; ++e) {
            if (!allowed[e]) continue;
            const acc_t ge = g[e];
            const scalar_t* src = er + e * H;
            for (int64_t j = 0; j < H; ++j) a[j] += ge * static_cast<acc_t>(src[j]);
          }
          if (num_tower_layers == 1) {
            acc_t s = bl;
            for (int64_t j = 0; j < H; ++j) s += a[j] * static_cast<acc_t>(wl[j]);
            out_ptr[(r0 + r) * T + t] = static_cast<scalar_t>(transform(s));
          } else {
            scalar_t* dst = mp + r * H;
            for (int64_t j = 0; j < H; ++j) dst[j] = static_cast<scalar_t>(a[j]);
          }
        }
        if (num_tower_layers > 1) {
          at::Tensor in = mix;
          for (int64_t k = 0; k + 1 < num_tower_layers; ++k) {
            at::Tensor h = rows_of(tower_buf[k]);
            at::mm_out(h, in, tower_t[k][t]);
            const int64_t width = d.tower_sizes[k];
            const scalar_t* b = tower_biases[k].const_data_ptr<scalar_t>() + t * width;
            scalar_t* hp = h.data_ptr<scalar_t>();
            for (int64_t r = 0; r < nb; ++r) {
              scalar_t* row = hp + r * width;
              for (int64_t j = 0; j < width; ++j) {
                const acc_t v = static_cast<acc_t>(row[j]) + static_cast<acc_t>(b[j]);
                row[j] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
              }
            }
            in = h;
          }
          const scalar_t* ip = in.const_data_ptr<scalar_t>();
          for (int64_t r = 0; r < nb; ++r) {
            const scalar_t* row = ip + r * G_last_in;
            acc_t s = bl;
            for (int64_t j = 0; j < G_last_in; ++j) s += static_cast<acc_t>(row[j]) * static_cast<acc_t>(wl[j]);
            out_ptr[(r0 + r) * T + t] = static_cast<scalar_t>(transform(s));
          }
        }
      }
    }
  });
}

at::Tensor multi_task_score_cpu(const at::Tensor& x_in, at::TensorList expert_weights_in,
                                at::TensorList expert_biases_in, const at::Tensor& gate_weight,
                                const at::Tensor& gate_bias, const at::Tensor& gate_mask,
                                at::TensorList tower_weights_in, at::TensorList tower_biases_in,
                                std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const MultiTaskScoreDims d =
      check_multi_task_score_inputs(x_in, expert_weights_in, expert_biases_in, gate_weight, gate_bias,
                                    gate_mask, tower_weights_in, tower_biases_in, transforms);
  const int64_t E = d.experts, T = d.tasks, D = d.width, H1 = d.expert_sizes[0];

  const at::Tensor mask_t = gate_mask.contiguous();
  const bool* mask_ptr = mask_t.const_data_ptr<bool>();
  std::vector<uint8_t> mask(static_cast<size_t>(T * E));
  for (int64_t t = 0; t < T; ++t) {
    bool any = false;
    for (int64_t e = 0; e < E; ++e) {
      mask[t * E + e] = mask_ptr[t * E + e] ? 1 : 0;
      any = any || mask_ptr[t * E + e];
    }
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task");
  }

  at::Tensor out = at::empty({d.rows, T}, x_in.options());
  if (d.rows == 0) return out;
  const at::Tensor x = x_in.stride(1) == 1 && x_in.stride(0) >= D ? x_in : x_in.contiguous();

  // The expert first layers and the gates as one [E*H_1 + T*E, D] matrix (and one bias vector):
  // free when the params come from pack_multi_task_params, one copy otherwise.
  const at::Tensor& w0 = expert_weights_in[0];
  const at::Tensor& b0 = expert_biases_in[0];
  at::Tensor first_weight, first_bias;
  if (adjacent(w0, gate_weight)) {
    first_weight = at::Tensor(w0).as_strided({E * H1 + T * E, D}, {D, 1});
  } else {
    first_weight = at::cat({w0.reshape({E * H1, D}), gate_weight.reshape({T * E, D})});
  }
  if (adjacent(b0, gate_bias)) {
    first_bias = at::Tensor(b0).as_strided({E * H1 + T * E}, {1});
  } else {
    first_bias = at::cat({b0.reshape({E * H1}), gate_bias.reshape({T * E})});
  }
  std::vector<at::Tensor> expert_weights, expert_biases, tower_weights, tower_biases;
  for (size_t l = 0; l < expert_weights_in.size(); ++l) {
    expert_weights.push_back(expert_weights_in[l].contiguous());
    expert_biases.push_back(expert_biases_in[l].contiguous());
  }
  for (size_t k = 0; k < tower_weights_in.size(); ++k) {
    tower_weights.push_back(tower_weights_in[k].contiguous());
    tower_biases.push_back(tower_biases_in[k].contiguous());
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "multi_task_score_cpu", [&] {
    score_blocks<scalar_t>(x, d, first_weight, first_bias, expert_weights, expert_biases, mask, tower_weights,
                           tower_biases, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("multi_task_score", &multi_task_score_cpu);
}

}  // namespace mtkernels
