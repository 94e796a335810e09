// multi_task_score, CPU: experts, per-task softmax gates, task towers and output transforms
// (ARCHITECTURE §3.2), float32 arithmetic throughout (bfloat16/float16 inputs are widened once).
//
// Every weight matrix is packed into 16-column panels (the BLIS / GotoBLAS layout: Goto & van de
// Geijn, "Anatomy of High-Performance Matrix Multiplication", TOMS 2008) in one float32 buffer,
// either once by `multi_task_score_pack` (the Python wrapper caches it per params object and
// repacks when a weight's version counter moves) or per call by `multi_task_score`. One
// at::parallel_for over blocks of rows then runs the whole network on a block while its
// activations sit in L2: each expert's layers (bias + ReLU fused into the store), the gate
// logits and their masked softmax, the per-task mixtures, the towers and the transforms. The
// [M, E*H_1] first-layer activations, the [M, T, H] mixtures and later layers exist only per
// block; every product runs on one register-tiled micro-kernel (6 rows x 16 columns, 12 AVX2
// accumulators), which on the 2-core EPYC this was tuned on matches MKL's sgemm rate on these
// shapes without its per-call packing.

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/packed_gemm.h"
#include "multi_task_score/multi_task_score.h"

namespace mtkernels {
namespace {

// Rows per block: the block's input rows, one expert's hidden layer and all experts' last layer
// (72 x (256 + 128 + 8*64) floats for the MMoE, about 260 KB) stay in a 512 KB L2.
constexpr int64_t kBlockRows = 72;
constexpr int64_t kOneBlockRows = 64;

// Where each layer lives in the packed buffer, derived from the network's dimensions alone, so
// a buffer packed earlier is checked against the params it is used with by its size.
struct PackedLayout {
  std::vector<PackedLayer> experts;  // L layers, E groups; layer 0 reads x (k = D)
  PackedLayer gates;                 // one group: the [T*E, D] gate logits
  std::vector<PackedLayer> towers;   // the K-1 hidden tower layers, T groups
  int64_t last_weight = 0;           // [T, G_{K-1}]: the 1-wide last tower layer, as dot products
  int64_t last_bias = 0;             // [T]
  int64_t size = 0;
};

PackedLayout packed_layout(const MultiTaskScoreDims& d) {
  PackedLayout p;
  int64_t offset = 0;
  auto add = [&](int64_t groups, int64_t n, int64_t k) {
    PackedLayer l;
    l.groups = groups;
    l.n = n;
    l.k = k;
    l.n_pad = round_up(n, kPanel);
    l.panels = offset;
    offset += groups * l.n_pad * k;
    l.bias = offset;
    offset += groups * l.n_pad;
    return l;
  };
  int64_t fan_in = d.width;
  for (int64_t h : d.expert_sizes) {
    p.experts.push_back(add(d.experts, h, fan_in));
    fan_in = h;
  }
  p.gates = add(1, d.tasks * d.experts, d.width);
  for (size_t k = 0; k + 1 < d.tower_sizes.size(); ++k) {
    p.towers.push_back(add(d.tasks, d.tower_sizes[k], fan_in));
    fan_in = d.tower_sizes[k];
  }
  p.last_weight = offset;
  offset += d.tasks * fan_in;
  p.last_bias = offset;
  offset += d.tasks;
  p.size = offset;
  return p;
}

void pack_into(const PackedLayout& p, at::TensorList expert_weights, at::TensorList expert_biases,
               const at::Tensor& gate_weight, const at::Tensor& gate_bias, at::TensorList tower_weights,
               at::TensorList tower_biases, float* buffer) {
  for (size_t l = 0; l < p.experts.size(); ++l) {
    pack_layer(p.experts[l], as_float(expert_weights[l]).const_data_ptr<float>(),
               as_float(expert_biases[l]).const_data_ptr<float>(), buffer);
  }
  pack_layer(p.gates, as_float(gate_weight).const_data_ptr<float>(), as_float(gate_bias).const_data_ptr<float>(),
             buffer);
  for (size_t k = 0; k < p.towers.size(); ++k) {
    pack_layer(p.towers[k], as_float(tower_weights[k]).const_data_ptr<float>(),
               as_float(tower_biases[k]).const_data_ptr<float>(), buffer);
  }
  const at::Tensor last_w = as_float(tower_weights.back());  // [T, 1, G]
  const at::Tensor last_b = as_float(tower_biases.back());   // [T, 1]
  std::memcpy(buffer + p.last_weight, last_w.const_data_ptr<float>(), sizeof(float) * last_w.numel());
  std::memcpy(buffer + p.last_bias, last_b.const_data_ptr<float>(), sizeof(float) * last_b.numel());
}

std::vector<uint8_t> gate_mask_bytes(const at::Tensor& gate_mask, const MultiTaskScoreDims& d) {
  const at::Tensor mask_t = gate_mask.contiguous();
  const bool* mask_ptr = mask_t.const_data_ptr<bool>();
  std::vector<uint8_t> mask(static_cast<size_t>(d.tasks * d.experts));
  for (int64_t t = 0; t < d.tasks; ++t) {
    bool any = false;
    for (int64_t e = 0; e < d.experts; ++e) {
      mask[t * d.experts + e] = mask_ptr[t * d.experts + e] ? 1 : 0;
      any = any || mask_ptr[t * d.experts + e];
    }
    TORCH_CHECK_VALUE(any, "params.gate_mask must allow at least one expert for every task");
  }
  return mask;
}

// The scoring pass: x [M, D] float32 contiguous, the packed buffer, out [M, T] float32.
void score_packed(const float* x, const MultiTaskScoreDims& d, const PackedLayout& p, const float* buffer,
                  const std::vector<uint8_t>& mask, float* out) {
  const int64_t M = d.rows, E = d.experts, T = d.tasks, D = d.width;
  const size_t L = p.experts.size();
  const int64_t H = d.expert_sizes.back();  // mixture width
  const int64_t H_pad = p.experts.back().n_pad;
  const int64_t expert_out_ld = E * H_pad;
  const int64_t G_last = p.towers.empty() ? H : p.towers.back().n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // A small call (up to kOneBlockRows rows per thread) is one block per thread. Larger calls: a
  // multiple of `threads` blocks of about kBlockRows rows, at least two per thread, so that on a
  // shared machine a descheduled thread's second block is taken by the others. (One block per
  // thread would stream the weights once per thread instead of twice, but leaves nothing to
  // take over: the thread that finished waits at the join for the descheduled one.)
  int64_t num_blocks = threads;
  if (M > threads * kOneBlockRows)
    num_blocks = round_up(std::max<int64_t>(2 * threads, (M + kBlockRows - 1) / kBlockRows), threads);
  // Whole 6-row tiles where the rows allow: the last tile of a block is computed in full over
  // rows already done (see small_gemm), so an uneven block wastes up to 5 rows per panel.
  const int64_t even = (M + num_blocks - 1) / num_blocks;
  const int64_t block = even >= kTileRows ? round_up(even, kTileRows) : std::max<int64_t>(1, even);
  num_blocks = (M + block - 1) / block;
  int64_t hidden_pad = 0;  // widest expert hidden layer (all but the last), padded
  for (size_t l = 0; l + 1 < L; ++l) hidden_pad = std::max(hidden_pad, p.experts[l].n_pad);
  int64_t tower_pad = 0;
  for (const PackedLayer& l : p.towers) tower_pad = std::max(tower_pad, l.n_pad);
  const float* last_w = buffer + p.last_weight;
  const float* last_b = buffer + p.last_bias;

  // Blocks are claimed dynamically: on a shared machine a thread that was descheduled finds the
  // work already taken by the others instead of making them wait at the join.
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, std::min(threads, num_blocks), 1, [&](int64_t, int64_t) {
    // Per-thread scratch, reused by every block of this thread; widths padded to 16 columns.
    std::vector<float> hidden[2];
    for (auto& h : hidden) h.resize(static_cast<size_t>(block * hidden_pad));
    std::vector<float> expert_out(static_cast<size_t>(block * expert_out_ld));
    std::vector<float> gate(static_cast<size_t>(block * p.gates.n_pad));
    const int64_t mix_ld = H_pad;
    std::vector<float> mix(static_cast<size_t>(block * mix_ld));
    std::vector<float> tower[2];
    for (auto& h : tower) h.resize(static_cast<size_t>(block * tower_pad));

    for (int64_t blk = next_block.fetch_add(1); blk < num_blocks; blk = next_block.fetch_add(1)) {
      const int64_t r0 = blk * block;
      const int64_t nb = std::min(block, M - r0);
      const float* xb = x + r0 * D;

      // Each expert's layers, the last one into its columns of expert_out.
      for (int64_t e = 0; e < E; ++e) {
        const float* in = xb;
        int64_t in_ld = D;
        for (size_t l = 0; l < L; ++l) {
          const bool last = l + 1 == L;
          float* dst = last ? expert_out.data() + e * H_pad : hidden[l % 2].data();
          const int64_t dst_ld = last ? expert_out_ld : p.experts[l].n_pad;
          small_gemm(nb, p.experts[l], e, buffer, in, in_ld, /*relu=*/true, dst, dst_ld);
          in = dst;
          in_ld = dst_ld;
        }
      }
      // Gate logits and the masked softmax over each task's allowed experts, in place.
      const int64_t gate_ld = p.gates.n_pad;
      small_gemm(nb, p.gates, 0, buffer, xb, D, /*relu=*/false, gate.data(), gate_ld);
      for (int64_t r = 0; r < nb; ++r) {
        for (int64_t t = 0; t < T; ++t) {
          const uint8_t* allowed = mask.data() + t * E;
          float* g = gate.data() + r * gate_ld + t * E;
          float max_logit = -std::numeric_limits<float>::infinity();
          for (int64_t e = 0; e < E; ++e)
            if (allowed[e] && g[e] > max_logit) max_logit = g[e];
          float sum = 0.f;
          for (int64_t e = 0; e < E; ++e) {
            g[e] = allowed[e] ? std::exp(g[e] - max_logit) : 0.f;
            sum += g[e];
          }
          const float inv = 1.f / sum;
          for (int64_t e = 0; e < E; ++e) g[e] *= inv;
        }
      }

      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* allowed = mask.data() + t * E;
        // mixture_t = sum over allowed experts of gate weight x expert output, per row.
        for (int64_t r = 0; r < nb; ++r) {
          const float* g = gate.data() + r * gate_ld + t * E;
          const float* er = expert_out.data() + r * expert_out_ld;
          float* m = mix.data() + r * mix_ld;
          std::fill(m, m + H, 0.f);
          for (int64_t e = 0; e < E; ++e) {
            if (!allowed[e]) continue;
            const float ge = g[e];
            const float* src = er + e * H_pad;
            for (int64_t j = 0; j < H; ++j) m[j] += ge * src[j];
          }
        }
        // tower: hidden layers on the micro-kernel, the 1-wide last layer as a dot product.
        const float* in = mix.data();
        int64_t in_ld = mix_ld;
        for (size_t k = 0; k < p.towers.size(); ++k) {
          float* dst = tower[k % 2].data();
          small_gemm(nb, p.towers[k], t, buffer, in, in_ld, /*relu=*/true, dst, p.towers[k].n_pad);
          in = dst;
          in_ld = p.towers[k].n_pad;
        }
        const float* wl = last_w + t * G_last;
        const float bl = last_b[t];
        const bool sigmoid = d.sigmoid[t];
        for (int64_t r = 0; r < nb; ++r) {
          const float* row = in + r * in_ld;
          float s = 0.f;
          for (int64_t j = 0; j < G_last; ++j) s += row[j] * wl[j];
          s += bl;
          out[(r0 + r) * T + t] = sigmoid ? 1.f / (1.f + std::exp(-s)) : s;
        }
      }
    }
  });
}

void check_native_dtype(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble,
                   "x: the native multi_task_score computes in float32; float64 input runs on "
                   "mtkernels.reference.multi_task_score (mtkernels.ops.multi_task_score routes it there)");
}

at::Tensor score(const at::Tensor& x_in, const MultiTaskScoreDims& d, const PackedLayout& p, const float* buffer,
                 const std::vector<uint8_t>& mask) {
  at::Tensor out = at::empty({d.rows, d.tasks}, x_in.options());
  if (d.rows == 0) return out;
  const at::Tensor x = as_float(x_in);
  at::Tensor out_f = x_in.scalar_type() == at::kFloat ? out : at::empty({d.rows, d.tasks}, x.options());
  score_packed(x.const_data_ptr<float>(), d, p, buffer, mask, out_f.data_ptr<float>());
  if (!out_f.is_same(out)) out.copy_(out_f);
  return out;
}

at::Tensor multi_task_score_cpu(const at::Tensor& x, at::TensorList expert_weights, at::TensorList expert_biases,
                                const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                const at::Tensor& gate_mask, at::TensorList tower_weights,
                                at::TensorList tower_biases, std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: no autograd inside
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const std::vector<uint8_t> mask = gate_mask_bytes(gate_mask, d);
  if (d.rows == 0) return at::empty({0, d.tasks}, x.options());
  const PackedLayout p = packed_layout(d);
  at::Tensor buffer = at::empty({p.size}, x.options().dtype(at::kFloat));
  pack_into(p, expert_weights, expert_biases, gate_weight, gate_bias, tower_weights, tower_biases,
            buffer.data_ptr<float>());
  return score(x, d, p, buffer.const_data_ptr<float>(), mask);
}

at::Tensor multi_task_score_pack_cpu(at::TensorList expert_weights, at::TensorList expert_biases,
                                     const at::Tensor& gate_weight, const at::Tensor& gate_bias,
                                     const at::Tensor& gate_mask, at::TensorList tower_weights,
                                     at::TensorList tower_biases, std::vector<std::string> transforms) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK_VALUE(gate_weight.dim() == 3, "params.gate_weight must have shape [T, E, D], got ",
                    gate_weight.sizes());
  // The checks take their D and dtype from x: an empty x of the gates' width and dtype.
  const at::Tensor x = at::empty({0, gate_weight.size(2)}, gate_weight.options());
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const PackedLayout p = packed_layout(d);
  at::Tensor buffer = at::empty({p.size}, x.options().dtype(at::kFloat));
  pack_into(p, expert_weights, expert_biases, gate_weight, gate_bias, tower_weights, tower_biases,
            buffer.data_ptr<float>());
  return buffer;
}

at::Tensor multi_task_score_packed_cpu(const at::Tensor& x, at::TensorList expert_weights,
                                       at::TensorList expert_biases, const at::Tensor& gate_weight,
                                       const at::Tensor& gate_bias, const at::Tensor& gate_mask,
                                       at::TensorList tower_weights, at::TensorList tower_biases,
                                       std::vector<std::string> transforms, const at::Tensor& packed) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const MultiTaskScoreDims d = check_multi_task_score_inputs(x, expert_weights, expert_biases, gate_weight,
                                                             gate_bias, gate_mask, tower_weights, tower_biases,
                                                             transforms);
  check_native_dtype(x);
  const std::vector<uint8_t> mask = gate_mask_bytes(gate_mask, d);
  const PackedLayout p = packed_layout(d);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kFloat,
                   "packed must be the float32 tensor multi_task_score_pack returns, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 1 && packed.numel() == p.size && packed.is_contiguous() &&
                        packed.device() == x.device(),
                    "packed must be the contiguous 1-D tensor of ", p.size,
                    " floats that multi_task_score_pack returns for these params (on x's device), got shape ",
                    packed.sizes(), " on ", packed.device());
  return score(x, d, p, packed.const_data_ptr<float>(), mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkernels, CPU, m) {
  m.impl("multi_task_score", &multi_task_score_cpu);
  m.impl("multi_task_score_pack", &multi_task_score_pack_cpu);
  m.impl("multi_task_score_packed", &multi_task_score_packed_cpu);
}

}  // namespace mtkernels
